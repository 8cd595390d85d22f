"""The Python stream API over HTTP: LocalStreams' interface and errors, against a server's /stream API.

async with RemoteStreams("http://127.0.0.1:8000", api_key="...") as streams:
    stream = await streams.create("export", content_type="text/csv")
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import time
from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import httpx

from ..errors import (
    PayloadTooLargeError,
    SharingUnavailableError,
    StorageFullError,
    StreamClosedError,
    StreamError,
    StreamNotFoundError,
)
from . import webhooks
from .base import (
    UNSET,
    ListResult,
    ShareLink,
    Stream,
    StreamInfo,
    StreamService,
    check_create,
    check_id,
    check_list,
    share_link,
)

__all__ = [
    "RemoteStream",
    "RemoteStreamError",
    "RemoteStreams",
    "ServerUnavailableError",
    "UnauthorizedError",
    "info_from_wire",
]

DEFAULT_MAX_APPEND = 5 * 1024 * 1024
RETRY_DELAYS = (0.2, 0.4, 0.8, 1.6, 2.0)
IDENTITY = {"accept-encoding": "identity"}
STOP_WAIT = 25.0  # seconds one stop long-poll waits (the server allows 30)


class UnauthorizedError(StreamError, PermissionError):
    """The server wants an API key (or a different one)."""

    status = 401


class ForbiddenError(UnauthorizedError):
    """The key or token is good but does not cover this call (a scope or a namespace it lacks)."""

    status = 403


class ServerUnavailableError(StreamError, ConnectionError):
    """The server could not be reached, or the connection broke."""

    status = 503


class RemoteStreamError(StreamError):
    """Any other error answer from the server; `status` is its HTTP status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _message(response: httpx.Response) -> str:
    try:
        payload = response.json()
    except ValueError:
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("error"), str):
        return payload["error"]
    return f"the server answered {response.status_code} {response.reason_phrase}".strip()


def error_for(response: httpx.Response) -> Exception:
    """The SDK error for an error answer, with the server's message; ValueError for a rejected argument."""
    message, status = _message(response), response.status_code
    if status == 400:
        return ValueError(message)
    if status == 403:
        return ForbiddenError(message)
    if status == 401:
        return UnauthorizedError(message)
    if status == 404:
        return StreamNotFoundError(message)
    if status == 409:
        return StreamClosedError(message)
    if status == 413:
        return PayloadTooLargeError(message)
    if status == 507:
        return StorageFullError(message)
    return RemoteStreamError(message, status)


def _unavailable(base_url: str, exc: httpx.HTTPError) -> ServerUnavailableError:
    reason = str(exc) or type(exc).__name__
    return ServerUnavailableError(f"cannot reach the server at {base_url} ({reason})")


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def info_from_wire(data: Mapping[str, Any]) -> StreamInfo:
    """A StreamInfo from the record the server sends (`name` there is the namespace)."""
    namespace = data.get("namespace", data["name"])
    return StreamInfo(
        id=data["id"],
        name=data.get("protocol_name") or data["id"],
        namespace=namespace,
        metadata=dict(data.get("metadata") or {}),
        url=data["url"],
        viewer_url=data.get("viewer_url", ""),
        content_type=data.get("content_type", "application/octet-stream"),
        size_bytes=int(data.get("size_bytes", 0)),
        stored_bytes=int(data.get("stored_bytes", data.get("size_bytes", 0))),
        compressed=bool(data.get("compressed", False)),
        created_at=_time(data.get("created_at")) or datetime.fromtimestamp(0, UTC),
        closed_at=_time(data.get("closed_at")),
        expires_at=_time(data.get("expires_at")),
        stop_requested=bool(data.get("stop_requested", False)),
    )


class RemoteStream(Stream):
    """Writes queue here and one sender task posts them in order, several queued writes per request.

    `max_append` is the server's limit for one write, in bytes.
    """

    def __init__(self, info: StreamInfo, compressed: bool, service: RemoteStreams, max_append: int) -> None:
        super().__init__(info, compressed)
        self._service = service
        self.max_append = max_append
        self._queue: collections.deque[tuple[bytes, asyncio.Future[None]]] = collections.deque()
        self._sender: asyncio.Task[None] | None = None
        self._stop_watcher: asyncio.Task[bool] | None = None

    def _send(self, chunk: bytes) -> asyncio.Future[None]:
        if len(chunk) > self.max_append:
            raise PayloadTooLargeError(
                f"a write may be at most {self.max_append} bytes; split it into smaller writes"
            )
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((chunk, future))
        if self._sender is None or self._sender.done():
            self._sender = self._service._spawn(self._drain())
        return future

    async def _drain(self) -> None:
        while self._queue:
            batch = [self._queue.popleft()]
            size = len(batch[0][0])
            while self._queue and size + len(self._queue[0][0]) <= self.max_append:
                size += len(self._queue[0][0])
                batch.append(self._queue.popleft())
            try:
                await self._service._post(f"/stream/{self.id}/append", content=b"".join(c for c, _ in batch))
            except BaseException as exc:
                # Later writes must not land after a hole: they fail with the same error.
                failed = [*batch, *self._queue]
                self._queue.clear()
                error = exc if isinstance(exc, Exception) else ServerUnavailableError("write cancelled")
                for _, future in failed:
                    if not future.done():
                        future.set_exception(error)
                if not isinstance(exc, Exception):
                    raise
                return
            for _, future in batch:
                if not future.done():
                    future.set_result(None)

    def _watch_stop(self) -> None:
        # One long-poll at a time on the stream's small stop endpoint, each at most STOP_WAIT seconds, from
        # the first look at `stop_requested` until the stream is closed: no cost for writers that never look.
        if self._stop_watcher is None and not self._closed and not self._stop.is_set():
            try:
                asyncio.get_running_loop()
            except RuntimeError:  # looked at outside the event loop: nothing can watch for it there
                return
            self._stop_watcher = self._service._watch(self.wait_stop())

    async def _poll_stop(self, seconds: float) -> bool | None:
        wait = min(seconds, STOP_WAIT)
        try:
            response = await self._service._client.get(
                f"/stream/{self.id}/stop", params={"wait": f"{wait:.3f}"}, timeout=wait + 10.0
            )
        except httpx.TransportError:
            await asyncio.sleep(min(wait, RETRY_DELAYS[-1]))  # the server is away: ask again shortly
            return False
        if response.status_code == 404:
            return None
        if response.is_error:
            raise error_for(response)
        answer = response.json()
        return True if answer.get("stop_requested") else None if answer.get("closed") else False

    async def _finish(self) -> None:
        if self._stop_watcher is not None:
            self._stop_watcher.cancel()
        headers = {"x-compress": "gzip"} if self.compressed else {}
        await self._service._post(f"/stream/{self.id}/complete", headers=headers)


class RemoteStreams(StreamService):
    """The stream API of a Streamhold server, over HTTP; use it as an async context manager."""

    def __init__(
        self,
        server_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        base = server_url.rstrip("/")
        self.server_url = base.removesuffix("/stream")  # an Agentuity-style base URL works too
        headers = {"user-agent": "streamhold-python"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self._client = httpx.AsyncClient(
            base_url=self.server_url, headers=headers, timeout=timeout, transport=transport
        )
        self._senders: set[asyncio.Task[None]] = set()
        self._watchers: set[asyncio.Task[bool]] = set()

    async def __aenter__(self) -> RemoteStreams:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Wait for queued writes, then close the connections."""
        while self._senders:
            await asyncio.gather(*list(self._senders), return_exceptions=True)
        for watcher in list(self._watchers):
            watcher.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        await self._client.aclose()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(work)
        self._senders.add(task)
        task.add_done_callback(self._senders.discard)
        return task

    def _watch(self, work: Coroutine[Any, Any, bool]) -> asyncio.Task[bool]:
        task: asyncio.Task[bool] = asyncio.get_running_loop().create_task(work)
        self._watchers.add(task)
        task.add_done_callback(self._watched)
        return task

    def _watched(self, task: asyncio.Task[bool]) -> None:
        self._watchers.discard(task)
        if not task.cancelled():
            task.exception()  # seen: stop_requested stays False, and wait_stop() raises it itself

    async def _request(self, method: str, path: str, **options: Any) -> httpx.Response:
        try:
            response = await self._client.request(method, path, **options)
        except httpx.TransportError as exc:
            raise _unavailable(self.server_url, exc) from None
        if response.is_error:
            raise error_for(response)
        return response

    async def _post(self, path: str, **options: Any) -> httpx.Response:
        return await self._request("POST", path, **options)

    async def create(
        self,
        namespace: str,
        *,
        content_type: str = "application/octet-stream",
        compress: bool = False,
        metadata: Mapping[str, str] | None = None,
        ttl: int | float | None = UNSET,
        public: bool | None = None,
    ) -> RemoteStream:
        meta, seconds = check_create(namespace, content_type, metadata, ttl)
        headers = {"content-type": content_type}
        body: dict[str, Any] = {"name": namespace, "metadata": meta, "headers": headers, "ttl": seconds or 0}
        if public is not None:
            body["public"] = bool(public)
        response = await self._post("/stream", json=body)
        limit = response.headers.get("stream-max-append-bytes", "")
        max_append = int(limit) if limit.isdigit() else DEFAULT_MAX_APPEND
        return RemoteStream(info_from_wire(response.json()), bool(compress), self, max_append)

    async def list(
        self,
        namespace: str | None = None,
        metadata: Mapping[str, str] | None = None,
        limit: int = 100,
        offset: int = 0,
        sort: str = "created",
        direction: str = "desc",
    ) -> ListResult:
        body: dict[str, Any] = {
            "metadata": check_list(limit, offset, namespace, metadata),
            "limit": limit,
            "offset": offset,
            # On the wire `name` is the namespace; the stream's own name sorts as `protocol_name`.
            "sort": "protocol_name" if sort == "name" else sort,
            "direction": direction,
        }
        if namespace:
            body["name"] = namespace
        page = (await self._post("/stream/list", json=body)).json()
        return ListResult(int(page["total"]), [info_from_wire(item) for item in page["streams"]])

    async def get(self, stream_id: str) -> StreamInfo:
        check_id(stream_id)
        return info_from_wire((await self._post(f"/stream/{stream_id}/info", json={})).json())

    async def download(self, stream_id: str) -> AsyncIterator[bytes]:
        """The content; an open stream is tailed until it is closed, reconnecting if the connection drops."""
        async for piece in self.read(check_id(stream_id)):
            yield piece

    async def read(
        self, stream_id: str, *, follow: bool = True, offset: int = 0, resume_for: float = 30.0
    ) -> AsyncIterator[bytes]:
        """The content from byte `offset`; with `follow`, tail an open stream resuming when connections drop.

        Gives up with ServerUnavailableError after `resume_for` seconds without getting anywhere.
        """
        position = offset
        stalled_since: float | None = None
        attempt = 0
        while True:
            params: dict[str, Any] = {}
            if position:
                params["offset"] = position
            if not follow:
                params["follow"] = "false"
            try:
                complete = False
                async with self._client.stream(
                    "GET", f"/stream/{stream_id}", params=params, timeout=httpx.Timeout(30.0, read=None)
                ) as response:
                    if response.is_error:
                        await response.aread()
                        raise error_for(response)
                    complete = response.headers.get("stream-closed") == "true" or not follow
                    async for piece in response.aiter_bytes():
                        position += len(piece)
                        stalled_since, attempt = None, 0
                        yield piece
                # The server ends an open stream's body only at close; ask, in case a proxy cut it cleanly.
                if complete or await self._finished(stream_id, position):
                    return
            except (httpx.TransportError, httpx.DecodingError) as exc:  # a cut gzip body fails to decode
                if not follow:
                    raise _unavailable(self.server_url, exc) from None
            now = time.monotonic()
            stalled_since = stalled_since or now
            if now - stalled_since > resume_for:
                raise ServerUnavailableError(
                    f"lost the stream at byte {position} and could not resume within {resume_for:.0f} s "
                    f"from {self.server_url}"
                )
            await asyncio.sleep(RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)])
            attempt += 1

    async def _finished(self, stream_id: str, position: int) -> bool:
        try:
            response = await self._client.head(f"/stream/{stream_id}", headers=IDENTITY)
        except httpx.TransportError:
            return False
        if response.is_error:
            raise error_for(response)
        closed = response.headers.get("stream-closed") == "true"
        length = response.headers.get("content-length", "")
        return closed and length.isdigit() and position >= int(length)

    async def delete(self, stream_id: str) -> None:
        await self._request("DELETE", f"/stream/{check_id(stream_id)}")

    async def stop(self, stream_id: str) -> bool:
        response = await self._post(f"/stream/{check_id(stream_id)}/stop")
        return response.status_code == 202  # 200: the stream is closed, there is nothing to stop

    async def share(self, stream_id: str, ttl: float = 3600, stop: bool = False) -> ShareLink:
        body = {"ttl": ttl, "stop": stop}
        try:
            response = await self._client.post(f"/stream/{check_id(stream_id)}/share", json=body)
        except httpx.TransportError as exc:
            raise _unavailable(self.server_url, exc) from None
        if response.status_code == 409:  # not a closed stream: the server cannot sign links
            raise SharingUnavailableError(_message(response))
        if response.is_error:
            raise error_for(response)
        return share_link(response.json())

    # --- subscriptions (the protocol's reserved APIs) ---------------------------------------------

    async def create_subscription(
        self,
        subscription_id: str,
        kind: str = "webhook",
        *,
        pattern: str | None = None,
        streams: Sequence[str] | None = None,
        webhook_url: str | None = None,
        wake_stream: str | None = None,
        lease_ttl_ms: int | None = None,
        description: str | None = None,
    ) -> dict[str, Any]:
        """Create a subscription (or re-confirm an identical one); returns its record.

        `kind` is "webhook" (give `webhook_url`) or "pull-wake" (give `wake_stream`); `pattern` globs
        stream paths (`*` one segment, `**` any), `streams` names streams explicitly.
        """
        body = webhooks.subscription_body(
            kind,
            pattern=pattern,
            streams=streams,
            webhook_url=webhook_url,
            wake_stream=wake_stream,
            lease_ttl_ms=lease_ttl_ms,
            description=description,
        )
        record = await self._subscription_call("PUT", subscription_id, json=body)
        assert record is not None
        return record

    async def get_subscription(self, subscription_id: str) -> dict[str, Any] | None:
        """The subscription's record (its streams and their acknowledged offsets), or None."""
        return await self._subscription_call("GET", subscription_id)

    async def delete_subscription(self, subscription_id: str) -> None:
        await self._subscription_call("DELETE", subscription_id)

    async def list_subscriptions(self) -> builtins.list[dict[str, Any]]:
        """Every subscription with its last delivery and failures (an admin call, not the protocol's)."""
        found = await self._reserved_call("GET", f"{webhooks.RESERVED}/subscriptions")
        return builtins.list((found or {}).get("subscriptions", []))

    async def rotate_signing_key(self, retire: bool = False) -> dict[str, Any]:
        """Make a new webhook signing key (the previous stays published for a grace), or with `retire`,
        stop publishing every key but the newest. Returns the signing kid and the published kids."""
        action = "retire" if retire else "rotate"
        answer = await self._reserved_call("POST", f"{webhooks.RESERVED}/jwks/{action}")
        assert answer is not None
        return answer

    async def _subscription_call(
        self, method: str, subscription_id: str, **options: Any
    ) -> dict[str, Any] | None:
        return await self._reserved_call(method, webhooks.subscription_path(subscription_id), **options)

    async def _reserved_call(self, method: str, path: str, **options: Any) -> dict[str, Any] | None:
        try:
            return await webhooks.call(self._client, method, path, **options)
        except httpx.TransportError as exc:
            raise _unavailable(self.server_url, exc) from None
