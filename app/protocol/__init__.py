"""The Durable Streams protocol at /v1/stream/{name}: one mounted handler for every method."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any
from urllib.parse import unquote

from litestar import Request, asgi
from litestar.datastructures import State
from litestar.enums import ScopeType
from litestar.exceptions import HTTPException
from litestar.response.base import ASGIResponse
from litestar.types import HTTPResponseStartEvent, Receive, Scope, Send

from .. import checks
from ..errors import (
    ContentTypeMismatchError,
    InvalidRequestError,
    StreamClosedError,
    StreamError,
    StreamNotFoundError,
)
from ..http import auth
from ..http.auth import principal_of, require, require_read, resolve, visibility_of
from ..http.headers import API_CORS_HEADERS, STREAM_ID_HEADER, content_headers
from ..http.metrics import request_metrics
from ..http.responses import respond
from ..models import (
    AppendResult,
    Producer,
    StreamState,
    format_offset,
    lifecycle,
    offset_belongs,
    require_live,
    split_offset,
)
from ..settings import Settings
from ..store.appends import media_type
from ..store.chunk_files import FILE_CHUNK_MIN, Spool
from ..store.store import NewStream, Store
from .reads import read_stream
from .sse import SseResponse
from .subscriptions import RESERVED, reserved_app
from .wire import (
    API_RESPONSE_HEADERS,
    PREFIX,
    absolute_url,
    components,
    error,
    error_parts,
    frame_json,
    is_json,
    name_from_path,
    namespace_of,
    receive_body,
    request_name,
    state_headers,
    stream_name,
)

VISIBILITY = "streamhold-visibility"  # public or private, at create; else STREAMHOLD_READS decides
APPEND_LABELS = (("method", "POST"), ("route", PREFIX))
CREATE_LABELS = (("method", "PUT"), ("route", PREFIX))
log = logging.getLogger("streamhold.protocol")

# --- create --------------------------------------------------------------------------------------


def _ttl_and_expiry(headers: dict[str, str]) -> tuple[int | None, float | None]:
    ttl_raw = headers.get("stream-ttl")
    expires_raw = headers.get("stream-expires-at")
    if ttl_raw is not None and expires_raw is not None:
        raise InvalidRequestError("give Stream-TTL or Stream-Expires-At, not both")
    if ttl_raw is not None:
        seconds = checks.whole_number(
            ttl_raw, "Stream-TTL (seconds)", checks.MAX_TTL_SECONDS, leading_zeros=False
        )
        return seconds or None, None
    if expires_raw is not None:
        try:
            moment = datetime.fromisoformat(expires_raw.replace("Z", "+00:00"))
        except ValueError:
            raise InvalidRequestError(
                "Stream-Expires-At must be an RFC 3339 time, such as 2030-01-01T00:00:00Z"
            ) from None
        if moment.tzinfo is None:
            raise InvalidRequestError("Stream-Expires-At needs a time zone, such as Z or +00:00")
        try:
            timestamp = moment.timestamp()
        except (OverflowError, ValueError):
            timestamp = -1.0
        if not 0 <= timestamp <= checks.MAX_TIMESTAMP:
            raise InvalidRequestError("Stream-Expires-At must be a time from 1970 to 9000")
        return None, timestamp
    return None, None


def _fork_options(headers: dict[str, str]) -> tuple[str | None, tuple[int, int] | None, int]:
    source = headers.get("stream-forked-from")
    offset_raw = headers.get("stream-fork-offset")
    sub_raw = headers.get("stream-fork-sub-offset")
    if source is None:
        if offset_raw is not None or sub_raw is not None:
            raise InvalidRequestError("Stream-Fork-Offset and Stream-Fork-Sub-Offset need Stream-Forked-From")
        return None, None, 0
    path = unquote(source.split("://", 1)[-1].split("/", 1)[-1] if "://" in source else source)
    if not path.startswith(PREFIX + "/"):
        raise InvalidRequestError(f"Stream-Forked-From must be a stream path such as {PREFIX}/name")
    name = stream_name(path[len(PREFIX) :])
    offset = None
    if offset_raw is not None:
        offset = split_offset(offset_raw)
        if offset is None:
            raise InvalidRequestError("Stream-Fork-Offset is not a valid offset")
    sub = 0
    if sub_raw is not None:
        sub = checks.whole_number(sub_raw, "Stream-Fork-Sub-Offset", leading_zeros=False)
        if sub > 0 and offset is None:
            raise InvalidRequestError("Stream-Fork-Sub-Offset needs Stream-Fork-Offset")
    return name, offset, sub


def _fork_point(offset: tuple[int, int] | None, sub: int) -> Any:
    def resolve(
        source: StreamState,
        read: Callable[[int, int], Iterator[bytes]],
        by_id: Callable[[str], StreamState | None],
    ) -> int:
        if offset is not None and not offset_belongs(source, *offset, by_id):
            raise InvalidRequestError(
                "Stream-Fork-Offset is not an offset of the source stream (it may be of a deleted "
                "stream of that name): take one from the source's own responses"
            )
        base = source.tail if offset is None else offset[1]
        if base > source.tail:
            raise InvalidRequestError("Stream-Fork-Offset is beyond the end of the source stream")
        if sub == 0:
            return base
        if not source.json_mode:
            if sub > source.tail - base:
                raise InvalidRequestError("Stream-Fork-Sub-Offset overshoots the bytes after the fork offset")
            return base + sub
        # JSON mode counts messages (one per line): read only as far as the sub-offset-th one ends.
        position, remaining = base, sub
        for piece in read(base, source.tail):
            for end in (i + 1 for i, byte in enumerate(piece) if byte == 0x0A):
                remaining -= 1
                if remaining == 0:
                    return position + end
            position += len(piece)
        raise InvalidRequestError("Stream-Fork-Sub-Offset overshoots the messages after the fork offset")

    return resolve


async def _create(
    state: State, scope: Scope, receive: Receive, routed: str
) -> tuple[int, dict[str, str], bytes]:
    """Create a stream (idempotent when the configuration matches), optionally closed or forked."""
    store: Store = state.store
    settings: Settings = state.settings
    headers = _request_headers(scope)
    principal = await resolve(headers.get("authorization", ""), settings, store.tokens)
    require(principal, "write")
    name = name_from_path(scope.get("raw_path"), routed)
    require(principal, "write", namespace_of(name))
    visibility = visibility_of(headers.get(VISIBILITY), "Streamhold-Visibility")
    given_type = headers.get("content-type", "").strip()
    if given_type:
        checks.content_type(given_type)
    ttl, expires_at = _ttl_and_expiry(headers)
    fork_from, fork_offset, sub = _fork_options(headers)
    body = await receive_body(receive, headers.get("content-length"), settings.max_append_bytes)
    content_type = given_type
    if fork_from is not None:
        found = await store.get_by_name(fork_from)
        if lifecycle(found).readable:  # a fork reads its source: so may only one who may read it
            assert found is not None
            require_read(principal, found, settings)
        if not content_type:
            content_type = require_live(found).content_type
    content_type = content_type or "application/octet-stream"
    json_mode = is_json(content_type)
    initial = frame_json(body, allow_empty_array=True) if json_mode and body else body
    stream, created = await store.create(
        NewStream(
            name=name,
            namespace=namespace_of(name),
            content_type=content_type,
            json_mode=json_mode,
            ttl_seconds=ttl,
            sliding=ttl is not None,
            expires_at=expires_at,
            closed=headers.get("stream-closed", "").lower() == "true",
            initial=initial,
            fork_from=fork_from,
            fork_offset=fork_offset[1] if fork_offset is not None else None,
            fork_point=_fork_point(fork_offset, sub) if fork_from is not None else None,
            visibility=visibility,
        )
    )
    answer = state_headers(stream, stream.tail, stream.closed)
    if created and stream.tail:  # a create with a body is an append to subscriptions (noted, not waited on)
        state.subscriptions.noted([stream.id])
    if created:
        # Header values are Latin-1 on the wire: send the URL percent-encoded, as clients expect anyway.
        answer["location"] = absolute_url(scope)
    return 201 if created else 200, answer, b""


async def _create_mounted(name: str, request: Request[Any, Any, Any]) -> ASGIResponse:
    """A create that reached the mounted handler: only `PUT /v1/stream`, with no name, does (a 400)."""
    try:
        return respond(*await _create(request.app.state, request.scope, request.receive, name))
    except StreamError as exc:
        return error(exc)


# --- append --------------------------------------------------------------------------------------


def _producer(headers: dict[str, str]) -> Producer | None:
    values = [headers.get(h) for h in ("producer-id", "producer-epoch", "producer-seq")]
    if all(v is None for v in values):
        return None
    if any(v is None for v in values):
        raise InvalidRequestError("Producer-Id, Producer-Epoch and Producer-Seq go together: send all three")
    producer_id, epoch, seq = values
    assert producer_id is not None and epoch is not None and seq is not None
    if not producer_id.strip():
        raise InvalidRequestError("Producer-Id may not be empty")
    checks.short_text(producer_id, "Producer-Id")
    return Producer(
        producer_id, checks.whole_number(epoch, "Producer-Epoch"), checks.whole_number(seq, "Producer-Seq")
    )


def _append_headers(result: AppendResult, generation: int) -> dict[str, str]:
    headers = {"stream-next-offset": format_offset(result.tail, generation)}
    if result.closed:
        headers["stream-closed"] = "true"
    if result.producer_epoch is not None:
        headers["producer-epoch"] = str(result.producer_epoch)
        headers["producer-seq"] = str(result.producer_seq)
    return headers


def _request_headers(scope: Scope) -> dict[str, str]:
    """Header names and values as text; the first of repeated headers wins."""
    headers: dict[str, str] = {}
    for key, value in scope["headers"]:
        name = key.decode("latin-1").lower()
        if name not in headers:
            headers[name] = value.decode("latin-1")
    return headers


async def _append(
    state: State, scope: Scope, receive: Receive, routed: str
) -> tuple[int, dict[str, str], bytes]:
    """Append to a stream, append and close it, or just close it (empty body and Stream-Closed: true)."""
    store: Store = state.store
    settings: Settings = state.settings
    headers = _request_headers(scope)
    share = auth.share_param(scope.get("query_string", b""))
    principal = await resolve(headers.get("authorization", ""), settings, store.tokens, share)
    require(principal, "write")
    name = name_from_path(scope.get("raw_path"), routed)
    stream = require_live(await store.resolve(name))
    require(principal, "write", stream.namespace)  # a name made again keeps its namespace: its first segment
    close = headers.get("stream-closed", "").lower() == "true"
    producer = _producer(headers)
    declared = headers.get("content-length")
    given_type = headers.get("content-type")
    if given_type:
        checks.content_type(given_type)
    seq = headers.get("stream-seq")
    if seq is not None:
        checks.short_text(seq, "Stream-Seq")
    spool = await _spool(store, stream, declared, given_type, settings.max_append_bytes)
    try:
        raw = await receive_body(receive, declared, settings.max_append_bytes, spool)
        if spool is not None and spool.released:
            spool = None
        try:
            body = _checked_body(stream, raw, given_type, close)
        except StreamError:
            # Checked against a cached copy: the name may have been made again elsewhere since.
            fresh = require_live(await store.resolve(name, fresh=True))
            if fresh.id == stream.id:
                raise
            if spool is not None:
                spool.close()
                spool = None
            stream = fresh
            body = _checked_body(stream, raw, given_type, close)
    except BaseException:
        if spool is not None:
            spool.close()
        raise
    options = {
        "content_type": given_type if body else None,
        "seq": seq,
        "producer": producer,
        "close": close,
    }
    try:
        try:
            result = await store.append(stream.id, body, spool=spool, **options)
        except StreamNotFoundError:
            # The name may have been deleted and created again since it was cached: look once more.
            fresh = require_live(await store.resolve(name, fresh=True))
            if fresh.id == stream.id:
                raise
            stream = fresh
            result = await store.append(fresh.id, _checked_body(fresh, raw, given_type, close), **options)
    except StreamClosedError as exc:
        exc.generation = stream.generation  # its final offset is one of this stream's
        raise
    status = 200 if producer is not None and body and not result.duplicate else 204
    return status, _append_headers(result, stream.generation), b""


def _checked_body(stream: StreamState, body: bytes, given_type: str | None, close: bool) -> bytes:
    """The body to append to `stream`, framed if it is a JSON stream; raises if the stream cannot take it."""
    if not body and not close:
        raise InvalidRequestError("an append needs a body (or Stream-Closed: true to close the stream)")
    if body and not given_type:
        raise InvalidRequestError(f"an append needs a Content-Type; this stream takes {stream.content_type}")
    if body and not stream.closed and media_type(given_type or "") != media_type(stream.content_type):
        given = media_type(given_type or "")
        raise ContentTypeMismatchError(
            f"Content-Type {given} does not match the stream's {stream.content_type}"
        )
    if body and stream.json_mode and not stream.closed:
        return frame_json(body, allow_empty_array=False)
    return body


async def _spool(
    store: Store, stream: StreamState, declared: str | None, given_type: str | None, limit: int
) -> Spool | None:
    """A spool for a body big enough for the stream's file, so that it goes to disk while it arrives.

    Measured with one writer of 1 MiB appends, two servers side by side: 41-46% more MiB/s once the disk
    had slowed to its sustained pace (the commit's sync then finds most of the body written), no loss before.
    """
    size = checks.count(declared or "")
    if size is None or not FILE_CHUNK_MIN <= size <= limit:
        return None
    if stream.json_mode or stream.closed or media_type(given_type or "") != media_type(stream.content_type):
        return None
    return await store.spool(stream.id, size)


async def append_asgi(state: State, scope: Scope, receive: Receive, send: Send) -> None:
    """POST /v1/stream/{name}, served straight from ASGI.

    Appends are most of a busy server's requests, and the framework's request object, router and
    middleware cost as much as the append's own work; this path adds their effects (security headers,
    request metrics, error bodies) itself.
    """
    await _straight(state, scope, receive, send, False)


async def create_asgi(state: State, scope: Scope, receive: Receive, send: Send) -> None:
    """PUT /v1/stream/{name}, served straight from ASGI as appends are: the framework cost a create more
    than its own work did, measured under 16 concurrent creators."""
    await _straight(state, scope, receive, send, True)


async def _straight(state: State, scope: Scope, receive: Receive, send: Send, create: bool) -> None:
    started = time.perf_counter()
    routed = scope["path"][len(PREFIX) :]
    try:
        if create:
            status, headers, body = await _create(state, scope, receive, routed)
        else:
            status, headers, body = await _append(state, scope, receive, routed)
    except StreamError as exc:
        status, headers, body = error_parts(exc)
    except HTTPException as exc:  # a missing API key
        headers = {**(exc.headers or {}), "content-type": "application/json"}
        status, body = exc.status_code, json.dumps({"error": exc.detail}).encode()
    except Exception:
        log.exception("%s %s failed", "create of" if create else "append to", scope["path"])
        headers = {"content-type": "application/json"}
        what = b"the create" if create else b"the append"
        status, body = 500, b'{"error": "internal server error; %s was not acknowledged"}' % what
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    if body or create:
        raw.append((b"content-length", str(len(body)).encode()))
    if create:  # what the security headers middleware gives a response carrying this content type
        raw += content_headers(headers.get("content-type", ""), inline=False) + API_CORS_HEADERS
    else:
        raw += API_RESPONSE_HEADERS
    start: HTTPResponseStartEvent = {"type": "http.response.start", "status": status, "headers": raw}
    await send(start)
    await send({"type": "http.response.body", "body": body, "more_body": False})
    labels = CREATE_LABELS if create else APPEND_LABELS
    request_metrics(state).record(labels, status, time.perf_counter() - started)


async def _append_mounted(name: str, request: Request[Any, Any, Any]) -> ASGIResponse:
    """An append that reached the mounted handler: only `POST /v1/stream`, with no name, does (a 400)."""
    try:
        return respond(*await _append(request.app.state, request.scope, request.receive, name))
    except StreamError as exc:
        return error(exc)


async def head_stream(name: str, request: Request[Any, Any, Any]) -> ASGIResponse:
    """A stream's metadata: type, tail, closed, TTL or expiry."""
    store, _, settings = components(request)
    try:
        state = require_live(await store.get_by_name(request_name(request, name)))
        require_read(await principal_of(request), state, settings)
    except StreamError as exc:
        return respond(exc.status, {"content-type": "application/json"}, head_only=True)
    except HTTPException as exc:  # a private stream: not even its size is told
        refused = {**(exc.headers or {}), "content-type": "application/json"}
        return respond(exc.status_code, refused, head_only=True)
    headers = {**state_headers(state, state.tail, state.closed), "cache-control": "no-store"}
    headers[STREAM_ID_HEADER] = state.id  # what pages stop it by: POST /stream/{id}/stop
    if state.sliding and state.ttl_seconds:
        headers["stream-ttl"] = str(state.ttl_seconds)
    elif state.expires_at is not None:
        headers["stream-expires-at"] = datetime.fromtimestamp(state.expires_at).astimezone().isoformat()
    return respond(200, headers, head_only=True)


async def delete_stream(name: str, request: Request[Any, Any, Any]) -> ASGIResponse:
    """Delete a stream (soft-delete while forks of it remain)."""
    store, _, settings = components(request)
    try:
        principal = await principal_of(request)
        require(principal, "manage")
        state = require_live(await store.get_by_name(request_name(request, name)))
        require(principal, "manage", state.namespace)
        await store.delete(state.id)
    except StreamError as exc:
        return error(exc)
    return respond(204)


HANDLERS = {
    "PUT": _create_mounted,
    "POST": _append_mounted,
    "GET": read_stream,
    "HEAD": head_stream,
    "DELETE": delete_stream,
}


@asgi(PREFIX, is_mount=True, copy_scope=False, opt={"stream_content": True})
async def protocol_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Every protocol request, dispatched by method.

    A mounted ASGI handler: these requests skip Litestar's per-request signature parsing and injection,
    which cost more than the append itself.
    """
    path = scope["path"]
    if scope["type"] == ScopeType.HTTP and (path == RESERVED or path.startswith(RESERVED + "/")):
        await reserved_app(scope, receive, send)
        return
    method = scope["method"] if scope["type"] == ScopeType.HTTP else "WEBSOCKET"
    handler = HANDLERS.get(method)
    response: ASGIResponse | SseResponse
    if handler is None:
        body = json.dumps({"error": f"{method} is not a protocol method"}).encode()
        response = respond(405, {"allow": ", ".join(HANDLERS), "content-type": "application/json"}, body)
    else:
        request: Request[Any, Any, Any] = Request(scope, receive, send)
        try:
            response = await handler(scope["path"], request)
        except HTTPException as exc:  # a missing API key, or a body over the server's limit
            body = json.dumps({"error": exc.detail}).encode()
            response = respond(
                exc.status_code, {**(exc.headers or {}), "content-type": "application/json"}, body
            )
    await response(scope, receive, send)


routes = [protocol_app]
