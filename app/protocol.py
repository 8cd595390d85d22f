"""The Durable Streams protocol at /v1/stream/{name}: create, append, read (catch-up, long-poll, SSE)."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import re
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, quote, unquote

from litestar import Request, asgi
from litestar.exceptions import HTTPException
from litestar.response.base import ASGIResponse
from litestar.response.streaming import ASGIStreamingResponse
from litestar.types import Receive, Scope, Send

from app.auth import require_key
from app.live import LiveHub
from app.models import (
    MAX_NAME_LENGTH,
    AppendResult,
    ContentTypeMismatchError,
    InvalidRequestError,
    PayloadTooLargeError,
    Producer,
    ProducerSeqGapError,
    StaleEpochError,
    StreamClosedError,
    StreamError,
    StreamGoneError,
    StreamNotFoundError,
    StreamState,
    format_offset,
    parse_offset,
)
from app.settings import Settings
from app.store import NewStream, Store, _iter_range
from app.writer import media_type

PREFIX = "/v1/stream"
CATCHUP_LIMIT = 32 * 1024 * 1024
JSON_CATCHUP_LIMIT = 4 * 1024 * 1024
INLINE_LIMIT = 1024 * 1024
SSE_SLICE = 256 * 1024
MAX_SAFE_INTEGER = 2**53 - 1
CURSOR_EPOCH = 1728432000.0  # 2024-10-09T00:00:00Z, the protocol's cursor epoch
CURSOR_INTERVAL = 20.0
_DIGITS = re.compile(r"^(0|[1-9][0-9]*)$")
_PLAIN_DIGITS = re.compile(r"^[0-9]+$")

CORS = {
    "access-control-allow-origin": "*",
    "access-control-allow-methods": "GET, POST, PUT, DELETE, HEAD, OPTIONS",
    "access-control-allow-headers": (
        "content-type, authorization, if-none-match, last-event-id, stream-ttl, stream-expires-at, "
        "stream-closed, stream-seq, producer-id, producer-epoch, producer-seq, stream-forked-from, "
        "stream-fork-offset, stream-fork-sub-offset"
    ),
    "access-control-expose-headers": (
        "stream-next-offset, stream-cursor, stream-up-to-date, stream-closed, stream-ttl, stream-expires-at, "
        "stream-sse-data-encoding, producer-epoch, producer-seq, producer-expected-seq, "
        "producer-received-seq, etag, content-type, content-encoding, location"
    ),
    "access-control-max-age": "86400",
}


def components(request: Request[Any, Any, Any]) -> tuple[Store, LiveHub, Settings]:
    """The store, hub and settings, straight from app state: Litestar's injection spawns a task per value."""
    state = request.app.state
    return state.store, state.hub, state.settings


def respond(
    status: int, headers: dict[str, str] | None = None, body: bytes = b"", head_only: bool = False
) -> ASGIResponse:
    """A response whose Content-Type is sent exactly as given (no charset added)."""
    merged = dict(headers or {})
    if status in (204, 304) or head_only:
        merged.pop("content-length", None)
        return ASGIResponse(body=b"", status_code=status, headers=merged, is_head_response=head_only)
    merged.setdefault("content-type", "application/json")
    return ASGIResponse(body=body, status_code=status, headers=merged)


def error(exc: StreamError, extra: dict[str, str] | None = None) -> ASGIResponse:
    headers = {"content-type": "application/json", **(extra or {})}
    if isinstance(exc, StreamClosedError):
        headers.update({"stream-closed": "true", "stream-next-offset": format_offset(exc.tail)})
    elif isinstance(exc, StaleEpochError):
        headers["producer-epoch"] = str(exc.current)
    elif isinstance(exc, ProducerSeqGapError):
        headers.update(
            {"producer-expected-seq": str(exc.expected), "producer-received-seq": str(exc.received)}
        )
    body = json.dumps({"error": str(exc)}).encode()
    return respond(exc.status, headers, body)


def request_name(request: Request[Any, Any, Any], routed: str) -> str:
    """The stream name as the client sent it: the router has already collapsed `//` and a trailing `/`."""
    raw = request.scope.get("raw_path")
    if raw:
        path = unquote(raw.decode("latin-1").split("?", 1)[0])
        if path.startswith(PREFIX + "/"):
            return stream_name(path[len(PREFIX) + 1 :])
    return stream_name(routed)


def absolute_url(request: Request[Any, Any, Any]) -> str:
    """The request's own absolute URL without its query, percent-encoded (header values are Latin-1)."""
    raw = request.scope.get("raw_path")
    path = raw.decode("latin-1").split("?", 1)[0] if raw else PREFIX + request.scope["path"]
    return quote(str(request.base_url).rstrip("/") + path, safe=":/%@!$&'()*+,;=~")


def stream_name(raw: str) -> str:
    """A stream name, validated: bounded length, no empty or dot segments, no control characters."""
    name = raw[1:] if raw.startswith("/") else raw
    if not name or len(name) > MAX_NAME_LENGTH:
        raise InvalidRequestError(f"a stream name must be 1 to {MAX_NAME_LENGTH} characters")
    segments = name.split("/")
    if any(s in ("", ".", "..") for s in segments):
        raise InvalidRequestError("a stream name may not have empty, '.' or '..' segments")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
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
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequestError("the body is not valid JSON") from None
    messages = value if isinstance(value, list) else [value]
    if not messages and not allow_empty_array:
        raise InvalidRequestError("an empty JSON array appends nothing; send at least one message")
    return b"".join(
        json.dumps(m, separators=(",", ":"), ensure_ascii=False).encode() + b"\n" for m in messages
    )


def json_body(framed: bytes) -> bytes:
    """Stored JSON messages as the one JSON array a read returns."""
    return b"[" + framed[:-1].replace(b"\n", b",") + b"]" if framed else b"[]"


async def read_body(request: Request[Any, Any, Any], limit: int) -> bytearray:
    """The whole request body, refusing (413) one larger than `limit` before reading it all."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"the body is {declared} bytes; an append may be at most {limit} bytes")
    body = bytearray()
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise InvalidRequestError("the client went away before sending the whole body")
        body += message.get("body", b"")
        if len(body) > limit:
            raise PayloadTooLargeError(
                f"an append may be at most {limit} bytes; split it into smaller appends"
            )
        if not message.get("more_body"):
            return body  # a bytearray: the store takes it as is, saving a copy of large bodies


def cursor(client: str | None) -> str:
    """The protocol's CDN cursor: the current 20 s interval, always moving past the client's."""
    interval = int((time.time() - CURSOR_EPOCH) // CURSOR_INTERVAL)
    if client and client.isdigit() and int(client) >= interval:
        interval = int(client) + random.randint(1, 180)
    return str(interval)


def parse_query(request: Request[Any, Any, Any]) -> dict[str, list[str]]:
    return parse_qs(request.scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)


def single(query: dict[str, list[str]], key: str) -> str | None:
    values = query.get(key)
    if values is None:
        return None
    if len(values) != 1:
        raise InvalidRequestError(f"give the {key} parameter once")
    return values[0]


def live_state(state: StreamState | None) -> StreamState:
    if state is None or state.expired():
        raise StreamNotFoundError("stream not found")
    if state.deleted:
        raise StreamGoneError("stream was deleted; forks of it still exist")
    return state


def state_headers(state: StreamState, tail: int, closed: bool) -> dict[str, str]:
    headers = {"content-type": state.content_type, "stream-next-offset": format_offset(tail)}
    if closed:
        headers["stream-closed"] = "true"
    return headers


# --- create --------------------------------------------------------------------------------------


def _ttl_and_expiry(request: Request[Any, Any, Any]) -> tuple[int | None, float | None]:
    ttl_raw = request.headers.get("stream-ttl")
    expires_raw = request.headers.get("stream-expires-at")
    if ttl_raw is not None and expires_raw is not None:
        raise InvalidRequestError("give Stream-TTL or Stream-Expires-At, not both")
    if ttl_raw is not None:
        if not _DIGITS.match(ttl_raw):
            raise InvalidRequestError("Stream-TTL must be a whole number of seconds, such as 3600")
        return int(ttl_raw) or None, None
    if expires_raw is not None:
        try:
            moment = datetime.fromisoformat(expires_raw.replace("Z", "+00:00"))
        except ValueError:
            raise InvalidRequestError(
                "Stream-Expires-At must be an RFC 3339 time, such as 2030-01-01T00:00:00Z"
            ) from None
        if moment.tzinfo is None:
            raise InvalidRequestError("Stream-Expires-At needs a time zone, such as Z or +00:00")
        return None, moment.timestamp()
    return None, None


def _fork_options(request: Request[Any, Any, Any]) -> tuple[str | None, int | None, int]:
    source = request.headers.get("stream-forked-from")
    offset_raw = request.headers.get("stream-fork-offset")
    sub_raw = request.headers.get("stream-fork-sub-offset")
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
        offset = parse_offset(offset_raw)
        if offset is None:
            raise InvalidRequestError("Stream-Fork-Offset is not a valid offset")
    sub = 0
    if sub_raw is not None:
        if not _DIGITS.match(sub_raw):
            raise InvalidRequestError("Stream-Fork-Sub-Offset must be a whole number")
        sub = int(sub_raw)
        if sub > 0 and offset is None:
            raise InvalidRequestError("Stream-Fork-Sub-Offset needs Stream-Fork-Offset")
    return name, offset, sub


def _fork_point(offset: int | None, sub: int) -> Any:
    def resolve(source: StreamState, conn: Any) -> int:
        base = source.tail if offset is None else offset
        if base > source.tail:
            raise InvalidRequestError("Stream-Fork-Offset is beyond the end of the source stream")
        if sub == 0:
            return base
        rest = b"".join(_iter_range(conn, source, base, source.tail))
        if source.json_mode:
            ends = [i + 1 for i, byte in enumerate(rest) if byte == 0x0A]
            if sub > len(ends):
                raise InvalidRequestError(
                    "Stream-Fork-Sub-Offset overshoots the messages after the fork offset"
                )
            return base + ends[sub - 1]
        if sub > len(rest):
            raise InvalidRequestError("Stream-Fork-Sub-Offset overshoots the bytes after the fork offset")
        return base + sub

    return resolve


async def create_stream(name: str, request: Request[Any, Any, Any]) -> ASGIResponse:
    """Create a stream (idempotent when the configuration matches), optionally closed or forked."""
    store, _, settings = components(request)
    try:
        require_key(request, settings)
        name = request_name(request, name)
        given_type = request.headers.get("content-type", "").strip()
        ttl, expires_at = _ttl_and_expiry(request)
        fork_from, fork_offset, sub = _fork_options(request)
        body = await read_body(request, settings.max_append_bytes)
        content_type = given_type
        if not content_type and fork_from is not None:
            source = live_state(await store.get_by_name(fork_from))
            content_type = source.content_type
        content_type = content_type or "application/octet-stream"
        json_mode = is_json(content_type)
        initial = frame_json(body, allow_empty_array=True) if json_mode and body else body
        state, created = await store.create(
            NewStream(
                name=name,
                namespace=namespace_of(name),
                content_type=content_type,
                json_mode=json_mode,
                ttl_seconds=ttl,
                sliding=ttl is not None,
                expires_at=expires_at,
                closed=request.headers.get("stream-closed", "").lower() == "true",
                initial=initial,
                fork_from=fork_from,
                fork_offset=fork_offset,
                fork_point=_fork_point(fork_offset, sub) if fork_from is not None else None,
            )
        )
    except StreamError as exc:
        return error(exc)
    headers = state_headers(state, state.tail, state.closed)
    if created:
        # Header values are Latin-1 on the wire: send the URL percent-encoded, as clients expect anyway.
        headers["location"] = absolute_url(request)
    return respond(201 if created else 200, headers)


# --- append --------------------------------------------------------------------------------------


def _producer(request: Request[Any, Any, Any]) -> Producer | None:
    values = [request.headers.get(h) for h in ("producer-id", "producer-epoch", "producer-seq")]
    if all(v is None for v in values):
        return None
    if any(v is None for v in values):
        raise InvalidRequestError("Producer-Id, Producer-Epoch and Producer-Seq go together: send all three")
    producer_id, epoch, seq = values
    assert producer_id is not None and epoch is not None and seq is not None
    if not producer_id.strip():
        raise InvalidRequestError("Producer-Id may not be empty")
    for label, value in (("Producer-Epoch", epoch), ("Producer-Seq", seq)):
        if not _PLAIN_DIGITS.match(value) or int(value) > MAX_SAFE_INTEGER:
            raise InvalidRequestError(f"{label} must be a whole number from 0 to 2^53-1")
    return Producer(producer_id, int(epoch), int(seq))


def _append_headers(state: StreamState, result: AppendResult) -> dict[str, str]:
    headers = {"stream-next-offset": format_offset(result.tail)}
    if result.closed:
        headers["stream-closed"] = "true"
    if result.producer_epoch is not None:
        headers["producer-epoch"] = str(result.producer_epoch)
        headers["producer-seq"] = str(result.producer_seq)
    return headers


async def append_stream(name: str, request: Request[Any, Any, Any]) -> ASGIResponse:
    """Append to a stream, append and close it, or just close it (empty body and Stream-Closed: true)."""
    store, _, settings = components(request)
    try:
        require_key(request, settings)
        name = request_name(request, name)
        state = live_state(await store.resolve(name))
        close = request.headers.get("stream-closed", "").lower() == "true"
        producer = _producer(request)
        body = await read_body(request, settings.max_append_bytes)
        given_type = request.headers.get("content-type")
        if not body and not close:
            raise InvalidRequestError("an append needs a body (or Stream-Closed: true to close the stream)")
        if body and not given_type:
            raise InvalidRequestError(
                f"an append needs a Content-Type; this stream takes {state.content_type}"
            )
        if body and not state.closed and media_type(given_type or "") != media_type(state.content_type):
            given = media_type(given_type or "")
            expected = state.content_type
            raise ContentTypeMismatchError(f"Content-Type {given} does not match the stream's {expected}")
        if body and state.json_mode and not state.closed:
            body = frame_json(body, allow_empty_array=False)
        options = {
            "content_type": given_type if body else None,
            "seq": request.headers.get("stream-seq"),
            "producer": producer,
            "close": close,
        }
        try:
            result = await store.append(state.id, body, **options)
        except StreamNotFoundError:
            # The name may have been deleted and created again since it was cached: look once more.
            fresh = live_state(await store.resolve(name, fresh=True))
            if fresh.id == state.id:
                raise
            result = await store.append(fresh.id, body, **options)
    except StreamError as exc:
        return error(exc)
    status = 200 if producer is not None and body and not result.duplicate else 204
    return respond(status, _append_headers(state, result))


# --- read ----------------------------------------------------------------------------------------


def _start_offset(query: dict[str, list[str]], live: str | None) -> str:
    raw = single(query, "offset")
    if raw is None:
        if live is not None:
            raise InvalidRequestError("live reads need an offset: use offset=-1 for the start or offset=now")
        return "-1"
    if raw in ("-1", "now") or parse_offset(raw) is not None:
        return raw
    raise InvalidRequestError("offset must be -1, now, or an offset returned in Stream-Next-Offset")


def _position(token: str, state: StreamState, last_event_id: str | None = None) -> int:
    if token == "now":
        return state.tail
    position = 0 if token == "-1" else parse_offset(token) or 0
    if last_event_id:
        resumed = parse_offset(last_event_id)
        if resumed is not None and position <= resumed <= state.tail:
            position = resumed
    if position > state.tail:
        raise InvalidRequestError("offset is beyond the end of the stream")
    return position


async def _body_iter(store: Store, state: StreamState, start: int, end: int) -> AsyncIterator[bytes]:
    async for piece in store.iter_content(state, start, end):
        yield piece


async def _catch_up(
    request: Request[Any, Any, Any],
    store: Store,
    state: StreamState,
    start: int,
    token: str,
    extra: dict[str, str],
) -> ASGIResponse:
    if token == "now":
        headers = {**state_headers(state, state.tail, state.closed), "stream-up-to-date": "true"}
        headers["cache-control"] = "no-store"
        return respond(200, {**headers, **extra}, b"[]" if state.json_mode else b"")
    limit = JSON_CATCHUP_LIMIT if state.json_mode else CATCHUP_LIMIT
    end = min(state.tail, start + limit)
    data: bytes | None = None
    if state.json_mode or end - start <= INLINE_LIMIT:
        data = (
            await store.read(state.id, start, end)
            if not state.compressed
            else b"".join([p async for p in store.iter_content(state, start, end)])
        )
        if state.json_mode and end < state.tail:
            cut = data.rfind(b"\n") + 1
            if cut == 0:  # one message larger than the limit: read up to its end
                more = await store.read(state.id, end, state.tail)
                cut = len(data) + more.find(b"\n") + 1
                data += more
            data, end = data[:cut], start + cut
    at_tail = end == state.tail
    closed = state.closed and at_tail
    etag = f'"{state.id[7:]}:{start}:{end}{":c" if closed else ""}"'
    headers = {**state_headers(state, end, closed), "etag": etag, **extra}
    if at_tail:
        headers["stream-up-to-date"] = "true"
    if request.headers.get("if-none-match") == etag:
        return respond(304, headers)
    if data is not None:
        return respond(200, headers, json_body(data) if state.json_mode else data)
    headers = {**headers, "content-length": str(end - start)}
    return ASGIStreamingResponse(iterator=_body_iter(store, state, start, end), headers=headers)


async def _long_poll(
    request: Request[Any, Any, Any],
    store: Store,
    hub: LiveHub,
    settings: Settings,
    state: StreamState,
    start: int,
    extra: dict[str, str],
) -> ASGIResponse:
    client_cursor = single(parse_query(request), "cursor")
    extra = {**extra, "stream-cursor": cursor(client_cursor)}
    deadline = time.monotonic() + settings.long_poll_timeout
    gone_away = asyncio.ensure_future(_client_gone(request))
    with hub.watch(state.id, "long-poll") as waiter:
        try:
            while True:
                if start < state.tail:
                    return await _catch_up(request, store, state, start, "", extra)
                if state.closed:
                    headers = {**state_headers(state, state.tail, True), "stream-up-to-date": "true", **extra}
                    return respond(204, headers)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or hub.stopping or gone_away.done():
                    headers = {
                        **state_headers(state, state.tail, False),
                        "stream-up-to-date": "true",
                        **extra,
                    }
                    return respond(204, headers)
                woke = await _wait_unless_gone(waiter, remaining, gone_away)
                state = await _after_wake(store, waiter, state, woke, remaining)
        finally:
            gone_away.cancel()


async def _client_gone(request: Request[Any, Any, Any]) -> None:
    """Return once the client has disconnected, so a waiting reader frees what it holds at once."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _wait_unless_gone(waiter: Any, seconds: float, gone_away: asyncio.Future[None]) -> bool:
    waiting = asyncio.ensure_future(waiter.wait(seconds))
    await asyncio.wait((waiting, gone_away), return_when=asyncio.FIRST_COMPLETED)
    if not waiting.done():
        waiting.cancel()
        return False
    return waiting.result()


async def _after_wake(
    store: Store, waiter: Any, state: StreamState, woke: bool, remaining: float
) -> StreamState:
    """The stream after a wake-up: from the doorbell when it says the tail moved, else from the store."""
    if waiter.gone:
        raise StreamNotFoundError("stream was deleted")
    if woke and waiter.tail > state.tail and not state.compressed:
        return _advanced(state, waiter.tail, waiter.closed)
    return live_state(await store.get(state.id))


def _advanced(state: StreamState, tail: int, closed: bool) -> StreamState:
    """The stream as a doorbell describes it: its committed tail moved on (and maybe it closed).

    Shared by all readers woken by the same doorbell: a thousand readers make one copy, not a thousand.
    """
    key = (state.id, tail, closed)
    shared = _states.get(key)
    if shared is None:
        values = {name: getattr(state, name) for name in StreamState.__slots__}
        values["tail"] = tail
        if closed and values["closed_at"] is None:
            values["closed_at"] = time.time()
        if len(_states) >= 256:
            _states.clear()
        shared = _states[key] = StreamState(**values)
    return shared


_states: dict[tuple[str, int, bool], StreamState] = {}


def _sse_event(kind: str, payload: str) -> str:
    lines = re.split(r"\r\n|\r|\n", payload)
    return f"event: {kind}\n" + "".join(f"data:{line}\n" for line in lines) + "\n"


def _control(
    tail: int, closed: bool, up_to_date: bool, client_cursor: str | None, interval: str | None = None
) -> str:
    control: dict[str, Any] = {"streamNextOffset": format_offset(tail)}
    if closed:
        control["streamClosed"] = True
    else:
        control["streamCursor"] = interval or cursor(client_cursor)
    if up_to_date:
        control["upToDate"] = True
    return _sse_event("control", json.dumps(control, separators=(",", ":")))


def _sse_data(state: StreamState, data: bytes, next_offset: int) -> str:
    if state.json_mode:
        payload = json_body(data).decode()
    elif is_text(state.content_type):
        payload = data.decode("utf-8", errors="replace")
    else:
        payload = base64.b64encode(data).decode()
    return _sse_event("data", payload)[:-1] + f"id:{format_offset(next_offset)}\n\n"


async def _sse_events(
    store: Store, hub: LiveHub, settings: Settings, state: StreamState, start: int, client_cursor: str | None
) -> AsyncIterator[str | bytes]:
    position = start
    with hub.watch(state.id, "sse") as waiter:
        hub.observe(state.id, state.tail, state.closed)
        sent_any = False
        while True:
            while position < state.tail:
                block, position = await _next_block(store, hub, state, position, client_cursor)
                if not block:
                    break
                yield block
                sent_any = True
            if state.closed and position >= state.tail:
                if not sent_any:
                    yield _control(position, True, True, client_cursor)
                return
            if not sent_any:
                yield _control(position, False, True, client_cursor)
                sent_any = True
            if hub.stopping:
                return
            woke = await waiter.wait(settings.sse_keepalive)
            if hub.stopping or waiter.gone:
                return
            if not woke:
                yield ": keep-alive\n\n"
                state = live_state(await store.get(state.id))
            elif waiter.tail > state.tail and not state.compressed:
                state = _advanced(state, waiter.tail, waiter.closed)
            elif waiter.tail < state.tail or (state.closed == waiter.closed and waiter.tail == state.tail):
                state = live_state(await store.get(state.id))
            elif waiter.closed and not state.closed:
                state = _advanced(state, state.tail, True)
            if state.closed and position >= state.tail:
                sent_any = False


async def _next_block(
    store: Store, hub: LiveHub, state: StreamState, position: int, client_cursor: str | None
) -> tuple[bytes, int]:
    """The next data event and its control event, and the position after them.

    Readers at the same position share one encoding: with a thousand readers tailing a stream, each
    change is read and encoded once, not a thousand times.
    """
    end = min(state.tail, position + SSE_SLICE)
    interval = cursor(client_cursor)
    key = (state.id, position, end, state.closed, interval if client_cursor else None)
    cached = _blocks.get(key)
    if cached is not None:
        return cached
    if state.compressed:
        data = b"".join([p async for p in store.iter_content(state, position, end)])
    else:
        data = await hub.read(state.id, position, end)
    if state.json_mode and end < state.tail:
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            data = await store.read(state.id, position, state.tail)
            cut = data.find(b"\n") + 1
        data = data[:cut]
    elif is_text(state.content_type) and not state.json_mode:
        data = whole_utf8(data, end == state.tail)
    if not data:
        return b"", position
    after = position + len(data)
    at_tail = after == state.tail
    # One write per data event and its control event, so readers never see one without the other.
    block = (
        _sse_data(state, data, after)
        + _control(after, state.closed and at_tail, at_tail, client_cursor, interval)
    ).encode()
    if len(_blocks) >= 256:
        _blocks.clear()
    _blocks[key] = (block, after)
    return block, after


_blocks: dict[tuple[Any, ...], tuple[bytes, int]] = {}


def whole_utf8(data: bytes, final: bool) -> bytes:
    """Cut before a UTF-8 sequence split at the slice's end, so text events never carry half a character."""
    if final or not data:
        return data
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:
            return data
        if byte >= 0xC0:
            needed = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return data if back >= needed else data[:-back]
    return data


async def read_stream(name: str, request: Request[Any, Any, Any]) -> ASGIResponse:
    """Read from an offset: catch-up, `live=long-poll` or `live=sse`."""
    store, hub, settings = components(request)
    try:
        name = request_name(request, name)
        query = parse_query(request)
        live = single(query, "live")
        if live not in (None, "long-poll", "sse"):
            raise InvalidRequestError("live must be long-poll or sse")
        token = _start_offset(query, live)
        state = live_state(await store.get_by_name(name))
        if state.sliding:
            await store.touch(state)
        extra: dict[str, str] = {}
        if live == "sse":
            start = _position(token, state, request.headers.get("last-event-id"))
            headers = {
                "content-type": "text/event-stream",
                "cache-control": "no-cache",
                "x-accel-buffering": "no",
            }
            if not is_text(state.content_type):
                headers["stream-sse-data-encoding"] = "base64"
            events = _sse_events(store, hub, settings, state, start, single(query, "cursor"))
            return ASGIStreamingResponse(iterator=events, headers=headers)
        start = _position(token, state)
        if live == "long-poll":
            return await _long_poll(request, store, hub, settings, state, start, extra)
        return await _catch_up(request, store, state, start, token, extra)
    except StreamError as exc:
        return error(exc)


async def head_stream(name: str, request: Request[Any, Any, Any]) -> ASGIResponse:
    """A stream's metadata: type, tail, closed, TTL or expiry."""
    store = components(request)[0]
    try:
        state = live_state(await store.get_by_name(request_name(request, name)))
    except StreamError as exc:
        return respond(exc.status, {"content-type": "application/json"}, head_only=True)
    headers = {**state_headers(state, state.tail, state.closed), "cache-control": "no-store"}
    if state.sliding and state.ttl_seconds:
        headers["stream-ttl"] = str(state.ttl_seconds)
    elif state.expires_at is not None:
        headers["stream-expires-at"] = datetime.fromtimestamp(state.expires_at).astimezone().isoformat()
    return respond(200, headers, head_only=True)


async def delete_stream(name: str, request: Request[Any, Any, Any]) -> ASGIResponse:
    """Delete a stream (soft-delete while forks of it remain)."""
    store, _, settings = components(request)
    try:
        require_key(request, settings)
        state = live_state(await store.get_by_name(request_name(request, name)))
        await store.delete(state.id)
    except StreamError as exc:
        return error(exc)
    return respond(204)


HANDLERS = {
    "PUT": create_stream,
    "POST": append_stream,
    "GET": read_stream,
    "HEAD": head_stream,
    "DELETE": delete_stream,
}


@asgi(PREFIX, is_mount=True, copy_scope=False)
async def protocol_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Every protocol request, dispatched by method.

    A mounted ASGI handler: these requests skip Litestar's per-request signature parsing and injection,
    which cost more than the append itself.
    """
    handler = HANDLERS.get(scope["method"])
    if handler is None:
        body = json.dumps({"error": f"{scope['method']} is not a protocol method"}).encode()
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
