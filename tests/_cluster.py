"""Helpers for tests of several server processes: a throwaway Redis, outages, live readers, metrics.

Outages are made without touching shared servers: a throwaway ``redis-server`` is killed and restarted, and
a PostgreSQL database that a test created is closed to connections (``ALLOW_CONNECTIONS false`` plus
terminating the sessions on that one database) and opened again.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx
import psycopg
import pytest

from streamhold.live import CHANNEL
from tests._server import HOST, REPO_ROOT, ServerProcess, free_port
from tests._sse import sse_events

Labels = tuple[tuple[str, str], ...]


def require(what: str, reason: str) -> None:
    """Skip loudly on a developer machine, fail in CI (CI=true), when a needed tool is missing."""
    if os.environ.get("CI"):
        pytest.fail(f"CI needs {what}: {reason}")
    pytest.skip(f"SKIPPED LOUDLY: {what} unavailable ({reason}); these multi-process tests did not run")


class RedisServer:
    """A private, memory-only redis-server on a fixed free port; it can be killed and started again."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            require("redis-server", "not on PATH; install the redis-server package")
        self.binary = str(binary)
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> RedisServer:
        argv = [self.binary, "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no"]
        self._proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self._proc.returncode} on port {self.port}")
            try:
                if self.command("PING") == "+PONG":
                    return self
            except OSError:
                pass
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within 10 s")

    def kill(self) -> None:
        """SIGKILL, as a crash would; only the process this object started."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait(timeout=10)

    def command(self, *args: str) -> str:
        """Send one command (RESP) and return the first line of the reply."""
        payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
        with socket.create_connection((HOST, self.port), timeout=2) as sock:
            sock.sendall(payload.encode())
            reply = b""
            while not reply.endswith(b"\r\n"):
                piece = sock.recv(4096)
                if not piece:
                    break
                reply += piece
        return reply.decode().split("\r\n")[0]

    def subscribers(self, channel: str) -> int:
        """How many connections are subscribed to `channel` (PUBSUB NUMSUB)."""
        payload = f"*3\r\n$6\r\nPUBSUB\r\n$6\r\nNUMSUB\r\n${len(channel)}\r\n{channel}\r\n"
        with socket.create_connection((HOST, self.port), timeout=2) as sock:
            sock.sendall(payload.encode())
            reply = b""
            deadline = time.monotonic() + 2
            while reply.count(b"\r\n") < 4 and time.monotonic() < deadline:
                reply += sock.recv(4096)
        return int(reply.decode().split("\r\n")[3].lstrip(":"))

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


@contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    """A new, empty database on the server of `admin_url`, dropped afterwards."""
    name = f"streamhold_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{admin_url.rsplit('/', 1)[0]}/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def database_name(url: str) -> str:
    return url.rsplit("/", 1)[1]


def set_database_online(admin_url: str, url: str, online: bool) -> None:
    """Open or close one test database to connections; closing also ends the sessions already on it."""
    name = database_name(url)
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS {"true" if online else "false"}')
        if not online:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )


def listeners(admin_url: str, url: str) -> int:
    """Sessions on this database whose last statement was a LISTEN: one per subscribed process."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND query ILIKE 'LISTEN %%'",
            (database_name(url),),
        ).fetchone()
    assert row is not None
    return int(row[0])


def start_servers(count: int, env: Mapping[str, str]) -> list[ServerProcess]:
    """Start `count` servers with the same environment, in parallel; stop them with `stop_servers`."""
    servers = [ServerProcess(env=env, startup_timeout=30) for _ in range(count)]
    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(server.start) for server in servers]
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        stop_servers(servers)
        raise errors[0]  # type: ignore[misc]
    return servers


def stop_servers(servers: list[ServerProcess]) -> None:
    with ThreadPoolExecutor(max(len(servers), 1)) as pool:
        list(pool.map(lambda s: s.__exit__(None, None, None), servers))


def server_errors(server: ServerProcess) -> list[str]:
    """Lines of a server log that show a failure: a traceback, a failed sweep or write transaction."""
    pattern = re.compile(r"Traceback|sweep failed|transaction failed")
    return [line for line in server.log_text().splitlines() if pattern.search(line)]


@dataclass
class Channels:
    """A channels backend for one test, and how to take it away and bring it back."""

    kind: str
    url: str
    cut: Callable[[], None]
    restore: Callable[[], None]
    subscribers: Callable[[], int]


@contextmanager
def open_channels(kind: str, pg_server: str) -> Iterator[Channels]:
    """Redis: a throwaway server, killed and restarted. Postgres: a database of its own, closed and opened."""
    if kind == "redis":
        with RedisServer() as redis:
            yield Channels("redis", redis.url, redis.kill, redis.start, lambda: redis.subscribers(CHANNEL))
        return
    with fresh_database(pg_server) as url:
        try:
            yield Channels(
                "postgres",
                url,
                lambda: set_database_online(pg_server, url, False),
                lambda: set_database_online(pg_server, url, True),
                lambda: listeners(pg_server, url),
            )
        finally:
            set_database_online(pg_server, url, True)


def server_env(database_url: str, channels_url: str, tmp_path: Path, **settings: float) -> dict[str, str]:
    """STREAMHOLD_* variables for a server of the cluster; `settings` are e.g. long_poll_timeout=10."""
    env = {
        "STREAMHOLD_DATA_DIR": str(tmp_path / "data"),
        "STREAMHOLD_DATABASE_URL": database_url,
        "STREAMHOLD_CHANNELS_URL": channels_url,
    }
    env.update({f"STREAMHOLD_{key.upper()}": str(value) for key, value in settings.items()})
    return env


@contextmanager
def cluster(env: dict[str, str], count: int = 2) -> Iterator[list[ServerProcess]]:
    """`count` servers sharing `env` (one database, one channels backend) for the life of the block."""
    servers = start_servers(count, env)
    try:
        yield servers
    finally:
        stop_servers(servers)


# --- metrics -------------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')


def parse_metrics(text: str) -> dict[str, dict[Labels, float]]:
    """Samples by name (labels sorted); fails on any line that is not valid Prometheus text 0.0.4."""
    samples: dict[str, dict[Labels, float]] = {}
    typed: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            parts = line.split(" ", 3)
            if line.startswith("# TYPE "):
                assert parts[3] in ("counter", "gauge", "histogram", "summary", "untyped"), line
                assert parts[2] not in typed, f"TYPE given twice: {line}"
                typed[parts[2]] = parts[3]
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name, raw_labels, value = match.groups()
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in typed else name
        assert family in typed, f"sample before its TYPE line: {line!r}"
        labels: list[tuple[str, str]] = []
        if raw_labels:
            body = raw_labels[1:-1]
            position = 0
            while position < len(body):
                label = _LABEL.match(body, position)
                assert label, f"bad labels in {line!r}"
                labels.append((label[1], json.loads(f'"{label[2]}"')))
                position = label.end()
        samples.setdefault(name, {})[tuple(sorted(labels))] = float(value)
    return samples


def metric(samples: dict[str, dict[Labels, float]], name: str, **labels: str) -> float:
    """One sample's value (0 when absent)."""
    return samples.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


async def scrape(client: httpx.AsyncClient, server: ServerProcess) -> dict[str, dict[Labels, float]]:
    response = await client.get(f"{server.url}/metrics")
    assert response.status_code == 200, response.text
    return parse_metrics(response.text)


async def live_readers(client: httpx.AsyncClient, server: ServerProcess) -> dict[str, float]:
    """The server's live readers by kind (long_poll for long-poll)."""
    samples = await scrape(client, server)
    readers = samples["streamhold_live_readers"]
    return {kind.replace("-", "_"): value for ((_, kind),), value in readers.items()}


async def wait_for_readers(
    client: httpx.AsyncClient,
    server: ServerProcess,
    baseline: Mapping[str, float] | None = None,
    within: float = 10.0,
    **expected: int,
) -> None:
    """Wait until the server reports these many more live readers than `baseline`, e.g. sse=3."""
    deadline = time.monotonic() + within
    wanted = {kind: (baseline or {}).get(kind, 0) + count for kind, count in expected.items()}
    seen: dict[str, float] = {}
    while time.monotonic() < deadline:
        seen = await live_readers(client, server)
        if all(seen.get(kind, 0) == count for kind, count in wanted.items()):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"live readers on {server.url}: wanted {wanted}, last seen {seen}")


async def wait_for_status(
    client: httpx.AsyncClient, url: str, status: int, within: float
) -> tuple[float, httpx.Response]:
    """Poll `url` until it answers `status`; returns the seconds it took and the response."""
    started = time.monotonic()
    response: httpx.Response | None = None
    while time.monotonic() - started < within:
        try:
            response = await client.get(url, timeout=5)
        except httpx.TransportError:
            response = None
        if response is not None and response.status_code == status:
            return time.monotonic() - started, response
        await asyncio.sleep(0.05)
    last = "no answer" if response is None else f"{response.status_code} {response.text}"
    raise AssertionError(f"{url} did not answer {status} within {within} s (last: {last})")


# --- readers -------------------------------------------------------------------------------------


@dataclass
class Received:
    """What one live reader got: the bytes, and for each piece its arrival time, size and end offset."""

    kind: str
    data: bytearray = field(default_factory=bytearray)
    arrivals: list[tuple[float, int, int]] = field(default_factory=list)

    def add(self, piece: bytes, next_offset: int) -> None:
        self.data += piece
        self.arrivals.append((time.time(), len(piece), next_offset))


def offset_number(token: str) -> int:
    return int(token.split("_")[1])


async def read_sse(
    client: httpx.AsyncClient, url: str, into: Received | None = None, max_events: int = 100_000
) -> Received:
    """Tail a text stream from its start with `live=sse` until the server says it is closed."""
    received = into or Received("sse")
    offset = "-1"
    async with client.stream("GET", url, params={"offset": offset, "live": "sse"}) as response:
        assert response.status_code == 200, await response.aread()
        events = 0
        async for kind, data, event_id in sse_events(response.aiter_lines()):
            events += 1
            assert events <= max_events, "too many events"
            if kind == "data":
                assert event_id is not None, "a data event without id:"
                received.add(data.encode(), offset_number(event_id))
            elif kind == "control" and json.loads(data).get("streamClosed"):
                return received
    raise AssertionError(f"SSE from {url} ended before the stream was closed")


async def read_long_poll(
    client: httpx.AsyncClient, url: str, into: Received | None = None, max_requests: int = 100_000
) -> Received:
    """Tail a stream from its start with `live=long-poll` until a response says it is closed."""
    received = into or Received("long-poll")
    offset = "-1"
    for _ in range(max_requests):
        response = await client.get(url, params={"offset": offset, "live": "long-poll"})
        assert response.status_code in (200, 204), f"{response.status_code} {response.text}"
        offset = response.headers["stream-next-offset"]
        if response.status_code == 200:
            received.add(response.content, offset_number(offset))
        if response.headers.get("stream-closed") == "true":
            return received
    raise AssertionError(f"long-poll on {url} did not see the stream closed after {max_requests} requests")


def check_received(received: Received, expected: bytes) -> None:
    """Every byte once and in order, with offsets that only grow and match the bytes before them."""
    assert bytes(received.data) == expected, (
        f"{received.kind} reader got {len(received.data)} bytes, wanted {len(expected)}:\n"
        f"got    ...{bytes(received.data)[-120:]!r}\nwanted ...{expected[-120:]!r}"
    )
    position = 0
    for _, size, end in received.arrivals:
        assert size > 0 and end == position + size, f"{received.kind}: offset {end} after {position}+{size}"
        position = end


RECORD = re.compile(rb"([a-z]+):(\d+):(\d+\.\d+);")


def record(tag: str, seq: int) -> bytes:
    """One timestamped record: `tag:seq:unix-time;`, so readers can measure delivery latency."""
    return f"{tag}:{seq:05d}:{time.time():.6f};".encode()


def latencies(received: Received, since: Mapping[int, float] | None = None) -> list[float]:
    """Seconds from each record's creation (or from `since[seq]`, e.g. its acknowledgement) to its arrival."""
    out, start = [], 0
    for arrived, size, _ in received.arrivals:
        piece = bytes(received.data[start : start + size])
        out += [arrived - (since[int(m[2])] if since else float(m[3])) for m in RECORD.finditer(piece)]
        start += size
    return out


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


# --- the in-process Python API as a third process --------------------------------------------------

SDK_WRITER = """
import asyncio, sys, time
from streamhold.sdk.context import create_agent_context

async def main(count: int, gap: float) -> None:
    async with create_agent_context() as ctx:
        stream = await ctx.stream.create("scale", content_type="text/plain")
        print(stream.id, flush=True)
        if (await asyncio.to_thread(sys.stdin.readline)).strip() != "go":
            return
        for seq in range(count):
            await stream.write(f"sdk:{seq:05d}:{time.time():.6f};")
            await asyncio.sleep(gap)
        await stream.close()
    print("done", flush=True)

asyncio.run(main(int(sys.argv[1]), float(sys.argv[2])))
"""


class SdkWriter:
    """A script using `create_agent_context()` (its own store and hub): creates a stream, writes on "go"."""

    def __init__(self, env: Mapping[str, str], count: int, gap: float) -> None:
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("STREAMHOLD_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SDK_WRITER, str(count), str(gap)],
            cwd=REPO_ROOT,
            env={**inherited, **env},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.stream_id = self._line(30).strip()
        assert self.stream_id.startswith("stream_"), f"SDK writer said {self.stream_id!r}: {self._stderr()}"

    def _line(self, within: float) -> str:
        assert self.proc.stdout is not None
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(self.proc.stdout.readline)
            try:
                return future.result(timeout=within).decode()
            except TimeoutError:
                self.proc.kill()
                raise AssertionError(f"SDK writer said nothing within {within} s: {self._stderr()}") from None

    def _stderr(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        stream: IO[bytes] | None = self.proc.stderr
        return stream.read().decode(errors="replace") if stream is not None else ""

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()

    async def finish(self, within: float = 60.0) -> str:
        """Wait for the script to end; returns its stderr (log lines)."""
        try:
            out, err = await asyncio.to_thread(self.proc.communicate, timeout=within)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"SDK writer still running after {within} s") from None
        stderr = err.decode(errors="replace")
        code = self.proc.returncode
        assert code == 0 and b"done" in out, f"SDK writer failed ({code}): {stderr}"
        return stderr

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
