"""Forks share their source's bytes below the fork offset: creating one copies nothing, on both engines."""

from __future__ import annotations

import asyncio
import random
import time
import zlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import func, select, update

from streamhold.settings import Settings
from streamhold.store import chunk_files, transactions
from streamhold.store.schema import ChunkRow, StreamRow
from streamhold.store.store import NewStream, Store

pytestmark = pytest.mark.timeout(120)

MIB = 1024 * 1024


@pytest.fixture
async def store(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Store]:
    monkeypatch.setattr(chunk_files, "REMOVE_GRACE", 0.05)  # unused chunk files go at once
    async with Store.open(settings) as opened:
        yield opened


async def content(store: Store, stream_id: str) -> bytes:
    state = await store.get(stream_id)
    assert state is not None
    return b"".join([piece async for piece in store.iter_content(state)])


def stored(store: Store, stream_id: str) -> tuple[int, int]:
    """How many chunks a stream has, and how many bytes they hold."""
    c = ChunkRow.__table__.c
    with store._read_engine.connect() as conn:
        count, size = conn.execute(
            select(func.count(), func.coalesce(func.sum(func.length(c.data) + c.file_bytes), 0)).where(
                c.stream_id == stream_id
            )
        ).one()
    return int(count), int(size)


async def large_stream(store: Store, name: str, size: int, seed: int) -> tuple[str, bytes]:
    state, _ = await store.create(NewStream(namespace="forks", name=name))
    body = random.Random(seed).randbytes(size)
    for start in range(0, size, MIB):
        await store.append(state.id, body[start : start + MIB])
    return state.id, body


async def reads_match(store: Store, stream_id: str, expected: bytes, boundaries: list[int]) -> None:
    """Whole content, and reads at and across each boundary, equal `expected`."""
    assert await content(store, stream_id) == expected
    for at in boundaries:
        for lo, hi in ((at - 7, at + 7), (0, at), (at, len(expected)), (at - 1, at)):
            lo, hi = max(lo, 0), min(hi, len(expected))
            assert await store.read(stream_id, lo, hi) == expected[lo:hi], (lo, hi)


async def test_forking_a_large_stream_copies_nothing_and_holds_no_write_up(store: Store) -> None:
    source_id, body = await large_stream(store, "big", 24 * MIB, 1)
    other, _ = await store.create(NewStream(namespace="forks", name="other"))
    forking = asyncio.create_task(store.create(NewStream(namespace="forks", name="copy", fork_from="big")))
    slowest = 0.0
    while not forking.done():
        began = time.perf_counter()
        await store.append(other.id, b"x")
        slowest = max(slowest, time.perf_counter() - began)
    fork, created = await forking
    assert created and fork.tail == len(body)
    assert stored(store, fork.id) == (0, 0), "the fork copied its source's bytes"
    assert slowest < 1.0
    await store.append(fork.id, b"own bytes")
    await reads_match(store, fork.id, body + b"own bytes", [len(body), MIB, 5 * MIB + 3])
    await store.append(source_id, b"later")
    assert await content(store, fork.id) == body + b"own bytes", "the source's later bytes leaked in"


async def test_a_fork_outlives_its_deleted_source(store: Store) -> None:
    source_id, body = await large_stream(store, "src", 3 * MIB + 5, 2)
    fork, _ = await store.create(
        NewStream(namespace="forks", name="f", fork_from="src", fork_offset=2 * MIB + 1)
    )
    await store.append(fork.id, b"tail of the fork")
    expected = body[: 2 * MIB + 1] + b"tail of the fork"
    await store.delete(source_id)
    await store.sweep()
    await asyncio.sleep(0.3)  # a removal of the source's chunk file would have happened by now
    await reads_match(store, fork.id, expected, [2 * MIB + 1, MIB])
    assert store.files is None or store.files.path(source_id).exists()
    await store.delete(fork.id)
    await store.sweep()
    assert await store.get(source_id) is None, "the deleted source was kept after its last fork went"
    assert stored(store, source_id) == (0, 0) and stored(store, fork.id) == (0, 0)
    if store.files is not None:
        for _ in range(100):
            if not store.files.path(source_id).exists():
                break
            await asyncio.sleep(0.05)
        assert not store.files.path(source_id).exists(), "the source's chunk file outlived it"


async def test_a_source_that_expires_stays_readable_through_its_fork(store: Store) -> None:
    source_id, body = await large_stream(store, "old", 2 * MIB, 3)
    fork, _ = await store.create(
        NewStream(namespace="forks", name="young", fork_from="old", ttl_seconds=3600)
    )
    table = StreamRow.__table__
    with store._write_engine.begin() as conn:
        conn.execute(update(table).where(table.c.id == source_id).values(expires_at=1.0))
    again, created = await store.create(NewStream(namespace="forks", name="old"))  # the name is free at once
    assert created and again.id != source_id and again.tail == 0
    await store.sweep()
    await asyncio.sleep(0.3)
    assert await content(store, fork.id) == body
    await store.delete(fork.id)
    await store.sweep()
    assert await store.get(source_id) is None and stored(store, source_id) == (0, 0)


async def test_a_fork_of_a_compressed_source_and_one_made_before_compression(store: Store) -> None:
    text = b"".join(b"%d,user%d@example.com\n" % (i, i) for i in range(60000))
    state, _ = await store.create(NewStream(namespace="forks", name="csv", content_type="text/csv"))
    for start in range(0, len(text), 100_000):
        await store.append(state.id, text[start : start + 100_000])
    early, _ = await store.create(
        NewStream(namespace="forks", name="early", content_type="text/csv", fork_from="csv")
    )
    await store.append(state.id, b"", close=True, compress=True)
    await store.finish(state.id)
    closed = await store.get(state.id)
    assert closed is not None and closed.compressed and stored(store, state.id) == (0, 0)
    await asyncio.sleep(0.3)
    await store.append(early.id, b"x,y\n")
    await reads_match(store, early.id, text + b"x,y\n", [len(text), 1000])
    late, _ = await store.create(
        NewStream(
            namespace="forks", name="late", content_type="text/csv", fork_from="csv", fork_offset=500_001
        )
    )
    assert stored(store, late.id) == (0, 0)
    await store.append(late.id, b"z\n")
    await reads_match(store, late.id, text[:500_001] + b"z\n", [500_001, 77])
    await store.append(late.id, b"", close=True, compress=True)  # its gzip body holds its prefix too
    await store.finish(late.id)
    await store.delete(state.id)
    await store.delete(early.id)
    await store.sweep()
    packed = await store.get(late.id)
    assert packed is not None and packed.compressed and stored(store, late.id) == (0, 0)
    await reads_match(store, late.id, text[:500_001] + b"z\n", [500_001, 77])


async def test_forks_of_forks_read_through_every_level_after_deletes(store: Store) -> None:
    root_id, body = await large_stream(store, "root", 2 * MIB, 4)
    one, _ = await store.create(NewStream(namespace="forks", name="one", fork_from="root", fork_offset=MIB))
    await store.append(one.id, b"A" * 70_000)  # a chunk file of its own on SQLite
    await store.append(one.id, b"a")
    two, _ = await store.create(
        NewStream(namespace="forks", name="two", fork_from="one", fork_offset=MIB + 500)
    )
    await store.append(two.id, b"B" * 10)
    await store.append(root_id, b"root later")
    await store.append(one.id, b"one later")
    expected_one = body[:MIB] + b"A" * 70_000 + b"a" + b"one later"
    expected_two = body[:MIB] + b"A" * 500 + b"B" * 10
    await reads_match(store, two.id, expected_two, [MIB, MIB + 500])
    await store.delete(one.id)
    await store.delete(root_id)
    await store.sweep()
    await asyncio.sleep(0.3)
    await reads_match(store, two.id, expected_two, [MIB, MIB + 500])
    kept = await store.get(two.id)
    assert kept is not None and kept.stored_bytes == 10 and stored(store, two.id)[1] <= 10
    await store.delete(two.id)
    await store.sweep()
    for stream_id in (root_id, one.id, two.id):
        assert await store.get(stream_id) is None and stored(store, stream_id) == (0, 0)
    assert len(expected_one) > MIB


async def test_reading_a_fork_of_a_compressed_source_inflates_it_once(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = b"".join(b"row %d of the export\n" % i for i in range(400_000))  # about 9 MiB
    state, _ = await store.create(NewStream(namespace="forks", name="gz", content_type="text/plain"))
    for start in range(0, len(text), MIB):
        await store.append(state.id, text[start : start + MIB])
    await store.append(state.id, b"", close=True, compress=True)
    await store.finish(state.id)
    fork, _ = await store.create(
        NewStream(namespace="forks", name="gz-fork", content_type="text/plain", fork_from="gz")
    )
    await store.append(fork.id, b"more\n")
    inflated = [0]  # plain bytes out of every inflater (a bounded inflater is fed the same input again)
    make_inflater = zlib.decompressobj

    class Counted:
        def __init__(self, *args: Any) -> None:
            self._inflater = make_inflater(*args)

        def decompress(self, data: bytes, *args: Any) -> bytes:
            out = self._inflater.decompress(data, *args)
            inflated[0] += len(out)
            return out

        def __getattr__(self, name: str) -> Any:
            return getattr(self._inflater, name)

    monkeypatch.setattr(zlib, "decompressobj", Counted)
    forked = await store.get(fork.id)
    source = await store.get(state.id)
    assert forked is not None and source is not None
    read = b"".join([piece async for piece in store.iter_content(forked, 10, slice_size=MIB)])
    assert read == (text + b"more\n")[10:]
    assert inflated[0] <= 2 * len(text), "the source was inflated again for every slice"


async def test_a_fork_committed_while_the_sweep_looks_keeps_its_expiring_source(
    store: Store, settings: Settings
) -> None:
    """A fork made by another process as its source expires: the sweep must not purge the source."""
    if settings.is_sqlite:
        pytest.skip("on SQLite one writer at a time: no sweep runs while another process creates")
    source_id, body = await large_stream(store, "brief", MIB // 2, 5)
    table = StreamRow.__table__
    with store._write_engine.begin() as conn:
        conn.execute(update(table).where(table.c.id == source_id).values(expires_at=time.time() + 1.0))
    with store._write_engine.connect() as other:
        creating = other.begin()
        new = NewStream(namespace="forks", name="caught", fork_from="brief", ttl_seconds=3600)
        (fork, _), _ = transactions.create(other, new, True, None, store.counter_slot)
        await asyncio.sleep(1.2)  # the source expires while the fork is not yet committed
        sweeping = asyncio.create_task(store.sweep())
        await asyncio.sleep(0.5)
        creating.commit()
    await sweeping
    assert await content(store, fork.id) == body


async def test_a_fork_that_holds_a_copy_of_its_prefix_reads_it_when_its_source_is_gone(store: Store) -> None:
    """Forks made before forks shared their source's bytes hold a copy; their source may have been purged."""
    source_id, body = await large_stream(store, "first", MIB + 3, 6)
    fork, _ = await store.create(
        NewStream(namespace="forks", name="copied", fork_from="first", fork_offset=MIB)
    )
    await store.append(fork.id, b"own")
    chunk_table, stream_table = ChunkRow.__table__, StreamRow.__table__
    with store._write_engine.begin() as conn:
        conn.execute(chunk_table.insert().values(stream_id=fork.id, start=0, data=body[:MIB], file_bytes=0))
        conn.execute(chunk_table.delete().where(chunk_table.c.stream_id == source_id))
        conn.execute(stream_table.delete().where(stream_table.c.id == source_id))
    await reads_match(store, fork.id, body[:MIB] + b"own", [MIB, 100])
