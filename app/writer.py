"""Group commit: one writer per process applies queued operations in as few transactions as it can."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, insert, select, update

from app.models import (
    AppendResult,
    ContentTypeMismatchError,
    InvalidRequestError,
    ProducerRow,
    ProducerSeqGapError,
    Producer,
    SeqConflictError,
    StaleEpochError,
    StreamClosedError,
    StreamError,
    StreamGoneError,
    StreamNotFoundError,
    StreamRow,
    ChunkRow,
)

log = logging.getLogger("streamhold.writer")

streams = StreamRow.__table__
chunks = ChunkRow.__table__
producers = ProducerRow.__table__

MAX_BATCH_OPS = 4096
MAX_BATCH_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Change:
    """What a committed operation changed about one stream, for the doorbells."""

    stream_id: str
    tail: int
    closed: bool
    gone: bool = False


@dataclass(slots=True)
class AppendOp:
    """One append (or close) waiting for the writer."""

    stream_id: str
    data: bytes
    future: asyncio.Future[AppendResult]
    content_type: str | None = None
    seq: str | None = None
    producer: Producer | None = None
    close: bool = False
    compress: bool = False


@dataclass(slots=True)
class CallOp:
    """Any other write: `fn(conn)` in a transaction of its own; returns (result, changes)."""

    fn: Callable[[Connection], tuple[Any, list[Change]]]
    future: asyncio.Future[Any]


@dataclass(slots=True)
class _Pending:
    """A stream's state while a batch of appends is applied to it in memory."""

    row: Any
    tail: int
    closed_at: float | None
    last_seq: str | None
    expires_at: float | None
    compress: bool
    appends: int = 0
    parts: list[bytes] = field(default_factory=list)
    changed: bool = False


def media_type(content_type: str) -> str:
    """The media type of a Content-Type value, lower-cased, without parameters."""
    return content_type.split(";", 1)[0].strip().lower()


class Writer:
    """Runs every write of this process through one thread, committing concurrent appends together."""

    def __init__(self, engine: Engine, postgres: bool, on_change: Callable[[list[Change]], None]) -> None:
        self._engine = engine
        self._postgres = postgres
        self._on_change = on_change
        self._queue: collections.deque[AppendOp | CallOp] = collections.deque()
        self._wakeup = asyncio.Event()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="streamhold-writer")
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.appends = 0
        self.bytes_appended = 0
        self.commits = 0
        self.after_close: Callable[[str, bool], None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="streamhold-writer")

    async def stop(self) -> None:
        """Finish what is queued, then stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        self._thread.shutdown(wait=True)

    def submit(self, op: AppendOp | CallOp) -> None:
        if self._closing:
            op.future.set_exception(RuntimeError("the store is shutting down; retry against a running server"))
            return
        self._queue.append(op)
        self._wakeup.set()

    async def call(self, fn: Callable[[Connection], tuple[Any, list[Change]]]) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.submit(CallOp(fn, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    return
                await self._wakeup.wait()
                self._wakeup.clear()
                continue
            batch = self._take_batch()
            try:
                if isinstance(batch[0], CallOp):
                    outcome = await loop.run_in_executor(self._thread, self._run_call, batch[0])
                    outcomes: list[tuple[bool, Any]] = [outcome[0]]
                    changes = outcome[1]
                else:
                    appends: list[AppendOp] = batch  # type: ignore[assignment]
                    outcomes, changes = await loop.run_in_executor(self._thread, self._run_appends, appends)
            except Exception as exc:  # the transaction failed as a whole
                log.exception("write transaction failed")
                for op in batch:
                    if not op.future.done():
                        op.future.set_exception(exc)
                continue
            for op, (ok, value) in zip(batch, outcomes, strict=True):
                if op.future.done():
                    continue
                if ok:
                    op.future.set_result(value)
                else:
                    op.future.set_exception(value)
            if changes:
                self._on_change(changes)

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
        now = time.time()
        ids = list({op.stream_id for op in ops})
        with self._engine.begin() as conn:
            query = select(streams).where(streams.c.id.in_(ids))
            if self._postgres:
                query = query.with_for_update()
            pending = {
                row.id: _Pending(row, row.tail, row.closed_at, row.last_seq, row.expires_at, row.compress)
                for row in conn.execute(query)
            }
            states = self._load_producers(conn, ops)
            known = set(states)
            outcomes: list[tuple[bool, Any]] = []
            for op in ops:
                try:
                    outcomes.append((True, _apply(pending.get(op.stream_id), op, states, now)))
                except StreamError as exc:
                    outcomes.append((False, exc))
            changes = self._write(conn, pending, states, known, now)
        self.commits += 1
        return outcomes, changes

    def _load_producers(self, conn: Connection, ops: list[AppendOp]) -> dict[tuple[str, str], list[int]]:
        wanted = {(op.stream_id, op.producer.id) for op in ops if op.producer is not None}
        if not wanted:
            return {}
        query = select(producers).where(
            producers.c.stream_id.in_({s for s, _ in wanted}),
            producers.c.producer_id.in_({p for _, p in wanted}),
        )
        return {
            (r.stream_id, r.producer_id): [r.epoch, r.seq]
            for r in conn.execute(query)
            if (r.stream_id, r.producer_id) in wanted
        }

    def _write(
        self,
        conn: Connection,
        pending: dict[str, _Pending],
        states: dict[tuple[str, str], list[int]],
        known: set[tuple[str, str]],
        now: float,
    ) -> list[Change]:
        new_chunks = []
        updates = []
        changes = []
        for stream_id, p in pending.items():
            if not p.changed:
                continue
            data = b"".join(p.parts)
            if data:
                new_chunks.append({"stream_id": stream_id, "start": p.row.tail, "data": data})
                self.appends += p.appends
                self.bytes_appended += len(data)
            updates.append(
                {
                    "_id": stream_id,
                    "tail": p.tail,
                    "stored_bytes": p.row.stored_bytes + len(data),
                    "appends": p.row.appends + p.appends,
                    "closed_at": p.closed_at,
                    "last_seq": p.last_seq,
                    "expires_at": p.expires_at,
                    "compress": p.compress,
                    "updated_at": now,
                }
            )
            changes.append(Change(stream_id, p.tail, p.closed_at is not None))
            if p.closed_at is not None and p.row.closed_at is None and self.after_close is not None:
                self.after_close(stream_id, p.compress)
        if new_chunks:
            conn.execute(insert(chunks), new_chunks)
        if updates:
            stmt = (
                update(streams)
                .where(streams.c.id == bindparam("_id"))
                .values({k: bindparam(k) for k in updates[0] if k != "_id"})
            )
            conn.execute(stmt, updates)
        if states:
            rows = [{"s": s, "p": p, "epoch": e, "seq": q} for (s, p), (e, q) in states.items()]
            fresh = [r for r in rows if (r["s"], r["p"]) not in known]
            old = [r for r in rows if (r["s"], r["p"]) in known]
            if fresh:
                conn.execute(
                    insert(producers),
                    [{"stream_id": r["s"], "producer_id": r["p"], "epoch": r["epoch"], "seq": r["seq"]} for r in fresh],
                )
            if old:
                conn.execute(
                    update(producers)
                    .where(producers.c.stream_id == bindparam("s"), producers.c.producer_id == bindparam("p"))
                    .values(epoch=bindparam("epoch"), seq=bindparam("seq")),
                    old,
                )
        return changes


def _apply(
    p: _Pending | None, op: AppendOp, states: dict[tuple[str, str], list[int]], now: float
) -> AppendResult:
    """Check one append against the stream's state as the batch has left it, and apply it in memory."""
    if p is None or (p.expires_at is not None and p.expires_at <= now):
        raise StreamNotFoundError("stream not found")
    if p.row.deleted:
        raise StreamGoneError("stream was deleted")
    producer = op.producer
    state: list[int] | None = None
    if producer is not None:
        state = states.get((op.stream_id, producer.id))
        if state is not None:
            epoch, last = state
            if producer.epoch < epoch:
                raise StaleEpochError(epoch)
            if producer.epoch == epoch and producer.seq <= last:
                return AppendResult(p.tail, p.closed_at is not None, True, epoch, last)
    if p.closed_at is not None:
        if op.close and not op.data and producer is None:
            return AppendResult(p.tail, True)  # closing a closed stream is idempotent
        raise StreamClosedError("stream is closed", p.tail)
    if producer is not None:
        if state is None or producer.epoch > state[0]:
            if producer.seq != 0:
                if state is not None:
                    raise InvalidRequestError("a new producer epoch must start at Producer-Seq 0")
                raise ProducerSeqGapError(0, producer.seq)
        elif producer.seq != state[1] + 1:
            raise ProducerSeqGapError(state[1] + 1, producer.seq)
    if op.data and op.content_type is not None and media_type(op.content_type) != media_type(p.row.content_type):
        raise ContentTypeMismatchError(
            f"Content-Type {media_type(op.content_type)} does not match the stream's {p.row.content_type}"
        )
    if op.seq is not None:
        if p.last_seq is not None and op.seq.encode() <= p.last_seq.encode():
            raise SeqConflictError(f"Stream-Seq {op.seq!r} is not greater than the last one")
        p.last_seq = op.seq
    if op.data:
        p.parts.append(op.data)
        p.tail += len(op.data)
        p.appends += 1
    if op.close:
        p.closed_at = now
        p.compress = p.compress or op.compress
    if p.row.sliding and p.row.ttl_seconds:
        p.expires_at = now + p.row.ttl_seconds
    p.changed = True
    if producer is not None:
        states[(op.stream_id, producer.id)] = [producer.epoch, producer.seq]
        return AppendResult(p.tail, p.closed_at is not None, False, producer.epoch, producer.seq)
    return AppendResult(p.tail, p.closed_at is not None)
