"""A full disk: writes answer 507 on both HTTP APIs (StorageFullError in Python), never 500; readiness and
metrics say so; nothing acknowledged is damaged; and writes work again once space is freed, without a restart.

Each case runs a real server with its data directory on a small tmpfs (mounting one needs root).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from streamhold import RemoteStreams, StorageFullError, StreamError, create_agent_context
from streamhold.settings import Settings
from streamhold.store.disk import is_storage_full
from tests import _tmpfs as tmpfs
from tests._server import ServerProcess
from tests._tmpfs import fill

MIB = 1024 * 1024
PIECE = 32 * 1024  # stays in the database (below the chunk-file size)
BIG = 256 * 1024  # goes to the stream's chunk file
PROBE = 1024  # a small write; the store counts any write as taking at least a page or two
MAX_APPENDS = 2000
RESERVE = MIB


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB tmpfs in the test's folder."""
    with tmpfs.small_disk(tmp_path / "disk", "32m") as folder:
        yield folder


def serve(data: Path, reserve: int) -> ServerProcess:
    env = {"STREAMHOLD_DATA_DIR": str(data / "data"), "STREAMHOLD_MIN_FREE_BYTES": str(reserve)}
    return ServerProcess(env=env, startup_timeout=60)  # a loaded machine starts slowly


class Client:
    """An HTTP client that records every status it sees and the bytes each stream acknowledged."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=30)
        self.statuses: list[int] = []
        self.acked: dict[str, bytearray] = {}  # write path -> acknowledged content
        self.read_path: dict[str, str] = {}  # write path -> protocol path (an open /stream GET never ends)

    def request(self, method: str, path: str, **options: object) -> httpx.Response:
        response = self.http.request(method, path, **options)  # type: ignore[arg-type]
        if path != "/readyz":  # which answers 503 while storage is full, as it should
            self.statuses.append(response.status_code)
        return response

    def create(self, name: str) -> str:
        path = f"/v1/stream/{name}"
        assert self.request("PUT", path, headers={"content-type": "text/plain"}).status_code == 201
        self.acked[path] = bytearray()
        return path

    def append(self, path: str, data: bytes) -> httpx.Response:
        response = self.request("POST", path, content=data, headers={"content-type": "text/plain"})
        if response.status_code in (200, 204):
            self.acked[path] += data
        return response

    def agentuity_create(self) -> str:
        created = self.request("POST", "/stream", json={"name": "disk"})
        assert created.status_code == 200, created.text
        path = f"/stream/{created.json()['id']}"
        self.acked[path] = bytearray()
        self.read_path[path] = f"/v1/stream/{created.json()['protocol_name']}"
        return path

    def agentuity_append(self, path: str, data: bytes) -> httpx.Response:
        response = self.request("POST", f"{path}/append", content=data)
        if response.status_code in (200, 204):
            self.acked[path] += data
        return response

    def check_content(self) -> None:
        """Every acknowledged byte is there, in order, and nothing else."""
        for path, data in self.acked.items():
            content = self.read(self.read_path.get(path, path))
            assert content == bytes(data), f"{path}: not the {len(data)} acknowledged bytes"

    def read(self, path: str) -> bytes:
        content, offset = b"", "-1"
        for _ in range(1000):  # the protocol answers a catch-up read in slices
            response = self.request("GET", path, params={"offset": offset})
            assert response.status_code == 200, (path, response.status_code)
            content += response.content
            offset = response.headers["stream-next-offset"]
            if response.headers.get("stream-up-to-date") == "true":
                return content
        raise AssertionError(f"{path}: read did not reach the tail")

    def assert_no_server_errors(self) -> None:
        assert not [s for s in self.statuses if s >= 500 and s != 507], sorted(set(self.statuses))

    def metric(self, name: str) -> float:
        for line in self.request("GET", "/metrics").text.splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
        raise AssertionError(f"no {name} in /metrics")


def assert_full(response: httpx.Response) -> None:
    assert response.status_code == 507, (response.status_code, response.text)
    message = response.json()["error"]
    assert "nothing was stored" in message and "delete streams" in message, message


def fill_until_refused(client: Client, paths: list[str], size: int) -> tuple[httpx.Response, int]:
    """Append `size` bytes to `paths` in turn until one is refused; returns (the refusal, appends before)."""
    for n in range(MAX_APPENDS):
        response = client.append(paths[n % len(paths)], bytes([65 + n % 26]) * size)
        if response.status_code == 507:
            return response, n
        assert response.status_code == 204, (response.status_code, response.text)
    raise AssertionError(f"no refusal after {MAX_APPENDS} appends")


def wal_emptied(data: Path) -> bool:
    """Wait for the idle writer's checkpoint, which empties the WAL and cuts it off when space is short."""
    wal = data / "data" / "streamhold.db-wal"
    return wait_for(lambda: not wal.exists() or wal.stat().st_size == 0)


def stay_below_reserve(client: Client, disk: Path, path: str) -> None:
    """Bring free space (as the server counts it) to half the reserve, where it stays while nothing is freed.

    Short of space, the idle writer checkpoints the WAL and cuts it off, which gives space back; and the
    database's free pages (left by compaction) count as free too: appends use those up first.
    """
    target = RESERVE // 2
    for n in range(20):
        assert wal_emptied(disk)
        free, stats = client.metric("streamhold_storage_free_bytes"), os.statvfs(disk)
        room = stats.f_bavail * stats.f_frsize
        if free <= target:
            return
        if free - room > target // 2:
            fill_until_refused(client, [path], PIECE)
        else:
            fill(disk / f"ballast{n}", leave=int(room - (free - target)))
    raise AssertionError("free space did not stay below the reserve")


def wait_for(condition: object, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def test_reserve_refuses_writes_and_a_delete_brings_them_back(small_disk: Path) -> None:
    """Below the reserve appends and creates get 507 on both APIs; DELETE works and writes resume."""
    with serve(small_disk, reserve=RESERVE) as server:
        client = Client(server.url)
        big, small = client.create("big"), client.create("small")
        agentuity = client.agentuity_create()
        assert client.agentuity_append(agentuity, b"before\n").status_code == 204
        fill(small_disk / "ballast", leave=8 * MIB)

        assert_full(fill_until_refused(client, [big] * 7 + [small], PIECE)[0])
        stay_below_reserve(client, small_disk, big)
        assert_full(client.append(big, b"r" * PROBE))
        assert_full(client.agentuity_append(agentuity, b"r" * PROBE))
        assert_full(client.request("PUT", "/v1/stream/new", headers={"content-type": "text/plain"}))
        assert_full(client.request("POST", "/stream", json={"name": "new"}))
        with pytest.raises(StorageFullError, match="nothing was stored"):
            asyncio.run(remote_create(server.url))  # the remote Python API raises it too
        assert client.metric("streamhold_storage_full_total") >= 5
        ready = client.request("GET", "/readyz")
        assert ready.status_code == 503 and "reserve" in ready.json()["storage"], ready.text
        assert "storage-full" in client.request("GET", "/").text  # the dashboard's banner
        client.check_content()

        # A close without bytes still goes through: it needs next to no space.
        assert client.request("POST", small, headers={"stream-closed": "true"}).status_code == 204
        assert client.request("DELETE", big).status_code == 204
        del client.acked[big]
        assert wait_for(lambda: client.agentuity_append(agentuity, b"after\n").status_code == 204)
        assert client.request("GET", "/readyz").status_code == 200
        assert "storage-full" not in client.request("GET", "/").text
        client.create("new")
        client.check_content()
        client.assert_no_server_errors()


def test_full_disk_answers_507_and_writes_resume_when_space_is_freed(small_disk: Path) -> None:
    """Without a reserve the disk itself fills (database and chunk files): 507, never 500, no hole."""
    ballast = small_disk / "ballast"
    with serve(small_disk, reserve=0) as server:
        client = Client(server.url)
        files, rows = client.create("files"), client.create("rows")
        agentuity = client.agentuity_create()
        fill(ballast, leave=4 * MIB)

        assert_full(fill_until_refused(client, [files], BIG)[0])
        assert_full(fill_until_refused(client, [rows], PIECE)[0])
        assert_full(client.agentuity_append(agentuity, b"x" * PIECE))
        ready = client.request("GET", "/readyz")
        assert ready.status_code == 503 and "storage" in ready.json(), ready.text
        assert client.metric("streamhold_storage_full_total") >= 3
        client.check_content()

        ballast.unlink()
        assert wait_for(lambda: client.append(rows, b"after\n").status_code == 204)
        assert client.append(files, b"y" * BIG).status_code == 204
        assert client.agentuity_append(agentuity, b"after\n").status_code == 204
        assert wait_for(lambda: client.request("GET", "/readyz").status_code == 200)
        client.check_content()
        client.assert_no_server_errors()


async def test_python_api_raises_storage_full_error(small_disk: Path) -> None:
    """In process, a write that cannot be stored raises StorageFullError, a StreamError; later writes work."""
    assert issubclass(StorageFullError, StreamError)
    settings = Settings(data_dir=small_disk / "data", min_free_bytes=2 * MIB)
    async with create_agent_context(settings) as ctx:
        stream = await ctx.stream.create("disk")
        await stream.write(b"kept\n")
        fill(small_disk / "ballast", leave=MIB)
        with pytest.raises(StorageFullError, match="nothing was stored"):
            await stream.write(b"x" * PIECE)
        with pytest.raises(StorageFullError):
            await ctx.stream.create("disk")
        (small_disk / "ballast").unlink()
        await asyncio.sleep(0.3)  # free space is read at most every 0.2 s
        fresh = await ctx.stream.create("disk")
        await fresh.write(b"again\n")
        await fresh.close()
        assert b"".join([c async for c in ctx.stream.download(fresh.id)]) == b"again\n"
        # The stream whose write failed refuses later writes (they would follow a hole) and keeps its bytes.
        with pytest.raises(StorageFullError):
            await stream.write(b"later\n")
        assert (await ctx.stream.get(stream.id)).size_bytes == len(b"kept\n")
        assert await ctx.stream.store.read(stream.id, 0, 5) == b"kept\n"  # type: ignore[attr-defined]


def test_disk_full_errors_are_told_apart() -> None:
    """SQLite's SQLITE_FULL, ENOSPC/EDQUOT and PostgreSQL's SQLSTATE 53100 are a full disk; others are not."""
    import errno
    import sqlite3

    import psycopg.errors
    from sqlalchemy.exc import OperationalError

    full_sqlite = sqlite3.OperationalError("database or disk is full")
    assert is_storage_full(full_sqlite)
    assert is_storage_full(OperationalError("INSERT", {}, full_sqlite))
    assert is_storage_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_storage_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_storage_full(psycopg.errors.DiskFull("could not extend file"))
    assert not is_storage_full(sqlite3.OperationalError("database is locked"))
    assert not is_storage_full(OSError(errno.EIO, "Input/output error"))
    assert not is_storage_full(psycopg.errors.UniqueViolation("duplicate key"))


async def remote_create(url: str) -> None:
    async with RemoteStreams(url) as streams:
        await streams.create("disk")
