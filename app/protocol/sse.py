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
from contextlib import aclosing
from typing import Any

from litestar.types import HTTPResponseStartEvent, Receive, Scope, Send

from .. import clock
from ..errors import StreamError
from ..live import DATA, IDLE, UP_TO_DATE, LiveHub, follow
from ..models import StreamState, format_offset
from ..settings import Settings
from ..store.store import Store
from .wire import SSE_SLICE, cursor, is_text, json_body

RawHeaders = list[tuple[bytes, bytes]]
KEEP_ALIVE = b": keep-alive\n\n"


async def client_gone(receive: Receive) -> None:
    """Return once the client has disconnected, so a waiting reader frees what it holds at once."""
    while (await receive())["type"] != "http.disconnect":
        pass


class SseResponse:
    """The SSE body as an ASGI response: data events with their control events, keep-alives while idle,
    until the stream closes or is deleted (a clean end) or the client goes away.

    `extra_headers` are added to the head as given (the security headers, where no middleware adds them).
    """

    __slots__ = (
        "client_cursor",
        "extra_headers",
        "headers",
        "hub",
        "settings",
        "start",
        "state",
        "store",
        "until",
    )

    def __init__(
        self,
        headers: dict[str, str],
        store: Store,
        hub: LiveHub,
        settings: Settings,
        state: StreamState,
        start: int,
        client_cursor: str | None,
    ) -> None:
        self.headers = headers
        self.store, self.hub, self.settings = store, hub, settings
        self.state: StreamState | None = state
        self.start, self.client_cursor = start, client_cursor
        self.extra_headers: RawHeaders = []
        # Opened with a share link: the body ends at its first event after the link expires, so nothing
        # committed later reaches this reader (a reconnect is then refused, saying why).
        self.until: float | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(self._head())
        gone = asyncio.ensure_future(client_gone(receive))
        state, self.state = self.state, None  # the follow keeps the stream's state from here on
        assert state is not None
        events = follow(
            self.hub,
            self.store,
            state,
            self.start,
            self._step,
            kind="sse",
            idle_after=self.settings.sse_keepalive,
            cancel=gone,
        )
        announced = said_closed = False
        try:
            async with aclosing(events):
                async for event in events:
                    if self.until is not None and clock.now() >= self.until:
                        break
                    piece: bytes | None = None
                    if event.kind == DATA:
                        piece = event.piece
                        announced = True
                        said_closed = event.state.closed and event.position == event.state.tail
                    elif event.kind == IDLE:
                        piece = KEEP_ALIVE
                    elif event.kind == UP_TO_DATE:
                        if not announced:
                            piece = _control(event.state, event.position, False, True, self.client_cursor)
                            announced = True
                    elif not said_closed:  # closed with no data event that said so
                        piece = _control(event.state, event.position, True, True, self.client_cursor)
                    if piece and not gone.done():
                        await send({"type": "http.response.body", "body": piece, "more_body": True})
        except StreamError:  # the stream was deleted: end the connection cleanly, claiming nothing more
            pass
        finally:
            left = gone.done()
            gone.cancel()
        if not left:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _head(self) -> HTTPResponseStartEvent:
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        return {"type": "http.response.start", "status": 200, "headers": raw + self.extra_headers}

    async def _step(self, state: StreamState, position: int) -> tuple[bytes, int]:
        return await _next_block(self.store, self.hub, state, position, self.client_cursor)


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
) -> bytes:
    control: dict[str, Any] = {"streamNextOffset": format_offset(tail, state.generation)}
    if closed:
        control["streamClosed"] = True
    else:
        control["streamCursor"] = interval or cursor(client_cursor)
    if up_to_date:
        control["upToDate"] = True
    return _sse_event("control", json.dumps(control, separators=(",", ":"))).encode()


def _sse_data(state: StreamState, data: bytes, next_offset: int) -> str:
    if state.json_mode:
        payload = json_body(data).decode()
    elif is_text(state.content_type):
        payload = data.decode("utf-8", errors="replace")
    else:
        payload = base64.b64encode(data).decode()
    return _sse_event("data", payload)[:-1] + f"id:{format_offset(next_offset, state.generation)}\n\n"


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
    block = _sse_data(state, data, after).encode() + _control(
        state, after, state.closed and at_tail, at_tail, client_cursor, interval
    )
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
