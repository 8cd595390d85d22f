"""Server-sent events for the Durable Streams protocol: a parser and a live session over `wire`."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from benchmarks.wire import Connection, HttpError, Origin


@dataclass
class SseEvent:
    """One event: `kind` is `data` or `control` for this protocol; `t` is when its last byte arrived."""

    kind: str
    data: str
    t: float

    def control(self) -> dict[str, Any]:
        """The JSON object of a control event."""
        value = json.loads(self.data)
        return value if isinstance(value, dict) else {}


class SseParser:
    """Splits an event-stream body into events; lines may end in LF or CRLF (a lone CR is not a break)."""

    def __init__(self) -> None:
        self._buf = b""
        self._cr_pending = False

    def feed(self, data: bytes, t: float) -> list[SseEvent]:
        """Consume body bytes that arrived at `t`; return the events they completed."""
        if self._cr_pending:
            data, self._cr_pending = b"\r" + data, False
        if data.endswith(b"\r"):
            data, self._cr_pending = data[:-1], True
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        self._buf += data
        if b"\n\n" not in self._buf:
            return []
        *blocks, self._buf = self._buf.split(b"\n\n")
        events = []
        for block in blocks:
            event = _parse_block(block, t)
            if event is not None:
                events.append(event)
        return events


def _parse_block(block: bytes, t: float) -> SseEvent | None:
    kind = "message"
    data: list[str] = []
    for line in block.decode("utf-8", "replace").split("\n"):
        if not line or line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "event":
            kind = value
        elif name == "data":
            data.append(value)
    if not data:
        return None
    return SseEvent(kind, "\n".join(data), t)


class SseSession:
    """A live `?live=sse` read whose events land on a queue; `close()` is an abrupt disconnect."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._parser = SseParser()
        self.events: asyncio.Queue[SseEvent | None] = asyncio.Queue()
        self.status = 0
        self.headers: dict[str, str] = {}

    @classmethod
    async def open(cls, origin: Origin, path: str, offset: str, limit_s: float = 10.0) -> SseSession:
        """Connect and start reading `path` from `offset`; raises if the answer is not 200."""
        conn = await Connection.open(origin, limit_s)
        session = cls(conn)
        try:
            head, done = await conn.start(
                "GET",
                f"{path}?offset={quote(offset, safe='')}&live=sse",
                session._on_body,
                {"Accept": "text/event-stream"},
                limit_s=limit_s,
            )
        except BaseException:
            conn.close()
            raise
        session.status, session.headers = head.status, head.headers
        if head.status != 200:
            conn.close()
            raise HttpError(f"SSE read of {path} answered {head.status}")
        done.add_done_callback(session._on_done)
        return session

    def _on_body(self, data: bytes, t: float) -> None:
        for event in self._parser.feed(data, t):
            self.events.put_nowait(event)

    def _on_done(self, fut: asyncio.Future[None]) -> None:
        if not fut.cancelled():
            fut.exception()
        self.events.put_nowait(None)

    async def next(self, wait_s: float) -> SseEvent | None:
        """The next event, or None when the server ended the stream; raises TimeoutError."""
        return await asyncio.wait_for(self.events.get(), wait_s)

    def close(self) -> None:
        """Disconnect."""
        self._conn.abort()
