"""Running under uvicorn: the server, its HTTP protocol's bounds, and the start-up banner.

The protocol subclass below reaches into uvicorn's HTTP/1.1 implementation (its attributes and parser
callbacks), which uvicorn does not promise to keep. It was written and measured against UVICORN_VERSION;
tests/test_serve.py fails when another version is installed or when what it overrides has changed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import ipaddress
import resource
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from . import urls
from .main import create_app
from .settings import Settings

UVICORN_VERSION = "0.54.0"  # the uvicorn whose internals Protocol and Server were checked against
BODY_BUFFER = 1024 * 1024
DRAIN_BYTES = 16 * 1024 * 1024  # of a body after an early answer, read and dropped (or the append limit)
FILES_KEPT = 128  # open files kept free of connections, for the database, chunk files and logs


def is_loopback(host: str) -> bool:
    """Whether `host` (an address to listen on) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one connection may cost: seconds to send headers, to take some of a response; connections;
    bytes and seconds of a request body read (and dropped) after an answer that did not wait for it."""

    header_timeout: float = 10.0
    send_timeout: float = 60.0
    max_connections: int = 10_000
    drain_bytes: int = DRAIN_BYTES
    drain_timeout: float = 5.0


async def _busy(scope: Any, receive: Any, send: Any) -> None:
    """The answer past the connection cap: 503, try again shortly, and the connection closes."""
    body = b"the server has too many open connections; try again in a few seconds\n"
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"5"),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class Flag:
    """asyncio.Event's is_set/set/clear/wait without its deque of waiters (760 bytes, made at once).

    uvicorn gives every connection two Events and a deque: with 10,000 idle SSE readers those were 2 KiB of
    each reader's memory. Waiters get a future each (as asyncio.Event's do), in a list made when one waits.
    """

    __slots__ = ("_set", "_waiters")

    def __init__(self, value: bool = False) -> None:
        self._set = value
        self._waiters: list[asyncio.Future[bool]] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if self._set:
            return
        self._set = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(True)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> bool:
        if self._set:
            return True
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            return await waiter
        finally:
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)


class Pipeline(list[Any]):
    """The two deque methods uvicorn's queue of pipelined requests uses, on a list of 80 bytes, not 760."""

    def appendleft(self, item: Any) -> None:
        self.insert(0, item)


class Protocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol, with a larger body buffer and bounds on what a connection may hold.

    At uvicorn's 64 KiB body buffer, a 1 MiB append reached the app in six or more pieces, each waiting for
    the app to take the last: 0.5-1 ms more per append, measured; it buffers up to 1 MiB.

    uvicorn 0.54 has no header-read timeout (its keep-alive timer runs only after a response), no limit on
    a write the client never takes, and its `limit_concurrency` answers 503 without `Retry-After`; these
    are added here through its `connections`, `transport`, `flow`, `app` and parser callbacks.

    An answer sent before the request's body ended (a 413 judged from Content-Length, a 404) leaves the
    rest of the body coming. Closing at once would reset the connection under a client still sending, and
    a client may lose the answer with it; uvicorn reads and drops the rest instead, but without end: a
    client could keep a connection busy with gigabytes. So it is read up to `drain_bytes` within
    `drain_timeout`, and past either the connection closes.

    A connection's two asyncio.Events (`flow._is_writable_event`, `cycle.message_event`) and its `pipeline`
    deque are swapped for lighter equivalents (Flag, Pipeline) as soon as uvicorn makes them.
    """

    limits = Limits()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # uvicorn types it BaseTransport
        self._header_timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        self._drain_timer: asyncio.TimerHandle | None = None
        self._drain_left = 0
        super().connection_made(transport)
        if not self.pipeline:
            self.pipeline = Pipeline()  # type: ignore[assignment]
        writable = self.flow._is_writable_event
        self.flow._is_writable_event = Flag(writable.is_set())  # type: ignore[assignment]
        self._start_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.cycle is None or self.cycle.response_complete:  # bytes of the next request's head
            self._start_header_timer()
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._start_header_timer()

    def on_headers_complete(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if len(self.connections) <= self.limits.max_connections:
            super().on_headers_complete()
        else:
            # uvicorn's on_headers_complete starts whatever `self.app` is: for this request, the refusal.
            app, self.app = self.app, _busy
            try:
                super().on_headers_complete()
            finally:
                self.app = app
        cycle = self.cycle
        if cycle is not None and type(cycle.message_event) is asyncio.Event:
            # Nothing waits on it yet: the request's task has been made, not run.
            cycle.message_event = Flag(cycle.message_event.is_set())  # type: ignore[assignment]

    def on_body(self, body: bytes) -> None:
        # uvicorn's own on_body, with BODY_BUFFER in place of its 64 KiB high-water mark.
        if self.parser.should_upgrade() and self._should_upgrade():
            return
        if self.cycle.response_complete:  # the rest of a body after an early answer
            self._drain_left -= len(body)
            if self._drain_left < 0 and not self.transport.is_closing():
                self.transport.close()
            return
        self.cycle.body += body
        if len(self.cycle.body) > BODY_BUFFER:
            self.flow.pause_reading()
        self.cycle.message_event.set()

    def on_message_complete(self) -> None:
        if self.cycle.response_complete and self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # self.cycle is the request just answered unless a pipelined one has begun (its body then ended).
        cycle = self.cycle
        if cycle.response_complete and cycle.more_body and not self.transport.is_closing():
            self._drain_left = self.limits.drain_bytes
            self._drain_timer = self.loop.call_later(self.limits.drain_timeout, self._drain_too_slow)

    def _drain_too_slow(self) -> None:
        self._drain_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._watch_send(self.transport.get_write_buffer_size())

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _start_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.limits.header_timeout, self._headers_too_slow)

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def _watch_send(self, waiting: int) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
        self._send_timer = self.loop.call_later(self.limits.send_timeout, self._check_send, waiting)

    def _check_send(self, waiting: int) -> None:
        """Close the connection if nothing of what waits to be sent went out since the last check."""
        self._send_timer = None
        if not self.flow.write_paused or self.transport.is_closing():
            return
        now = self.transport.get_write_buffer_size()
        if now >= waiting:
            self.transport.abort()
        else:
            self._watch_send(now)

    def _stop_timers(self) -> None:
        for timer in (self._header_timer, self._send_timer, self._drain_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._send_timer = self._drain_timer = None


class Server(uvicorn.Server):
    """Tells live responses to end as soon as a stop is asked for, so shutdown takes a moment, not minutes.

    Once started, it moves every object then alive out of the garbage collector's reach (they live as long
    as the process): the collector then walks only what requests create. With 1,000 SSE readers tailing one
    stream, collections had taken 17% of the event loop; delivery p99 fell from 202-220 ms to 122-144 ms.
    """

    def __init__(self, config: uvicorn.Config, on_listening: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self.on_listening = on_listening

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        gc.freeze()
        if self.started and self.on_listening is not None:
            self.on_listening()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        app = self.config.loaded_app
        while app is not None and not hasattr(app, "state"):
            app = getattr(app, "app", None)
        hub = getattr(getattr(app, "state", None), "hub", None) if app is not None else None
        if hub is not None:
            hub.shutdown()
        super().handle_exit(sig, frame)


def raise_open_file_limit() -> int:
    """Raise the soft limit on open files to the hard one (each connection is one); the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def _database(settings: Settings) -> str:
    """Where the streams are kept, in words; a PostgreSQL URL's password never appears."""
    if not settings.database_url:
        return f"{settings.data_dir.resolve()} (SQLite)"
    if settings.is_sqlite:
        return f"SQLite database {Path(settings.sqlalchemy_url.removeprefix('sqlite:///')).resolve()}"
    from sqlalchemy.engine import make_url

    url = make_url(settings.sqlalchemy_url)
    user = f" as {url.username}" if url.username else ""
    return f"PostgreSQL database {url.database} on {url.host or 'localhost'}:{url.port or 5432}{user}"


def banner(settings: Settings) -> str:
    """The lines `serve` prints once it listens: where to go, where the data is, whether keys are set."""
    origin = settings.origin()
    keys = (
        f"set ({len(settings.api_keys)}): clients send Authorization: Bearer <key>"
        if settings.api_keys
        else "none: anyone who can reach this address can read and write"
    )
    return "\n".join(
        [
            f"Streamhold is listening on {origin}",
            f"  dashboard  {urls.dashboard_url(origin)}",
            f"  demo       {urls.demo_url(origin)} (Start the demo on the dashboard, or `streamhold demo`)",
            f"  protocol   {urls.protocol_base(origin)}",
            f"  data       {_database(settings)}",
            f"  API keys   {keys}",
        ]
    )


def run(settings: Settings, host: str, port: int, log_level: str, announce: Callable[[str], None]) -> bool:
    """Serve the app on host:port until stopped; False if it never started (the port taken, say)."""
    if uvicorn.__version__ != UVICORN_VERSION:
        announce(
            f"warning: streamhold's connection bounds were checked against uvicorn {UVICORN_VERSION}, "
            f"and uvicorn {uvicorn.__version__} is installed; install uvicorn=={UVICORN_VERSION} to be sure"
        )
    open_files = raise_open_file_limit()
    # Connections past the cap still take a file each until answered; the database and chunk files need some.
    cap = max(1, min(settings.max_connections, open_files - FILES_KEPT))
    limits = Limits(
        settings.header_timeout, settings.send_timeout, cap, max(DRAIN_BYTES, settings.max_append_bytes)
    )
    config = uvicorn.Config(
        create_app(settings),
        host=host,
        port=port,
        log_level=log_level,
        http=type("Protocol", (Protocol,), {"limits": limits}),
        timeout_keep_alive=settings.idle_timeout,  # type: ignore[arg-type]  # a float works; typed int
        timeout_graceful_shutdown=2,
        lifespan="on",
        access_log=False,
        proxy_headers=False,
        server_header=False,  # no need to tell every client which HTTP server runs underneath
    )
    # The writer thread needs the GIL for the writes it runs (every write but quick commits of appends); a
    # busy event loop gives it up only every switch interval (5 ms by default), and the write's caller waits.
    sys.setswitchinterval(0.0005)
    server = Server(config, on_listening=lambda: announce(banner(settings)))
    try:
        server.run()  # on uvloop when it is installed
    except KeyboardInterrupt:
        pass
    return not (server.started is False and not server.should_exit)
