"""Protocol reads at /v1/stream/{name}: catch-up, long-poll and SSE, from the store and its doorbells."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Literal

from litestar import Request
from litestar.response.base import ASGIResponse
from litestar.response.streaming import ASGIStreamingResponse

from .. import clock
from ..errors import InvalidRequestError, OffsetGoneError, StreamError
from ..http import share_links
from ..http.auth import principal_of, require_read
from ..http.content import CutOff, CutOffBody
from ..http.responses import BODY_SLICE, parse_query, respond, single
from ..live import CLOSED, DATA, IDLE, UP_TO_DATE, LiveHub, follow
from ..models import StreamState, format_offset, parse_offset, require_live, split_offset
from ..settings import Settings
from ..store.store import Store
from .wire import (
    CATCHUP_LIMIT,
    INLINE_LIMIT,
    JSON_CATCHUP_LIMIT,
    SSE_SLICE,
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
    gone_away = asyncio.ensure_future(_client_gone(request))
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


async def _client_gone(request: Request[Any, Any, Any]) -> None:
    """Return once the client has disconnected, so a waiting reader frees what it holds at once."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse_event(kind: str, payload: str) -> str:
    lines = re.split(r"\r\n|\r|\n", payload)
    return f"event: {kind}\n" + "".join(f"data:{line}\n" for line in lines) + "\n"


def _control(
    state: StreamState,
    tail: int,
    closed: bool,
    up_to_date: bool,
    client_cursor: str | None,
    interval: str | None = None,
) -> str:
    control: dict[str, Any] = {"streamNextOffset": format_offset(tail, state.generation)}
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
    return _sse_event("data", payload)[:-1] + f"id:{format_offset(next_offset, state.generation)}\n\n"


async def _sse_events(
    store: Store, hub: LiveHub, settings: Settings, state: StreamState, start: int, client_cursor: str | None
) -> AsyncGenerator[str | bytes, None]:
    """The SSE body: data events with their control events, keep-alives while idle, until closed or gone."""

    async def step(current: StreamState, position: int) -> tuple[bytes, int]:
        return await _next_block(store, hub, current, position, client_cursor)

    events = follow(hub, store, state, start, step, kind="sse", idle_after=settings.sse_keepalive)
    announced = said_closed = False
    async with aclosing(events):
        try:
            async for event in events:
                if event.kind == DATA:
                    if event.piece is not None:
                        yield event.piece
                    announced = True
                    said_closed = event.state.closed and event.position == event.state.tail
                elif event.kind == IDLE:
                    yield ": keep-alive\n\n"
                elif event.kind == UP_TO_DATE:
                    if not announced:
                        yield _control(event.state, event.position, False, True, client_cursor)
                        announced = True
                elif not said_closed:  # closed with no data event that said so
                    yield _control(event.state, event.position, True, True, client_cursor)
        except StreamError:  # the stream was deleted: end the connection cleanly, claiming nothing more
            return


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
    cached = hub.sse_blocks.get(key)
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
        + _control(state, after, state.closed and at_tail, at_tail, client_cursor, interval)
    ).encode()
    return hub.sse_blocks.put(key, (block, after))


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
            events = _sse_events(store, hub, settings, state, start, asked.cursor)
            if principal.link is not None:
                events = share_links.while_valid(events, principal.link.expires)
            return ASGIStreamingResponse(iterator=events, headers=headers)
        start = await _position(store, asked.offset, state)
        if asked.live == "long-poll":
            until = principal.link.expires if principal.link is not None else None
            return await _long_poll(request, store, hub, settings, state, start, asked, until)
        return await _catch_up(store, state, start, asked.offset, asked, {})
    except StreamError as exc:
        return error(exc)
