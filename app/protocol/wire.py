"""The protocol's wire format: names, offsets, headers, JSON framing and responses, shared by its routes."""

from __future__ import annotations

import asyncio
import functools
import json
import random
import time
from typing import Any, cast
from urllib.parse import quote, unquote

from litestar import Request
from litestar.datastructures import URL
from litestar.response.base import ASGIResponse
from litestar.types import Receive, Scope

from .. import checks
from ..errors import (
    InvalidRequestError,
    PayloadTooLargeError,
    ProducerSeqGapError,
    StaleEpochError,
    StreamClosedError,
    StreamError,
)
from ..http.headers import API_RESPONSE_HEADERS, CORS  # noqa: F401  (the protocol's routes add these)
from ..http.responses import respond
from ..live import LiveHub
from ..models import MAX_NAME_LENGTH, StreamState, format_offset
from ..settings import Settings
from ..store.appends import media_type
from ..store.chunk_files import Spool
from ..store.store import Store
from ..urls import PROTOCOL_PREFIX

PREFIX = PROTOCOL_PREFIX
CATCHUP_LIMIT = 32 * 1024 * 1024
JSON_CATCHUP_LIMIT = 4 * 1024 * 1024
INLINE_LIMIT = 1024 * 1024
SSE_SLICE = 256 * 1024
# A spooled body lets go of its stream's file when its client sends nothing for SPOOL_PATIENCE_S, or has not
# sent it all within SPOOL_HOLD_S; other large appends to the stream go to the database until then.
SPOOL_PATIENCE_S = 5.0
SPOOL_HOLD_S = 30.0
CURSOR_EPOCH = 1728432000.0  # 2024-10-09T00:00:00Z, the protocol's cursor epoch
CURSOR_INTERVAL = 20.0


def components(request: Request[Any, Any, Any]) -> tuple[Store, LiveHub, Settings]:
    """The store, hub and settings, straight from app state: Litestar's injection spawns a task per value."""
    state = request.app.state
    return state.store, state.hub, state.settings


def error(exc: StreamError, extra: dict[str, str] | None = None) -> ASGIResponse:
    return respond(*error_parts(exc, extra))


def error_parts(exc: StreamError, extra: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """An error's status, headers and JSON body."""
    headers = {"content-type": "application/json", **(extra or {})}
    if isinstance(exc, StreamClosedError):
        final = format_offset(exc.tail, exc.generation)
        headers.update({"stream-closed": "true", "stream-next-offset": final})
    elif isinstance(exc, StaleEpochError):
        headers["producer-epoch"] = str(exc.current)
    elif isinstance(exc, ProducerSeqGapError):
        headers.update(
            {"producer-expected-seq": str(exc.expected), "producer-received-seq": str(exc.received)}
        )
    return exc.status, headers, json.dumps({"error": str(exc)}).encode()


def request_name(request: Request[Any, Any, Any], routed: str) -> str:
    """The stream name as the client sent it: the router has already collapsed `//` and a trailing `/`."""
    return name_from_path(request.scope.get("raw_path"), routed)


def name_from_path(raw: bytes | None, routed: str) -> str:
    """The stream name in the raw request path, else in the path after the prefix (`routed`), validated."""
    name = _name_in_raw_path(raw) if raw else None
    return name if name is not None else stream_name(routed)


# Writers append to the same few streams over and over. Shared by every app in the process, safely: a
# name depends on the raw path alone, never on an app's settings or data.
@functools.lru_cache(maxsize=4096)
def _name_in_raw_path(raw: bytes) -> str | None:
    path = unquote(raw.decode("latin-1").split("?", 1)[0])
    return stream_name(path[len(PREFIX) + 1 :]) if path.startswith(PREFIX + "/") else None


def absolute_url(scope: Scope) -> str:
    """The request's own absolute URL without its query, percent-encoded (header values are Latin-1)."""
    raw = scope.get("raw_path")
    path = raw.decode("latin-1").split("?", 1)[0] if raw else PREFIX + scope["path"]
    host = next((value for name, value in scope["headers"] if name == b"host"), b"")
    root = scope.get("app_root_path") or scope.get("root_path", "")
    return quote(_base_url(scope.get("scheme", "http"), scope.get("server"), host, root) + path, safe=SAFE)


SAFE = ":/%@!$&'()*+,;=~"


# A server is reached by one or a few origins: building each one's URL once spares every create the work.
@functools.lru_cache(maxsize=64)
def _base_url(scheme: str, server: tuple[str, int | None] | None, host: bytes, root: str) -> str:
    """The origin as Litestar's Request.base_url makes it, without its trailing slash."""
    headers = [(b"host", host)] if host else []
    fields = {"type": "http", "scheme": scheme, "server": server, "headers": headers, "root_path": root}
    return str(URL.from_scope(cast(Scope, {**fields, "path": "/", "query_string": b""}))).rstrip("/")


def stream_name(raw: str) -> str:
    """A stream name, validated: bounded length, no empty or dot segments, no control characters."""
    name = raw[1:] if raw.startswith("/") else raw
    if not name or len(name) > MAX_NAME_LENGTH:
        raise InvalidRequestError(f"a stream name must be 1 to {MAX_NAME_LENGTH} characters")
    segments = name.split("/")
    if any(s in ("", ".", "..") for s in segments):
        raise InvalidRequestError("a stream name may not have empty, '.' or '..' segments")
    if not checks.printable(name):
        raise InvalidRequestError("a stream name may not contain control characters")
    return name


def namespace_of(name: str) -> str:
    """Protocol-created streams get the first path segment as namespace, or `default` when there is none."""
    head_segment, slash, _ = name.partition("/")
    return head_segment[:254] if slash else "default"


def is_json(content_type: str) -> bool:
    return media_type(content_type) == "application/json"


def is_text(content_type: str) -> bool:
    kind = media_type(content_type)
    return kind.startswith("text/") or kind == "application/json"


def frame_json(body: bytes, *, allow_empty_array: bool) -> bytes:
    """JSON-mode storage: one compact JSON text per message, each ending in a newline."""
    try:
        value = json.loads(body)
    except RecursionError:
        raise InvalidRequestError("the JSON is nested too deeply; send a flatter document") from None
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequestError("the body is not valid JSON") from None
    messages = value if isinstance(value, list) else [value]
    if not messages and not allow_empty_array:
        raise InvalidRequestError("an empty JSON array appends nothing; send at least one message")
    try:
        return b"".join(
            json.dumps(m, separators=(",", ":"), ensure_ascii=False).encode() + b"\n" for m in messages
        )
    except RecursionError:
        raise InvalidRequestError("the JSON is nested too deeply; send a flatter document") from None
    except UnicodeEncodeError:
        raise InvalidRequestError(
            "the JSON has a lone surrogate escape (such as \\ud800), which is not Unicode text; fix the text"
        ) from None


def json_body(framed: bytes) -> bytes:
    """Stored JSON messages as the one JSON array a read returns."""
    return b"[" + framed[:-1].replace(b"\n", b",") + b"]" if framed else b"[]"


async def read_body(request: Request[Any, Any, Any], limit: int) -> bytes:
    """The whole request body, refusing (413) one larger than `limit` before reading it all."""
    return await receive_body(request.receive, request.headers.get("content-length"), limit)


async def receive_body(
    receive: Receive, declared: str | None, limit: int, spool: Spool | None = None
) -> bytes:
    """The whole body from an ASGI `receive`; `declared` is the Content-Length header, if any.

    With a spool, each piece is also written to the stream's file as it arrives, until the client is too
    slow (SPOOL_PATIENCE_S, SPOOL_HOLD_S); the spool then lets go of the file, and the writer writes the
    body once it is whole, as for any append.
    """
    if (checks.count(declared or "") or 0) > limit:
        raise PayloadTooLargeError(f"the body is {declared} bytes; an append may be at most {limit} bytes")
    parts: list[bytes] = []
    size = 0
    hold_until: float | None = None  # only a spooled body is timed
    while True:
        if spool is None or spool.released:
            message = await receive()
        else:
            now = asyncio.get_running_loop().time()
            hold_until = hold_until or now + SPOOL_HOLD_S
            try:
                # Cancelling uvicorn's receive loses nothing: it only waits for the body to arrive.
                async with asyncio.timeout_at(min(now + SPOOL_PATIENCE_S, hold_until)):
                    message = await receive()
            except TimeoutError:
                spool.release()
                continue
        if message["type"] != "http.request":  # http.disconnect
            raise InvalidRequestError("the client went away before sending the whole body")
        part = message.get("body", b"")
        size += len(part)
        if size > limit:
            raise PayloadTooLargeError(
                f"an append may be at most {limit} bytes; split it into smaller appends"
            )
        parts.append(part)
        if spool is not None:
            spool.add(part)
        if not message.get("more_body"):
            # One copy of a large body, and none again when the writer joins a lone append's parts.
            return b"".join(parts)


def cursor(client: str | None) -> str:
    """The protocol's CDN cursor: the current 20 s interval, always moving past the client's."""
    interval = int((time.time() - CURSOR_EPOCH) // CURSOR_INTERVAL)
    given = checks.count(client or "")
    if given is not None and interval <= given < checks.BEYOND:
        interval = given + random.randint(1, 180)
    return str(interval)


def state_headers(state: StreamState, tail: int, closed: bool) -> dict[str, str]:
    offset = format_offset(tail, state.generation)
    headers = {"content-type": state.content_type, "stream-next-offset": offset}
    if closed:
        headers["stream-closed"] = "true"
    return headers
