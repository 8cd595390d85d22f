"""The fault harness's plumbing: the stream names it plays with, requests to any server, offsets.

A request that fails without an answer raises Transport, which says whether it may have reached a server.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx

from tests._fault_history import History
from tests._server import ServerProcess

PREFIX = "/v1/stream/"
OCTETS = "application/octet-stream"


def offset_token(position: int) -> str:
    return f"0000000000000000_{position:016d}"


def offset_position(token: str | None) -> int | None:
    if not token or "_" not in token:
        return None
    try:
        return int(token.rsplit("_", 1)[1])
    except ValueError:
        return None


class RWLock:
    """Many holders in shared mode or one in exclusive mode; a waiting exclusive one holds off new shared."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._exclusive and not self._waiting)
            self._shared += 1
        try:
            yield
        finally:
            async with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._cond:
            self._waiting += 1
            await self._cond.wait_for(lambda: not self._exclusive and self._shared == 0)
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            async with self._cond:
                self._exclusive = False
                self._cond.notify_all()


@dataclass
class Slot:
    """A stream name the workload plays with, and what the workload knows of its current incarnation."""

    key: str
    kind: str  # named (protocol create), id (the /stream API's create), fork (a protocol fork)
    ttl: str = ""  # "", "sliding" or "fixed"
    lock: RWLock = field(default_factory=RWLock)
    inc: int = 0
    alive: bool = False
    path: str = ""  # the name in /v1/stream/{path}
    closed: bool = False
    busy: int = 0  # structural operations in progress
    version: int = 0
    expires: float = 0.0  # monotonic time before which a TTL incarnation surely lives
    producers: dict[int, list[object]] = field(default_factory=dict)
    ids: dict[int, str] = field(default_factory=dict)  # incarnation -> server stream id (id slots)


class Transport(Exception):
    """A request whose fate is unknown (it may have reached a server), or that surely never left."""

    def __init__(self, sent: bool, text: str) -> None:
        super().__init__(text)
        self.sent = sent


# A slot as a request found it: incarnation, alive, structural operations running, version, deleted ones.
Mark = tuple[int, bool, int, int, frozenset[int]]


class Wire:
    """Requests to whichever server is up, and what a read may have met while it was out."""

    def __init__(self, servers: Sequence[ServerProcess], history: History, allowed_5xx: bool) -> None:
        self.servers = list(servers)
        self.history = history
        self.allowed_5xx = allowed_5xx
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(15.0, connect=2.0))

    def server(self, rng: random.Random) -> ServerProcess:
        running = [s for s in self.servers if s.running] or self.servers
        return rng.choice(running)

    async def request(self, rng: random.Random, method: str, path: str, **kwargs: object) -> httpx.Response:
        url = self.server(rng).url + path
        try:
            return await self.client.request(method, url, **kwargs)  # type: ignore[arg-type]
        except httpx.ConnectError as exc:
            raise Transport(False, f"{type(exc).__name__}") from exc
        except httpx.TransportError as exc:
            raise Transport(True, f"{type(exc).__name__}") from exc

    def mark(self, slot: Slot) -> Mark:
        deleted = frozenset(
            number
            for (key, number), inc in self.history.incarnations.items()
            if key == slot.key and inc.ended == "deleted"
        )
        return slot.inc, slot.alive, slot.busy, slot.version, deleted

    def candidates(self, slot: Slot, before: Mark, fixed: int | None = None) -> tuple[tuple[int, ...], bool]:
        """The incarnations a read of `slot` sent at `before` could meet, and whether surely one, alive."""
        inc0, alive0, busy0, version0, _ = before
        # A create still out when the answer came may have made the next incarnation, which it may be.
        last = max(slot.inc, 1) + (1 if slot.busy else 0)
        incs = tuple(range(max(inc0, 1), last + 1)) if fixed is None else (fixed,)
        stable = alive0 and busy0 == 0 and slot.busy == 0 and version0 == slot.version and not slot.ttl
        if fixed is not None and (inc0 != fixed or slot.inc != fixed):
            stable = False
        return incs, stable

    def gone(self, slot: Slot, before: Mark, fixed: int | None = None) -> int:
        """The incarnation a read sent at `before` could not meet: its delete had been answered."""
        number = before[0] if fixed is None else fixed
        return number if number in before[4] else 0

    def target(self, slot: Slot) -> tuple[str, int | None]:
        """The path to read `slot` at, and for a /stream-created slot the one incarnation it names."""
        if slot.kind == "id":
            return PREFIX + slot.path, slot.inc
        return PREFIX + slot.path, None
