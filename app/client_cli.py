"""The client commands: `write`, `cat`, `ls`, `info`, `rm`, each talking to a server over its /stream API.

A new client command takes `@client_options` (--server and --key) and runs its work through `run()`, which
turns every failure into one line that says what to do; cli.py lists it among the commands.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import os
import re
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import datetime
from typing import Any, BinaryIO, TypeVar

import click

from . import urls
from .checks import shown
from .errors import StreamError
from .sdk.base import UNSET, StreamInfo
from .sdk.remote import RemoteStreams, ServerUnavailableError, UnauthorizedError
from .web.humanize import duration, human_bytes

T = TypeVar("T")
DEFAULT_SERVER = "http://127.0.0.1:8000"
READ_SIZE = 1024 * 1024
MAX_IN_FLIGHT = 8 * 1024 * 1024
PROGRESS_FROM = 1024 * 1024


def client_options(command: Callable[..., Any]) -> Callable[..., Any]:
    command = click.option(
        "--key",
        envvar="STREAMHOLD_API_KEY",
        show_envvar=True,
        help="API key or token, sent as Authorization: Bearer <key> to --server's origin only.",
    )(command)
    return click.option(
        "--server",
        envvar="STREAMHOLD_URL",
        show_envvar=True,
        default=DEFAULT_SERVER,
        show_default=True,
        help="The Streamhold server to talk to.",
    )(command)


def run(work: Coroutine[Any, Any, T], key: str | None, keyless: str | None = None) -> T:
    """Run a client coroutine; any failure becomes one line on stderr and exit status 1.

    `keyless` is the line for a 401 when no key was sent, in place of the general one.
    """
    try:
        return asyncio.run(work)
    except UnauthorizedError as exc:
        if exc.status == 403:  # a token that lacks a scope or a namespace: the server says which
            raise click.ClickException(shown(str(exc))) from None
        if not key and keyless:
            raise click.ClickException(keyless) from None
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
        return UNSET
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
                data: bytes | BaseException = source.read1(READ_SIZE)  # type: ignore[attr-defined]  # stdin's buffer has read1; BinaryIO omits it
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


@click.command()
@click.argument("namespace")
@click.option("--content-type", "-t", default="application/octet-stream", show_default=True)
@click.option("--compress", is_flag=True, help="Gzip it at close (served as Content-Encoding: gzip).")
@click.option("--meta", "-m", multiple=True, metavar="KEY=VALUE", help="A metadata pair; repeat for more.")
@click.option("--ttl", metavar="DURATION", help="Expire after 3600, 30m, 12h, 7d... or never (default: 30d).")
@client_options
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
    run(_write(server, key, namespace, options, sys.stdin.buffer), key)


def _target(target: str, server: str, key: str | None) -> tuple[str, str, str | None]:
    """(server, id, key) from an id, or from a stream URL such as http://host:8000/stream/<id>.

    The key goes only to the configured server's origin: a URL naming another host gets none.
    """
    if "://" not in target:
        return server, target, key
    found = urls.split_stream_url(target)
    if found is None:
        raise click.ClickException(f"not a stream URL: expected .../stream/<id>, got {target}")
    base, stream_id = found
    return base, stream_id, key if urls.same_origin(base, server) else None


async def _cat(server: str, key: str | None, stream_id: str, follow: bool, retry_for: float) -> None:
    out = sys.stdout.buffer
    async with RemoteStreams(server, key) as streams:
        async for piece in streams.read(stream_id, follow=follow, resume_for=retry_for):
            out.write(piece)
            out.flush()


@click.command()
@click.argument("target", metavar="ID|URL")
@click.option("--follow", "-f", is_flag=True, help="Tail an open stream until it closes (resumes on drops).")
@click.option("--retry-for", default=60.0, show_default=True, help="With --follow: seconds of reconnecting.")
@client_options
def cat(target: str, follow: bool, retry_for: float, server: str, key: str | None) -> None:
    """Print a stream's content to standard output (bytes as they are); a private one needs --key."""
    where, stream_id, sent = _target(target, server, key)
    keyless = "this stream is private: pass --key or set STREAMHOLD_API_KEY"
    if key and not sent:
        keyless = f"this stream is private, and the key goes only to --server ({server}): "
        keyless += f"pass --server {where}"
    try:
        run(_cat(where, sent, stream_id, follow, retry_for), sent, keyless)
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


@click.command(name="ls")
@click.option("--namespace", "-n", help="Only streams of this namespace.")
@click.option("--meta", "-m", multiple=True, metavar="KEY=VALUE", help="Only streams with this metadata.")
@click.option("--limit", default=100, show_default=True, help="How many to show (at most 1000).")
@click.option("--offset", default=0, show_default=True, help="How many to skip, for paging.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line instead of a table.")
@client_options
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

    page = run(fetch(), key)
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


@click.command()
@click.argument("stream_id", metavar="ID|URL")
@click.option("--json", "as_json", is_flag=True, help="The record as JSON.")
@client_options
def info(stream_id: str, as_json: bool, server: str, key: str | None) -> None:
    """Show one stream's record."""
    server, stream_id, key = _target(stream_id, server, key)

    async def fetch() -> StreamInfo:
        async with RemoteStreams(server, key) as streams:
            return await streams.get(stream_id)

    found = run(fetch(), key)
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


@click.command()
@click.argument("stream_ids", metavar="ID|URL...", nargs=-1, required=True)
@client_options
def rm(stream_ids: tuple[str, ...], server: str, key: str | None) -> None:
    """Delete streams."""

    async def remove() -> None:
        for target in stream_ids:
            where, stream_id, where_key = _target(target, server, key)
            async with RemoteStreams(where, where_key) as streams:
                await streams.delete(stream_id)
            click.echo(f"deleted {stream_id}")

    run(remove(), key)

