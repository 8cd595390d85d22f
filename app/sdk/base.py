"""The Python stream API (Agentuity's, in Python): one interface, served in-process or remotely.

stream = await streams.create("export", content_type="text/csv", compress=True)
await stream.write("Name,Email\\n")
await stream.close()
"""

from __future__ import annotations

import abc
import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .. import checks
from ..errors import StreamClosedError
from ..models import DEFAULT_TTL, clamp_ttl

STOP_POLL = 10.0  # seconds a stop wait lasts before it asks the store (or server) again


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
    stop_requested: bool = False  # someone asked the writer to stop (POST /stream/{id}/stop)

    @property
    def closed(self) -> bool:
        return self.closed_at is not None


@dataclass(frozen=True)
class ShareLink:
    """What `share()` answers: a link that reads one stream until `expires_at` (and stops it, if `stop`)."""

    url: str  # the viewer page
    content_url: str  # the stream's content, read as by its URL
    expires_at: datetime
    stop: bool


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
        self._stop = asyncio.Event()

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

    @property
    def stop_requested(self) -> bool:
        """Whether a stop of this stream's writer was asked (POST /stream/{id}/stop): look between writes."""
        self._watch_stop()
        return self._stop.is_set()

    async def wait_stop(self) -> bool:
        """Wait until a stop is asked (True) or the stream is closed (False); asyncio.timeout bounds it"""
        while not self._stop.is_set() and not self._closed:
            asked = await self._poll_stop(STOP_POLL)
            if asked is None:  # closed or gone: no stop will come
                break
            if asked:
                self._stop.set()
        return self._stop.is_set()

    def _watch_stop(self) -> None:
        """Start keeping `stop_requested` up to date, if this kind of stream needs to do something for it."""

    @abc.abstractmethod
    async def _poll_stop(self, seconds: float) -> bool | None:
        """Whether a stop is asked, waiting up to `seconds` for one; None once the stream is closed."""

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
        public: bool | None = None,
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

    @abc.abstractmethod
    async def stop(self, stream_id: str) -> bool:
        """Ask the stream's writer to stop, wherever it runs; False when the stream is already closed."""

    @abc.abstractmethod
    async def share(self, stream_id: str, ttl: float = 3600, stop: bool = False) -> ShareLink:
        """A link that reads this one stream for `ttl` seconds (and may ask its writer to stop, with `stop`);
        the server needs STREAMHOLD_SECRET to sign it."""


def share_link(answer: Mapping[str, Any]) -> ShareLink:
    """A ShareLink from the answer of POST /stream/{id}/share (or the same fields made in-process)."""
    expires = datetime.fromisoformat(str(answer["expires_at"]).replace("Z", "+00:00"))
    return ShareLink(str(answer["url"]), str(answer["content_url"]), expires, bool(answer["stop"]))


def _dt(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)
