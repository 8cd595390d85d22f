"""Durable Streams operations (create, append, close, catch-up, long-poll) over one keep-alive connection."""

from __future__ import annotations

import time
from dataclasses import dataclass
from urllib.parse import quote

from benchmarks.wire import Client, Origin, Response


class StreamError(Exception):
    """The server answered a status the scenario cannot go on with."""


def stream_path(origin: Origin, name: str) -> str:
    """The request target of a stream: `{prefix}/v1/stream/{name}`."""
    return f"{origin.prefix}/v1/stream/{quote(name, safe='/')}"


def _expect(resp: Response, what: str, *ok: int) -> Response:
    if resp.status not in ok:
        detail = resp.body[:200].decode("utf-8", "replace")
        raise StreamError(f"{what}: HTTP {resp.status} {detail}".strip())
    return resp


@dataclass
class CatchUp:
    """What a catch-up read returned: bytes, requests made, and where it ended."""

    size: int
    requests: int
    next_offset: str
    closed: bool
    body: bytes


class Streams:
    """Protocol calls for one origin, one at a time on one connection."""

    def __init__(self, origin: Origin, timeout: float = 30.0) -> None:
        self.origin = origin
        self.timeout = timeout
        self.client = Client(origin)

    def path(self, name: str) -> str:
        """The request target of stream `name`."""
        return stream_path(self.origin, name)

    async def create(self, name: str, content_type: str = "application/octet-stream") -> str:
        """PUT a new stream (200 if it already exists with this type); return its tail offset."""
        resp = await self.client.request(
            "PUT", self.path(name), {"Content-Type": content_type}, limit_s=self.timeout
        )
        _expect(resp, f"create {name}", 200, 201)
        return resp.header("stream-next-offset") or "-1"

    async def append(self, name: str, body: bytes, content_type: str = "application/octet-stream") -> str:
        """POST bytes; return the new tail offset."""
        resp = await self.client.request(
            "POST", self.path(name), {"Content-Type": content_type}, body, limit_s=self.timeout
        )
        _expect(resp, f"append to {name}", 200, 204)
        return resp.header("stream-next-offset") or ""

    async def close_stream(self, name: str) -> str:
        """POST an empty body with `Stream-Closed: true`; return the final offset."""
        resp = await self.client.request(
            "POST", self.path(name), {"Stream-Closed": "true"}, limit_s=self.timeout
        )
        _expect(resp, f"close {name}", 200, 204)
        return resp.header("stream-next-offset") or ""

    async def head(self, name: str) -> Response:
        """HEAD the stream (404 is returned, not raised)."""
        return await self.client.request("HEAD", self.path(name), limit_s=self.timeout)

    async def read(self, name: str, offset: str, keep_body: bool = True) -> Response:
        """One catch-up GET from `offset`."""
        resp = await self.client.request(
            "GET",
            f"{self.path(name)}?offset={quote(offset, safe='')}",
            limit_s=self.timeout,
            keep_body=keep_body,
        )
        return _expect(resp, f"read {name}", 200, 204)

    async def long_poll(self, name: str, offset: str, limit_s: float = 30.0) -> Response:
        """One `live=long-poll` GET from `offset`: 200 with new bytes, or 204 when the wait timed out."""
        target = f"{self.path(name)}?offset={quote(offset, safe='')}&live=long-poll"
        resp = await self.client.request("GET", target, limit_s=limit_s)
        return _expect(resp, f"long-poll {name}", 200, 204)

    async def catch_up(
        self,
        name: str,
        offset: str = "-1",
        keep_body: bool = False,
        max_requests: int = 100_000,
        deadline: float | None = None,
    ) -> CatchUp:
        """Read from `offset` to the tail, following Stream-Next-Offset until Stream-Up-To-Date."""
        size, requests, parts = 0, 0, []
        while True:
            resp = await self.read(name, offset, keep_body)
            requests += 1
            size += resp.size
            if keep_body:
                parts.append(resp.body)
            next_offset = resp.header("stream-next-offset")
            if not next_offset:
                raise StreamError(f"read {name}: no Stream-Next-Offset")
            offset = next_offset
            if resp.header("stream-up-to-date") == "true":
                closed = resp.header("stream-closed") == "true"
                return CatchUp(size, requests, offset, closed, b"".join(parts))
            if requests >= max_requests or (deadline is not None and time.monotonic() > deadline):
                raise StreamError(f"read {name}: not up to date after {requests} requests")
