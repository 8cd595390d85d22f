"""A lean HTTP/1.1 client on asyncio protocols: keep-alive requests, streamed bodies, first-byte times.

It exists so that a thousand SSE readers fit in one Python process and so that every timestamp is taken
where the bytes arrive, with no client-side decompression or buffering in between.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

BodySink = Callable[[bytes, float], None]

_HEAD, _LENGTH, _EOF, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS, _DONE = range(8)
_MAX_HEAD = 64 * 1024


class HttpError(Exception):
    """The server broke HTTP/1.1 framing or went away mid-response."""


@dataclass
class Response:
    """A response; `size` counts the body's bytes even when they were not kept in `body`."""

    status: int
    headers: dict[str, str]
    body: bytes = b""
    t_first_byte: float = 0.0
    size: int = 0

    def header(self, name: str) -> str | None:
        """The header's value (names are matched case-insensitively)."""
        return self.headers.get(name.lower())


@dataclass(frozen=True)
class Origin:
    """Where a server listens: loopback host, port and an optional path prefix."""

    host: str
    port: int
    prefix: str = ""

    @property
    def url(self) -> str:
        """The origin as a URL."""
        return f"http://{self.host}:{self.port}{self.prefix}"


def parse_origin(url: str) -> Origin:
    """Parse `http://host:port[/prefix]`; anything that is not loopback is refused."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"{url!r}: give an http:// origin such as http://127.0.0.1:8000")
    host = parts.hostname
    addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise ValueError(f"{url!r}: the benchmark only talks to loopback addresses (127.0.0.1, ::1)")
    return Origin(host=host, port=parts.port or 80, prefix=parts.path.rstrip("/"))


class ResponseParser:
    """Incremental parser of one response: head, then a Content-Length, chunked or until-close body."""

    def __init__(self, sink: BodySink, head_request: bool = False) -> None:
        self._sink = sink
        self._head_request = head_request
        self._buf = bytearray()
        self._state = _HEAD
        self._remaining = 0
        self.status = 0
        self.headers: dict[str, str] = {}
        self.keep_alive = True
        self.leftover = b""

    @property
    def head_done(self) -> bool:
        """True once the status line and headers are parsed."""
        return self._state != _HEAD

    @property
    def complete(self) -> bool:
        """True once the whole body has been delivered."""
        return self._state == _DONE

    def feed(self, data: bytes, t: float) -> None:
        """Consume bytes that arrived at time `t`."""
        if self._state == _HEAD:
            self._buf += data
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > _MAX_HEAD:
                    raise HttpError("response head larger than 64 KiB")
                return
            head, data = bytes(self._buf[:end]), bytes(self._buf[end + 4 :])
            self._buf.clear()
            self._parse_head(head)
            if self._state == _HEAD:  # an interim 1xx response: the real one follows
                if data:
                    self.feed(data, t)
                return
        if data:
            self._feed_body(data, t)

    def feed_eof(self, t: float) -> None:
        """The connection closed: fine for an until-close body, an error otherwise."""
        if self._state == _EOF:
            self._state = _DONE
        elif self._state != _DONE:
            raise HttpError("connection closed before the response was complete")

    def _parse_head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise HttpError(f"bad status line {lines[0]!r}")
        status = int(parts[1])
        if 100 <= status < 200:
            return
        self.status = status
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        connection = self.headers.get("connection", "").lower()
        self.keep_alive = parts[0] == "HTTP/1.1" and "close" not in connection
        if self._head_request or status in (204, 304):
            self._state = _DONE
        elif "chunked" in self.headers.get("transfer-encoding", "").lower():
            self._state = _CHUNK_SIZE
        elif "content-length" in self.headers:
            self._remaining = int(self.headers["content-length"])
            self._state = _LENGTH if self._remaining else _DONE
        else:
            self._state = _EOF
            self.keep_alive = False

    def _feed_body(self, data: bytes, t: float) -> None:
        if self._state == _LENGTH:
            piece = data[: self._remaining]
            self._remaining -= len(piece)
            self._sink(piece, t)
            if self._remaining == 0:
                self._state = _DONE
                self.leftover = data[len(piece) :]
            return
        if self._state == _EOF:
            self._sink(data, t)
            return
        if self._state == _DONE:
            self.leftover += data
            return
        self._buf += data
        self._drain_chunks(t)

    def _drain_chunks(self, t: float) -> None:
        buf = self._buf
        while buf:
            if self._state == _CHUNK_SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                size_text = bytes(buf[:end]).split(b";", 1)[0].strip()
                del buf[: end + 2]
                try:
                    self._remaining = int(size_text, 16)
                except ValueError as exc:
                    raise HttpError(f"bad chunk size {size_text!r}") from exc
                self._state = _CHUNK_DATA if self._remaining else _TRAILERS
            elif self._state == _CHUNK_DATA:
                take = min(self._remaining, len(buf))
                self._sink(bytes(buf[:take]), t)
                del buf[:take]
                self._remaining -= take
                if self._remaining == 0:
                    self._state = _CHUNK_CRLF
            elif self._state == _CHUNK_CRLF:
                if len(buf) < 2:
                    return
                if buf[:2] != b"\r\n":
                    raise HttpError("chunk not followed by CRLF")
                del buf[:2]
                self._state = _CHUNK_SIZE
            elif self._state == _TRAILERS:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                del buf[: end + 2]
                if end == 0:
                    self._state = _DONE
                    self.leftover = bytes(buf)
                    buf.clear()
            else:
                return


@dataclass
class _Pending:
    parser: ResponseParser
    head: asyncio.Future[Response]
    done: asyncio.Future[None]
    t_first_byte: float = 0.0


class Connection(asyncio.Protocol):
    """One keep-alive connection; requests run one after another, never pipelined."""

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self._transport: asyncio.Transport | None = None
        self._pending: _Pending | None = None
        self.closed = False

    @classmethod
    async def open(cls, origin: Origin, limit_s: float = 10.0) -> Connection:
        """Connect to the origin."""
        loop = asyncio.get_running_loop()
        conn = cls(origin)
        await asyncio.wait_for(loop.create_connection(lambda: conn, origin.host, origin.port), limit_s)
        return conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport (asyncio and uvloop both set TCP_NODELAY already)."""
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        """Feed the current response's parser."""
        t = time.monotonic()
        pending = self._pending
        if pending is None:
            return
        if not pending.t_first_byte:
            pending.t_first_byte = t
        try:
            pending.parser.feed(data, t)
        except HttpError as exc:
            self._fail(exc)
            return
        self._advance(pending)

    def connection_lost(self, exc: Exception | None) -> None:
        """Finish an until-close body, or fail the request in flight."""
        self.closed = True
        pending = self._pending
        if pending is None:
            return
        try:
            pending.parser.feed_eof(time.monotonic())
        except HttpError as err:
            self._fail(err)
            return
        self._advance(pending)

    def _advance(self, pending: _Pending) -> None:
        parser = pending.parser
        if parser.head_done and not pending.head.done():
            pending.head.set_result(
                Response(parser.status, parser.headers, t_first_byte=pending.t_first_byte)
            )
        if parser.complete and not pending.done.done():
            self._pending = None
            if not parser.keep_alive or parser.leftover:
                self.close()
            pending.done.set_result(None)

    def _fail(self, exc: Exception) -> None:
        pending, self._pending = self._pending, None
        self.close()
        if pending is None:
            return
        for fut in (pending.head, pending.done):
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # the caller may await only one of the two

    def close(self) -> None:
        """Drop the connection (this is how a reader "disconnects")."""
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        """Drop the connection at once, without flushing."""
        self.closed = True
        if self._transport is not None:
            self._transport.abort()

    def _send(self, method: str, target: str, headers: dict[str, str] | None, body: bytes) -> None:
        if self.closed or self._transport is None or self._transport.is_closing():
            raise HttpError("connection is closed")
        if self._pending is not None:
            raise HttpError("a request is already in flight on this connection")
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.origin.host}:{self.origin.port}"]
        all_headers = {"Accept-Encoding": "identity", "User-Agent": "streamhold-bench"}
        all_headers.update(headers or {})
        if body or method in ("POST", "PUT"):
            all_headers["Content-Length"] = str(len(body))
        lines.extend(f"{k}: {v}" for k, v in all_headers.items())
        self._transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if body:
            self._transport.write(body)

    def _begin(
        self, method: str, target: str, sink: BodySink, headers: dict[str, str] | None, body: bytes
    ) -> _Pending:
        loop = asyncio.get_running_loop()
        pending = _Pending(
            parser=ResponseParser(sink, head_request=method == "HEAD"),
            head=loop.create_future(),
            done=loop.create_future(),
        )
        self._send(method, target, headers, body)
        self._pending = pending
        return pending

    async def start(
        self,
        method: str,
        target: str,
        sink: BodySink,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        limit_s: float = 30.0,
    ) -> tuple[Response, asyncio.Future[None]]:
        """Send a request; return its head when it arrives, and a future for the end of the body."""
        pending = self._begin(method, target, sink, headers, body)
        try:
            async with asyncio.timeout(limit_s):
                head = await pending.head
        except TimeoutError as exc:
            self.abort()
            raise TimeoutError(f"{method} {target}: no answer within {limit_s:.0f} s") from exc
        except BaseException:
            self.abort()  # a cancelled request leaves the connection in an unknown state
            raise
        return head, pending.done

    async def request(
        self,
        method: str,
        target: str,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        limit_s: float = 30.0,
        keep_body: bool = True,
        sink: BodySink | None = None,
    ) -> Response:
        """Send a request and wait for the whole response."""
        chunks: list[bytes] = []
        size = 0

        def collect(data: bytes, t: float) -> None:
            nonlocal size
            size += len(data)
            if keep_body:
                chunks.append(data)
            if sink is not None:
                sink(data, t)

        pending = self._begin(method, target, collect, headers, body)
        try:
            async with asyncio.timeout(limit_s):
                await pending.done
        except TimeoutError as exc:
            self.abort()
            raise TimeoutError(f"{method} {target}: no complete answer within {limit_s:.0f} s") from exc
        except BaseException:
            self.abort()
            raise
        head = pending.head.result()  # always set before `done`
        head.body = b"".join(chunks)
        head.size = size
        return head


class Client:
    """Sequential requests to one origin, reconnecting when the server has closed the connection."""

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self._conn: Connection | None = None

    async def request(
        self,
        method: str,
        target: str,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        limit_s: float = 30.0,
        keep_body: bool = True,
    ) -> Response:
        """One request; an idempotent one is retried once if a reused connection was already dead."""
        for attempt in range(2):
            reused = self._conn is not None and not self._conn.closed
            if not reused:
                self._conn = await Connection.open(self.origin)
            assert self._conn is not None
            try:
                return await self._conn.request(method, target, headers, body, limit_s, keep_body)
            except (HttpError, ConnectionError) as exc:
                retryable = reused and method in ("GET", "HEAD", "PUT", "DELETE") and attempt == 0
                self._conn.close()
                self._conn = None
                if not retryable:
                    raise HttpError(f"{method} {target}: {exc}") from exc
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Close the connection."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
