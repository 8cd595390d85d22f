"""Protocol reads at /v1/stream/{name}: catch-up, long-poll and SSE, from the store and its doorbells."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from litestar import Request
from litestar.response.base import ASGIResponse
from litestar.response.streaming import ASGIStreamingResponse

from ..errors import InvalidRequestError, OffsetGoneError, StreamError, StreamNotFoundError
from ..http.content import _Body as CutOffBody
from ..http.content import _Cut as Cut
from ..http.responses import BODY_SLICE, parse_query, respond, single
from ..live import LiveHub
from ..models import StreamState, format_offset, parse_offset, split_offset
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
    live_state,
    request_name,
    state_headers,
)

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
        raise Cut from exc


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
    if request.headers.get("if-none-match") == etag:
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
                state = await _after_wake(store, hub, waiter, state, woke)
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


async def _after_wake(store: Store, hub: LiveHub, waiter: Any, state: StreamState, woke: bool) -> StreamState:
    """The stream after a wake-up: from the doorbell when it says the tail moved, else from the store."""
    if waiter.gone:
        raise StreamNotFoundError("stream was deleted")
    if woke and waiter.tail > state.tail and not state.compressed:
        return _advanced(hub, state, waiter.tail, waiter.closed)
    return live_state(await store.get(state.id))


def _advanced(hub: LiveHub, state: StreamState, tail: int, closed: bool) -> StreamState:
    """The stream as a doorbell describes it: its committed tail moved on (and maybe it closed).

    Shared by all readers woken by the same doorbell: a thousand readers make one copy, not a thousand.
    """
    key = (state.id, tail, closed)
    shared = hub.advanced_states.get(key)
    if shared is None:
        values = {name: getattr(state, name) for name in StreamState.__slots__}
        values["tail"] = tail
        if closed and values["closed_at"] is None:
            values["closed_at"] = time.time()
        shared = hub.advanced_states.put(key, StreamState(**values))
    return shared


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
) -> AsyncIterator[str | bytes]:
    async with aclosing(_sse_follow(store, hub, settings, state, start, client_cursor)) as events:
        try:
            async for event in events:
                yield event
        except StreamError:  # the stream was deleted: end the connection cleanly, claiming nothing more
            return


async def _sse_follow(
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
                    yield _control(state, position, True, True, client_cursor)
                return
            if not sent_any:
                yield _control(state, position, False, True, client_cursor)
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
                state = _advanced(hub, state, waiter.tail, waiter.closed)
            elif waiter.tail < state.tail or (state.closed == waiter.closed and waiter.tail == state.tail):
                state = live_state(await store.get(state.id))
            elif waiter.closed and not state.closed:
                state = _advanced(hub, state, state.tail, True)
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
            start = await _position(store, token, state, request.headers.get("last-event-id"))
            headers = {
                "content-type": "text/event-stream",
                "cache-control": "no-cache",
                "x-accel-buffering": "no",
            }
            if not is_text(state.content_type):
                headers["stream-sse-data-encoding"] = "base64"
            events = _sse_events(store, hub, settings, state, start, single(query, "cursor"))
            return ASGIStreamingResponse(iterator=events, headers=headers)
        start = await _position(store, token, state)
        if live == "long-poll":
            return await _long_poll(request, store, hub, settings, state, start, extra)
        return await _catch_up(request, store, state, start, token, extra)
    except StreamError as exc:
        return error(exc)
