"""Protocol reads at /v1/stream/{name}: catch-up, long-poll and SSE, from the store and its doorbells."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qs

from litestar import Litestar, Request
from litestar.exceptions import HTTPException
from litestar.response.base import ASGIResponse
from litestar.types import Message, Receive, Scope, Send

from .. import clock
from ..errors import InvalidRequestError, OffsetGoneError, StreamError
from ..http import guard, headers
from ..http.auth import principal_of, require_read
from ..http.content import CutOff, CutOffBody
from ..http.metrics import RequestMetrics, request_metrics
from ..http.responses import BODY_SLICE, parse_query, respond, single
from ..live import CLOSED, DATA, LiveHub, follow
from ..models import StreamState, parse_offset, require_live, split_offset
from ..settings import Settings
from ..store.store import Store
from .sse import SseResponse, client_gone
from .sse import whole_utf8 as whole_utf8  # the viewer's text slices cut where SSE's do
from .wire import (
    CATCHUP_LIMIT,
    INLINE_LIMIT,
    JSON_CATCHUP_LIMIT,
    PREFIX,
    components,
    cursor,
    error,
    is_text,
    json_body,
    request_name,
    state_headers,
)

# --- read ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """What a protocol read asks for, parsed once from its query and headers."""

    offset: str  # "-1", "now" or an offset token
    live: Literal["long-poll", "sse"] | None
    cursor: str | None
    last_event_id: str | None
    if_none_match: str | None

    @classmethod
    def parse(cls, request: Request[Any, Any, Any]) -> ReadRequest:
        query = parse_query(request)
        given = single(query, "live")
        live: Literal["long-poll", "sse"] | None = None
        if given == "long-poll":
            live = "long-poll"
        elif given == "sse":
            live = "sse"
        elif given is not None:
            raise InvalidRequestError("live must be long-poll or sse")
        offset = single(query, "offset")
        if offset is None:
            if live is not None:
                raise InvalidRequestError(
                    "live reads need an offset: use offset=-1 for the start or offset=now"
                )
            offset = "-1"
        elif offset not in ("-1", "now") and parse_offset(offset) is None:
            raise InvalidRequestError("offset must be -1, now, or an offset returned in Stream-Next-Offset")
        headers = request.headers
        return cls(
            offset, live, single(query, "cursor"), headers.get("last-event-id"), headers.get("if-none-match")
        )


async def _position(store: Store, token: str, state: StreamState, last_event_id: str | None = None) -> int:
    if token == "now":
        return state.tail
    position = 0 if token == "-1" else await _own_position(store, state, token)
    if last_event_id and split_offset(last_event_id) is not None:
        resumed = await _own_position(store, state, last_event_id)
        if position <= resumed <= state.tail:
            position = resumed
    if position > state.tail:
        raise InvalidRequestError("offset is beyond the end of the stream")
    return position


async def _own_position(store: Store, state: StreamState, token: str) -> int:
    """The byte position of an offset token, if this stream (not a deleted one of its name) handed it out."""
    generation, position = split_offset(token) or (0, 0)
    if not await store.offset_belongs(state, generation, position):
        if state.fork_source is not None:
            raise OffsetGoneError(
                "this offset is not one of this fork's: it is from a deleted stream of this name, or from "
                "its source past the fork point; read again from offset=-1"
            )
        raise OffsetGoneError(
            "this offset is from an earlier stream of this name, which was deleted: read again from offset=-1"
        )
    return position


async def _body_iter(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield first
    try:
        async for piece in rest:
            yield piece
    except StreamError as exc:  # deleted mid-body: cut it off, so the client sees it is short
        raise CutOff from exc


async def _catch_up(
    store: Store, state: StreamState, start: int, token: str, asked: ReadRequest, extra: dict[str, str]
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
            read_to = end
            while cut == 0 and read_to < state.tail:  # one message larger than the limit: read to its end
                more = await store.read(state.id, read_to, min(state.tail, read_to + limit))
                if not more:
                    break
                cut = len(data) + more.find(b"\n") + 1 if b"\n" in more else 0
                data, read_to = data + more, read_to + len(more)
            if cut == 0:
                cut = len(data)
            data, end = data[:cut], start + cut
    at_tail = end == state.tail
    closed = state.closed and at_tail
    etag = f'"{state.id[7:]}:{start}:{end}{":c" if closed else ""}"'
    headers = {**state_headers(state, end, closed), "etag": etag, **extra}
    if at_tail:
        headers["stream-up-to-date"] = "true"
    if asked.if_none_match == etag:
        return respond(304, headers)
    if data is not None:
        return respond(200, headers, json_body(data) if state.json_mode else data)
    headers = {**headers, "content-length": str(end - start)}
    # The first slice is read before the status is sent: a stream deleted by then is a 404.
    pieces = store.iter_content(state, start, end, BODY_SLICE)
    first = await anext(pieces)
    return CutOffBody(_body_iter(first, pieces), headers)


async def _long_poll(
    request: Request[Any, Any, Any],
    store: Store,
    hub: LiveHub,
    settings: Settings,
    state: StreamState,
    start: int,
    asked: ReadRequest,
    until: float | None = None,
) -> ASGIResponse:
    extra = {"stream-cursor": cursor(asked.cursor)}
    wait = settings.long_poll_timeout
    if until is not None:  # opened with a share link: no longer than it is good for
        wait = max(0.0, min(wait, until - clock.now()))
    deadline = asyncio.get_running_loop().time() + wait
    gone_away = asyncio.ensure_future(client_gone(request.receive))
    events = follow(
        hub,
        store,
        state,
        start,
        _reach,
        kind="long-poll",
        idle_after=max(wait, 0.05),
        deadline=deadline,
        cancel=gone_away,
    )
    try:
        async with aclosing(events):
            async for event in events:
                state = event.state
                if event.kind == DATA:
                    return await _catch_up(store, state, start, "", asked, extra)
                if event.kind == CLOSED:
                    headers = {**state_headers(state, state.tail, True), "stream-up-to-date": "true", **extra}
                    return respond(204, headers)
    finally:
        gone_away.cancel()
    return respond(204, {**state_headers(state, state.tail, False), "stream-up-to-date": "true", **extra})


async def _reach(state: StreamState, position: int) -> tuple[None, int]:
    """A long-poll's step: it answers with a catch-up read from its offset once anything is there."""
    return None, state.tail


async def read_stream(name: str, request: Request[Any, Any, Any]) -> ASGIResponse | SseResponse:
    """Read from an offset: catch-up, `live=long-poll` or `live=sse`."""
    store, hub, settings = components(request)
    try:
        name = request_name(request, name)
        asked = ReadRequest.parse(request)
        state = require_live(await store.get_by_name(name))
        principal = await principal_of(request)
        require_read(principal, state, settings)
        if state.sliding:
            await store.touch(state)
        if asked.live == "sse":
            start = await _position(store, asked.offset, state, asked.last_event_id)
            headers = {
                "content-type": "text/event-stream",
                "cache-control": "no-cache",
                "x-accel-buffering": "no",
            }
            if not is_text(state.content_type):
                headers["stream-sse-data-encoding"] = "base64"
            response = SseResponse(headers, store, hub, settings, state, start, asked.cursor)
            response.until = principal.link.expires if principal.link is not None else None
            return response
        start = await _position(store, asked.offset, state)
        if asked.live == "long-poll":
            until = principal.link.expires if principal.link is not None else None
            return await _long_poll(request, store, hub, settings, state, start, asked, until)
        return await _catch_up(store, state, start, asked.offset, asked, {})
    except StreamError as exc:
        return error(exc)


SSE_LABELS = (("method", "GET"), ("route", PREFIX))
log = logging.getLogger("streamhold.protocol")


def is_sse_read(scope: Scope) -> bool:
    """Whether a request is `GET /v1/stream/{name}?...live=sse...` (the query saying so once)."""
    query: bytes = scope.get("query_string", b"")
    return (
        scope.get("method") == "GET"
        and b"live=sse" in query
        and parse_qs(query.decode("latin-1")).get("live") == ["sse"]
    )


async def sse_asgi(app: Litestar, scope: Scope, receive: Receive, send: Send) -> None:
    """GET /v1/stream/{name}?live=sse, served straight from ASGI.

    An SSE reader holds its request's coroutines for as long as it stays connected. Outside the framework's
    router, middleware and streaming response, an idle reader holds a third less memory (measured with
    10,000 readers); this path adds what they would have: the security headers, request metrics and errors.
    """
    metrics = request_metrics(app.state)
    inline = guard.on_content_origin(scope, app.state.settings)
    # The request object caches what it parses in its scope's state: given a copy, that goes with it.
    asked: Any = {**scope, "app": app, "litestar_app": app, "state": {}}
    response: ASGIResponse | SseResponse
    try:
        response = await read_stream(scope["path"][len(PREFIX) :], Request(asked, receive, send))
    except HTTPException as exc:  # a private stream read without a key
        body = json.dumps({"error": exc.detail}).encode()
        response = respond(exc.status_code, {**(exc.headers or {}), "content-type": "application/json"}, body)
    except Exception:
        log.exception("SSE read of %s failed", scope["path"])
        response = respond(500, {"content-type": "application/json"}, b'{"error": "internal server error"}')
    if isinstance(response, SseResponse):
        response.extra_headers = _security_headers(b"text/event-stream", inline)
        _count_sse(metrics, 200)
        await response(scope, receive, send)
        return

    async def with_headers(message: Message) -> None:
        if message["type"] == "http.response.start":
            sent = list(message.get("headers", []))
            kind = next((v for k, v in sent if k.lower() == b"content-type"), b"")
            message = {**message, "headers": sent + _security_headers(kind, inline)}
            _count_sse(metrics, message["status"])
        await send(message)

    await response(scope, receive, with_headers)


def _security_headers(content_type: bytes, inline: bool) -> list[tuple[bytes, bytes]]:
    """What the app's security-headers middleware adds to stream content."""
    return [
        *headers.content_headers(content_type.decode("latin-1"), inline=inline),
        *headers.API_CORS_HEADERS,
    ]


def _count_sse(metrics: RequestMetrics, status: int) -> None:
    metrics.live_requests.labels(mode="sse").inc()
    metrics.record(SSE_LABELS, status, None)
