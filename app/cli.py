"""`streamhold`: `serve` (the default command) and client commands."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import gc
import ipaddress
import json
import os
import re
import resource
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import datetime
from types import FrameType
from typing import Any, BinaryIO, TypeVar

import click
import httpx
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .checks import shown
from .errors import StreamError
from .sdk.base import UNSET, StreamInfo
from .sdk.remote import RemoteStreams, ServerUnavailableError, UnauthorizedError
from .settings import Settings, SettingsError
from .web.humanize import duration, human_bytes

T = TypeVar("T")
DEFAULT_SERVER = "http://127.0.0.1:8000"
READ_SIZE = 1024 * 1024
MAX_IN_FLIGHT = 8 * 1024 * 1024
PROGRESS_FROM = 1024 * 1024
BODY_BUFFER = 1024 * 1024
FILES_KEPT = 128  # open files kept free of connections, for the database, chunk files and logs


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Server(uvicorn.Server):
    """Tells live responses to end as soon as a stop is asked for, so shutdown takes a moment, not minutes.

    Once started, it moves every object then alive out of the garbage collector's reach (they live as long
    as the process): the collector then walks only what requests create. With 1,000 SSE readers tailing one
    stream, collections had taken 17% of the event loop; delivery p99 fell from 202-220 ms to 122-144 ms.
    """

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        gc.freeze()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        app = self.config.loaded_app
        while app is not None and not hasattr(app, "state"):
            app = getattr(app, "app", None)
        hub = getattr(getattr(app, "state", None), "hub", None) if app is not None else None
        if hub is not None:
            hub.shutdown()
        super().handle_exit(sig, frame)


@dataclasses.dataclass(frozen=True)
class _Limits:
    """What one connection may cost: seconds to send headers, to take some of a response; connections."""

    header_timeout: float = 10.0
    send_timeout: float = 60.0
    max_connections: int = 10_000


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


class _Protocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol, with a larger body buffer and bounds on what a connection may hold.

    At uvicorn's 64 KiB body buffer, a 1 MiB append reached the app in six or more pieces, each waiting for
    the app to take the last: 0.5-1 ms more per append, measured; it buffers up to 1 MiB.

    uvicorn 0.54 has no header-read timeout (its keep-alive timer runs only after a response), no limit on
    a write the client never takes, and its `limit_concurrency` answers 503 without `Retry-After`; these
    are added here through its `connections`, `transport`, `flow`, `app` and parser callbacks.
    """

    limits = _Limits()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
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
            return
        app, self.app = self.app, _busy
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    def on_body(self, body: bytes) -> None:
        if (self.parser.should_upgrade() and self._should_upgrade()) or self.cycle.response_complete:
            return
        self.cycle.body += body
        if len(self.cycle.body) > BODY_BUFFER:
            self.flow.pause_reading()
        self.cycle.message_event.set()

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
        for timer in (self._header_timer, self._send_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._send_timer = None


def _raise_open_file_limit() -> int:
    """Raise the soft limit on open files to the hard one (each connection is one); the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


@click.group(invoke_without_command=True)
@click.pass_context
def main(ctx: click.Context) -> None:
    """Streamhold: durable, append-only streams over HTTP."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(serve)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=int, help="Port to listen on.")
@click.option("--insecure", is_flag=True, help="Listen beyond loopback without API keys (anyone can write).")
@click.option("--log-level", default="warning", show_default=True)
def serve(
    host: str = "127.0.0.1", port: int = 8000, insecure: bool = False, log_level: str = "warning"
) -> None:
    """Serve the HTTP API, the viewer and the dashboard."""
    try:
        settings = Settings.from_env()
        settings.sqlalchemy_url  # noqa: B018 - validates the URL before anything starts
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    if not settings.api_keys and not _is_loopback(host) and not insecure:
        raise click.ClickException(
            f"refusing to listen on {host} without API keys: set STREAMHOLD_API_KEYS=<key>[,<key>...] "
            "(clients send Authorization: Bearer <key>), or pass --insecure to allow anyone to write"
        )
    if not settings.public_url:
        shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        settings = dataclasses.replace(settings, public_url=f"http://{shown}:{port}")
    from .main import create_app

    open_files = _raise_open_file_limit()
    # Connections past the cap still take a file each until answered; the database and chunk files need some.
    cap = max(1, min(settings.max_connections, open_files - FILES_KEPT))
    limits = _Limits(settings.header_timeout, settings.send_timeout, cap)
    config = uvicorn.Config(
        create_app(settings),
        host=host,
        port=port,
        log_level=log_level,
        http=type("_Protocol", (_Protocol,), {"limits": limits}),
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
    server = _Server(config)
    try:
        server.run()  # on uvloop when it is installed
    except KeyboardInterrupt:
        pass
    if server.started is False and not server.should_exit:
        sys.exit(1)


@main.command()
@click.option("--url", envvar="STREAMHOLD_URL", default="", help="A running server [default: :8000 if up].")
@click.option("--in-process", is_flag=True, help="Serve the demo from this process, whatever else runs.")
@click.option("--port", default=0, type=int, help="Port of the in-process server [default: 8000 or any].")
@click.option("--linger", default=600.0, show_default=True, help="Seconds the in-process server stays up.")
def demo(url: str = "", in_process: bool = False, port: int = 0, linger: float = 600.0) -> None:
    """Stream a simulated (or configured real) LLM answer into the live viewer and print its URL."""
    from .demo_cli import cli_demo

    try:
        cli_demo(url, port, linger, in_process, click.echo)
    except (RuntimeError, OSError, SettingsError) as exc:
        raise click.ClickException(str(exc)) from None


# --- client commands -----------------------------------------------------------------------------


def _client_options(command: Callable[..., Any]) -> Callable[..., Any]:
    command = click.option(
        "--key",
        envvar="STREAMHOLD_API_KEY",
        show_envvar=True,
        help="API key, sent as Authorization: Bearer <key> to --server only (never by cat).",
    )(command)
    return click.option(
        "--server",
        envvar="STREAMHOLD_URL",
        show_envvar=True,
        default=DEFAULT_SERVER,
        show_default=True,
        help="The Streamhold server to talk to.",
    )(command)


def _run(work: Coroutine[Any, Any, T], key: str | None) -> T:
    """Run a client coroutine; any failure becomes one line on stderr and exit status 1."""
    try:
        return asyncio.run(work)
    except UnauthorizedError:
        hint = "the API key was refused" if key else "the server needs an API key"
        raise click.ClickException(f"{hint}: pass --key or set STREAMHOLD_API_KEY") from None
    except ServerUnavailableError as exc:
        raise click.ClickException(
            f"{exc}; start it with `streamhold serve` or point --server / STREAMHOLD_URL at it"
        ) from None
    except (StreamError, ValueError) as exc:  # a message may quote what a server sent
        raise click.ClickException(shown(str(exc))) from None


def _pairs(items: tuple[str, ...], option: str = "--meta") -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.ClickException(f"{option} takes KEY=VALUE, such as {option} user_id=u1; got {item!r}")
        pairs[key] = value
    return pairs


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")


def _duration(text: str | None) -> float | None:
    """--ttl: seconds, or a number with s, m, h or d; `never` or 0 keeps the stream forever."""
    if text is None:
        return UNSET  # type: ignore[no-any-return]
    if text.strip().lower() == "never":
        return None
    match = _DURATION.match(text.strip().lower())
    if match is None:
        raise click.ClickException(f"--ttl takes seconds or a duration (30m, 12h, 7d) or never; got {text!r}")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def _when(moment: datetime | None, empty: str = "-") -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S") if moment is not None else empty


async def _stdin_chunks(source: BinaryIO) -> AsyncIterator[bytes]:
    """Standard input as it arrives; a daemon thread reads, so a blocked read never holds up the exit."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes | BaseException] = asyncio.Queue(maxsize=4)

    def pump() -> None:
        while True:
            try:
                data: bytes | BaseException = source.read1(READ_SIZE)  # type: ignore[attr-defined]
            except (OSError, ValueError) as exc:
                data = exc
            try:
                asyncio.run_coroutine_threadsafe(queue.put(data), loop).result()
            except RuntimeError:  # the loop is gone: nobody is listening any more
                return
            if not data or isinstance(data, BaseException):
                return

    threading.Thread(target=pump, name="streamhold-stdin", daemon=True).start()
    while True:
        item = await queue.get()
        if isinstance(item, BaseException):
            raise click.ClickException(f"could not read standard input: {item}")
        if not item:
            return
        yield item


class _Progress:
    """Progress of a large write on stderr: a line a second once past 1 MiB, and a last one at the end."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.shown_at = 0.0

    def update(self, count: int) -> None:
        now = time.monotonic()
        if count >= PROGRESS_FROM and now - self.shown_at >= 1.0:
            click.echo(f"streamhold: {human_bytes(count)} written", err=True)
            self.shown_at = now

    def finish(self, count: int) -> None:
        if count >= PROGRESS_FROM:
            took = duration(time.monotonic() - self.started)
            click.echo(f"streamhold: {human_bytes(count)} written in {took}; stream closed", err=True)


async def _write(
    server: str, key: str | None, namespace: str, options: dict[str, Any], source: BinaryIO
) -> None:
    async with RemoteStreams(server, key) as streams:
        stream = await streams.create(namespace, **options)
        click.echo(stream.url)
        sys.stdout.flush()
        progress = _Progress()
        pending: collections.deque[tuple[asyncio.Future[Any], int]] = collections.deque()
        in_flight = 0
        async for data in _stdin_chunks(source):
            for start in range(0, len(data), stream.max_append):
                piece = data[start : start + stream.max_append]
                pending.append((stream.write(piece), len(piece)))
                in_flight += len(piece)
            # Bounded memory when the input outpaces the network: wait once too much is unconfirmed.
            while pending and (in_flight > MAX_IN_FLIGHT or pending[0][0].done()):
                future, size = pending.popleft()
                await future
                in_flight -= size
            progress.update(stream.bytes_written)
        await stream.close()
        progress.finish(stream.bytes_written)


@main.command()
@click.argument("namespace")
@click.option("--content-type", "-t", default="application/octet-stream", show_default=True)
@click.option("--compress", is_flag=True, help="Gzip it at close (served as Content-Encoding: gzip).")
@click.option("--meta", "-m", multiple=True, metavar="KEY=VALUE", help="A metadata pair; repeat for more.")
@click.option("--ttl", metavar="DURATION", help="Expire after 3600, 30m, 12h, 7d... or never (default: 30d).")
@_client_options
def write(
    namespace: str,
    content_type: str,
    compress: bool,
    meta: tuple[str, ...],
    ttl: str | None,
    server: str,
    key: str | None,
) -> None:
    """Pipe standard input into a new stream: prints its URL at once and closes it at end of input."""
    options = {"content_type": content_type, "compress": compress, "metadata": _pairs(meta)}
    options["ttl"] = _duration(ttl)
    _run(_write(server, key, namespace, options, sys.stdin.buffer), key)


def _origin(url: str) -> tuple[str, str, int | None]:
    parsed = httpx.URL(url)
    return parsed.scheme, parsed.host, parsed.port or {"http": 80, "https": 443}.get(parsed.scheme)


def _target(target: str, server: str, key: str | None) -> tuple[str, str, str | None]:
    """(server, id, key) from an id, or from a stream URL such as http://host:8000/stream/<id>.

    The key goes only to the configured server's origin: a URL naming another host gets none.
    """
    if "://" not in target:
        return server, target, key
    base, sep, rest = target.partition("/stream/")
    stream_id = rest.split("?", 1)[0].split("#", 1)[0].strip("/")
    if not sep or not stream_id or "/" in stream_id:
        raise click.ClickException(f"not a stream URL: expected .../stream/<id>, got {target}")
    try:
        same_origin = _origin(base) == _origin(server)
    except httpx.InvalidURL:
        raise click.ClickException(f"not a stream URL: expected .../stream/<id>, got {target}") from None
    return base, stream_id, key if same_origin else None


async def _cat(server: str, key: str | None, stream_id: str, follow: bool, retry_for: float) -> None:
    out = sys.stdout.buffer
    async with RemoteStreams(server, key) as streams:
        async for piece in streams.read(stream_id, follow=follow, resume_for=retry_for):
            out.write(piece)
            out.flush()


@main.command()
@click.argument("target", metavar="ID|URL")
@click.option("--follow", "-f", is_flag=True, help="Tail an open stream until it closes (resumes on drops).")
@click.option("--retry-for", default=60.0, show_default=True, help="With --follow: seconds of reconnecting.")
@_client_options
def cat(target: str, follow: bool, retry_for: float, server: str, key: str | None) -> None:
    """Print a stream's content to standard output (bytes as they are)."""
    # Content is public: reading it never needs the key, so it is never sent.
    server, stream_id, _ = _target(target, server, None)
    try:
        _run(_cat(server, None, stream_id, follow, retry_for), key)
    except BrokenPipeError:
        # The reader went away (`| head`); point stdout at nothing so the exit does not complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _record(info: StreamInfo) -> dict[str, Any]:
    record = dataclasses.asdict(info)
    for key, value in record.items():
        if isinstance(value, datetime):
            record[key] = value.isoformat()
    return record


def _state(info: StreamInfo) -> str:
    if info.closed_at is None:
        return "open"
    return "closed, gzip" if info.compressed else "closed"


@main.command(name="ls")
@click.option("--namespace", "-n", help="Only streams of this namespace.")
@click.option("--meta", "-m", multiple=True, metavar="KEY=VALUE", help="Only streams with this metadata.")
@click.option("--limit", default=100, show_default=True, help="How many to show (at most 1000).")
@click.option("--offset", default=0, show_default=True, help="How many to skip, for paging.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line instead of a table.")
@_client_options
def list_command(
    namespace: str | None,
    meta: tuple[str, ...],
    limit: int,
    offset: int,
    as_json: bool,
    server: str,
    key: str | None,
) -> None:
    """List streams, newest first."""

    async def fetch() -> Any:
        async with RemoteStreams(server, key) as streams:
            return await streams.list(namespace=namespace, metadata=_pairs(meta), limit=limit, offset=offset)

    page = _run(fetch(), key)
    if as_json:
        for info in page.streams:
            click.echo(json.dumps(_record(info)))
        return
    if not page.streams:
        message = f"no streams past {offset} (of {page.total})" if page.total else "no streams match"
        click.echo(message, err=True)
        return
    rows = [("ID", "NAMESPACE", "TYPE", "SIZE", "STATE", "CREATED", "EXPIRES")]
    for info in page.streams:
        rows.append(
            (
                shown(info.id),
                shown(info.namespace),
                shown(info.content_type),
                human_bytes(info.size_bytes),
                _state(info),
                _when(info.created_at),
                _when(info.expires_at, "never"),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    shown_to = offset + len(page.streams)
    if shown_to < page.total:
        click.echo(f"showing {offset + 1}-{shown_to} of {page.total}; --offset {shown_to} for more", err=True)


@main.command()
@click.argument("stream_id", metavar="ID|URL")
@click.option("--json", "as_json", is_flag=True, help="The record as JSON.")
@_client_options
def info(stream_id: str, as_json: bool, server: str, key: str | None) -> None:
    """Show one stream's record."""
    server, stream_id, key = _target(stream_id, server, key)

    async def fetch() -> StreamInfo:
        async with RemoteStreams(server, key) as streams:
            return await streams.get(stream_id)

    found = _run(fetch(), key)
    if as_json:
        click.echo(json.dumps(_record(found), indent=2))
        return
    stored = f" ({human_bytes(found.stored_bytes)} stored gzipped)" if found.compressed else ""
    lines = [
        ("id", found.id),
        ("namespace", found.namespace),
        ("url", found.url),
        ("viewer", found.viewer_url),
        ("content type", found.content_type),
        ("size", f"{found.size_bytes} bytes{stored}"),
        ("state", _state(found) + (f" at {_when(found.closed_at)}" if found.closed_at else "")),
        ("created", _when(found.created_at)),
        ("expires", _when(found.expires_at, "never")),
        ("metadata", ", ".join(f"{k}={v}" for k, v in found.metadata.items()) or "-"),
    ]
    for label, value in lines:
        click.echo(f"{label + ':':<14}{shown(value)}")


@main.command()
@click.argument("stream_ids", metavar="ID|URL...", nargs=-1, required=True)
@_client_options
def rm(stream_ids: tuple[str, ...], server: str, key: str | None) -> None:
    """Delete streams."""

    async def remove() -> None:
        for target in stream_ids:
            where, stream_id, where_key = _target(target, server, key)
            async with RemoteStreams(where, where_key) as streams:
                await streams.delete(stream_id)
            click.echo(f"deleted {stream_id}")

    _run(remove(), key)


if __name__ == "__main__":
    main()
