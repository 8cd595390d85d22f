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
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, NamedTuple, Protocol, TypeVar

from litestar.channels.backends.base import ChannelsBackend

from .channels import PUBLISH_TIMEOUT, make_backend
from .errors import StreamNotFoundError
from .models import LRU, Change, StreamState, require_live
from .settings import Settings

K = TypeVar("K")
V = TypeVar("V")
T = TypeVar("T")

log = logging.getLogger("streamhold.live")

CHANNEL = "streamhold.doorbell"
SHARED_READ_LIMIT = 1024 * 1024
COALESCE_FROM = 32  # readers of one stream before its doorbells are gathered
COALESCE_PER_READER = 50e-6  # seconds of gathering per reader
COALESCE_MAX = 0.05
MAX_MESSAGE = 7000  # PostgreSQL refuses NOTIFY payloads of 8000 bytes or more
SUBSCRIBE_TIMEOUT = 10.0
DRAIN_TIMEOUT = 2.0
RETRY_FIRST, RETRY_MAX = 0.1, 2.0
STALLED_READS = 3  # reads in a row that may come back short (compressed meanwhile) before a follow gives up


def encode_doorbells(origin: str, changes: Iterable[Change]) -> list[bytes]:
    """Doorbell messages for these changes, each small enough for any backend."""
    prefix = '{"o":' + json.dumps(origin) + ',"c":['
    messages: list[bytes] = []
    items: list[str] = []
    size = len(prefix) + 2
    for change in changes:
        fields: list[Any] = [change.stream_id, change.tail, change.closed, change.gone]
        if change.stop:  # a fifth field only when set: processes of earlier versions read the first four
            fields.append(True)
        item = json.dumps(fields, separators=(",", ":"))
        if items and size + len(item) + 1 > MAX_MESSAGE:
            messages.append((prefix + ",".join(items) + "]}").encode())
            items, size = [], len(prefix) + 2
        items.append(item)
        size += len(item) + 1
    if items:
        messages.append((prefix + ",".join(items) + "]}").encode())
    return messages


@dataclass(slots=True, eq=False)
class _Watch:
    """What this process knows of one stream's tail, and the futures its waiters sleep on.

    Not an asyncio.Event, whose empty deque alone is 760 bytes: with a reader per stream, a cost per reader.
    """

    stream_id: str
    tail: int = -1
    closed: bool = False
    gone: bool = False
    rings: int = 0
    sleepers: list[asyncio.Future[None]] | None = None
    readers: int = 0
    cache_start: int = 0
    cache: bytes = b""
    fetching: dict[tuple[int, int], asyncio.Future[bytes]] = field(default_factory=dict)
    ring_pending: bool = False

    def ring(self) -> None:
        self.ring_pending = False
        self.rings += 1
        sleepers, self.sleepers = self.sleepers, None
        for sleeper in sleepers or ():
            if not sleeper.done():
                sleeper.set_result(None)


class Waiter:
    """A reader's registration on one stream: taken before reading the store, so no doorbell is missed."""

    __slots__ = ("_rings", "_watch", "_woken")

    def __init__(self, watch: _Watch) -> None:
        self._watch = watch
        self._rings = watch.rings
        self._woken: asyncio.Future[None] | None = None

    @property
    def tail(self) -> int:
        return self._watch.tail

    @property
    def closed(self) -> bool:
        return self._watch.closed

    @property
    def gone(self) -> bool:
        return self._watch.gone

    async def wait(self, seconds: float, cancel: asyncio.Future[None] | None = None) -> bool:
        """Wait up to `seconds` for a doorbell since the last wait (or registration), or until `cancel` is
        done; whether a doorbell rang. One future and one timer: no task, no set, no closure per wait."""
        watch = self._watch
        if watch.rings == self._rings:
            loop = asyncio.get_running_loop()
            self._woken = woken = loop.create_future()
            sleepers = watch.sleepers = watch.sleepers or []
            sleepers.append(woken)
            timer = loop.call_later(seconds, self._wake)
            if cancel is not None:
                cancel.add_done_callback(self._wake)
            try:
                await woken
            finally:
                timer.cancel()
                if cancel is not None:
                    cancel.remove_done_callback(self._wake)
                if watch.sleepers is sleepers:  # not rung (a ring takes the list away): leave it
                    with contextlib.suppress(ValueError):
                        sleepers.remove(woken)
                self._woken = None
        rang = watch.rings != self._rings
        self._rings = watch.rings
        return rang

    def _wake(self, _: object = None) -> None:
        woken = self._woken
        if woken is not None and not woken.done():
            woken.set_result(None)


class SharedCache(Generic[K, V]):
    """A small map of values that many readers share, forgetting the least recently used first."""

    def __init__(self, size: int = 256) -> None:
        self._items: LRU[K, V] = LRU(size)

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: K) -> V | None:
        return self._items.get(key)

    def put(self, key: K, value: V) -> V:
        self._items.put(key, value)
        return value


class Source(Protocol):
    """What the hub needs of the store beneath it: news of each commit, and reads of committed bytes."""

    def subscribe(self, listener: Callable[[list[Change]], None]) -> None: ...

    async def read(self, stream_id: str, start: int, end: int) -> bytes: ...


class LiveHub:
    """Per-process doorbells: wakes local waiters on commit and carries doorbells to other processes."""

    def __init__(self, store: Source, backend: ChannelsBackend | None) -> None:
        self._store = store
        self._backend = backend
        self._watches: dict[str, _Watch] = {}
        self._origin = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._listener: asyncio.Task[None] | None = None
        self._publisher: asyncio.Task[None] | None = None
        self._outbox: dict[str, Change] = {}
        self._outbox_ready = asyncio.Event()
        self._pings: dict[str, asyncio.Future[None]] = {}
        self._stop_listeners: dict[str, set[Callable[[], None]]] = {}
        self._closed = False
        self._publish_failing = False
        self.sent = 0
        self.received = 0
        self.publish_failures = 0
        self.resubscribed = 0
        self.connected = backend is None
        self.stopping = False
        self.readers: dict[str, int] = {"sse": 0, "long-poll": 0, "http": 0, "sdk": 0}
        # What the readers of one change share: the stream as its doorbell describes it, and each SSE
        # block as encoded for a position, so a thousand readers make one copy and one encoding.
        self.advanced_states: SharedCache[tuple[str, int, bool], StreamState] = SharedCache()
        self.sse_blocks: SharedCache[tuple[Any, ...], tuple[bytes, int]] = SharedCache()

    @classmethod
    @asynccontextmanager
    async def open(cls, store: Source, settings: Settings) -> AsyncIterator[LiveHub]:
        """Run the hub (its one channel subscription and its publisher, if any) for the life of the block."""
        hub = cls(store, make_backend(settings.channels_url))
        store.subscribe(hub.on_commit)
        if hub._backend is not None:
            loop = asyncio.get_running_loop()
            hub._listener = loop.create_task(hub._listen(), name="streamhold-doorbells-in")
            hub._publisher = loop.create_task(hub._publish_forever(), name="streamhold-doorbells-out")
        try:
            yield hub
        finally:
            hub.shutdown()
            await hub._close()

    async def _close(self) -> None:
        self._closed = True
        self._outbox_ready.set()
        if self._publisher is not None:
            # Let the last doorbells leave, so other processes' readers need not wait for a timeout.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._publisher), DRAIN_TIMEOUT)
        for task in (self._publisher, self._listener):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._backend is not None:
            with contextlib.suppress(Exception):
                await self._backend.on_shutdown()

    def shutdown(self) -> None:
        """Wake every waiter and tell live responses to end: the server is stopping."""
        self.stopping = True
        self._ring_all()

    @contextlib.contextmanager
    def watch(self, stream_id: str, kind: str) -> Iterator[Waiter]:
        """Register as a live reader of a stream for the life of the block."""
        waiter = self.register(stream_id, kind)
        try:
            yield waiter
        finally:
            self.unregister(waiter, kind)

    def register(self, stream_id: str, kind: str) -> Waiter:
        """Register as a live reader of a stream, until `unregister`."""
        watch = self._watches.get(stream_id)
        if watch is None:
            watch = self._watches[stream_id] = _Watch(stream_id)
        watch.readers += 1
        self.readers[kind] = self.readers.get(kind, 0) + 1
        return Waiter(watch)

    def unregister(self, waiter: Waiter, kind: str) -> None:
        """The end of a registration made by `register`."""
        watch = waiter._watch
        watch.readers -= 1
        self.readers[kind] -= 1
        if watch.readers == 0 and not watch.fetching:
            self._watches.pop(watch.stream_id, None)

    def advanced(self, state: StreamState, tail: int, closed: bool) -> StreamState:
        """The stream as a doorbell describes it: its committed tail moved on (and maybe it closed).

        Shared by all readers woken by the same doorbell: a thousand readers make one copy, not a thousand.
        """
        key = (state.id, tail, closed)
        shared = self.advanced_states.get(key)
        if shared is None:
            values = {name: getattr(state, name) for name in StreamState.__slots__}
            values["tail"] = tail
            if closed and values["closed_at"] is None:
                values["closed_at"] = time.time()
            shared = self.advanced_states.put(key, StreamState(**values))
        return shared

    def live_readers(self, stream_id: str) -> int:
        """How many readers of this process are tailing the stream."""
        watch = self._watches.get(stream_id)
        return watch.readers if watch else 0

    def observe(self, stream_id: str, tail: int, closed: bool) -> None:
        """Record a tail read from the store, so doorbell tails never go backwards."""
        watch = self._watches.get(stream_id)
        if watch is not None and tail > watch.tail:
            watch.tail, watch.closed = tail, closed or watch.closed

    def on_commit(self, changes: list[Change]) -> None:
        """Wake this process's waiters, and queue a doorbell for the other processes."""
        for change in changes:
            self._ring_local(change)
        if self._publisher is None or self._closed or not changes:
            return
        for change in changes:
            queued = self._outbox.get(change.stream_id)
            if queued is not None:
                change = Change(
                    change.stream_id,
                    max(change.tail, queued.tail),
                    change.closed or queued.closed,
                    change.gone or queued.gone,
                    stop=change.stop or queued.stop,
                )
            self._outbox[change.stream_id] = change
        self._outbox_ready.set()

    async def ping(self, within: float = 2.0) -> bool:
        """Whether a message published now comes back through our own subscription (always, in-process)."""
        if self._backend is None:
            return True
        if not self.connected or self._closed:
            return False
        nonce = uuid.uuid4().hex
        echo: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pings[nonce] = echo
        try:
            async with asyncio.timeout(within):
                message = json.dumps({"o": self._origin, "ping": nonce}).encode()
                await self._backend.publish(message, [CHANNEL])
                await echo
        except Exception:
            return False
        finally:
            self._pings.pop(nonce, None)
        return True

    async def _publish_forever(self) -> None:
        """Publish queued doorbells one batch at a time; commits made meanwhile merge into the next batch."""
        while True:
            if not self._outbox:
                if self._closed:
                    return
                await self._outbox_ready.wait()
                self._outbox_ready.clear()
                continue
            batch, self._outbox = self._outbox, {}
            for message in encode_doorbells(self._origin, batch.values()):
                await self._publish(message)

    async def _publish(self, message: bytes) -> None:
        assert self._backend is not None
        error: Exception | None = None
        # The second attempt gets a fresh connection when the first found a stale one (the broker restarted).
        for _ in range(2):
            try:
                async with asyncio.timeout(PUBLISH_TIMEOUT):
                    await self._backend.publish(message, [CHANNEL])
            except Exception as exc:
                error = exc
                continue
            self.sent += 1
            if self._publish_failing:
                self._publish_failing = False
                log.warning("doorbells are published again")
            return
        self.publish_failures += 1
        if not self._publish_failing:
            self._publish_failing = True
            log.warning("could not publish a doorbell (%s); readers elsewhere wait for their timeouts", error)

    def _ring_all(self) -> None:
        for watch in self._watches.values():
            watch.ring()

    def on_stop(self, stream_id: str, listener: Callable[[], None]) -> Callable[[], None]:
        """Call `listener` when a stop of the stream is asked, on any process; returns the unsubscribe."""
        self._stop_listeners.setdefault(stream_id, set()).add(listener)

        def unsubscribe() -> None:
            listeners = self._stop_listeners.get(stream_id)
            if listeners is not None:
                listeners.discard(listener)
                if not listeners:
                    del self._stop_listeners[stream_id]

        return unsubscribe

    def _ring_local(self, change: Change) -> None:
        if change.stop:
            for listener in list(self._stop_listeners.get(change.stream_id, ())):
                listener()
            if change.tail < 0 and not change.closed and not change.gone:
                return  # only the stop: the stream's readers have nothing new to read
        watch = self._watches.get(change.stream_id)
        if watch is None:
            return
        if change.gone:
            watch.gone = True
            watch.cache = b""
        if change.tail > watch.tail or (change.closed and not watch.closed):
            watch.tail = max(change.tail, watch.tail)
            watch.closed = watch.closed or change.closed
        if change.gone or change.closed or watch.readers < COALESCE_FROM:
            watch.ring()
        elif not watch.ring_pending:
            # Many readers of one stream: let commits gather for a moment, so each wake-up carries
            # several of them. Waking a thousand readers per commit would starve the writer.
            watch.ring_pending = True
            delay = min(COALESCE_MAX, watch.readers * COALESCE_PER_READER)
            asyncio.get_running_loop().call_later(delay, watch.ring)

    async def _listen(self) -> None:
        """Hold the one subscription of this process, re-subscribing (with back-off) whenever it is lost."""
        assert self._backend is not None
        delay = RETRY_FIRST
        lost_at: float | None = None
        while True:
            try:
                async with asyncio.timeout(SUBSCRIBE_TIMEOUT):
                    await self._backend.on_startup()
                    await self._backend.subscribe([CHANNEL])
                self.connected = True
                if lost_at is not None:
                    self.resubscribed += 1
                    log.warning("doorbell subscription restored after %.1f s", time.monotonic() - lost_at)
                    lost_at = None
                    # Doorbells sent while we were away are gone: every reader re-reads the store now.
                    self._ring_all()
                delay = RETRY_FIRST
                async for _, message in self._backend.stream_events():
                    self._receive(message)
                raise ConnectionError("the subscription ended")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if lost_at is None:
                    lost_at = time.monotonic()
                    log.warning("doorbell subscription lost (%s); re-subscribing", exc)
            self.connected = False
            # While unsubscribed, each retry wakes the readers to re-read the store: slow polling, not silence
            self._ring_all()
            with contextlib.suppress(Exception):
                await self._backend.on_shutdown()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    def _receive(self, message: bytes) -> None:
        try:
            payload = json.loads(message)
            origin = payload["o"]
        except (ValueError, TypeError, KeyError):
            return
        if "ping" in payload:
            echo = self._pings.get(payload["ping"]) if origin == self._origin else None
            if echo is not None and not echo.done():
                echo.set_result(None)
            return
        if origin == self._origin:
            return
        self.received += 1
        for item in payload.get("c", ()):
            try:
                stream_id, tail, closed, gone, *more = item
                stop = bool(more and more[0])
                change = Change(str(stream_id), int(tail), bool(closed), bool(gone), stop=stop)
            except (ValueError, TypeError):
                continue
            self._ring_local(change)

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


# --- following a stream ---------------------------------------------------------------------------

DATA: Literal["data"] = "data"  # a piece, read up to `position`
UP_TO_DATE: Literal["up-to-date"] = (
    "up-to-date"  # at the committed tail, with nothing sent since the last wait
)
IDLE: Literal["idle"] = "idle"  # a wait ran out with no doorbell: time for a keep-alive
CLOSED: Literal["closed"] = "closed"  # at the end of a closed stream: the follow is over


class Event(NamedTuple, Generic[T]):
    """One step of a follow: what happened, the stream as then known, the reader's position, the piece."""

    kind: Literal["data", "up-to-date", "idle", "closed"]
    state: StreamState
    position: int
    piece: T | None


class StateReader(Protocol):
    """Where a follow reads a stream's record afresh: the store."""

    async def get(self, stream_id: str) -> StreamState | None: ...


async def follow(
    hub: LiveHub,
    reader: StateReader,
    state: StreamState,
    start: int,
    step: Callable[[StreamState, int], Awaitable[tuple[T, int]]],
    *,
    kind: str,
    idle_after: float,
    deadline: float | None = None,
    cancel: asyncio.Future[None] | None = None,
    reread: bool = False,
) -> AsyncGenerator[Event[T], None]:
    """Replay a stream from `start`, then wait on its doorbell for more, until closed, gone or cancelled.

    `step(state, position)` reads the next piece and says where it ends, never past `state.tail` (the
    committed tail); one piece is held at a time. A stream that vanishes raises StreamError; the follow just
    ends when the server stops, `cancel` is done or the `deadline` (event-loop time) passes. With `reread`,
    `state` is read again once the waiter is registered, so that no commit slips between the two.
    """
    loop = asyncio.get_running_loop()
    position = start
    waiter = hub.register(state.id, kind)  # not a context manager: one frame less that every reader holds
    try:
        if reread:
            state = require_live(await reader.get(state.id))
        hub.observe(state.id, state.tail, state.closed)
        stalled = 0
        delivered = False
        while True:
            while position < state.tail:
                piece, after = await step(state, position)
                if after <= position:
                    break
                position = after
                stalled, delivered = 0, True
                yield Event(DATA, state, position, piece)
            if position < state.tail:  # a short read: the stream was compressed (or deleted) meanwhile
                stalled += 1
                if stalled > STALLED_READS:
                    raise StreamNotFoundError("the stream changed while it was read: read it again")
                state = require_live(await reader.get(state.id))
                continue
            if state.closed:
                yield Event(CLOSED, state, position, None)
                return
            if not delivered:
                yield Event(UP_TO_DATE, state, position, None)
            delivered = True  # said: UP_TO_DATE comes again only after a wait that brought nothing
            seconds = idle_after if deadline is None else min(idle_after, deadline - loop.time())
            if hub.stopping or seconds <= 0 or (cancel is not None and cancel.done()):
                return
            woke = await waiter.wait(seconds, cancel)
            if hub.stopping or (cancel is not None and cancel.done()):
                return
            if waiter.gone:
                raise StreamNotFoundError("stream was deleted")
            if (
                woke
                and not state.compressed
                and (
                    waiter.tail > state.tail
                    or (waiter.tail == state.tail and waiter.closed and not state.closed)
                )
            ):
                state = hub.advanced(state, waiter.tail, waiter.closed)
                continue
            if not woke:
                if deadline is not None and loop.time() >= deadline:
                    return
                yield Event(IDLE, state, position, None)
            # No news in the doorbell (a timeout, a re-subscription, a tail behind ours): ask the store.
            state = require_live(await reader.get(state.id))
            hub.observe(state.id, state.tail, state.closed)
            delivered = False
    finally:
        hub.unregister(waiter, kind)
