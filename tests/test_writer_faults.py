"""A failing write: nothing after it is committed to its stream, and other streams' appends are unaffected."""

from __future__ import annotations

import asyncio
import errno
import json
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from streamhold.errors import StorageFullError
from streamhold.live import LiveHub
from streamhold.models import Producer
from streamhold.sdk.local import LocalStreams
from streamhold.settings import Settings
from streamhold.store import chunk_files
from streamhold.store.store import Store
from streamhold.store.transactions import NewStream
from streamhold.store.writer import ISOLATION_TRANSACTIONS, LANE_MIN_OPS

pytestmark = pytest.mark.timeout(60)


def disk_full() -> OSError:
    """A full disk, which the writer answers with StorageFullError."""
    return OSError(errno.ENOSPC, "No space left on device")


class _FaultyCursor:
    """The writer's real cursor, except that a write naming the poisoned stream calls `fault` first."""

    def __init__(self, cursor: Any, poisoned: set[str], fault: Callable[[], None], statement: str) -> None:
        self._cursor = cursor
        self._poisoned = poisoned
        self._fault = fault
        self._statement = statement

    def _check(self, sql: str, rows: list[Any]) -> None:
        if not sql.lstrip().upper().startswith(("INSERT", "UPDATE", "WITH")) or self._statement not in sql:
            return
        for row in rows:
            values = list(row.values() if isinstance(row, dict) else row)
            values += [v for value in values if isinstance(value, list) for v in value]  # a column of rows
            # Rows sent as one JSON array name their streams as JSON strings.
            quoted = {json.dumps(stream_id) for stream_id in self._poisoned}
            named = [v for v in values if isinstance(v, str)]
            if any(v in self._poisoned or any(q in v for q in quoted) for v in named):
                self._fault()

    def execute(self, sql: str, args: Any = ()) -> Any:
        self._check(sql, [args])
        self._cursor.execute(sql, args)
        return self

    def executemany(self, sql: str, rows: Any) -> Any:
        rows = list(rows)
        self._check(sql, rows)
        self._cursor.executemany(sql, rows)
        return self

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)


class _FaultyConnection:
    def __init__(self, conn: Any, poisoned: set[str], fault: Callable[[], None], statement: str) -> None:
        self._conn = conn
        self._poisoned = poisoned
        self._fault = fault
        self._statement = statement

    def cursor(self, *args: Any, **kwargs: Any) -> _FaultyCursor:
        return _FaultyCursor(self._conn.cursor(*args, **kwargs), self._poisoned, self._fault, self._statement)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def poison_writes(store: Store, poisoned: set[str], fault: Callable[[], None], statement: str = "") -> None:
    """Make the writer's statements that write rows of the `poisoned` streams call `fault` (which raises);
    only those whose SQL holds `statement`, if given."""
    for batches in store.writer.append_lanes():  # every connection that batches of appends run on
        real = batches._driver_connection

        def faulty(real: Callable[[], Any] = real) -> Any:
            return _FaultyConnection(real(), poisoned, fault, statement)

        batches._driver_connection = faulty  # type: ignore[method-assign]


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    async with Store.open(settings) as opened:
        yield opened


async def new_stream(store: Store, name: str) -> str:
    state, _ = await store.create(NewStream("faults", "text/plain", name=name))
    return state.id


async def content(store: Store, stream_id: str) -> bytes:
    state = await store.get(stream_id)
    assert state is not None
    return await store.read(stream_id, 0, state.tail)


def run_on_loop(loop: asyncio.AbstractEventLoop, fn: Callable[[], Any]) -> Any:
    """Call `fn` on the loop, whether the fault fires on the loop or on the writer thread."""
    if threading.current_thread() is threading.main_thread():
        return fn()

    async def call() -> Any:
        return fn()

    return asyncio.run_coroutine_threadsafe(call(), loop).result(10)


async def test_api_writes_queued_behind_a_failed_write_fail_too(settings: Settings) -> None:
    async with Store.open(settings) as store, LiveHub.open(store, settings) as hub:
        streams = LocalStreams(store, hub, settings)
        stream = await streams.create("export", content_type="text/plain")
        await stream.write(b"A" * 100)
        loop = asyncio.get_running_loop()
        later: list[asyncio.Future[Any]] = []
        armed = [True]

        def fail_once_after_queueing_c() -> None:
            if armed[0]:
                armed[0] = False
                # C is written while B's commit is under way, before its failure is known.
                later.append(run_on_loop(loop, lambda: stream.write(b"C" * 100)))
                raise disk_full()

        poison_writes(store, {stream.id}, fail_once_after_queueing_c)
        b = stream.write(b"B" * 100)
        with pytest.raises(StorageFullError) as failed:
            await b
        assert later, "the fault never fired"
        with pytest.raises(StorageFullError) as queued:
            await later[0]
        assert queued.value is failed.value
        with pytest.raises(StorageFullError):
            stream.write(b"D")
        assert await content(store, stream.id) == b"A" * 100


async def test_appends_queued_behind_a_failed_append_fail_and_a_retry_succeeds(store: Store) -> None:
    stream_id = await new_stream(store, "holes")
    await store.append(stream_id, b"A")
    loop = asyncio.get_running_loop()
    later: list[asyncio.Future[Any]] = []
    armed = [True]

    def fail_once_after_queueing_c() -> None:
        if armed[0]:
            armed[0] = False
            later.append(run_on_loop(loop, lambda: store.append_nowait(stream_id, b"C")))
            raise disk_full()

    poison_writes(store, {stream_id}, fail_once_after_queueing_c)
    with pytest.raises(StorageFullError):
        await store.append_nowait(stream_id, b"B")
    with pytest.raises(StorageFullError):
        await later[0]
    assert await content(store, stream_id) == b"A"
    # Once the failure is known, the client may retry: B, then C, land in order.
    assert (await store.append(stream_id, b"B")).tail == 2
    assert (await store.append(stream_id, b"C")).tail == 3
    assert await content(store, stream_id) == b"ABC"


async def test_a_batch_that_fails_after_writing_some_rows_commits_none_of_them(store: Store) -> None:
    """The stream's record is written, then writing the producer's state fails on this side (not the
    database's): none of the append may commit. On PostgreSQL the statements of a batch commit as its
    pipeline ends, so the failure must keep that end from committing what already went out."""
    stream_id = await new_stream(store, "half")
    await store.append(stream_id, b"A")

    armed = [True]

    def fail_once() -> None:
        if armed[0]:
            armed[0] = False
            raise disk_full()

    poison_writes(store, {stream_id}, fail_once, statement="INSERT INTO producers")
    with pytest.raises(StorageFullError):
        await store.append(stream_id, b"B", producer=Producer("p", 0, 0))
    state = await store.get(stream_id)
    assert state is not None and (state.tail, state.appends) == (1, 1)
    assert await content(store, stream_id) == b"A"
    # Nothing of it is left behind: the producer is new again, and the next append follows the first.
    assert (await store.append(stream_id, b"B", producer=Producer("p", 0, 0))).tail == 2
    assert await content(store, stream_id) == b"AB"


async def test_a_failing_stream_does_not_fail_other_streams_in_its_batch(store: Store) -> None:
    bad, good, other = [await new_stream(store, name) for name in ("bad", "good", "other")]

    def fail() -> None:
        raise disk_full()

    poison_writes(store, {bad}, fail)
    committed = store.writer.appends
    futures = {
        stream_id: [store.append_nowait(stream_id, f"{stream_id[-4:]}-{i};".encode()) for i in range(3)]
        for stream_id in (good, bad, other)
    }
    results = {
        stream_id: await asyncio.gather(*pending, return_exceptions=True)
        for stream_id, pending in futures.items()
    }
    assert all(isinstance(r, StorageFullError) for r in results[bad])
    for stream_id in (good, other):
        assert not any(isinstance(r, BaseException) for r in results[stream_id]), results[stream_id]
        expected = b"".join(f"{stream_id[-4:]}-{i};".encode() for i in range(3))
        assert await content(store, stream_id) == expected
    assert await content(store, bad) == b""
    assert store.writer.appends - committed == 6  # counted once, and only once committed


async def test_a_failure_of_every_stream_is_not_retried_without_end(store: Store) -> None:
    ids = [await new_stream(store, f"all-{i}") for i in range(64)]
    attempts = [0]

    def fail() -> None:
        attempts[0] += 1
        raise disk_full()

    poison_writes(store, set(ids), fail)
    results = await asyncio.gather(*[store.append_nowait(i, b"x") for i in ids], return_exceptions=True)
    assert all(isinstance(r, StorageFullError) for r in results)
    assert attempts[0] <= 1 + ISOLATION_TRANSACTIONS


async def test_a_full_disk_for_one_chunk_file_fails_only_its_stream(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(data_dir=tmp_path, long_poll_timeout=2.0, public_url="http://sh.test")
    async with Store.open(settings) as store:
        assert store.files is not None
        bad, good = await new_stream(store, "bad"), await new_stream(store, "good")
        real_write = chunk_files.Claim.write

        def write(self: chunk_files.Claim, offset: int, data: Any) -> None:
            if self.stream_id == bad:
                raise disk_full()
            real_write(self, offset, data)

        monkeypatch.setattr(chunk_files.Claim, "write", write)
        large = chunk_files.FILE_CHUNK_MIN * 2
        small = store.append_nowait(good, b"s" * 10)
        failing = store.append_nowait(bad, b"b" * large)
        big = store.append_nowait(good, b"g" * large)
        assert (await small).tail == 10
        assert (await big).tail == 10 + large
        with pytest.raises(StorageFullError):
            await failing
        assert await content(store, good) == b"s" * 10 + b"g" * large
        assert await content(store, bad) == b""


async def test_a_write_postgres_refuses_fails_only_its_stream(pg_url: str, tmp_path: Path) -> None:
    """The database itself refuses one stream's row: the batch's other streams still commit.

    The writer sends a batch's writes and its COMMIT together, so the refusal is answered to the COMMIT;
    the batch is known not to have committed, and is retried by stream.
    """
    settings = Settings(data_dir=tmp_path, database_url=pg_url, long_poll_timeout=2.0)
    async with Store.open(settings) as store:
        bad, good, other = [await new_stream(store, name) for name in ("bad", "good", "other")]
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute(
                "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                f"IF NEW.id = '{bad}' THEN RAISE EXCEPTION 'refused'; END IF; RETURN NEW; END $$"
            )
            admin.execute(
                "CREATE TRIGGER refuse BEFORE UPDATE ON streams FOR EACH ROW EXECUTE FUNCTION refuse()"
            )
        futures = {
            stream_id: [store.append_nowait(stream_id, f"{stream_id[-4:]}-{i};".encode()) for i in range(3)]
            for stream_id in (good, bad, other)
        }
        results = {
            stream_id: await asyncio.gather(*pending, return_exceptions=True)
            for stream_id, pending in futures.items()
        }
        assert all(isinstance(r, psycopg.Error) and "refused" in str(r) for r in results[bad]), results[bad]
        for stream_id in (good, other):
            assert not any(isinstance(r, BaseException) for r in results[stream_id]), results[stream_id]
            expected = b"".join(f"{stream_id[-4:]}-{i};".encode() for i in range(3))
            assert await content(store, stream_id) == expected
        assert await content(store, bad) == b""


async def test_postgres_commits_other_streams_while_a_batch_waits(pg_url: str, tmp_path: Path) -> None:
    """On PostgreSQL a second batch commits while the first waits; a stream's own appends still wait.

    The second starts once enough appends wait (LANE_MIN_OPS): fewer would cost a commit each.
    """
    settings = Settings(data_dir=tmp_path, database_url=pg_url, long_poll_timeout=2.0)
    async with Store.open(settings) as store:
        slow, quick = await new_stream(store, "slow"), await new_stream(store, "quick")
        stalled, release = threading.Event(), threading.Event()

        def stall() -> None:
            stalled.set()
            release.wait(10)

        poison_writes(store, {slow}, stall)
        first = store.append_nowait(slow, b"1")
        assert await asyncio.to_thread(stalled.wait, 10), "the slow stream's batch never started"
        second = store.append_nowait(slow, b"2")  # waits for its stream's batch in flight
        quick_ones = [store.append_nowait(quick, b"q") for _ in range(LANE_MIN_OPS)]
        try:
            done = await asyncio.wait_for(asyncio.gather(*quick_ones), 5)
            assert [result.tail for result in done] == list(range(1, LANE_MIN_OPS + 1))
            assert not first.done() and not second.done()
        finally:
            release.set()
        assert (await first).tail == 1
        assert (await second).tail == 2
        assert await content(store, slow) == b"12"
