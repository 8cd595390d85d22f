"""The vocabulary: value types, offsets and ids, and lifecycle(), the one live/closed/expired/gone rule
(errors are in errors.py, the tables in store/schema.py)."""

from __future__ import annotations

import enum
import json
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from . import clock
from .errors import StreamGoneError, StreamNotFoundError

DEFAULT_TTL = 30 * 86400
MIN_TTL = 60
MAX_TTL = 90 * 86400
MAX_NAME_LENGTH = 512
MAX_NAMESPACE_LENGTH = 254


# --- value types ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamState:
    """A snapshot of a stream's record."""

    id: str
    name: str
    namespace: str
    content_type: str
    json_mode: bool
    metadata: dict[str, str]
    created_at: float
    updated_at: float
    closed_at: float | None
    tail: int
    stored_bytes: int
    appends: int
    compress: bool
    compressed: bool
    ttl_seconds: int | None
    sliding: bool
    expires_at: float | None
    last_seq: str | None
    fork_source: str | None
    fork_offset: int | None
    deleted: bool
    generation: int = 0
    stop_requested_at: float | None = None  # when someone asked the writer to stop (POST /stream/{id}/stop)
    visibility: str | None = None  # "public", "private", or None to follow STREAMHOLD_READS

    @property
    def closed(self) -> bool:
        return self.closed_at is not None

    def expired(self, now: float | None = None) -> bool:
        """Whether it has expired by `now`, or else by the clock expiry is judged by (app/clock.py)."""
        return self.expires_at is not None and self.expires_at <= (clock.now() if now is None else now)

    @classmethod
    def from_row(cls, row: Any) -> StreamState:
        """Build a snapshot from a `streams` row (a dict, an ORM object or a SQL row)."""
        if isinstance(row, dict):
            get = row.__getitem__
        else:
            get = row._mapping.__getitem__ if hasattr(row, "_mapping") else row.__getattribute__
        return cls(
            id=get("id"),
            name=get("name"),
            namespace=get("namespace"),
            content_type=get("content_type"),
            json_mode=bool(get("json_mode")),
            metadata=json.loads(get("metadata_json") or "{}"),
            created_at=get("created_at"),
            updated_at=get("updated_at"),
            closed_at=get("closed_at"),
            tail=get("tail"),
            stored_bytes=get("stored_bytes"),
            appends=get("appends"),
            compress=bool(get("compress")),
            compressed=bool(get("compressed")),
            ttl_seconds=get("ttl_seconds"),
            sliding=bool(get("sliding")),
            expires_at=get("expires_at"),
            last_seq=get("last_seq"),
            fork_source=get("fork_source"),
            fork_offset=get("fork_offset"),
            deleted=bool(get("deleted")),
            generation=get("generation") or 0,
            stop_requested_at=_optional(get, "stop_requested_at"),
            visibility=_optional(get, "visibility"),
        )


def _optional(get: Callable[[str], Any], key: str) -> Any:
    """A column that rows selected before it existed (old statements, old backups) may lack."""
    try:
        return get(key)
    except (KeyError, AttributeError):
        return None


class Lifecycle(enum.Enum):
    """Where a stream is in its life, as every surface judges it (see `lifecycle`)."""

    OPEN = "open"
    CLOSED = "closed"
    EXPIRED = "expired"
    DELETED = "deleted"  # soft-deleted: forks of it still read its bytes
    MISSING = "missing"

    @property
    def readable(self) -> bool:
        return self is Lifecycle.OPEN or self is Lifecycle.CLOSED


def lifecycle(state: StreamState | None, now: float | None = None) -> Lifecycle:
    """The one rule for whether a stream is live, closed, expired or gone.

    `state` must come from a fresh read of the store (never a cache), and expiry is judged by the one
    clock (app/store/clock.py) unless `now` is given: a refusal is never taken from a stale copy.
    """
    if state is None:
        return Lifecycle.MISSING
    if state.expired(now):  # an expired stream is gone even before the sweeper deletes it
        return Lifecycle.EXPIRED
    if state.deleted:
        return Lifecycle.DELETED
    return Lifecycle.CLOSED if state.closed_at is not None else Lifecycle.OPEN


def require_live(state: StreamState | None, subject: str = "stream") -> StreamState:
    """`state` if it is readable (open or closed); else StreamNotFoundError, or StreamGoneError when it
    was deleted while forks of it remain. Surfaces map these to their own statuses."""
    stage = lifecycle(state)
    if stage.readable:
        assert state is not None
        return state
    if stage is Lifecycle.DELETED:
        raise StreamGoneError(f"{subject} was deleted; forks of it still exist")
    raise StreamNotFoundError(f"{subject} not found")


@dataclass(frozen=True, slots=True)
class Producer:
    """Idempotent-producer headers of one append."""

    id: str
    epoch: int
    seq: int


@dataclass(frozen=True, slots=True)
class AppendResult:
    """What an append did: the new tail, whether it was a producer duplicate, the producer's state."""

    tail: int
    closed: bool
    duplicate: bool = False
    producer_epoch: int | None = None
    producer_seq: int | None = None


@dataclass(frozen=True, slots=True)
class StreamFilter:
    """Which streams a listing shows."""

    namespace: str | None = None
    metadata: tuple[tuple[str, str], ...] = ()
    state: str | None = None  # "open", "closed" or "expiring"
    id_prefix: str | None = None
    # Namespaces (exact, `prefix/*` or `*`) a listing is kept within, as a token's are; None for all.
    namespaces: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class Change:
    """What a committed operation changed about one stream: the message of a doorbell."""

    stream_id: str
    tail: int
    closed: bool
    gone: bool = False
    added_chunk: int = 0  # the size of the chunk the operation added, if it added one
    stop: bool = False  # someone asked the stream's writer to stop (then `tail` may be -1: no news of it)


# --- offsets and ids -----------------------------------------------------------------------------

_OFFSET = re.compile(r"^(\d{1,19})_(\d{1,19})$")


def format_offset(position: int, generation: int = 0) -> str:
    """The protocol's offset token: the stream's generation and a byte position, each of 16 digits."""
    return f"{generation:016d}_{position:016d}"


def parse_offset(token: str) -> int | None:
    """The byte position of an offset token, or None when the token is malformed."""
    match = _OFFSET.match(token)
    return int(match.group(2)) if match else None


def split_offset(token: str) -> tuple[int, int] | None:
    """The (generation, byte position) of an offset token, or None when the token is malformed."""
    match = _OFFSET.match(token)
    return (int(match.group(1)), int(match.group(2))) if match else None


MAX_FORK_DEPTH = 64


def offset_belongs(
    state: StreamState, generation: int, position: int, stream_by_id: Callable[[str], StreamState | None]
) -> bool:
    """Whether an offset minted with `generation` may be read from `position` in this stream.

    Its own generation, the all-zero start, or (for a fork) a source's generation at or before the fork
    point, since a fork shares its source's bytes and offsets up to there.
    """
    if generation == state.generation or (generation == 0 and position == 0):
        return True
    current: StreamState | None = state
    for _ in range(MAX_FORK_DEPTH):
        if current is None or current.fork_source is None or current.fork_offset is None:
            return False
        if position > current.fork_offset:
            return False
        current = stream_by_id(current.fork_source)
        if current is not None and current.generation == generation:
            return True
    return False


_last_ms = 0
_last_counter = 0
COUNTER_BITS = 10  # of UUIDv7's 74 random bits: the other 64 are random in every id


def new_stream_id() -> str:
    """`stream_` and the 32 hex digits of a UUIDv7, so ids sort by creation time.

    Ids made in one millisecond step a 10-bit counter that starts at random (RFC 9562 method 1) and
    keep 64 fresh random bits each, so an id tells nothing about its neighbours.
    """
    global _last_ms, _last_counter
    ms = time.time_ns() // 1_000_000
    if ms <= _last_ms:
        ms, counter = _last_ms, _last_counter + 1
        if counter >= 1 << COUNTER_BITS:  # the counter ran out: borrow the next millisecond
            ms, counter = ms + 1, 0
    else:
        counter = int.from_bytes(os.urandom(2), "big") >> (16 - COUNTER_BITS + 1)  # the lower half
    _last_ms, _last_counter = ms, counter
    random_bits = int.from_bytes(os.urandom(8), "big")
    rand_a = counter << 2 | random_bits >> 62
    rand_b = random_bits & ((1 << 62) - 1)
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b
    return "stream_" + f"{value:032x}"


def iso(ts: float | None) -> str | None:
    """An ISO 8601 UTC timestamp, or None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def clamp_ttl(ttl: int | float | None) -> int | None:
    """Agentuity's TTL rule: None or 0 never expires; anything else is clamped to [60 s, 90 days]."""
    if ttl is None or ttl == 0:
        return None
    return int(min(max(ttl, MIN_TTL), MAX_TTL))


K = TypeVar("K")
V = TypeVar("V")


class LRU(Generic[K, V]):
    """A map of at most `size` entries that forgets the least recently used one first.

    Per-stream caches are these, so that what a process keeps never grows with the streams it has seen,
    and a working set larger than the bound costs a miss per evicted entry, not an emptied cache.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[K, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __iter__(self) -> Iterator[K]:
        return iter(self._items)

    def get(self, key: K, default: V | None = None) -> V | None:
        """The value, marked as just used; `default` if absent."""
        try:
            self._items.move_to_end(key)
        except KeyError:
            return default
        return self._items[key]

    def put(self, key: K, value: V) -> tuple[K, V] | None:
        """Set the value (marked as just used); returns the entry evicted to make room, if any."""
        self._items[key] = value
        self._items.move_to_end(key)
        if len(self._items) > self.size:
            return self._items.popitem(last=False)
        return None

    def pop(self, key: K, default: V | None = None) -> V | None:
        return self._items.pop(key, default)

    def clear(self) -> None:
        self._items.clear()
