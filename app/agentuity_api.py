"""The Agentuity-compatible stream service at /stream (and at the root, where Agentuity's SDK puts it).

Create, list, info, append, complete, PUT and delete pass one guard (http/auth.py) that checks the right each
declares; reading a stream's content by its URL is public (content.py serves it).
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

from litestar import Request, Router, delete, get, post, put, route
from litestar.di import NamedDependency
from litestar.exceptions import HTTPException
from litestar.params import FromPath
from litestar.response.base import ASGIResponse
from litestar.types import ControllerRouterHandler

from . import checks
from .errors import (
    InvalidRequestError,
    PayloadTooLargeError,
    StreamClosedError,
    StreamError,
    StreamNotFoundError,
)
from .http.auth import Right, principal_of, require, require_read, require_right, visibility_of
from .http.content import RangeNotSatisfiableError, respond_with_content
from .http.responses import parse_query, respond
from .live import LiveHub
from .models import DEFAULT_TTL, StreamFilter, StreamState, clamp_ttl, iso, lifecycle
from .protocol.wire import PREFIX, frame_json, read_body
from .sdk.local import info_from_state
from .settings import Settings
from .store.store import NewStream, Store

BASES = ("/stream", "")  # the documented prefix, and the root that the SDK's own base URL implies
JSON_LIMIT = 1024 * 1024
PUT_SLICE = 1024 * 1024
# Agentuity's sort names (`name` is the namespace on its wire) onto the store's.
SORTS = {
    "created": "created",
    "updated": "updated",
    "lastUsed": "updated",
    "size": "size",
    "name": "namespace",
    "namespace": "namespace",
    "protocol_name": "name",
}


def _paths(suffix: str) -> list[str]:
    return [f"{base}{suffix}" or "/" for base in BASES]


def _json(status: int, payload: Any, headers: dict[str, str] | None = None) -> ASGIResponse:
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    return respond(status, {"content-type": "application/json", **(headers or {})}, body)


def _error(exc: StreamError, head: bool = False) -> ASGIResponse:
    headers = {"content-type": "application/json"}
    if isinstance(exc, RangeNotSatisfiableError):
        headers["content-range"] = f"bytes */{exc.length}"
    if head:
        return ASGIResponse(body=b"", status_code=exc.status, headers=headers, is_head_response=True)
    return _json(exc.status, {"error": str(exc)}, headers)


def wire_info(state: StreamState, origin: str) -> dict[str, Any]:
    """A stream's record on this API: Agentuity's snake_case fields (`name` is the namespace), and more."""
    info = info_from_state(state, origin)
    return {
        "id": state.id,
        "name": state.namespace,
        "metadata": dict(state.metadata),
        "url": info.url,
        "size_bytes": state.tail,
        "expires_at": iso(state.expires_at),
        "namespace": state.namespace,
        "content_type": state.content_type,
        "created_at": iso(state.created_at),
        "updated_at": iso(state.updated_at),
        "closed_at": iso(state.closed_at),
        "completed": state.closed,
        "compressed": state.compressed,
        "stored_bytes": state.stored_bytes,
        "protocol_name": state.name,
        "viewer_url": info.viewer_url,
        "stop_requested": state.stop_requested_at is not None,
    }


async def _live(store: Store, stream_id: str) -> StreamState:
    state = await store.get(stream_id)
    if not lifecycle(state).readable:  # this API answers 404 for deleted streams too, as Agentuity does
        raise StreamNotFoundError(f"stream {stream_id} not found (it may have expired or been deleted)")
    assert state is not None
    return state


async def _allowed(
    request: Request[Any, Any, Any], store: Store, stream_id: str, right: Right
) -> StreamState:
    """The live stream, once the request's principal holds `right` over its namespace (else 403)."""
    state = await _live(store, stream_id)
    require(await principal_of(request), right, state.namespace)
    return state


async def _json_object(request: Request[Any, Any, Any]) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > JSON_LIMIT:
        raise PayloadTooLargeError(f"a JSON body may be at most {JSON_LIMIT} bytes")
    if not raw.strip():
        return {}
    try:
        value = checks.json_value(raw)
    except checks.InvalidInputError:
        raise
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequestError('the body must be a JSON object, such as {"name": "export"}') from None
    if not isinstance(value, dict):
        raise InvalidRequestError('the body must be a JSON object, such as {"name": "export"}')
    return value


def _content_type(headers: Any) -> str:
    if headers is None:
        return "application/octet-stream"
    if not isinstance(headers, dict):
        raise InvalidRequestError('headers must be an object, such as {"content-type": "text/csv"}')
    given = [value for key, value in headers.items() if key.lower() == "content-type"]
    return checks.content_type(given[-1]) if given else "application/octet-stream"


def _ttl(body: dict[str, Any]) -> int | None:
    if "ttl" not in body:
        return DEFAULT_TTL
    ttl = body["ttl"]
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl != ttl or ttl < 0:
        raise InvalidRequestError(
            "ttl must be a number of seconds: 0 or null never expires; others are clamped to 60..7776000"
        )
    return clamp_ttl(ttl)


def _integer(body: dict[str, Any], key: str, default: int) -> int:
    value = body.get(key)
    if value is None:
        return default
    whole = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not whole or value != int(value):
        raise InvalidRequestError(f"{key} must be a whole number")
    return int(value)


# --- management ----------------------------------------------------------------------------------


@post(_paths(""), status_code=200, opt={"right": "write"})
async def create_stream(
    request: Request[Any, Any, Any], store: NamedDependency[Store], settings: NamedDependency[Settings]
) -> ASGIResponse:
    """Create a stream from {name, metadata?, headers?: {content-type}, ttl?}; answers its id and record."""
    body = await _json_object(request)
    new = NewStream(
        namespace=checks.namespace(body.get("name", body.get("namespace"))),
        content_type=_content_type(body.get("headers")),
        metadata=checks.metadata(body.get("metadata"), coerce=True),
        ttl_seconds=_ttl(body),
        visibility=visibility_of(body.get("public"), "public"),
    )
    require(await principal_of(request), "write", new.namespace)
    state, _ = await store.create(new)
    info = wire_info(state, settings.origin())
    return _json(
        200, info, {"location": info["url"], "stream-max-append-bytes": str(settings.max_append_bytes)}
    )


@post(_paths("/list"), status_code=200, opt={"right": "manage"})
async def list_streams(
    request: Request[Any, Any, Any], store: NamedDependency[Store], settings: NamedDependency[Settings]
) -> ASGIResponse:
    """One page of the live streams matching {name?, metadata?}, with the total number of matches."""
    body = await _json_object(request)
    namespace = body.get("name") or body.get("namespace")
    principal = await principal_of(request)
    where = StreamFilter(
        namespace=checks.namespace(namespace) if namespace else None,
        metadata=tuple(checks.metadata(body.get("metadata"), coerce=True).items()),
        # A token sees, and counts, only the streams of namespaces it may manage.
        namespaces=None if principal.full else principal.namespaces,
    )
    sort = body.get("sort") or "created"
    if not isinstance(sort, str) or sort not in SORTS:
        raise InvalidRequestError(f"sort must be one of {', '.join(SORTS)}; got {sort!r}")
    limit, offset = checks.list_window(_integer(body, "limit", 100), _integer(body, "offset", 0))
    cursor = body.get("cursor")
    if cursor is not None and not isinstance(cursor, str):
        raise InvalidRequestError("cursor must be the next_cursor string of an earlier page")
    found = await store.listing(
        where,
        sort=SORTS[sort],
        direction=body.get("direction") or "desc",
        limit=limit,
        offset=offset,
        cursor=cursor or None,
    )
    origin = settings.origin()
    return _json(
        200,
        {
            "success": True,
            "streams": [wire_info(s, origin) for s in found.streams],
            "total": found.total,
            # The page after this one, however deep: pass it back as `cursor` (None after the last page).
            "next_cursor": found.next,
        },
    )


@post(_paths("/{stream_id:str}/info"), status_code=200, opt={"right": "manage"})
async def stream_info(
    stream_id: FromPath[str],
    request: Request[Any, Any, Any],
    store: NamedDependency[Store],
    settings: NamedDependency[Settings],
) -> ASGIResponse:
    """A stream's record."""
    state = await _allowed(request, store, stream_id, "manage")
    return _json(200, wire_info(state, settings.origin()))


@delete(_paths("/{stream_id:str}"), status_code=200, opt={"right": "manage"})
async def delete_stream(
    stream_id: FromPath[str],
    request: Request[Any, Any, Any],
    store: NamedDependency[Store],
    settings: NamedDependency[Settings],
) -> ASGIResponse:
    """Delete a stream; its URL answers 404 from then on."""
    await store.delete((await _allowed(request, store, stream_id, "manage")).id)
    return respond(204)


# --- writes --------------------------------------------------------------------------------------


def _writable(state: StreamState) -> StreamState:
    if state.closed:
        raise StreamClosedError(f"stream {state.id} is complete; create a new stream to write more")
    return state


@post(_paths("/{stream_id:str}/append"), status_code=200, opt={"right": "write"})
async def append_stream(
    stream_id: FromPath[str],
    request: Request[Any, Any, Any],
    store: NamedDependency[Store],
    settings: NamedDependency[Settings],
) -> ASGIResponse:
    """Append the raw body; answered once it is committed."""
    state = _writable(await _allowed(request, store, stream_id, "write"))
    body = await read_body(request, settings.max_append_bytes)
    if body:
        if state.json_mode:  # a Durable Streams JSON stream keeps one message per line
            body = frame_json(body, allow_empty_array=False)
        await store.append(state.id, body)
    return respond(204)


def _compress_header(request: Request[Any, Any, Any]) -> bool:
    value = request.headers.get("x-compress", "").strip().lower()
    if value not in ("", "gzip"):
        raise InvalidRequestError("X-Compress must be gzip, or left out to store the stream as it is")
    return value == "gzip"


async def _complete(store: Store, stream_id: str, compress: bool) -> None:
    # Closing a closed stream is a no-op in the writer, so a repeated complete is idempotent.
    await store.append_nowait(stream_id, b"", close=True, compress=compress)
    await store.finish(stream_id)


@post(_paths("/{stream_id:str}/complete"), status_code=200, opt={"right": "write"})
async def complete_stream(
    stream_id: FromPath[str],
    request: Request[Any, Any, Any],
    store: NamedDependency[Store],
    settings: NamedDependency[Settings],
) -> ASGIResponse:
    """Close the stream (gzip it first with `X-Compress: gzip`); idempotent."""
    compress = _compress_header(request)
    state = await _allowed(request, store, stream_id, "write")
    await _complete(store, state.id, compress)
    return respond(204)


async def _inflated(pieces: AsyncIterator[bytes], gzipped: bool, bound: int) -> AsyncIterator[bytes]:
    """The request body, gunzipped when it came gzipped, in pieces of at most `bound` bytes."""
    if not gzipped:
        async for piece in pieces:
            yield piece
        return
    inflater = zlib.decompressobj(31)
    try:
        async for piece in pieces:
            data = piece
            while data:
                yield inflater.decompress(data, bound)
                data = inflater.unconsumed_tail
                if inflater.eof and inflater.unused_data:  # another member follows (`gzip -c a b`)
                    data, inflater = inflater.unused_data, zlib.decompressobj(31)
        yield inflater.flush()
    except zlib.error:
        raise InvalidRequestError(
            "the body is not valid gzip; send it plain or fix Content-Encoding"
        ) from None
    if not inflater.eof:
        raise InvalidRequestError("the gzip body ended early; send the whole body")


@put(_paths("/{stream_id:str}"), status_code=200, request_max_body_size=None, opt={"right": "write"})
async def put_stream(
    stream_id: FromPath[str],
    request: Request[Any, Any, Any],
    store: NamedDependency[Store],
    settings: NamedDependency[Settings],
) -> ASGIResponse:
    """The older whole-body upload: the body (streamed, maybe gzipped) is appended in slices, then closed."""
    state = _writable(await _allowed(request, store, stream_id, "write"))
    if state.json_mode:
        raise StreamClosedError(f"stream {state.id} takes JSON messages: send each with POST .../append")
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity", "gzip"):
        raise InvalidRequestError("Content-Encoding must be gzip, or left out for a plain body")
    compress = _compress_header(request) or encoding == "gzip"
    size = min(PUT_SLICE, settings.max_append_bytes)
    buffer = bytearray()
    async for piece in _inflated(request.stream(), encoding == "gzip", size):
        buffer += piece
        while len(buffer) >= size:
            await store.append(state.id, bytes(buffer[:size]))
            del buffer[:size]
    if buffer:
        await store.append(state.id, bytes(buffer))
    await _complete(store, state.id, compress)
    return respond(204)


# --- content -------------------------------------------------------------------------------------


async def _read(
    stream_id: str,
    request: Request[Any, Any, Any],
    store: Store,
    hub: LiveHub,
    settings: Settings,
    head: bool,
) -> ASGIResponse:
    try:
        state = await _live(store, stream_id)
        require_read(await principal_of(request), state, settings)
        if _protocol_read(request):
            return _to_protocol(request, state)
        return await respond_with_content(request, store, hub, settings, state, head)
    except StreamError as exc:
        return _error(exc, head)
    except HTTPException as exc:  # a private stream, read without a key or a read token for it
        headers = {**(exc.headers or {}), "content-type": "application/json", "cache-control": "no-store"}
        if head:
            return ASGIResponse(body=b"", status_code=exc.status_code, headers=headers, is_head_response=True)
        return _json(exc.status_code, {"error": exc.detail}, headers)


PROTOCOL_OFFSET = re.compile(r"-1|now|[0-9]+_[0-9]+")


def _protocol_read(request: Request[Any, Any, Any]) -> bool:
    """A read in the protocol's terms (`live`, or an offset that is not a byte count: -1, now, a token),
    as the browser client sends for a /stream/{id} URL it was given."""
    query = parse_query(request)
    return "live" in query or any(PROTOCOL_OFFSET.fullmatch(offset) for offset in query.get("offset", []))


def _to_protocol(request: Request[Any, Any, Any], state: StreamState) -> ASGIResponse:
    """A temporary redirect to the stream's protocol URL, the query (a share link's included) unchanged."""
    query = request.scope.get("query_string", b"").decode("latin-1")
    location = f"{PREFIX}/{quote(state.name, safe='/')}?{query}"
    return ASGIResponse(
        body=b"", status_code=307, headers={"location": location, "cache-control": "no-store"}
    )


@get("/stream/{stream_id:str}", opt={"stream_content": True})
async def read_content(
    stream_id: FromPath[str],
    request: Request[Any, Any, Any],
    store: NamedDependency[Store],
    hub: NamedDependency[LiveHub],
    settings: NamedDependency[Settings],
) -> ASGIResponse:
    """The content (public): a closed stream whole or by Range; an open one replayed, then tailed."""
    return await _read(stream_id, request, store, hub, settings, head=False)


@route("/stream/{stream_id:str}", http_method=["HEAD"], opt={"stream_content": True})
async def head_content(
    stream_id: FromPath[str],
    request: Request[Any, Any, Any],
    store: NamedDependency[Store],
    hub: NamedDependency[LiveHub],
    settings: NamedDependency[Settings],
) -> ASGIResponse:
    """The headers a GET would answer with."""
    return await _read(stream_id, request, store, hub, settings, head=True)


@route("/{stream_id:str}", http_method=["GET", "HEAD"], opt={"stream_content": True})
async def content_at_root(stream_id: FromPath[str], request: Request[Any, Any, Any]) -> ASGIResponse:
    """The root-level content URL of the SDK's default base: a permanent redirect to /stream/{id}.

    Content is served under /stream only, where every response carries the sandboxing headers.
    """
    query = request.scope.get("query_string", b"").decode("latin-1")
    location = f"/stream/{quote(stream_id, safe='')}" + (f"?{query}" if query else "")
    return ASGIResponse(body=b"", status_code=308, headers={"location": location}, media_type="text/plain")


# Every call but reading content passes one guard, which checks the right each handler declares;
# StreamErrors raised by the handlers become their status and a JSON message in the app's exception handler.
guarded = Router(
    "/",
    route_handlers=[
        create_stream,
        list_streams,
        stream_info,
        delete_stream,
        append_stream,
        complete_stream,
        put_stream,
    ],
    guards=[require_right],
)
routes: list[ControllerRouterHandler] = [guarded, read_content, head_content, content_at_root]
