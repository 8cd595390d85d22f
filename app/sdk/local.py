"""The stream API in-process: straight to this process's store."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing
from datetime import UTC, datetime

from .. import clock
from ..errors import (
    InvalidRequestError,
    PayloadTooLargeError,
    StreamError,
    StreamGoneError,
    StreamNotFoundError,
)
from ..http import share_links
from ..live import DATA, LiveHub, follow
from ..models import AppendResult, StreamFilter, StreamState, lifecycle
from ..settings import Settings
from ..store.store import NewStream, Store
from ..urls import stream_url, viewer_url
from .base import (
    UNSET,
    ListResult,
    ShareLink,
    Stream,
    StreamInfo,
    StreamService,
    _dt,
    check_create,
    check_id,
    check_list,
    share_link,
)


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
        created_at=datetime.fromtimestamp(state.created_at, UTC),
        closed_at=_dt(state.closed_at),
        expires_at=_dt(state.expires_at),
        stop_requested=state.stop_requested_at is not None,
    )


class _LocalStream(Stream):
    def __init__(self, info: StreamInfo, compressed: bool, service: LocalStreams) -> None:
        super().__init__(info, compressed)
        self._service = service
        # The stop doorbell reaches this process wherever the stop was posted; wait_stop reads the store too.
        self._unlisten = service.hub.on_stop(self.id, self._stop.set)
        self._closing: asyncio.Future[AppendResult] | None = None

    def _send(self, chunk: bytes) -> asyncio.Future[AppendResult]:
        limit = self._service.settings.max_append_bytes
        if len(chunk) > limit:
            raise PayloadTooLargeError(f"a write may be at most {limit} bytes; split it into smaller writes")
        return self._service.store.write_nowait(self.id, chunk)

    async def _poll_stop(self, seconds: float) -> bool | None:
        state = await self._service.store.get(self.id)
        if not lifecycle(state).readable or state is None:
            return None
        if state.stop_requested_at is not None:
            return True
        if state.closed:
            return None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stop.wait()
        return self._stop.is_set()

    async def close(self) -> None:
        if not self._closed and self._error is None and self._pending:
            # Joined to the last queued write, the close shares its commit: waiting for the writes first
            # would make it a commit of its own.
            self._closing = self._service.store.join_close(self.id, self.compressed)
        await super().close()

    async def _finish(self) -> None:
        self._unlisten()
        store = self._service.store
        closing = self._closing or store.append_nowait(self.id, b"", close=True, compress=self.compressed)
        await closing
        await store.finish(self.id)


class LocalStreams(StreamService):
    """The stream API straight to this process's store."""

    def __init__(self, store: Store, hub: LiveHub, settings: Settings) -> None:
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
        public: bool | None = None,
    ) -> Stream:
        meta, seconds = check_create(namespace, content_type, metadata, ttl)
        state, _ = await self.store.create(
            NewStream(
                namespace=namespace,
                content_type=content_type,
                metadata=meta,
                ttl_seconds=seconds,
                visibility=_visibility(public),
            )
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
        if not lifecycle(state).readable:
            raise StreamNotFoundError(f"stream {stream_id} not found")
        assert state is not None
        return state

    async def get(self, stream_id: str) -> StreamInfo:
        return info_from_state(await self._live_state(stream_id), self.settings.origin())

    async def download(self, stream_id: str) -> AsyncIterator[bytes]:
        state = await self._live_state(stream_id)
        reading: tuple[AsyncIterator[bytes], int] | None = None  # the content being read, and its end

        async def step(current: StreamState, position: int) -> tuple[bytes, int]:
            nonlocal reading
            if reading is None or reading[1] <= position:
                reading = (self.store.iter_content(current, position, current.tail), current.tail)
            piece = await anext(reading[0], b"")
            if not piece:
                reading = None
            return piece, position + len(piece)

        events = follow(
            self.hub, self.store, state, 0, step, kind="sdk", idle_after=self.settings.long_poll_timeout
        )
        async with aclosing(events):
            try:
                async for event in events:
                    if event.kind == DATA and event.piece:
                        yield event.piece
            except StreamGoneError:  # deleted while forks of it remain: to this API it is not found
                raise StreamNotFoundError(f"stream {stream_id} not found") from None

    async def delete(self, stream_id: str) -> None:
        await self._live_state(stream_id)
        await self.store.delete(stream_id)

    async def stop(self, stream_id: str) -> bool:
        state = await self.store.request_stop((await self._live_state(stream_id)).id)
        return not state.closed

    async def share(self, stream_id: str, ttl: float = 3600, stop: bool = False) -> ShareLink:
        state = await self._live_state(stream_id)
        try:
            settings = self.settings
            made = share_links.share(settings.secret, settings.origin(), state, ttl, stop, clock.now())
        except InvalidRequestError as exc:
            raise ValueError(str(exc)) from None
        return share_link(made)


def _visibility(public: bool | None) -> str | None:
    """A stream's stored visibility: None follows STREAMHOLD_READS."""
    if public is None:
        return None
    if not isinstance(public, bool):
        raise TypeError("public must be True, False or None (None follows STREAMHOLD_READS)")
    return "public" if public else "private"
