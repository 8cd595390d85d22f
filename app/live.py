"""Live doorbells: "stream X now ends at N", across processes through a Litestar channels backend.

Readers never get data from the channel; they re-read the store. Each process holds one subscription
and wakes its own waiters per stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from litestar.channels.backends.base import ChannelsBackend
from litestar.channels.backends.memory import MemoryChannelsBackend

from app.settings import Settings
from app.store import Store
from app.writer import Change

log = logging.getLogger("streamhold.live")

CHANNEL = "streamhold.doorbell"
SHARED_READ_LIMIT = 1024 * 1024


def make_backend(url: str) -> ChannelsBackend | None:
    """The channels backend for STREAMHOLD_CHANNELS_URL; None means in-process only."""
    if not url or url == "memory://":
        return None
    if url.startswith(("redis://", "rediss://")):
        from litestar.channels.backends.redis import RedisChannelsPubSubBackend
        from redis.asyncio import Redis

        return RedisChannelsPubSubBackend(redis=Redis.from_url(url, socket_connect_timeout=5))
    if url.startswith(("postgresql://", "postgres://")):
        from litestar.channels.backends.psycopg import PsycoPgChannelsBackend

        return PsycoPgChannelsBackend(pg_dsn=url)
    raise ValueError(f"STREAMHOLD_CHANNELS_URL must be redis://, postgresql:// or empty, got {url.split(':')[0]}:...")


@dataclass
class _Watch:
    """What this process knows of one stream's tail, and the event its waiters sleep on."""

    tail: int = -1
    closed: bool = False
    gone: bool = False
    event: asyncio.Event = field(default_factory=asyncio.Event)
    readers: int = 0
    cache_start: int = 0
    cache: bytes = b""
    fetching: dict[tuple[int, int], asyncio.Future[bytes]] = field(default_factory=dict)

    def ring(self) -> None:
        self.event.set()
        self.event = asyncio.Event()


class Waiter:
    """A reader's registration on one stream: taken before reading the store, so no doorbell is missed."""

    def __init__(self, watch: _Watch) -> None:
        self._watch = watch
        self._event = watch.event

    @property
    def tail(self) -> int:
        return self._watch.tail

    @property
    def closed(self) -> bool:
        return self._watch.closed

    @property
    def gone(self) -> bool:
        return self._watch.gone

    async def wait(self, timeout: float) -> bool:
        """Wait for a doorbell since the last wait (or registration); False on timeout."""
        try:
            async with asyncio.timeout(timeout):
                await self._event.wait()
        except TimeoutError:
            return False
        finally:
            self._event = self._watch.event
        return True


class LiveHub:
    """Per-process doorbells: wakes local waiters on commit and carries doorbells to other processes."""

    def __init__(self, store: Store, backend: ChannelsBackend | None) -> None:
        self._store = store
        self._backend = backend
        self._watches: dict[str, _Watch] = {}
        self._origin = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._task: asyncio.Task[None] | None = None
        self.sent = 0
        self.received = 0
        self.connected = backend is None
        self.stopping = False
        self.readers: dict[str, int] = {"sse": 0, "long-poll": 0, "http": 0, "sdk": 0}

    @classmethod
    @asynccontextmanager
    async def open(cls, store: Store, settings: Settings) -> AsyncIterator[LiveHub]:
        """Run the hub (and its one channel subscription, if any) for the life of the block."""
        hub = cls(store, make_backend(settings.channels_url))
        store.subscribe(hub.on_commit)
        if hub._backend is not None:
            hub._task = asyncio.get_running_loop().create_task(hub._listen(), name="streamhold-doorbells")
        try:
            yield hub
        finally:
            hub.shutdown()
            if hub._task is not None:
                hub._task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await hub._task
                with contextlib.suppress(Exception):
                    await hub._backend.on_shutdown()  # type: ignore[union-attr]

    def shutdown(self) -> None:
        """Wake every waiter and tell live responses to end: the server is stopping."""
        self.stopping = True
        for watch in self._watches.values():
            watch.ring()

    @contextlib.contextmanager
    def watch(self, stream_id: str, kind: str) -> Iterator[Waiter]:
        """Register as a live reader of a stream for the life of the block."""
        watch = self._watches.get(stream_id)
        if watch is None:
            watch = self._watches[stream_id] = _Watch()
        watch.readers += 1
        self.readers[kind] = self.readers.get(kind, 0) + 1
        try:
            yield Waiter(watch)
        finally:
            watch.readers -= 1
            self.readers[kind] -= 1
            if watch.readers == 0 and not watch.fetching:
                self._watches.pop(stream_id, None)

    def live_readers(self, stream_id: str) -> int:
        watch = self._watches.get(stream_id)
        return watch.readers if watch else 0

    def observe(self, stream_id: str, tail: int, closed: bool) -> None:
        """Record a tail read from the store, so doorbell tails never go backwards."""
        watch = self._watches.get(stream_id)
        if watch is not None and tail > watch.tail:
            watch.tail, watch.closed = tail, closed or watch.closed

    def on_commit(self, changes: list[Change]) -> None:
        for change in changes:
            self._ring_local(change)
        if self._backend is not None and changes:
            payload = json.dumps(
                {"o": self._origin, "c": [[c.stream_id, c.tail, c.closed, c.gone] for c in changes]},
                separators=(",", ":"),
            )
            self.sent += 1
            asyncio.get_running_loop().create_task(self._publish(payload))

    async def _publish(self, payload: str) -> None:
        try:
            await self._backend.publish(payload.encode(), [CHANNEL])  # type: ignore[union-attr]
        except Exception as exc:  # a lost doorbell only delays readers until their timeout
            log.warning("could not publish a doorbell: %s", exc)

    def _ring_local(self, change: Change) -> None:
        watch = self._watches.get(change.stream_id)
        if watch is None:
            return
        if change.gone:
            watch.gone = True
            watch.cache = b""
        if change.tail > watch.tail or (change.closed and not watch.closed):
            watch.tail = max(change.tail, watch.tail)
            watch.closed = watch.closed or change.closed
        watch.ring()

    async def _listen(self) -> None:
        assert self._backend is not None
        delay = 0.2
        while True:
            try:
                await self._backend.on_startup()
                await self._backend.subscribe([CHANNEL])
                self.connected = True
                delay = 0.2
                async for _, message in self._backend.stream_events():
                    self._receive(message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("doorbell subscription lost (%s); retrying in %.1fs", exc, delay)
            self.connected = False
            # Readers may have missed doorbells while the subscription was down: wake them to re-read.
            for watch in self._watches.values():
                watch.ring()
            with contextlib.suppress(Exception):
                await self._backend.on_shutdown()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _receive(self, message: bytes) -> None:
        try:
            payload = json.loads(message)
        except ValueError:
            return
        if payload.get("o") == self._origin:
            return
        self.received += 1
        for stream_id, tail, closed, gone in payload.get("c", []):
            self._ring_local(Change(stream_id, tail, closed, gone))

    async def read(self, stream_id: str, start: int, end: int) -> bytes:
        """Read [start, end) of a live stream, sharing one store read among the readers that want it."""
        watch = self._watches.get(stream_id)
        if watch is None or end - start > SHARED_READ_LIMIT:
            return await self._store.read(stream_id, start, end)
        cached_end = watch.cache_start + len(watch.cache)
        if watch.cache_start <= start and end <= cached_end:
            return watch.cache[start - watch.cache_start : end - watch.cache_start]
        for (lo, hi), pending in watch.fetching.items():
            if lo <= start and end <= hi:
                data = await asyncio.shield(pending)
                return data[start - lo : end - lo]
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        watch.fetching[(start, end)] = future
        try:
            data = await self._store.read(stream_id, start, end)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # the waiters re-raise it; this one is retrieved here
            raise
        finally:
            watch.fetching.pop((start, end), None)
        future.set_result(data)
        if end >= cached_end:
            watch.cache_start, watch.cache = start, data
        return data
