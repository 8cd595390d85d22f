"""The protocol's SSE body (`live=sse`): its events, and the response that sends them until the reader goes.

Every open reader holds what is here for as long as it stays, so the response is one task of its own
plus one that notices the client going away (no task group, no per-wait tasks): with 10,000 idle readers
on one process, what each holds is what the server holds.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any

from litestar.types import HTTPResponseStartEvent, Receive, Scope, Send

from ..errors import StreamError
from ..live import DATA, IDLE, UP_TO_DATE, LiveHub, follow
from ..models import StreamState, format_offset
from ..settings import Settings
from ..store.store import Store
from .wire import SSE_SLICE, cursor, is_text, json_body

RawHeaders = list[tuple[bytes, bytes]]


async def client_gone(receive: Receive) -> None:
    """Return once the client has disconnected, so a waiting reader frees what it holds at once."""
    while (await receive())["type"] != "http.disconnect":
        pass


class SseResponse:
    """An ASGI response streaming `sse_events` until the stream closes, is deleted, or the client goes away.

    `extra_headers` are added to the head as given (the security headers, when no middleware adds them).
    """

    __slots__ = ("extra_headers", "headers", "make_events", "on_start")

    def __init__(
        self,
        headers: dict[str, str],
        make_events: Callable[[asyncio.Future[None]], AsyncGenerator[str | bytes, None]],
    ) -> None:
        self.headers = headers
        self.make_events = make_events
        self.extra_headers: RawHeaders = []
        self.on_start: Callable[[int], None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        start: HTTPResponseStartEvent = {
            "type": "http.response.start",
            "status": 200,
            "headers": raw + self.extra_headers,
        }
        await send(start)
        if self.on_start is not None:
            self.on_start(200)
        gone = asyncio.ensure_future(client_gone(receive))
        try:
            events = self.make_events(gone)
            async with aclosing(events):
                async for piece in events:
                    if gone.done():
                        return
                    body = piece if isinstance(piece, bytes) else piece.encode()
                    await send({"type": "http.response.body", "body": body, "more_body": True})
            if not gone.done():
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            gone.cancel()


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


async def sse_events(
    store: Store,
    hub: LiveHub,
    settings: Settings,
    state: StreamState,
    start: int,
    client_cursor: str | None,
    gone: asyncio.Future[None] | None = None,
) -> AsyncGenerator[str | bytes, None]:
    """The SSE body: data events with their control events, keep-alives while idle, until closed or `gone`."""

    async def step(current: StreamState, position: int) -> tuple[bytes, int]:
        return await _next_block(store, hub, current, position, client_cursor)

    events = follow(
        hub, store, state, start, step, kind="sse", idle_after=settings.sse_keepalive, cancel=gone
    )
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
