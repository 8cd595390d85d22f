"""The fault harness's history: what was sent, what came back, and which incarnation each stream was in.

Every append body is a record that names itself (`[uid:length]` and bytes derived from the uid), so the
checker can parse any stream content back into the appends that made it.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

HEADER_LEN = 23  # "[" + 12 hex digits + ":" + 8 digits + "]"


def record_bytes(uid: int, length: int) -> bytes:
    """The body of append `uid`: a header naming it, then bytes only that uid produces."""
    header = f"[{uid:012x}:{length:08d}]".encode()
    assert len(header) == HEADER_LEN and length >= HEADER_LEN
    filler = random.Random(uid).randbytes(length - HEADER_LEN)
    return header + filler


def parse_header(data: bytes, position: int) -> tuple[int, int] | None:
    """The (uid, length) of a record header at `position`, or None if there is none."""
    head = data[position : position + HEADER_LEN]
    if len(head) < HEADER_LEN or head[:1] != b"[" or head[13:14] != b":" or head[22:23] != b"]":
        return None
    try:
        return int(head[1:13], 16), int(head[14:22])
    except ValueError:
        return None


@dataclass
class Incarnation:
    """One life of a stream name, from the create that made it to its delete or expiry."""

    key: str
    number: int
    stream_id: str = ""
    ttl: float | None = None
    fork_of: tuple[str, int, int] | None = None  # (source key, source incarnation, fork offset)
    final: bytes | None = None  # its whole content, read while nothing could append
    final_note: str = ""
    ended: str = ""  # "deleted" or "expired", when known

    @property
    def label(self) -> str:
        return f"{self.key}#{self.number}"


@dataclass
class Append:
    """One append as the workload sent it, and what it learned of its fate."""

    uid: int
    key: str
    inc: int
    data: bytes
    t0: float
    t1: float = 0.0
    outcome: str = "pending"  # ack (at start..end), ack-dup or ack-somewhere (offset unknown), fail, maybe
    start: int | None = None
    end: int | None = None
    statuses: list[str] = field(default_factory=list)
    producer: tuple[str, int, int] | None = None


@dataclass
class Read:
    """One read (or one SSE event) of a stream: the bytes it delivered at the offsets it claimed.

    `incs` are the incarnations the name could have had while the request was out; `session` groups reads
    that follow each other's offsets (one reader), which must all stay in one incarnation.
    """

    kind: str
    key: str
    incs: tuple[int, ...]
    t0: float
    t1: float
    status: int | None
    start: int | None = None
    end: int | None = None
    data: bytes = b""
    claimed: int | None = None  # the offset the response says it delivered up to
    session: int = 0
    parent: int = 0  # the session this one went on from (a reader resuming at an offset it was given)
    note: str = ""
    stable: bool = False  # the stream surely existed and nothing structural ran meanwhile
    gone: int = 0  # an incarnation whose end (delete or expiry) was known before the request was sent
    closed_claim: bool = False


@dataclass
class Event:
    """A line of the history for a failure report."""

    t: float
    text: str


class History:
    """Everything the workload did, in one place, for the checker and the failure report."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.started = time.monotonic()
        self.incarnations: dict[tuple[str, int], Incarnation] = {}
        self.appends: dict[int, Append] = {}
        self.reads: list[Read] = []
        self.events: list[Event] = []
        self.server_errors: list[str] = []
        self.kills = 0
        self._uid = seed * 1_000_003 % (1 << 40)

    def next_uid(self) -> int:
        self._uid += 1
        return self._uid

    def note(self, text: str) -> None:
        self.events.append(Event(time.monotonic() - self.started, text))

    def incarnation(self, key: str, number: int, **values: Any) -> Incarnation:
        inc = self.incarnations.get((key, number))
        if inc is None:
            inc = self.incarnations[(key, number)] = Incarnation(key, number)
        for name, value in values.items():
            setattr(inc, name, value)
        return inc

    def tail(self, count: int = 40) -> str:
        lines = [f"{e.t:8.3f}s {e.text}" for e in self.events[-count:]]
        return "\n".join(lines)
