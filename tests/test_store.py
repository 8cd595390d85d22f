"""The store's contract, run on SQLite and on PostgreSQL alike."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import random
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine, event, func, inspect, select, text, update

from streamhold.errors import InvalidRequestError, StreamClosedError, StreamNotFoundError
from streamhold.models import StreamFilter, format_offset, new_stream_id, parse_offset
from streamhold.settings import Settings
from streamhold.store import chunk_files, transactions
from streamhold.store.batches import PENDING_LIMIT
from streamhold.store.chunk_files import FILE_CHUNK_MIN
from streamhold.store.schema import STREAMS_FILLFACTOR, ChunkRow, GzipChunkRow, StreamRow
from streamhold.store.store import NewStream, Store
from streamhold.store.writer import IDLE_CHECKPOINT_S, QUICK_COMMIT_S

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    async with Store.open(settings) as opened:
        yield opened


async def content(store: Store, stream_id: str) -> bytes:
    state = await store.get(stream_id)
    assert state is not None
    return b"".join([piece async for piece in store.iter_content(state)])


def chunk_rows(store: Store, stream_id: str, table: type = ChunkRow) -> int:
    with store._read_engine.connect() as conn:
        return conn.execute(
            select(func.count()).select_from(table).where(table.__table__.c.stream_id == stream_id)
        ).scalar_one()


async def test_create_append_read_close(store: Store) -> None:
    state, created = await store.create(
        NewStream(namespace="export", content_type="text/csv", metadata={"u": "1"})
    )
    assert created and state.id.startswith("stream_") and state.name == state.id
    first = await store.append(state.id, b"Name,Email\n")
    second = await store.append(state.id, b"a,b@example.com\n")
    assert (first.tail, second.tail) == (11, 27)
    assert await store.read(state.id, 0, 27) == b"Name,Email\na,b@example.com\n"
    assert await store.read(state.id, 4, 10) == b",Email"
    closed = await store.append(state.id, b"", close=True)
    assert closed.closed and closed.tail == 27
    with pytest.raises(StreamClosedError):
        await store.append(state.id, b"more")
    again = await store.get(state.id)
    assert again is not None and again.closed and again.tail == 27 and again.metadata == {"u": "1"}


async def test_appends_see_what_another_store_did_to_the_stream(store: Store, settings: Settings) -> None:
    """Another process (here a second store on the same database) closes and deletes streams in between.

    On PostgreSQL the last appends go without reading the rows, which this store wrote last: they must find
    the other's changes all the same (batches.py)."""
    closing, _ = await store.create(NewStream(namespace="other", content_type="text/plain"))
    deleting, _ = await store.create(NewStream(namespace="other", content_type="text/plain"))
    for state in (closing, deleting):
        await store.append(state.id, b"one ")
    async with Store.open(settings) as other:
        await other.append(closing.id, b"two ", close=True)
        await other.delete(deleting.id)
    with pytest.raises(StreamClosedError):
        await store.append(closing.id, b"three")
    with pytest.raises(StreamNotFoundError):
        await store.append(deleting.id, b"three")
    assert await content(store, closing.id) == b"one two "


async def test_a_lost_postgres_connection_costs_no_append(
    pg_server: str, pg_url: str, tmp_path: Path
) -> None:
    """The writer's session is killed between appends: the next append reconnects and lands exactly once."""
    async with Store.open(Settings(data_dir=tmp_path, database_url=pg_url)) as store:
        state, _ = await store.create(NewStream(namespace="pg", content_type="text/plain"))
        await store.append(state.id, b"before ")
        with psycopg.connect(pg_server, autocommit=True) as admin:
            backend = store.writer._driver.info.backend_pid
            admin.execute("SELECT pg_terminate_backend(%s, 5000)", (backend,))  # waits until it has ended
        await store.append(state.id, b"after")
        assert store.writer._driver.info.backend_pid != backend
        assert await content(store, state.id) == b"before after"


async def test_postgres_appends_to_streams_another_process_writes_too_land_in_order(
    pg_url: str, tmp_path: Path
) -> None:
    """Two stores on one database take turns appending to one stream: each batch of a store writes without
    reading what that store wrote last, so each must find the other's writes and not write over them."""
    settings = Settings(data_dir=tmp_path, database_url=pg_url)
    async with Store.open(settings) as first, Store.open(settings) as second:
        state, _ = await first.create(NewStream(namespace="turns", content_type="text/plain"))
        expected = b""
        for i in range(120):
            store = (first, second)[i // 2 % 2]  # two appends each, so the second of them skips its read
            data = f"{i};".encode().ljust(300, b".")  # a chunk every few appends: the chunks' keys clash too
            result = await store.append(state.id, data)
            expected += data
            assert result.tail == len(expected)
        assert await content(first, state.id) == expected
        writers = [store.writer for store in (first, second)]
        assert all(w.unread_batches > 0 and w.changed_rows > 0 for w in writers), [
            (w.unread_batches, w.changed_rows) for w in writers
        ]
        listed = await second.get(state.id)
        assert listed is not None and (listed.tail, listed.appends) == (len(expected), 120)


async def test_postgres_streams_leave_room_for_updates_in_new_and_older_databases(
    pg_url: str, tmp_path: Path
) -> None:
    """The streams table keeps its fillfactor (HOT updates for appends), also once an older one is opened."""

    def fillfactor() -> list[str]:
        with psycopg.connect(pg_url) as conn:
            row = conn.execute("SELECT reloptions FROM pg_class WHERE oid = 'streams'::regclass").fetchone()
            return list(row[0] or []) if row else []

    settings = Settings(data_dir=tmp_path, database_url=pg_url)
    async with Store.open(settings):
        pass
    assert fillfactor() == [f"fillfactor={STREAMS_FILLFACTOR}"]
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE streams RESET (fillfactor)")  # as a database from before it was set
    assert fillfactor() == []
    async with Store.open(settings):
        pass
    assert fillfactor() == [f"fillfactor={STREAMS_FILLFACTOR}"]


async def test_quick_or_large_commits_far_from_a_checkpoint_run_on_the_loop(tmp_path: Path) -> None:
    async with Store.open(Settings(data_dir=tmp_path)) as store:
        state, _ = await store.create(NewStream(namespace="big", content_type="application/octet-stream"))
        await store.append(state.id, b"x" * 300_000)
        writer = store.writer
        assert writer.checkpoint_bytes > 64 * 1024 * 1024
        writer.commit_seconds = 0.0
        assert writer.may_commit_on_loop(300_000) and writer.may_commit_on_loop(1000)
        writer.commit_seconds = 0.5  # a slow disk: small batches go to the thread, large ones stay
        assert writer.may_commit_on_loop(300_000) and not writer.may_commit_on_loop(1000)
        await store.append(state.id, b"w")  # a quick commit eases the estimate by a tenth of the gap
        assert QUICK_COMMIT_S < writer.commit_seconds < 0.5
        wal = (tmp_path / "streamhold.db-wal").stat().st_size
        writer.checkpoint_bytes = wal + 500_000  # the next 300 KB commit could reach the checkpoint
        writer.commit_seconds = 0.0
        assert not writer.may_commit_on_loop(300_000) and writer.may_commit_on_loop(1000)
        await store.append(state.id, b"y" * 300_000)
        assert await store.read(state.id, 299_999, 300_002) == b"xwy"


async def test_an_idle_writer_checkpoints_the_wal_so_that_it_starts_over(tmp_path: Path) -> None:
    async with Store.open(Settings(data_dir=tmp_path)) as store:
        state, _ = await store.create(NewStream(namespace="idle", content_type="application/octet-stream"))
        for _ in range(20):
            await store.append(state.id, b"z" * 100_000)
        wal = tmp_path / "streamhold.db-wal"
        grown = wal.stat().st_size
        writer = store.writer
        await asyncio.sleep(IDLE_CHECKPOINT_S)
        for _ in range(50):
            if writer._checkpointed == writer.commits and writer._checkpoint is None:
                break
            await asyncio.sleep(0.1)
        await store.append(state.id, b"after")
        assert wal.stat().st_size == grown, "the next commit went to the WAL's start, not its end"
        assert await store.read(state.id, 2_000_000 - 1, 2_000_005) == b"zafter"


async def test_compressing_a_large_stream_lets_other_writes_through(store: Store) -> None:
    """Gzip runs outside write transactions; its pieces commit one by one, so appends slip in between."""
    big, _ = await store.create(NewStream(namespace="gz", content_type="application/octet-stream"))
    body = random.Random(7).randbytes(6 * 1024 * 1024)  # incompressible: about one gzip piece per MiB
    for start in range(0, len(body), 1024 * 1024):
        await store.append(big.id, body[start : start + 1024 * 1024])
    other, _ = await store.create(NewStream(namespace="gz", content_type="text/plain"))
    await store.append(big.id, b"", close=True, compress=True)
    commits = store.writer.commits
    finishing = asyncio.create_task(store.finish(big.id))
    appended = 0
    while not finishing.done():
        await store.append(other.id, b"x")
        appended += 1
    await finishing
    assert store.writer.commits - commits >= 6 + appended
    assert appended >= 2, "no append got through while the stream was being compressed"
    closed = await store.get(big.id)
    assert closed is not None and closed.compressed and await content(store, big.id) == body
    assert chunk_rows(store, big.id) == 0


async def test_an_interrupted_compression_is_redone_by_the_sweep(store: Store) -> None:
    state, _ = await store.create(NewStream(namespace="gz", content_type="text/plain"))
    text = b"".join(b"line %d\n" % i for i in range(50000))
    await store.append(state.id, text)
    await store.append_nowait(state.id, b"", close=True, compress=True)  # and the process stops here
    # What a crash in the middle of compressing leaves behind, long enough ago for the sweep to notice.
    with store._write_engine.begin() as conn:
        conn.execute(GzipChunkRow.__table__.insert().values(stream_id=state.id, seq=0, data=b"stale"))
        conn.execute(GzipChunkRow.__table__.insert().values(stream_id=state.id, seq=7, data=b"stale"))
        table = StreamRow.__table__
        conn.execute(update(table).where(table.c.id == state.id).values(closed_at=time.time() - 3600))
    assert await content(store, state.id) == text  # staged pieces are not content
    assert await store.sweep() == 0
    for _ in range(200):
        closed = await store.get(state.id)
        assert closed is not None
        if closed.compressed:
            break
        await asyncio.sleep(0.05)
    assert closed.compressed and await content(store, state.id) == text
    assert chunk_rows(store, state.id, GzipChunkRow) == 1


async def test_ids_are_uuid7_and_sort_by_time() -> None:
    ids = [new_stream_id() for _ in range(2000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    hexpart = ids[0].removeprefix("stream_")
    assert len(hexpart) == 32 and hexpart[12] == "7" and hexpart[16] in "89ab"


def test_offsets_are_fixed_width_and_sort_as_strings() -> None:
    assert format_offset(0) == "0000000000000000_0000000000000000"
    assert parse_offset(format_offset(123456)) == 123456
    assert parse_offset("12,3") is None and parse_offset("now") is None
    values = sorted(random.sample(range(10**12), 200))
    assert [format_offset(v) for v in values] == sorted(format_offset(v) for v in values)


async def test_bytes_are_stored_exactly(store: Store) -> None:
    state, _ = await store.create(NewStream(namespace="bin"))
    payload = bytes(range(256)) * 400
    for start in range(0, len(payload), 7000):
        await store.append(state.id, payload[start : start + 7000])
    assert await content(store, state.id) == payload


async def test_concurrent_appends_keep_call_order_and_never_interleave(store: Store) -> None:
    state, _ = await store.create(NewStream(namespace="order"))
    writes = [f"<{i:04d}:{'x' * (i % 50)}>".encode() for i in range(600)]
    futures = [store.append_nowait(state.id, w) for w in writes]
    snapshots = []
    for _ in range(5):
        current = await store.get(state.id)
        assert current is not None
        snapshots.append(await store.read(state.id, 0, current.tail))
        await asyncio.sleep(0)
    results = await asyncio.gather(*futures)
    final = b"".join(writes)
    assert await content(store, state.id) == final
    assert [r.tail for r in results] == sorted(r.tail for r in results)
    assert all(final.startswith(s) for s in snapshots), "every read is a prefix of the final content"
    assert store.writer.commits < len(writes) / 5, "concurrent appends are committed together"


async def test_tiny_appends_are_coalesced_and_read_with_few_queries(store: Store, settings: Settings) -> None:
    state, _ = await store.create(NewStream(namespace="tokens", content_type="text/plain"))
    rng = random.Random(7)
    writes = [bytes(rng.choice(b"abcdefghij ") for _ in range(rng.randint(1, 20))) for _ in range(4000)]
    for start in range(0, 4000, 40):  # 100 rounds of 40 concurrent writes: many small chunks
        await asyncio.gather(*(store.append_nowait(state.id, w) for w in writes[start : start + 40]))
    await store.append(state.id, b"", close=True)
    await store.finish(state.id)
    assert chunk_rows(store, state.id) <= 2, "a closed stream's small chunks are merged"
    queries = 0

    def count(*_: object) -> None:
        nonlocal queries
        queries += 1

    event.listen(store._read_engine, "before_cursor_execute", count)
    try:
        assert await content(store, state.id) == b"".join(writes)
    finally:
        event.remove(store._read_engine, "before_cursor_execute", count)
    assert queries <= 6, f"read back with {queries} queries"


async def test_open_stream_compacts_in_the_background(store: Store) -> None:
    state, _ = await store.create(NewStream(namespace="tokens"))
    lines = [b"%06d," % i + b"x" * 400 for i in range(1000)]  # about 200 chunks of PENDING_LIMIT bytes
    for line in lines:
        await store.append(state.id, line)
    await asyncio.sleep(0.2)
    for _ in range(50):
        if chunk_rows(store, state.id) < 100:
            break
        await asyncio.sleep(0.1)
    assert chunk_rows(store, state.id) < 100
    assert await content(store, state.id) == b"".join(lines)


def pending_bytes(store: Store, stream_id: str) -> int:
    with store._read_engine.connect() as conn:
        table = StreamRow.__table__
        query = select(func.length(table.c.pending)).where(table.c.id == stream_id)
        return conn.execute(query).scalar_one()


async def test_small_appends_wait_in_the_stream_record_and_read_at_any_offset(
    store: Store, settings: Settings
) -> None:
    """Small appends collect in the stream's record until they fill a chunk; reads see them at once."""
    rng = random.Random(11)
    streams = [(await store.create(NewStream(namespace="tokens")))[0].id for _ in range(4)]
    written: dict[str, bytes] = {s: b"" for s in streams}
    for _ in range(150):
        batch = [(s, rng.randbytes(rng.randint(1, 40))) for s in streams]
        await asyncio.gather(*(store.append(s, data) for s, data in batch))
        for s, data in batch:
            written[s] += data
    for s, data in written.items():
        assert chunk_rows(store, s) <= len(data) // PENDING_LIMIT, "small appends share chunks"
        assert 0 < pending_bytes(store, s) < PENDING_LIMIT
        for _ in range(40):
            lo = rng.randrange(len(data))
            hi = rng.randrange(lo, len(data) + 1)
            assert await store.read(s, lo, hi) == data[lo:hi]
        assert await content(store, s) == data
    first = streams[0]
    async with Store.open(settings) as reopened:  # the pending bytes are as durable as any
        assert await content(reopened, first) == written[first]
        big = rng.randbytes(300_000)
        await reopened.append(first, big)
        assert pending_bytes(reopened, first) == 0
        assert await reopened.read(first, len(written[first]) - 5, len(written[first]) + 5) == (
            written[first][-5:] + big[:5]
        )
        await reopened.append(first, b"end", close=True)
        assert pending_bytes(reopened, first) == 0, "closing puts the pending bytes in a chunk"
    assert await content(store, first) == written[first] + big + b"end"


async def test_a_database_from_before_pending_bytes_is_upgraded(settings: Settings) -> None:
    async with Store.open(settings) as store:
        state, _ = await store.create(NewStream(namespace="old"))
        await store.append(state.id, b"x" * 5000)
    engine = create_engine(settings.sqlalchemy_url)
    with engine.begin() as conn:  # the schema as an earlier version left it
        conn.execute(text("ALTER TABLE streams DROP COLUMN pending"))
        conn.execute(text("CREATE INDEX ix_streams_stored_bytes ON streams (stored_bytes)"))
        conn.execute(text("ALTER TABLE chunks DROP COLUMN file_bytes"))
    async with Store.open(settings) as store:
        with engine.connect() as conn:
            assert "ix_streams_stored_bytes" not in {i["name"] for i in inspect(conn).get_indexes("streams")}
            assert "file_bytes" in {c["name"] for c in inspect(conn).get_columns("chunks")}
        engine.dispose()
        assert await content(store, state.id) == b"x" * 5000
        await store.append(state.id, b"small")
        assert pending_bytes(store, state.id) == 5
        assert await content(store, state.id) == b"x" * 5000 + b"small"
        large = random.Random(5).randbytes(FILE_CHUNK_MIN)
        await store.append(state.id, large)
        assert await content(store, state.id) == b"x" * 5000 + b"small" + large


def file_chunks(store: Store, stream_id: str) -> list[tuple[int, int, int]]:
    """The stream's chunks as (start, bytes in the row, bytes in its chunk file)."""
    c = ChunkRow.__table__.c
    with store._read_engine.connect() as conn:
        query = select(c.start, func.length(c.data), c.file_bytes).where(c.stream_id == stream_id)
        return [tuple(row) for row in conn.execute(query.order_by(c.start))]


async def test_large_appends_live_in_a_chunk_file_and_read_at_any_offset(
    store: Store, settings: Settings
) -> None:
    """On SQLite a large append goes to the stream's chunk file; reads mix files, chunks and pending bytes."""
    rng = random.Random(3)
    state, _ = await store.create(NewStream(namespace="files"))
    pieces = [
        rng.randbytes(100),  # pending
        rng.randbytes(FILE_CHUNK_MIN),  # the pending bytes make a chunk, this a file chunk
        rng.randbytes(3 * FILE_CHUNK_MIN + 7),  # right after the last: read together
        rng.randbytes(PENDING_LIMIT + 1),  # a chunk in the database
        rng.randbytes(FILE_CHUNK_MIN - 1),  # just too small for a file
        rng.randbytes(FILE_CHUNK_MIN * 2),
        rng.randbytes(10),  # pending again
    ]
    for piece in pieces:
        await store.append(state.id, piece)
    data = b"".join(pieces)
    rows = file_chunks(store, state.id)
    in_files = [(start, size) for start, in_row, size in rows if size]
    if settings.is_sqlite:
        assert store.files is not None and store.files.path(state.id).exists()
        ends = [sum(map(len, pieces[:i])) for i in range(len(pieces))]
        assert in_files == [(ends[1], len(pieces[1])), (ends[2], len(pieces[2])), (ends[5], len(pieces[5]))]
        assert all(in_row == 0 for _, in_row, size in rows if size)
    else:
        assert in_files == [] and store.files is None
    bounds = [0, len(data)] + [sum(map(len, pieces[:i])) + d for i in range(1, 7) for d in (-1, 0, 1)]
    for _ in range(60):
        lo, hi = sorted(rng.choice(bounds + [rng.randrange(len(data))]) for _ in range(2))
        assert await store.read(state.id, lo, hi) == data[lo:hi]
    assert await content(store, state.id) == data
    async with Store.open(settings) as reopened:
        assert await content(reopened, state.id) == data
        fork, _ = await reopened.create(NewStream(namespace="files", fork_from=state.name))
        assert await content(reopened, fork.id) == data
    if store.files is not None:
        assert store.files.path(state.id).stat().st_size > len(data), "the file grows ahead of its writes"
    await store.append(state.id, b"", close=True)
    await store.finish(state.id)  # compaction merges small chunks only
    assert await content(store, state.id) == data
    assert [(s, n) for s, _, n in file_chunks(store, state.id) if n] == in_files
    if store.files is not None:
        assert store.files.path(state.id).stat().st_size <= len(data), "closing gives the spare space back"


async def test_bytes_a_failed_commit_left_in_a_chunk_file_are_never_read(tmp_path: Path) -> None:
    async with Store.open(Settings(data_dir=tmp_path)) as store:
        state, _ = await store.create(NewStream(namespace="files"))
        first = random.Random(1).randbytes(FILE_CHUNK_MIN)
        await store.append(state.id, first)
        assert store.files is not None
        claim = store.files.claim(state.id)
        assert claim is not None
        store.files.write([(claim, len(first), b"\xff" * 3 * FILE_CHUNK_MIN)])  # never committed
        claim.close()
        second = random.Random(2).randbytes(FILE_CHUNK_MIN + 5)
        await store.append(state.id, b"small")
        await store.append(state.id, second)
        assert await content(store, state.id) == first + b"small" + second


async def test_a_spooled_body_is_only_synced_at_its_commit(tmp_path: Path) -> None:
    """A body written into the file as it arrived is where its append lands: the commit syncs it."""
    rng = random.Random(6)
    async with Store.open(Settings(data_dir=tmp_path)) as store:
        state, _ = await store.create(NewStream(namespace="files"))
        first = rng.randbytes(100)  # pending in the stream's record: the file starts after it
        await store.append(state.id, first)
        body = rng.randbytes(3 * FILE_CHUNK_MIN + 11)
        spool = await store.spool(state.id, len(body))
        assert spool is not None and spool.offset == len(first)
        for start in range(0, len(body), 50_000):
            spool.add(body[start : start + 50_000])
        result = await store.append(state.id, body, spool=spool)
        assert result.tail == len(first) + len(body)
        assert store.writer.spooled == 1
        assert spool.claim.fd == -1, "the writer closed the spool"
        assert [(s, n) for s, _, n in file_chunks(store, state.id) if n] == [(len(first), len(body))]
        assert await content(store, state.id) == first + body
        assert await store.read(state.id, 90, 70_000) == (first + body)[90:70_000]


async def test_a_spool_overtaken_by_other_appends_lands_after_them(tmp_path: Path) -> None:
    """Appends that commit while a body arrives come first; the file stays the spool's, so theirs go in the
    database, and the spooled body is written again where its append lands."""
    rng = random.Random(7)
    async with Store.open(Settings(data_dir=tmp_path)) as store:
        state, _ = await store.create(NewStream(namespace="files"))
        body = rng.randbytes(2 * FILE_CHUNK_MIN)
        spool = await store.spool(state.id, len(body))
        assert spool is not None and spool.offset == 0
        spool.add(body[:FILE_CHUNK_MIN])
        other = rng.randbytes(FILE_CHUNK_MIN + 3)
        await store.append(state.id, b"small")
        await store.append(state.id, other)
        spool.add(body[FILE_CHUNK_MIN:])
        await store.append(state.id, body, spool=spool)
        assert store.writer.spooled == 0
        start = len(b"small") + len(other)
        assert [(s, n) for s, _, n in file_chunks(store, state.id) if n] == [(start, len(body))]
        assert await content(store, state.id) == b"small" + other + body
        later = rng.randbytes(FILE_CHUNK_MIN)
        await store.append(state.id, later)  # the spool let go of the file
        assert file_chunks(store, state.id)[-1][2] == len(later)
        assert await content(store, state.id) == b"small" + other + body + later


async def test_a_spool_keeps_another_store_out_of_the_file(tmp_path: Path) -> None:
    """Another store (another process) cannot claim a file a spool holds; its large append goes into the
    database instead of waiting, and each store reads what both wrote."""
    rng = random.Random(8)
    settings = Settings(data_dir=tmp_path)
    async with Store.open(settings) as mine, Store.open(settings) as theirs:
        state, _ = await mine.create(NewStream(namespace="files"))
        body = rng.randbytes(FILE_CHUNK_MIN)
        spool = await mine.spool(state.id, len(body))
        assert spool is not None
        assert await theirs.spool(state.id, len(body)) is None
        spool.add(body)
        big = rng.randbytes(2 * FILE_CHUNK_MIN)
        await theirs.append(state.id, big)
        assert file_chunks(theirs, state.id) == [(0, len(big), 0)]
        await mine.append(state.id, body, spool=spool)
        assert file_chunks(mine, state.id)[-1] == (len(big), 0, len(body))
        assert await content(mine, state.id) == big + body
        assert await content(theirs, state.id) == big + body


async def test_a_file_being_spooled_into_is_not_removed_as_unused(tmp_path: Path) -> None:
    """A new stream's file has no chunk until its first large append commits; a removal meanwhile (another
    process starting) must leave it, or the append would be written to a file no longer there."""
    body = random.Random(10).randbytes(FILE_CHUNK_MIN)
    async with Store.open(Settings(data_dir=tmp_path)) as store:
        assert store.files is not None
        state, _ = await store.create(NewStream(namespace="files"))
        spool = await store.spool(state.id, len(body))
        assert spool is not None
        spool.add(body)
        remove = functools.partial(transactions.remove_unused_files, files=store.files, stream_ids=[state.id])
        await store.writer.call(remove)
        assert store.files.path(state.id).exists()
        await store.append(state.id, body, spool=spool)
        assert store.writer.spooled == 1
    async with Store.open(Settings(data_dir=tmp_path)) as reopened:
        assert await content(reopened, state.id) == body


async def test_a_held_file_of_a_deleted_stream_is_removed_once_let_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream deleted while a large append arrives keeps its file only until that append lets go of it;
    a spool for a stream that cannot take the append leaves no file behind."""
    monkeypatch.setattr(chunk_files, "REMOVE_GRACE", 0.2)
    body = random.Random(11).randbytes(FILE_CHUNK_MIN)
    async with Store.open(Settings(data_dir=tmp_path)) as store:
        assert store.files is not None
        state, _ = await store.create(NewStream(namespace="files"))
        await store.append(state.id, body)
        spool = await store.spool(state.id, len(body))
        assert spool is not None
        await store.delete(state.id)
        await asyncio.sleep(0.6)
        assert store.files.path(state.id).exists(), "held by the append still arriving"
        spool.close()  # the append then fails: its stream was deleted
        for _ in range(100):
            if not store.files.path(state.id).exists():
                break
            await asyncio.sleep(0.05)
        assert not store.files.path(state.id).exists()
        assert await store.spool(state.id, len(body)) is None
        assert not store.files.path(state.id).exists()


def record_directory_syncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """From now on, the descriptors of the directories that are fsynced, in order."""
    synced: list[int] = []
    fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            synced.append(fd)
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return synced


async def test_the_first_commit_into_a_file_syncs_its_name_whoever_made_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spool that creates a file and then fails leaves the file's name unsynced: the first commit that
    refers to it syncs the directory, once."""
    rng = random.Random(12)
    async with Store.open(Settings(data_dir=tmp_path)) as store:
        state, _ = await store.create(NewStream(namespace="files"))
        spool = await store.spool(state.id, FILE_CHUNK_MIN)
        assert spool is not None and spool.claim.created
        spool.close()  # its client went away
        synced = record_directory_syncs(monkeypatch)
        first, second = rng.randbytes(FILE_CHUNK_MIN), rng.randbytes(FILE_CHUNK_MIN)
        await store.append(state.id, first)
        assert len(synced) == 1
        await store.append(state.id, second)
        assert len(synced) == 1
        assert await content(store, state.id) == first + second


async def test_a_file_holds_no_blocks_for_bytes_kept_in_the_database(tmp_path: Path) -> None:
    rng = random.Random(13)
    async with Store.open(Settings(data_dir=tmp_path)) as store:
        assert store.files is not None
        state, _ = await store.create(NewStream(namespace="files"))
        prefix = [rng.randbytes(4096) for _ in range(256)]  # 1 MiB in the database
        for piece in prefix:
            await store.append(state.id, piece)
        body = rng.randbytes(FILE_CHUNK_MIN)
        await store.append(state.id, body)
        assert file_chunks(store, state.id)[-1] == (1 << 20, 0, len(body))
        allocated = store.files.path(state.id).stat().st_blocks * 512
        end = (1 << 20) + len(body)
        assert allocated <= 2 * end - (1 << 20), "nothing allocated below the file's first chunk"
        assert await content(store, state.id) == b"".join(prefix) + body


async def test_a_stream_without_a_file_is_not_looked_at_again_after_delete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chunk_files, "REMOVE_GRACE", 0.05)
    calls: list[list[str]] = []
    remove = transactions.remove_unused_files

    def counted(conn: Any, files: chunk_files.ChunkFiles, stream_ids: list[str]) -> Any:
        calls.append(stream_ids)
        return remove(conn, files, stream_ids)

    monkeypatch.setattr(transactions, "remove_unused_files", counted)
    async with Store.open(Settings(data_dir=tmp_path)) as store:
        state, _ = await store.create(NewStream(namespace="files"))
        await store.append(state.id, b"small")
        await store.delete(state.id)
        await asyncio.sleep(0.5)
    assert [ids for ids in calls if ids] == [[state.id]], "a missing file is not a held one"


def test_a_removal_that_fails_lets_go_of_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = chunk_files.ChunkFiles(tmp_path)
    stream_id = new_stream_id()
    files.path(stream_id).write_bytes(b"unused")

    def refused(stream_id: str) -> None:
        raise PermissionError("read-only")

    monkeypatch.setattr(files, "remove", refused)
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    ChunkRow.__table__.create(engine)
    with engine.begin() as conn, pytest.raises(PermissionError):
        transactions.remove_unused_files(conn, files, [stream_id])
    claim = files.claim(stream_id)
    assert claim is not None, "the lock was released"
    claim.close()


def test_a_file_made_anew_has_its_name_synced_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = chunk_files.ChunkFiles(tmp_path)
    stream_id = new_stream_id()
    synced = record_directory_syncs(monkeypatch)

    def commit(committed: bool) -> None:
        claim = files.claim(stream_id)
        assert claim is not None
        files.write([(claim, 0, b"bytes")])
        if committed:
            files.committed()
        claim.close()

    commit(False)  # made the file and synced its name, but the commit failed
    assert len(synced) == 1
    commit(True)  # so the next commit that refers to the file syncs its name again
    assert len(synced) == 2
    commit(True)
    assert len(synced) == 2, "a name stays durable once a commit referring to it has succeeded"
    files.remove(stream_id)
    commit(True)  # a file made anew has its name synced, whatever this process synced before
    assert len(synced) == 3


def test_a_claim_on_a_file_removed_before_it_was_locked_opens_a_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = chunk_files.ChunkFiles(tmp_path)
    stream_id = new_stream_id()
    files.path(stream_id).write_bytes(b"unused")
    opened = os.open

    def open_as_a_removal_unlinks_it(path: Any, flags: int, mode: int = 0o777) -> int:
        fd = opened(path, flags, mode)
        if not flags & os.O_CREAT:
            os.unlink(path)
        return fd

    monkeypatch.setattr(os, "open", open_as_a_removal_unlinks_it)
    claim = files.claim(stream_id)
    monkeypatch.undo()
    assert claim is not None and claim.created
    assert os.path.samestat(os.fstat(claim.fd), files.path(stream_id).stat())
    claim.close()


async def test_chunk_files_go_with_their_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deleting or compressing a stream removes its file after a grace; a start removes leftover files."""
    monkeypatch.setattr(chunk_files, "REMOVE_GRACE", 1.0)
    large = random.Random(4).randbytes(2 * FILE_CHUNK_MIN)
    async with Store.open(Settings(data_dir=tmp_path)) as store:
        assert store.files is not None
        deleted, _ = await store.create(NewStream(namespace="files"))
        packed, _ = await store.create(NewStream(namespace="files"))
        kept, _ = await store.create(NewStream(namespace="files"))
        for state in (deleted, packed, kept):
            await store.append(state.id, large)
        await store.delete(deleted.id)
        assert store.files.path(deleted.id).exists(), "a read may still be under way"
        await store.append(packed.id, b"", close=True, compress=True)
        await store.finish(packed.id)
        gone = (store.files.path(deleted.id), store.files.path(packed.id))
        for _ in range(100):
            if not any(path.exists() for path in gone):
                break
            await asyncio.sleep(0.05)
        assert not any(path.exists() for path in gone)
        assert await content(store, packed.id) == large
        leftover = store.files.path(new_stream_id())
        leftover.write_bytes(b"left by a process that stopped")
    async with Store.open(Settings(data_dir=tmp_path)) as store:
        assert store.files is not None
        assert leftover.exists(), "a new file may belong to a commit under way elsewhere"
        assert await content(store, kept.id) == large
    await asyncio.sleep(1.1)
    async with Store.open(Settings(data_dir=tmp_path)) as store:
        assert store.files is not None
        assert not leftover.exists() and store.files.path(kept.id).exists()
        assert await content(store, kept.id) == large


async def test_list_filters_sorts_and_pages(store: Store) -> None:
    for i in range(12):
        namespace = "export" if i % 2 else "audit"
        meta = {"user": f"u{i % 3}", "kind": "csv"}
        state, _ = await store.create(NewStream(namespace=namespace, metadata=meta))
        await store.append(state.id, b"x" * i)
    total, page = await store.list(StreamFilter(namespace="export"), limit=4)
    assert total == 6 and len(page) == 4 and all(s.namespace == "export" for s in page)
    assert [s.created_at for s in page] == sorted((s.created_at for s in page), reverse=True)
    total, page = await store.list(StreamFilter(metadata=(("user", "u1"), ("kind", "csv"))))
    assert total == 4 and all(s.metadata["user"] == "u1" for s in page)
    total, page = await store.list(StreamFilter(), sort="size", direction="asc", limit=3, offset=2)
    assert total == 12 and [s.tail for s in page] == [2, 3, 4]
    with pytest.raises(Exception, match="limit"):
        await store.list(StreamFilter(), limit=1001)
    summary = await store.summary()
    assert summary["streams"] == 12 and {n["namespace"] for n in summary["namespaces"]} == {"audit", "export"}


async def test_delete_reclaims_storage(store: Store) -> None:
    state, _ = await store.create(NewStream(namespace="tmp", metadata={"a": "b"}))
    await store.append(state.id, b"data" * 1000)
    await store.delete(state.id)
    assert await store.get(state.id) is None
    assert chunk_rows(store, state.id) == 0
    with pytest.raises(StreamNotFoundError):
        await store.delete(state.id)


async def test_bulk_delete_takes_one_transaction_per_page(store: Store) -> None:
    made = [(await store.create(NewStream(namespace="bulk")))[0] for _ in range(30)]
    await store.create(NewStream(namespace="kept"))
    for state in made[:5]:
        await store.append(state.id, b"data")
    commits = store.writer.commits
    assert await store.delete_matching(StreamFilter(namespace="bulk")) == 30
    assert store.writer.commits - commits == 1
    assert (await store.list(StreamFilter(namespace="bulk")))[1] == []
    assert len((await store.list(StreamFilter(namespace="kept")))[1]) == 1
    assert all(chunk_rows(store, state.id) == 0 for state in made[:5])


async def test_expired_streams_vanish_at_once_and_are_swept(store: Store) -> None:
    state, _ = await store.create(NewStream(namespace="tmp", ttl_seconds=60))
    assert state.expires_at is not None and abs(state.expires_at - time.time() - 60) < 5
    await store.append(state.id, b"soon gone")
    with store._write_engine.begin() as conn:
        conn.execute(
            update(StreamRow.__table__).where(StreamRow.__table__.c.id == state.id).values(expires_at=1.0)
        )
    expired = await store.get(state.id)
    assert expired is not None and expired.expired()
    total, _ = await store.list(StreamFilter(namespace="tmp"))
    assert total == 0
    with pytest.raises(StreamNotFoundError):
        await store.append(state.id, b"late")
    assert await store.sweep() == 1
    assert await store.get(state.id) is None and chunk_rows(store, state.id) == 0


async def test_compression_at_close_keeps_content_and_saves_space(store: Store) -> None:
    state, _ = await store.create(NewStream(namespace="export", content_type="text/csv"))
    rows = b"".join(b"%d,user%d@example.com,2026-11-24\n" % (i, i) for i in range(20000))
    for start in range(0, len(rows), 65536):
        await store.append(state.id, rows[start : start + 65536])
    await store.append(state.id, b"", close=True, compress=True)
    await store.finish(state.id)
    closed = await store.get(state.id)
    assert closed is not None and closed.compressed and closed.tail == len(rows)
    assert closed.stored_bytes < len(rows) / 3
    assert chunk_rows(store, state.id) == 0 and chunk_rows(store, state.id, GzipChunkRow) >= 1
    assert await content(store, state.id) == rows
    middle = b"".join([p async for p in store.iter_content(closed, 1000, 5000)])
    assert middle == rows[1000:5000]
    forked = NewStream(namespace="export", content_type="text/csv", fork_from=closed.name, fork_offset=5000)
    fork, _ = await store.create(forked)
    assert await content(store, fork.id) == rows[:5000]
    with pytest.raises(InvalidRequestError, match="fork offset"):
        await store.create(dataclasses.replace(forked, fork_offset=len(rows) + 1))
