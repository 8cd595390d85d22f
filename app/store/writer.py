"""Group commit: one writer per process applies queued operations in as few transactions as it can."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine

from ..errors import StreamError
from ..models import AppendResult
from . import clock
from .appends import AppendOp, Pending, Record, apply_append
from .chunk_files import FILE_CHUNK_MIN, ChunkFiles, Claim, Spool
from .statements import Prepared, Statements, state_from_tuple

log = logging.getLogger("streamhold.writer")
T = TypeVar("T")

MAX_BATCH_OPS = 4096
MAX_BATCH_BYTES = 16 * 1024 * 1024
MAX_CACHED_ROWS = 4096
# A batch commits on the event loop rather than the writer thread while commits are quick, or when it is
# this large. The hand-over to the thread and back costs more than a quick sync: waking the thread on the
# other core and getting the GIL back took 0.3-0.6 ms a commit under 16 writers, longer than the 0.3 ms
# COMMIT itself. Measured side by side (16 writers of 64-byte appends, 12 runs each): 7% more appends/s
# on 17% less server CPU. A slow disk sends commits to the thread, so the loop never waits on it for long.
# Large batches always win on the loop: about 15% faster with one writer of 1 MiB appends.
LOOP_COMMIT_BYTES = 256 * 1024
QUICK_COMMIT_S = 0.001
WAL_FRAME_HEADER = 24
# Small appends collect in the stream's record (its `pending` bytes) until they make a chunk this large. A
# commit of small appends then writes a few pages of the streams table, rather than also a chunk row and
# an index entry per stream, scattered over as many pages: measured, 2 to 3 times fewer pages a commit.
PENDING_LIMIT = 2048
IDLE_CHECKPOINT_S = 0.5
# A failed batch of appends to several streams is retried in parts by stream, in at most this many
# transactions: enough to find one failing stream among the 4096 a batch may hold.
ISOLATION_TRANSACTIONS = 32


@dataclass(frozen=True, slots=True)
class Change:
    """What a committed operation changed about one stream, for the doorbells."""

    stream_id: str
    tail: int
    closed: bool
    gone: bool = False
    added_chunk: int = 0  # the size of the chunk the operation added, if it added one


@dataclass(slots=True)
class CallOp:
    """Any other write: `fn(conn)` in a transaction of its own; returns (result, changes)."""

    fn: Callable[[Connection], tuple[Any, list[Change]]]
    future: asyncio.Future[Any]


class _Thread:
    """One thread that runs functions for the event loop, one at a time, in the order given.

    A round trip costs about 17 us against run_in_executor's 41 us, measured on an idle loop; the writer
    makes one per write other than appends, and one per commit of appends while the disk is slow.
    """

    def __init__(self, name: str) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None  # the loop whose futures it settles
        self._jobs: queue.SimpleQueue[tuple[asyncio.Future[Any], Callable[..., Any], tuple[Any, ...]] | None]
        self._jobs = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def new_future(self) -> asyncio.Future[Any]:
        """A future on the loop it settles futures on."""
        # The loop is kept: asyncio.get_running_loop() makes a getpid() system call each time, 2-3% of the
        # event loop's time under small appends, measured.
        assert self.loop is not None, "the writer has not started"
        return self.loop.create_future()

    def run(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        future: asyncio.Future[T] = self.new_future()
        self._jobs.put((future, fn, args))
        return future

    def stop(self) -> None:
        """Finish the queued functions, then end the thread."""
        self._jobs.put(None)
        self._thread.join()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            try:
                result = fn(*args)
            except BaseException as exc:  # handed to the awaiting coroutine, which decides
                future.get_loop().call_soon_threadsafe(_settle, future, False, exc)
            else:
                future.get_loop().call_soon_threadsafe(_settle, future, True, result)


def _settle(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.done():  # its awaiter was cancelled meanwhile
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


class Writer:
    """Runs every write of this process through one thread, committing concurrent appends together."""

    def __init__(
        self,
        engine: Engine,
        postgres: bool,
        on_change: Callable[[list[Change]], None],
        statements: Statements,
        files: ChunkFiles | None = None,
    ) -> None:
        self._engine = engine
        self._files = files
        # The batch's large appends, written to chunk files (and synced) just before its COMMIT; None for
        # bytes a spool wrote. The claims keep other writers out of the files until the COMMIT is done.
        self._file_writes: list[tuple[Claim, int, bytes | bytearray | None]] = []
        self._claims: list[Claim] = []
        self.spooled = 0  # appends whose body was already in its file when the batch came to write it
        self._statements = statements
        self._driver: Any = None
        self._pooled: Any = None
        self._postgres = postgres
        self._on_change = on_change
        self._queue: collections.deque[AppendOp | CallOp] = collections.deque()
        self._wakeup = asyncio.Event()
        self._thread = _Thread("streamhold-writer")
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.appends = 0
        self.bytes_appended = 0
        self._uncommitted = [0, 0]  # appends and bytes of the batch being written, counted once committed
        self.commits = 0
        self.after_close: Callable[[str, bool], None] | None = None
        # SQLite only: stream rows (and their pending byte counts) as this connection's last commit left
        # them. They stay valid while no other connection commits, which `PRAGMA data_version` tells, so a
        # batch skips re-reading them.
        self._rows: dict[str, Record] = {}
        self._written: dict[str, Record] = {}
        self._data_version = -1
        self._commit_sent = False
        self._wal_path = "" if postgres else f"{engine.url.database}-wal"
        self._checkpointed = 0
        self._checkpoint: asyncio.Future[None] | None = None
        self.checkpoint_bytes = 0
        # How long COMMITs take: rises at once with a slow one, falls back by a tenth of the gap a commit.
        self.commit_seconds = 0.0

    def start(self) -> None:
        self._thread.loop = asyncio.get_running_loop()
        self._task = self._thread.loop.create_task(self._run(), name="streamhold-writer")

    async def stop(self) -> None:
        """Finish what is queued, then stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        if self._checkpoint is not None:
            with contextlib.suppress(Exception):
                await self._checkpoint
        self._thread.stop()
        if self._pooled is not None:
            self._pooled.close()

    def new_future(self) -> asyncio.Future[Any]:
        """A future on the writer's loop."""
        return self._thread.new_future()

    def join_last(
        self, stream_id: str, data: bytes, limit: int = 1024 * 1024
    ) -> asyncio.Future[AppendResult] | None:
        """Add `data` to the last queued op if it is a plain append to the same stream; its future, or None.

        Consecutive writes then commit as one append, in order, and each still resolves only when committed.
        """
        if not self._queue:
            return None
        last = self._queue[-1]
        if (
            not isinstance(last, AppendOp)
            or last.stream_id != stream_id
            or last.close
            or last.seq is not None
            or last.producer is not None
            or last.content_type is not None
            or last.spool is not None
            or len(last.data) + len(data) > limit
        ):
            return None
        if isinstance(last.data, bytes):
            last.data = bytearray(last.data)
        last.data += data
        return last.future

    def submit(self, op: AppendOp | CallOp) -> None:
        if self._closing:
            if isinstance(op, AppendOp) and op.spool is not None:
                op.spool.close()
            op.future.set_exception(
                RuntimeError("the store is shutting down; retry against a running server")
            )
            return
        self._queue.append(op)
        self._wakeup.set()

    async def call(self, fn: Callable[[Connection], tuple[Any, list[Change]]]) -> Any:
        future: asyncio.Future[Any] = self.new_future()
        self.submit(CallOp(fn, future))
        return await future

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                await self._idle()
                continue
            # One more pass of the event loop first, so that the requests it is handling join this batch:
            # measured with 16 writers, 9% more appends/s and 0.6 ms less latency (p50), on 5% less CPU.
            await asyncio.sleep(0)
            batch = self._take_batch()
            try:
                if isinstance(batch[0], CallOp):
                    outcome = await self._thread.run(self._run_call, batch[0])
                    outcomes: list[tuple[bool, Any]] = [outcome[0]]
                    changes = outcome[1]
                else:
                    outcomes, changes = await self._isolated_appends(batch)  # type: ignore[arg-type]
            except Exception as exc:  # the transaction failed as a whole
                log.exception("write transaction failed")
                for op in batch:
                    if not op.future.done():
                        op.future.set_exception(exc)
                _close_spools(batch)
                self._fail_queued({op.stream_id: exc for op in batch if isinstance(op, AppendOp)})
                continue
            _close_spools(batch)
            failed: dict[str, Exception] = {}
            for op, (ok, value) in zip(batch, outcomes, strict=True):
                if not ok and isinstance(op, AppendOp) and not isinstance(value, StreamError):
                    failed.setdefault(op.stream_id, value)
                if op.future.done():
                    continue
                if ok:
                    op.future.set_result(value)
                else:
                    op.future.set_exception(value)
            self._fail_queued(failed)
            if changes:
                self._on_change(changes)

    async def _appends(self, ops: list[AppendOp]) -> tuple[list[tuple[bool, Any]], list[Change]]:
        if self._postgres:
            return await self._thread.run(self._run_appends, ops)
        return await self._sqlite_appends(ops)

    async def _isolated_appends(self, ops: list[AppendOp]) -> tuple[list[tuple[bool, Any]], list[Change]]:
        """Commit a batch of appends; if it fails, commit its streams apart, so only the failing ones fail.

        A failure that can be one stream's (its chunk file's disk is full, a statement on its rows fails)
        then fails only that stream's appends: the batch is split in halves by stream, again and again
        while a half fails, within a budget of transactions, so a failure of the whole database ends soon.
        """
        try:
            return await self._appends(ops)
        except Exception as exc:
            streams = list(dict.fromkeys(op.stream_id for op in ops))
            if len(streams) < 2 or not self._may_retry(exc):
                raise
            log.warning("a batch of appends to %d streams failed; committing them apart", len(streams))
            return await self._bisect(ops, streams, exc, [ISOLATION_TRANSACTIONS])

    async def _bisect(
        self, ops: list[AppendOp], streams: list[str], error: Exception, budget: list[int]
    ) -> tuple[list[tuple[bool, Any]], list[Change]]:
        if len(streams) < 2:
            return [(False, error)] * len(ops), []
        results: dict[int, tuple[bool, Any]] = {}
        changes: list[Change] = []
        half = len(streams) // 2
        for part in (streams[:half], streams[half:]):
            chosen = set(part)
            some = [op for op in ops if op.stream_id in chosen]
            if budget[0] <= 0:
                if budget[0] == 0:
                    budget[0] = -1  # logged once
                    log.error("gave up committing a failed batch's streams apart", exc_info=error)
                results.update((id(op), (False, error)) for op in some)
                continue
            budget[0] -= 1
            try:
                outcomes, done = await self._appends(some)
            except Exception as exc:
                if self._may_retry(exc):
                    outcomes, done = await self._bisect(some, part, exc, budget)
                else:
                    log.error("write transaction failed", exc_info=exc)
                    outcomes, done = [(False, exc)] * len(some), []
            results.update(zip(map(id, some), outcomes, strict=True))
            changes += done
        return [results[id(op)] for op in ops], changes

    def _may_retry(self, exc: Exception) -> bool:
        """Whether a failed transaction of appends is known not to have committed, and may be run again."""
        # Once COMMIT is sent the batch may be committed (on PostgreSQL, or on SQLite if a sync failed
        # after its commit frame was written): doing it again would append twice.
        if self._commit_sent:
            return False
        # A lost connection, or waiting for another process's lock, is the whole database's trouble.
        if self._postgres:
            return self._driver is not None
        return not (isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc))

    def _fail_queued(self, failed: dict[str, Exception]) -> None:
        """Fail the queued appends to streams whose write just failed, with the same error."""
        # Nothing after a failed write is committed to its stream. An append queued while the failed write
        # was under way was sent before its failure was known, and may follow on from it (the Python API's
        # unawaited writes, a client's concurrent appends): committed, it would leave a hole. An append
        # queued after this point answers the failure, such as a retry of the failed bytes, and goes ahead.
        if not failed or not self._queue:
            return
        kept: collections.deque[AppendOp | CallOp] = collections.deque()
        for op in self._queue:
            if isinstance(op, AppendOp) and op.stream_id in failed:
                if op.spool is not None:
                    op.spool.close()
                if not op.future.done():
                    op.future.set_exception(failed[op.stream_id])
            else:
                kept.append(op)
        self._queue.clear()
        self._queue.extend(kept)

    async def _idle(self) -> None:
        """Wait for work; once idle a moment after commits, checkpoint the WAL in the background.

        Otherwise the WAL is checkpointed only when it passes `wal_autocheckpoint`, in the commit that
        passes it, which then waits for the whole WAL to be copied. Checkpointed while idle, it also starts
        over from its beginning, where syncing the file needs no new blocks.
        """
        due = bool(self._wal_path) and self.commits != self._checkpointed and self._checkpoint is None
        if not due:
            await self._wakeup.wait()
        else:
            try:
                await asyncio.wait_for(self._wakeup.wait(), IDLE_CHECKPOINT_S)
            except TimeoutError:
                self._checkpointed = self.commits
                self._checkpoint = asyncio.get_running_loop().run_in_executor(None, self._checkpoint_wal)
                self._checkpoint.add_done_callback(self._checkpoint_done)
                return
        self._wakeup.clear()

    def _checkpoint_wal(self) -> None:
        # A connection of its own: a PASSIVE checkpoint takes no write lock, so appends go on meanwhile.
        conn = sqlite3.connect(self._engine.url.database or "", timeout=0)
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        finally:
            conn.close()

    def _checkpoint_done(self, done: asyncio.Future[None]) -> None:
        self._checkpoint = None
        if not done.cancelled() and done.exception() is not None:
            log.warning("idle WAL checkpoint failed", exc_info=done.exception())

    def _take_batch(self) -> list[AppendOp | CallOp]:
        first = self._queue.popleft()
        if isinstance(first, CallOp):
            return [first]
        batch: list[AppendOp | CallOp] = [first]
        size = len(first.data)
        while self._queue and len(batch) < MAX_BATCH_OPS and size < MAX_BATCH_BYTES:
            if isinstance(self._queue[0], CallOp):
                break
            op = self._queue.popleft()
            size += len(op.data)  # type: ignore[union-attr]
            batch.append(op)
        return batch

    def _run_call(self, op: CallOp) -> tuple[tuple[bool, Any], list[Change]]:
        try:
            with self._engine.begin() as conn:
                result, changes = op.fn(conn)
        except StreamError as exc:
            return (False, exc), []
        self.commits += 1
        return (True, result), changes

    def _run_appends(self, ops: list[AppendOp]) -> tuple[list[tuple[bool, Any]], list[Change]]:
        for attempt in (1, 2):
            try:
                return self._append_transaction(ops)
            except Exception:
                # Once COMMIT has been sent the batch may have been committed: doing it again would
                # append twice, so only a failure before that is retried (on a new connection).
                forgot = self._forget_broken_connection()
                if attempt == 2 or not forgot or self._commit_sent:
                    raise
        raise AssertionError("unreachable")

    def _forget_broken_connection(self) -> bool:
        """Drop a PostgreSQL connection that has closed or broken, so that the next batch opens a new one."""
        driver = self._driver
        if not self._postgres or driver is None or not (driver.closed or driver.broken):
            return False
        if self._pooled is not None:
            self._pooled.invalidate()
        self._driver = self._pooled = None
        return True

    def _driver_connection(self) -> Any:
        if self._driver is None:
            self._pooled = self._engine.raw_connection()
            self._driver = self._pooled.driver_connection
            if not self._postgres:
                # Never wait for a lock on the event loop: a busy database sends the batch to the thread.
                self._driver.execute("PRAGMA busy_timeout=0")
                pages = self._driver.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
                page_size = self._driver.execute("PRAGMA page_size").fetchone()[0]
                self.checkpoint_bytes = pages * (page_size + WAL_FRAME_HEADER) if pages > 0 else 0
        return self._driver

    def may_commit_on_loop(self, size: int) -> bool:
        """Whether a batch of `size` bytes may commit on the event loop: quick or large, and no checkpoint.

        A commit that takes the WAL past `wal_autocheckpoint` checkpoints it, copying the whole WAL into the
        database, which takes far too long to run on the loop. The WAL file is never smaller than the
        frames in it, so its size bounds them.
        """
        if not self.checkpoint_bytes:
            return False
        if size < LOOP_COMMIT_BYTES and self.commit_seconds >= QUICK_COMMIT_S:
            return False
        try:
            wal = os.stat(self._wal_path).st_size
        except OSError:
            wal = 0
        return wal + 2 * size < self.checkpoint_bytes

    async def _sqlite_appends(self, ops: list[AppendOp]) -> tuple[list[tuple[bool, Any]], list[Change]]:
        """Apply a batch on the event loop; commit it there too, or on the writer thread if the disk is slow.

        SQLite runs the batch's statements in microseconds; only the COMMIT waits for the disk. Keeping the
        rest off the writer thread spares each batch two trips for the GIL, which a busy loop holds.
        """
        conn = self._driver_connection()
        cursor = conn.cursor()
        try:
            cursor.execute("BEGIN IMMEDIATE")
        except Exception:
            # Another process holds the write lock: wait for it on the writer thread, not on the loop.
            cursor.close()
            return await self._thread.run(self._run_appends, ops)
        try:
            outcomes, changes = self._append_transaction(ops, cursor=cursor)
            if self.may_commit_on_loop(sum(len(op.data) for op in ops)):
                self._commit(cursor)
            else:
                await self._thread.run(self._commit, cursor)
        except BaseException as exc:
            self._rows.clear()
            with contextlib.suppress(Exception):
                cursor.execute("ROLLBACK")
            if not isinstance(exc, asyncio.CancelledError):  # else the thread may still be using the files
                self._release_claims()
            raise
        finally:
            cursor.close()
        self._release_claims()
        self._committed()
        self._count_commit()
        return outcomes, changes

    def _commit(self, cursor: Any) -> None:
        """Sync the batch's chunk files, then commit the rows that refer to them."""
        files = self._files if self._file_writes else None
        if files is not None:
            files.write(self._file_writes)
        self._commit_sent = True
        started = time.perf_counter()
        cursor.execute("COMMIT")
        took = time.perf_counter() - started
        if files is not None:
            files.committed()
        self.commit_seconds = max(took, self.commit_seconds + (took - self.commit_seconds) / 10)

    def _count_commit(self) -> None:
        self.commits += 1
        self.appends += self._uncommitted[0]
        self.bytes_appended += self._uncommitted[1]
        self._uncommitted = [0, 0]

    def _release_claims(self) -> None:
        for claim in self._claims:
            claim.close()
        self._claims.clear()

    def _cached_rows(self, cursor: Any) -> dict[str, Record]:
        """The row cache, emptied first if another connection has committed since this one last did."""
        if self._postgres:
            return {}
        cursor.execute("PRAGMA data_version")
        version = cursor.fetchone()[0]
        if version != self._data_version or len(self._rows) > MAX_CACHED_ROWS:
            self._rows.clear()
            self._data_version = version
        self._written.clear()
        return self._rows

    def _committed(self) -> None:
        self._rows.update(self._written)
        self._written.clear()

    def _append_transaction(
        self, ops: list[AppendOp], cursor: Any = None
    ) -> tuple[list[tuple[bool, Any]], list[Change]]:
        now = clock.now()
        conn = self._driver_connection()
        sql = self._statements
        began = cursor is not None
        cursor = cursor if began else conn.cursor()
        self._commit_sent = False
        self._file_writes.clear()
        self._uncommitted = [0, 0]
        try:
            if not self._postgres and not began:
                cursor.execute("PRAGMA busy_timeout=10000")
                cursor.execute("BEGIN IMMEDIATE")
            pending: dict[str, Pending] = {}
            cached = self._cached_rows(cursor)
            # Lock rows in one order, so writers in several processes never deadlock.
            for stream_id in sorted({op.stream_id for op in ops}):
                record = cached.get(stream_id)
                if record is None:
                    query = sql.stream_by_id_locked
                    cursor.execute(query.sql, query.args({"id": stream_id}))
                    found = cursor.fetchone()
                    record = Record.read(state_from_tuple(found[:-1]), found[-1]) if found else None
                if record is not None:
                    pending[stream_id] = Pending(
                        record,
                        record.tail,
                        record.closed_at,
                        record.last_seq,
                        record.expires_at,
                        record.compress,
                    )
            states: dict[tuple[str, str], list[int]] = {}
            for stream_id, producer_id in {
                (op.stream_id, op.producer.id) for op in ops if op.producer is not None
            }:
                cursor.execute(
                    sql.producer.sql, sql.producer.args({"stream_id": stream_id, "producer_id": producer_id})
                )
                found = cursor.fetchone()
                if found is not None:
                    states[(stream_id, producer_id)] = [found[0], found[1]]
            known = set(states)
            outcomes: list[tuple[bool, Any]] = []
            for op in ops:
                try:
                    outcomes.append((True, apply_append(pending.get(op.stream_id), op, states, now)))
                except StreamError as exc:
                    outcomes.append((False, exc))
            changes = self._write(cursor, pending, states, known, now)
            if began:
                return outcomes, changes  # the caller commits
            if self._postgres:
                self._commit_sent = True
                conn.commit()
            else:
                self._commit(cursor)
                self._committed()
        except BaseException:
            self._rows.clear()
            if began:
                raise
            try:
                if self._postgres:
                    conn.rollback()
                else:
                    cursor.execute("ROLLBACK")
            except Exception:  # the connection itself failed; the caller decides whether to reconnect
                pass
            raise
        finally:
            if not began:
                if not self._postgres:
                    with contextlib.suppress(Exception):
                        cursor.execute("PRAGMA busy_timeout=0")
                cursor.close()
                self._release_claims()
        self._count_commit()
        return outcomes, changes

    def _write(
        self,
        cursor: Any,
        pending: dict[str, Pending],
        states: dict[tuple[str, str], list[int]],
        known: set[tuple[str, str]],
        now: float,
    ) -> list[Change]:
        sql = self._statements
        new_chunks = []
        flushes = []
        updates: dict[Prepared, list[Any]] = {}
        changes = []
        for stream_id, p in pending.items():
            if not p.changed:
                continue
            data = b"".join(p.parts)
            was = p.record
            values = {
                "_id": stream_id,
                "tail": p.tail,
                "stored_bytes": was.stored_bytes + len(data),
                "appends": was.appends + p.appends,
                "closed_at": p.closed_at,
                "last_seq": p.last_seq,
                "compress": p.compress,
                "updated_at": now,
            }
            # Bytes stay pending while they are few and the stream open; a chunk takes them otherwise.
            waiting = was.waiting + len(data)
            added = 0
            if waiting < PENDING_LIMIT and p.closed_at is None:
                update = sql.update_stream
                if data:
                    update = sql.update_stream_pending
                    values["data"] = data
            else:
                update = sql.update_stream_flushed if was.waiting else sql.update_stream
                claim = self._claim(stream_id, p.spool) if len(data) >= FILE_CHUNK_MIN else None
                in_file = claim is not None
                if was.waiting:
                    start = was.tail - was.waiting
                    joined = b"" if in_file else data
                    flushes.append(
                        sql.flush_pending.args({"stream_id": stream_id, "start": start, "data": joined})
                    )
                    added = was.waiting + len(joined)
                if claim is not None:
                    spooled = p.spool is not None and len(p.parts) == 1 and p.spool.holds(data, was.tail)
                    self.spooled += spooled
                    self._file_writes.append((claim, was.tail, None if spooled else data))
                    chunk = {"stream_id": stream_id, "start": was.tail, "data": b"", "file_bytes": len(data)}
                    new_chunks.append(sql.insert_chunk.args(chunk))
                elif data and not was.waiting:
                    chunk = {"stream_id": stream_id, "start": was.tail, "data": data, "file_bytes": 0}
                    new_chunks.append(sql.insert_chunk.args(chunk))
                    added = len(data)
                waiting = 0
            if data:
                self._uncommitted[0] += p.appends
                self._uncommitted[1] += len(data)
            updates.setdefault(update, []).append(update.args(values))
            if p.expires_at != was.expires_at:
                expiry = {"_id": stream_id, "expires_at": p.expires_at}
                updates.setdefault(sql.update_expiry, []).append(sql.update_expiry.args(expiry))
            if not self._postgres:  # the record as this commit leaves it
                self._written[stream_id] = Record(
                    was.facts,
                    waiting,
                    p.tail,
                    values["stored_bytes"],
                    values["appends"],
                    p.closed_at,
                    p.last_seq,
                    p.expires_at,
                    p.compress,
                )
            changes.append(Change(stream_id, p.tail, p.closed_at is not None, added_chunk=added))
            if p.closed_at is not None and was.closed_at is None and self.after_close is not None:
                self.after_close(stream_id, p.compress)
        if new_chunks:
            cursor.executemany(sql.insert_chunk.sql, new_chunks)
        if flushes:  # before the updates that empty the pending bytes they take
            cursor.executemany(sql.flush_pending.sql, flushes)
        for update, rows in updates.items():
            cursor.executemany(update.sql, rows)
        for (stream_id, producer_id), (epoch, seq) in states.items():
            statement = sql.update_producer if (stream_id, producer_id) in known else sql.insert_producer
            values = {"stream_id": stream_id, "producer_id": producer_id, "epoch": epoch, "seq": seq}
            cursor.execute(statement.sql, statement.args(values))
        return changes

    def _claim(self, stream_id: str, spool: Spool | None) -> Claim | None:
        """The stream's file for this batch's bytes, or None to keep them in the database.

        A spool of this batch brings its claim. Another writer's claim (a spool still receiving its body,
        or a store in another process) means the file is busy: the bytes then go into the database, which
        every reader handles the same, rather than waiting for the other writer while holding the database.
        """
        if self._files is None:
            return None
        if spool is not None:
            return spool.claim
        claim = self._files.claim(stream_id)
        if claim is not None:
            self._claims.append(claim)
        return claim


def _close_spools(batch: list[AppendOp | CallOp]) -> None:
    """Let go of the batch's spooled files, once the writer is done with them (not on cancellation)."""
    for op in batch:
        if isinstance(op, AppendOp) and op.spool is not None:
            op.spool.close()


