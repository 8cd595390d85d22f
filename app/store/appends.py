"""The append rules, pure: an append checked against its stream as the batch left it, applied in memory."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from ..errors import (
    ContentTypeMismatchError,
    InvalidRequestError,
    ProducerSeqGapError,
    SeqConflictError,
    StaleEpochError,
    StreamClosedError,
    StreamGoneError,
    StreamNotFoundError,
)
from ..models import AppendResult, Producer, StreamState
from .chunk_files import Spool


@dataclass(slots=True)
class AppendOp:
    """One append (or close) waiting for the writer."""

    stream_id: str
    data: bytes | bytearray  # a bytearray once later writes are joined to it (Writer.join_last)
    future: asyncio.Future[AppendResult]
    content_type: str | None = None
    seq: str | None = None
    producer: Producer | None = None
    close: bool = False
    compress: bool = False
    spool: Spool | None = None  # the body, already in the stream's file; the writer closes it


@dataclass(slots=True)
class Record:
    """A stream's record as the writer knows it: fixed facts as read, the fields appends change as written."""

    facts: StreamState  # its content type, TTL and deleted flag hold; its other fields may be stale
    waiting: int  # bytes pending in the record
    tail: int
    stored_bytes: int
    appends: int
    closed_at: float | None
    last_seq: str | None
    expires_at: float | None
    compress: bool

    @classmethod
    def read(cls, state: StreamState, waiting: int) -> Record:
        return cls(
            state,
            waiting,
            state.tail,
            state.stored_bytes,
            state.appends,
            state.closed_at,
            state.last_seq,
            state.expires_at,
            state.compress,
        )


@dataclass(slots=True)
class Pending:
    """A stream's state while a batch of appends is applied to it in memory."""

    record: Record  # as the batch found it
    tail: int
    closed_at: float | None
    last_seq: str | None
    expires_at: float | None
    compress: bool
    appends: int = 0
    parts: list[bytes | bytearray] = field(default_factory=list)
    changed: bool = False
    spool: Spool | None = None


def media_type(content_type: str) -> str:
    """The media type of a Content-Type value, lower-cased, without parameters."""
    return content_type.split(";", 1)[0].strip().lower()


def apply_append(
    p: Pending | None, op: AppendOp, states: dict[tuple[str, str], list[int]], now: float
) -> AppendResult:
    """Check one append against the stream's state as the batch has left it, and apply it in memory."""
    if p is None or (p.expires_at is not None and p.expires_at <= now):
        raise StreamNotFoundError("stream not found")
    if p.record.facts.deleted:
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
    facts = p.record.facts
    if (
        op.data
        and op.content_type is not None
        and media_type(op.content_type) != media_type(facts.content_type)
    ):
        raise ContentTypeMismatchError(
            f"Content-Type {media_type(op.content_type)} does not match the stream's {facts.content_type}"
        )
    if op.seq is not None:
        if p.last_seq is not None and op.seq.encode() <= p.last_seq.encode():
            raise SeqConflictError(f"Stream-Seq {op.seq!r} is not greater than the last one")
        p.last_seq = op.seq
    if op.data:
        p.parts.append(op.data)
        p.tail += len(op.data)
        p.appends += 1
        if op.spool is not None:
            p.spool = op.spool
    if op.close:
        p.closed_at = now
        p.compress = p.compress or op.compress
    if facts.sliding and facts.ttl_seconds:
        p.expires_at = now + facts.ttl_seconds
    p.changed = True
    if producer is not None:
        states[(op.stream_id, producer.id)] = [producer.epoch, producer.seq]
        return AppendResult(p.tail, p.closed_at is not None, False, producer.epoch, producer.seq)
    return AppendResult(p.tail, p.closed_at is not None)
