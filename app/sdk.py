"""The Python stream API (Agentuity's, in Python): one interface, served in-process or remotely.

stream = await streams.create("export", content_type="text/csv", compress=True)
await stream.write("Name,Email\\n")
await stream.close()
"""

from __future__ import annotations

import abc
import asyncio
import inspect
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from . import checks
from .models import (
    DEFAULT_TTL,
    AppendResult,
    PayloadTooLargeError,
    StreamClosedError,
    StreamError,
    StreamFilter,
    StreamNotFoundError,
    StreamState,
    clamp_ttl,
)
from .settings import Settings

__all__ = [
    "UNSET",
    "AgentContext",
    "AgentRuntime",
    "ListResult",
    "LocalStreams",
    "Stream",
    "StreamClosedError",
    "StreamInfo",
    "StreamNotFoundError",
    "StreamService",
    "create_agent_context",
    "encode_chunk",
]


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


@dataclass(frozen=True)
class StreamInfo:
    """What `get()` and `list()` tell about a stream."""

    id: str
    name: str
    namespace: str
    metadata: dict[str, str]
    url: str
    viewer_url: str
    content_type: str
    size_bytes: int
    stored_bytes: int
    compressed: bool
    created_at: datetime
    closed_at: datetime | None
    expires_at: datetime | None

    @property
    def closed(self) -> bool:
        return self.closed_at is not None


@dataclass(frozen=True)
class ListResult:
    """One page of `list()`: `total` matches in all, `streams` on this page."""

    total: int
    streams: list[StreamInfo]


def encode_chunk(data: Any) -> bytes:
    """Bytes for one write: str as UTF-8, bytes-like as is, anything else as compact JSON."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, str):
        return data.encode()
    if isinstance(data, bytearray | memoryview):
        return bytes(data)
    try:
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
    except (TypeError, ValueError) as exc:
        raise TypeError(f"write() takes str, bytes or a JSON-serialisable value: {exc}") from None


def check_create(
    namespace: Any, content_type: Any, metadata: Any, ttl: Any
) -> tuple[dict[str, str], int | None]:
    """Validate create() arguments the same way for every implementation; returns (metadata, ttl)."""
    checks.namespace(namespace)
    checks.content_type(content_type)
    meta = checks.metadata(metadata)
    if ttl is UNSET:
        return meta, DEFAULT_TTL
    # `not ttl >= 0` also refuses NaN, which compares false with everything.
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int | float) or not ttl >= 0):
        raise ValueError("ttl must be a number of seconds (0 or None: never expires)")
    return meta, clamp_ttl(ttl)


def check_list(limit: Any, offset: Any, namespace: Any = None, metadata: Any = None) -> dict[str, str]:
    """Validate list() arguments the same way for every implementation; returns the metadata filter."""
    checks.list_window(limit, offset)
    if namespace:
        checks.namespace(namespace)
    return checks.metadata(metadata)


def check_id(stream_id: Any) -> str:
    if not isinstance(stream_id, str) or not stream_id.strip():
        raise ValueError("a stream id is required and must be a non-empty string")
    # The remote API puts the id in a URL path: a slash or `?` there would reach another endpoint.
    if len(stream_id) > 255 or not checks.printable(stream_id) or any(c in stream_id for c in "/?#%\\"):
        raise checks.InvalidInputError(f"{stream_id[:80]!r} is not a stream id, such as stream_0123…")
    return stream_id


class Stream:
    """A stream being written. Writes apply in call order, even when not awaited one by one."""

    def __init__(self, info: StreamInfo, compressed: bool) -> None:
        self.id = info.id
        self.url = info.url
        self.viewer_url = info.viewer_url
        self.info = info
        self.compressed = compressed
        self.bytes_written = 0
        self._closed = False
        self._pending: set[asyncio.Future[Any]] = set()
        self._error: BaseException | None = None
        self._last: asyncio.Future[Any] | None = None  # the future of the latest write

    def write(self, data: Any) -> asyncio.Future[Any]:
        """Queue `data` now; await the result to know it is committed."""
        if self._closed:
            raise StreamClosedError(f"stream {self.id} is closed; create a new stream to write more")
        last = self._last
        if self._error is None and last is not None and last.done() and not last.cancelled():
            # Failed, but its callback has not run yet: a write now would land after the hole.
            self._error = last.exception()
        if self._error is not None:
            raise self._error
        chunk = encode_chunk(data)
        if not chunk:
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            future.set_result(None)
            return future
        future = self._send(chunk)
        self._last = future
        self.bytes_written += len(chunk)
        if future not in self._pending:  # writes that joined a queued append share its future
            self._pending.add(future)
            future.add_done_callback(self._settled)
        return future

    def _settled(self, future: asyncio.Future[Any]) -> None:
        self._pending.discard(future)
        if not future.cancelled() and future.exception() is not None and self._error is None:
            self._error = future.exception()

    async def close(self) -> None:
        """Wait for pending writes, then close the stream. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)
        if self._error is not None:
            raise self._error
        await self._finish()

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @abc.abstractmethod
    def _send(self, chunk: bytes) -> asyncio.Future[Any]: ...

    @abc.abstractmethod
    async def _finish(self) -> None: ...


class StreamService(abc.ABC):
    """The stream API: create, list, get, download, delete."""

    @abc.abstractmethod
    async def create(
        self,
        namespace: str,
        *,
        content_type: str = "application/octet-stream",
        compress: bool = False,
        metadata: Mapping[str, str] | None = None,
        ttl: int | float | None = UNSET,
    ) -> Stream: ...

    @abc.abstractmethod
    async def list(
        self,
        namespace: str | None = None,
        metadata: Mapping[str, str] | None = None,
        limit: int = 100,
        offset: int = 0,
        sort: str = "created",
        direction: str = "desc",
    ) -> ListResult: ...

    @abc.abstractmethod
    async def get(self, stream_id: str) -> StreamInfo: ...

    @abc.abstractmethod
    def download(self, stream_id: str) -> AsyncIterator[bytes]: ...

    @abc.abstractmethod
    async def delete(self, stream_id: str) -> None: ...


def _dt(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


def stream_url(origin: str, stream_id: str) -> str:
    return f"{origin}/stream/{stream_id}"


def viewer_url(origin: str, name: str) -> str:
    return f"{origin}/watch/{quote(name, safe='/')}"


def info_from_state(state: StreamState, origin: str) -> StreamInfo:
    return StreamInfo(
        id=state.id,
        name=state.name,
        namespace=state.namespace,
        metadata=dict(state.metadata),
        url=stream_url(origin, state.id),
        viewer_url=viewer_url(origin, state.name),
        content_type=state.content_type,
        size_bytes=state.tail,
        stored_bytes=state.stored_bytes,
        compressed=state.compressed,
        created_at=_dt(state.created_at),  # type: ignore[arg-type]
        closed_at=_dt(state.closed_at),
        expires_at=_dt(state.expires_at),
    )


class _LocalStream(Stream):
    def __init__(self, info: StreamInfo, compressed: bool, service: LocalStreams) -> None:
        super().__init__(info, compressed)
        self._service = service

    def _send(self, chunk: bytes) -> asyncio.Future[AppendResult]:
        limit = self._service.settings.max_append_bytes
        if len(chunk) > limit:
            raise PayloadTooLargeError(f"a write may be at most {limit} bytes; split it into smaller writes")
        return self._service.store.write_nowait(self.id, chunk)

    async def _finish(self) -> None:
        store = self._service.store
        await store.append_nowait(self.id, b"", close=True, compress=self.compressed)
        await store.finish(self.id)


class LocalStreams(StreamService):
    """The stream API straight to this process's store."""

    def __init__(self, store: Any, hub: Any, settings: Settings) -> None:
        self.store = store
        self.hub = hub
        self.settings = settings

    async def create(
        self,
        namespace: str,
        *,
        content_type: str = "application/octet-stream",
        compress: bool = False,
        metadata: Mapping[str, str] | None = None,
        ttl: int | float | None = UNSET,
    ) -> Stream:
        from .store.store import NewStream

        meta, seconds = check_create(namespace, content_type, metadata, ttl)
        state, _ = await self.store.create(
            NewStream(namespace=namespace, content_type=content_type, metadata=meta, ttl_seconds=seconds)
        )
        return _LocalStream(info_from_state(state, self.settings.origin()), bool(compress), self)

    async def list(
        self,
        namespace: str | None = None,
        metadata: Mapping[str, str] | None = None,
        limit: int = 100,
        offset: int = 0,
        sort: str = "created",
        direction: str = "desc",
    ) -> ListResult:
        meta = check_list(limit, offset, namespace, metadata)
        where = StreamFilter(namespace=namespace, metadata=tuple(meta.items()))
        try:
            total, states = await self.store.list(
                where, sort=sort, direction=direction, limit=limit, offset=offset
            )
        except StreamError as exc:
            raise ValueError(str(exc)) from None
        origin = self.settings.origin()
        return ListResult(total, [info_from_state(s, origin) for s in states])

    async def _live_state(self, stream_id: str) -> StreamState:
        state = await self.store.get(check_id(stream_id))
        if state is None or state.expired() or state.deleted:
            raise StreamNotFoundError(f"stream {stream_id} not found")
        return state

    async def get(self, stream_id: str) -> StreamInfo:
        return info_from_state(await self._live_state(stream_id), self.settings.origin())

    async def download(self, stream_id: str) -> AsyncIterator[bytes]:  # type: ignore[override]
        state = await self._live_state(stream_id)
        offset = 0
        with self.hub.watch(state.id, "sdk") as waiter:
            while True:
                if offset < state.tail or state.compressed:
                    async for piece in self.store.iter_content(state, offset):
                        offset += len(piece)
                        yield piece
                    if state.compressed:
                        return
                if state.closed and offset >= state.tail:
                    return
                if offset >= state.tail:
                    await waiter.wait(self.settings.long_poll_timeout)
                    if self.hub.stopping:
                        return
                state = await self._live_state(stream_id)

    async def delete(self, stream_id: str) -> None:
        await self._live_state(stream_id)
        await self.store.delete(stream_id)


class AgentRuntime:
    """Background work started with `wait_until`: errors are logged, and shutdown awaits it."""

    def __init__(self, service: StreamService, logger: logging.Logger | None = None) -> None:
        self.service = service
        self.logger = logger or logging.getLogger("streamhold.agent")
        self._tasks: set[asyncio.Task[Any]] = set()

    def wait_until(self, work: Awaitable[Any] | Callable[[], Awaitable[Any]]) -> asyncio.Task[Any]:
        awaitable = work() if callable(work) and not inspect.isawaitable(work) else work
        task = asyncio.ensure_future(awaitable)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.logger.error("background work failed", exc_info=task.exception())

    @property
    def pending(self) -> int:
        return len(self._tasks)

    async def drain(self) -> None:
        """Wait until all background work has finished (including work it starts)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


class AgentContext:
    """What an agent handler gets: `.stream`, `.logger` and `.wait_until(...)`."""

    def __init__(
        self,
        runtime: AgentRuntime | None = None,
        *,
        trigger: str = "http",
        opener: Callable[[AsyncExitStack], Awaitable[StreamService]] | None = None,
    ) -> None:
        self._runtime = runtime
        self._opener = opener
        self._stack: AsyncExitStack | None = None
        self.trigger = trigger
        self.logger = runtime.logger if runtime else logging.getLogger("streamhold.agent")

    @property
    def stream(self) -> StreamService:
        if self._runtime is None:
            raise RuntimeError("open the context first: `async with create_agent_context() as ctx:`")
        return self._runtime.service

    def wait_until(self, work: Awaitable[Any] | Callable[[], Awaitable[Any]]) -> None:
        """Run `work` in the background, after the handler has answered."""
        if self._runtime is None:
            raise RuntimeError("open the context first: `async with create_agent_context() as ctx:`")
        self._runtime.wait_until(work)

    async def __aenter__(self) -> AgentContext:
        if self._runtime is None and self._opener is not None:
            self._stack = AsyncExitStack()
            service = await self._opener(self._stack)
            self._runtime = AgentRuntime(service)
            self.logger = self._runtime.logger
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runtime is not None:
            await self._runtime.drain()
        if self._stack is not None:
            await self._stack.aclose()
            self._stack = None
            self._runtime = None

    async def invoke(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        """Run `fn` with this context open, then wait for its background work."""
        async with self:
            return await fn()


def create_agent_context(
    settings: Settings | None = None,
    *,
    server_url: str | None = None,
    api_key: str | None = None,
    trigger: str = "manual",
) -> AgentContext:
    """A context for scripts and workers: remote with a server URL (or STREAMHOLD_URL), else local."""
    import os

    url = server_url or os.environ.get("STREAMHOLD_URL", "")
    key = api_key or os.environ.get("STREAMHOLD_API_KEY", "")

    async def open_service(stack: AsyncExitStack) -> StreamService:
        if url:
            from .sdk_remote import RemoteStreams

            return await stack.enter_async_context(RemoteStreams(url, api_key=key or None))
        from .live import LiveHub
        from .store.store import Store

        resolved = settings or Settings.from_env()
        store = await stack.enter_async_context(Store.open(resolved))
        hub = await stack.enter_async_context(LiveHub.open(store, resolved))
        return LocalStreams(store, hub, resolved)

    return AgentContext(trigger=trigger, opener=open_service)
