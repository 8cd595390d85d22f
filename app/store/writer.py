"""Group commit: one writer per process applies queued operations in as few transactions as it can."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Connection, Engine

from ..errors import StreamError
from ..models import AppendResult, Change
from . import calls, creates, transactions
from .appends import AppendOp, Record
from .batches import AppendBatches
from .calls import CallOp
from .chunk_files import ChunkFiles
from .disk import DiskSpace
from .loop_thread import LoopThread
from .statements import Statements

log = logging.getLogger("streamhold.writer")

MAX_BATCH_OPS = 4096
MAX_BATCH_BYTES = 16 * 1024 * 1024
# A batch commits on the event loop rather than the writer thread while commits are quick, or when it is
# this large. The hand-over to the thread and back costs more than a quick sync: waking the thread on the
# other core and getting the GIL back took 0.3-0.6 ms a commit under 16 writers, longer than the 0.3 ms
# COMMIT itself. Measured side by side (16 writers of 64-byte appends, 12 runs each): 7% more appends/s
# on 17% less server CPU. A slow disk sends commits to the thread, so the loop never waits on it for long.
# Large batches always win on the loop: about 15% faster with one writer of 1 MiB appends.
LOOP_COMMIT_BYTES = 256 * 1024
QUICK_COMMIT_S = 0.001
IDLE_CHECKPOINT_S = 0.5
# A failed batch of appends to several streams is retried in parts by stream, in at most this many
# transactions: enough to find one failing stream among the 4096 a batch may hold.
ISOLATION_TRANSACTIONS = 32
# PostgreSQL: batches of appends in flight at once, each on a connection and thread of its own. Its COMMIT
# waits for the WAL to reach the disk, so one batch at a time leaves the process waiting on every commit;
# with a second, one batch fills while the other commits, and the server flushes overlapping commits
# together. A stream is in one batch in flight at a time, so its appends still commit in order.
POSTGRES_LANES = 2
# While a batch is in flight, another starts only once this many writes wait: each commit costs the server
# and the database about as much as several appends, and smaller batches spent it on too few. Measured (16
# writers of 64-byte appends, 3 runs each, side by side): 17% less server CPU per append than starting one
# at once, and as many appends/s.
LANE_MIN_OPS = 4
PASSED_OPS = 64


@dataclass(slots=True)
class _Lane:
    """A connection for batches of appends (in its AppendBatches) and the thread its batches run on."""

    batches: AppendBatches
    thread: LoopThread


class Writer(AppendBatches):
    """Runs every write of this process through one thread, committing concurrent appends together."""

    def __init__(
        self,
        engine: Engine,
        postgres: bool,
        on_change: Callable[[list[Change]], None],
        statements: Statements,
        files: ChunkFiles | None = None,
    ) -> None:
        super().__init__(engine, postgres, statements, files)
        self._on_change = on_change
        self._queue: collections.deque[AppendOp | CallOp] = collections.deque()
        self._wakeup = asyncio.Event()
        self._thread = LoopThread("streamhold-writer")
        # The writer's own connection is the first lane; PostgreSQL has others (POSTGRES_LANES).
        self._lanes = [_Lane(self, self._thread)]
        if postgres:
            self._lanes += [
                _Lane(
                    AppendBatches(engine, True, statements, known=self._known),
                    LoopThread(f"streamhold-writer-{i}"),
                )
                for i in range(1, POSTGRES_LANES)
            ]
        self._free = list(self._lanes)
        self._busy: set[str] = set()  # the streams of the batches in flight
        self._flying: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.space = DiskSpace()  # tells a full disk's errors apart (StorageFullError) and counts them
        self._checkpointed = 0
        self._checkpoint: asyncio.Future[None] | None = None
        self._creates = None if postgres else creates.CreateStatements(engine)

    def start(self) -> None:
        for lane in self._lanes:
            lane.thread.loop = asyncio.get_running_loop()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="streamhold-writer")

    async def stop(self) -> None:
        """Finish what is queued, then stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        if self._checkpoint is not None:
            with contextlib.suppress(Exception):
                await self._checkpoint
        for lane in self._lanes:
            lane.thread.stop()
            if lane.batches._pooled is not None:
                lane.batches._pooled.close()

    def append_lanes(self) -> list[AppendBatches]:
        """The connections that batches of appends run on: the writer itself, and others on PostgreSQL."""
        return [lane.batches for lane in self._lanes]

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

    def join_close(self, stream_id: str, compress: bool) -> asyncio.Future[AppendResult] | None:
        """Make the last queued op close the stream if it is a plain append to it; its future, or None.

        The close then commits with the write, and fails with it: a failed write leaves the stream open.
        """
        last = self._queue[-1] if self._queue else None
        if not isinstance(last, AppendOp) or last.stream_id != stream_id or last.close:
            return None
        if last.seq is not None or last.producer is not None or last.content_type is not None:
            return None
        last.close, last.compress = True, compress
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

    async def call(
        self,
        fn: Callable[[Connection], tuple[Any, list[Change]]],
        group: bool = False,
        key: str = "",
        new: transactions.NewStream | None = None,
    ) -> Any:
        """Run `fn(conn)` in a transaction; with `group`, one it may share with other grouped calls.

        `new`, for a plain create that `fn` makes, lets a batch of them run on the driver connection.
        """
        future: asyncio.Future[Any] = self.new_future()
        self.submit(CallOp(fn, future, group, key, new))
        return await future

    async def _run(self) -> None:
        while True:
            if not self._queue or not self._may_take():
                if self._closing and not self._queue and not self._flying:
                    return
                await self._idle()
                continue
            # One more pass of the event loop first, so that the requests it is handling join this batch:
            # measured with 16 writers, 9% more appends/s and 0.6 ms less latency (p50), on 5% less CPU.
            await asyncio.sleep(0)
            if not self._queue or not self._may_take():  # a batch that ended meanwhile failed what was queued
                continue
            batch = self._take_batch()
            if not batch:  # every queued append is to a stream whose batch is in flight
                await self._idle()
                continue
            if self._postgres and isinstance(batch[0], AppendOp):
                self._fly(cast(list[AppendOp], batch))
                continue
            try:
                if isinstance(batch[0], CallOp):
                    outcomes, changes = await self._calls(cast(list[CallOp], batch))
                else:
                    # A batch is one CallOp or appends only (_take_batch).
                    appends = cast(list[AppendOp], batch)
                    outcomes, changes = await self._isolated_appends(appends, self._lanes[0])
            except Exception as failure:  # the transaction failed as a whole
                self._failed(batch, failure)
                continue
            self._settle(batch, outcomes, changes)

    async def _calls(self, ops: list[CallOp]) -> tuple[list[tuple[bool, Any]], list[Change]]:
        if ops[0].new is not None and self._creates is not None:
            outcomes = await self._sqlite_creates(ops, self._creates)
            if outcomes is not None:
                return outcomes, []
        return await self._thread.run(self._run_calls, ops)

    async def _sqlite_creates(
        self, ops: list[CallOp], statements: creates.CreateStatements
    ) -> list[tuple[bool, Any]] | None:
        """Plain creates on the event loop, as _sqlite_appends runs appends; None: run them as calls instead.

        They are run as calls when another process holds the write lock (the thread then waits for it),
        when one meets an expired stream of its name, or when a statement fails (then one by one).
        """
        cursor = self._driver_connection().cursor()
        try:
            cursor.execute("BEGIN IMMEDIATE")
        except Exception:
            cursor.close()
            return None
        self._file_writes.clear()
        self._commit_sent = False
        try:
            self._cached_rows(cursor)  # emptied if another connection committed: then it takes the new rows
            news = [op.new for op in ops if op.new is not None]
            try:
                outcomes = creates.create_batch(cursor, self._statements, statements, news, self.counter_slot)
            except Exception as exc:  # nothing of it is committed
                if not isinstance(exc, creates.Expired):
                    log.warning("a batch of %d creates failed; running them as calls", len(ops), exc_info=exc)
                with contextlib.suppress(Exception):
                    cursor.execute("ROLLBACK")
                return None
            if self.may_commit_on_loop(sum(len(new.initial) for new in news)):
                self._commit(cursor)
            else:
                await self._thread.run(self._commit, cursor)
        except BaseException:
            self._rows.clear()
            with contextlib.suppress(Exception):
                cursor.execute("ROLLBACK")
            raise
        finally:
            cursor.close()
        self.commits += 1
        # The new streams' records as committed, for the first appends to them to find (see _cached_rows).
        for ok, value in outcomes:
            if ok and value[1]:
                self._rows.put(value[0].id, Record.read(value[0], 0))
        return outcomes

    def _may_take(self) -> bool:
        """Whether the next batch may start: nothing is in flight, or it is appends enough and a lane is free.

        Any other write waits until no batch of appends is in flight, as it would if there were one lane.
        """
        return not self._flying or (
            bool(self._free) and isinstance(self._queue[0], AppendOp) and len(self._queue) >= LANE_MIN_OPS
        )

    def _fly(self, batch: list[AppendOp]) -> None:
        """Commit a batch of appends on a free lane, while the writer goes on to the next batch."""
        lane = self._free.pop(0)
        lane.batches.after_close = self.after_close
        streams = {op.stream_id for op in batch}
        self._busy |= streams
        task = asyncio.get_running_loop().create_task(self._flight(lane, batch, streams))
        self._flying.add(task)

    async def _flight(self, lane: _Lane, batch: list[AppendOp], streams: set[str]) -> None:
        try:
            try:
                outcomes, changes = await self._isolated_appends(batch, lane)
            except Exception as failure:  # the transaction failed as a whole
                self._failed(cast(list[AppendOp | CallOp], batch), failure)
            else:
                self._settle(cast(list[AppendOp | CallOp], batch), outcomes, changes)
        finally:
            done = lane.batches
            if done is not self:  # its counts join the writer's
                self.commits += done.commits
                self.appends += done.appends
                self.bytes_appended += done.bytes_appended
                self.unread_batches += done.unread_batches
                self.changed_rows += done.changed_rows
                done.commits = done.appends = done.bytes_appended = 0
                done.unread_batches = done.changed_rows = 0
            self._busy -= streams
            self._free.append(lane)
            self._free.sort(key=self._lanes.index)  # the writer's own connection first, when it is free
            current = asyncio.current_task()
            if current is not None:
                self._flying.discard(current)
            self._wakeup.set()

    def _failed(self, batch: list[AppendOp | CallOp], failure: Exception) -> None:
        """Fail every write of a batch whose transaction failed as a whole, and what is queued behind it."""
        exc = self.space.classify(failure, len(batch))
        if exc is failure:
            log.error("write transaction failed", exc_info=failure)
        for op in batch:
            if not op.future.done():
                op.future.set_exception(exc)
        _close_spools(batch)
        self._fail_queued({op.stream_id: exc for op in batch if isinstance(op, AppendOp)})

    def _settle(
        self, batch: list[AppendOp | CallOp], outcomes: list[tuple[bool, Any]], changes: list[Change]
    ) -> None:
        """Answer each write of a committed batch, then ring the doorbells of what it changed."""
        _close_spools(batch)
        failed: dict[str, Exception] = {}
        for op, (ok, value) in zip(batch, outcomes, strict=True):
            if not ok and not isinstance(value, StreamError):
                classified = self.space.classify(value)
                if classified is value and isinstance(op, CallOp):
                    log.error("a write failed", exc_info=value)
                value = classified
                if isinstance(op, AppendOp):
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

    async def _appends(self, ops: list[AppendOp], lane: _Lane) -> tuple[list[tuple[bool, Any]], list[Change]]:
        if self._postgres:
            return await lane.thread.run(lane.batches._run_appends, ops)
        return await self._sqlite_appends(ops)

    async def _isolated_appends(
        self, ops: list[AppendOp], lane: _Lane
    ) -> tuple[list[tuple[bool, Any]], list[Change]]:
        """Commit a batch of appends; if it fails, commit its streams apart, so only the failing ones fail.

        A failure that can be one stream's (its chunk file's disk is full, a statement on its rows fails)
        then fails only that stream's appends: the batch is split in halves by stream, again and again
        while a half fails, within a budget of transactions, so a failure of the whole database ends soon.
        """
        try:
            return await self._appends(ops, lane)
        except Exception as exc:
            streams = list(dict.fromkeys(op.stream_id for op in ops))
            if len(streams) < 2 or not self._may_retry(exc, lane.batches):
                raise
            log.warning("a batch of appends to %d streams failed; committing them apart", len(streams))
            return await self._bisect(ops, streams, exc, [ISOLATION_TRANSACTIONS], lane)

    async def _bisect(
        self, ops: list[AppendOp], streams: list[str], error: Exception, budget: list[int], lane: _Lane
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
                outcomes, done = await self._appends(some, lane)
            except Exception as exc:
                if self._may_retry(exc, lane.batches):
                    outcomes, done = await self._bisect(some, part, exc, budget, lane)
                else:
                    log.error("write transaction failed", exc_info=exc)
                    outcomes, done = [(False, exc)] * len(some), []
            results.update(zip(map(id, some), outcomes, strict=True))
            changes += done
        return [results[id(op)] for op in ops], changes

    def _may_retry(self, exc: Exception, batches: AppendBatches) -> bool:
        """Whether a failed transaction of appends is known not to have committed, and may be run again."""
        # Once COMMIT is sent the batch may be committed (on PostgreSQL, or on SQLite if a sync failed
        # after its commit frame was written): doing it again would append twice.
        if batches._commit_sent:
            return False
        # A lost connection, or waiting for another process's lock, is the whole database's trouble.
        if self._postgres:
            return batches._driver is not None
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
                # Short of space, the WAL is emptied and cut to nothing, to give its space back.
                mode = "TRUNCATE" if self.space.problem() else "PASSIVE"
                loop = asyncio.get_running_loop()
                self._checkpoint = loop.run_in_executor(None, self._checkpoint_wal, mode)
                self._checkpoint.add_done_callback(self._checkpoint_done)
                return
        self._wakeup.clear()

    def _checkpoint_wal(self, mode: str = "PASSIVE") -> None:
        # A connection of its own: a PASSIVE checkpoint takes no write lock, so appends go on meanwhile.
        conn = sqlite3.connect(self._engine.url.database or "", timeout=0)
        try:
            conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()
        finally:
            conn.close()

    def _checkpoint_done(self, done: asyncio.Future[None]) -> None:
        self._checkpoint = None
        if not done.cancelled() and done.exception() is not None:
            log.warning("idle WAL checkpoint failed", exc_info=done.exception())

    def _take_batch(self) -> list[AppendOp | CallOp]:
        if self._busy:
            return self._take_appends_around()
        first = self._queue.popleft()
        batch: list[AppendOp | CallOp] = [first]
        if isinstance(first, CallOp):
            # Grouped calls (creates) commit together, as appends do.
            while first.group and self._queue and len(batch) < MAX_BATCH_OPS:
                op = self._queue[0]
                if not isinstance(op, CallOp) or not op.group:
                    break
                if self._creates is not None and (op.new is None) != (first.new is None):
                    break  # plain creates run as a batch of their own (_sqlite_creates)
                batch.append(self._queue.popleft())
            return batch
        size = len(first.data)
        while self._queue and len(batch) < MAX_BATCH_OPS and size < MAX_BATCH_BYTES:
            op = self._queue[0]
            if isinstance(op, CallOp):
                break
            self._queue.popleft()
            size += len(op.data)
            batch.append(op)
        return batch

    def _take_appends_around(self) -> list[AppendOp | CallOp]:
        """The queued appends up to the next other write, but for those to streams whose batch is in flight.

        Those stay queued, in order, until their stream's batch ends: a stream's appends commit in order,
        and none commits after one that failed (_fail_queued).
        """
        batch: list[AppendOp | CallOp] = []
        kept: list[AppendOp] = []
        size = 0
        # Looking past at most PASSED_OPS appends keeps each look cheap however many wait for a busy stream.
        while self._queue and len(batch) < MAX_BATCH_OPS and size < MAX_BATCH_BYTES:
            op = self._queue[0]
            if isinstance(op, CallOp) or len(kept) >= PASSED_OPS:
                break
            self._queue.popleft()
            if op.stream_id in self._busy:
                kept.append(op)
            else:
                size += len(op.data)
                batch.append(op)
        self._queue.extendleft(reversed(kept))
        return batch

    def _run_calls(self, ops: list[CallOp]) -> tuple[list[tuple[bool, Any]], list[Change]]:
        outcomes, changes, commits = calls.run(self._engine, self._postgres, ops)
        self.commits += commits
        return outcomes, changes

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


def _close_spools(batch: list[AppendOp | CallOp]) -> None:
    """Let go of the batch's spooled files, once the writer is done with them (not on cancellation)."""
    for op in batch:
        if isinstance(op, AppendOp) and op.spool is not None:
            op.spool.close()
