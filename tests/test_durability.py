"""Nothing acknowledged is lost, whatever happens to the process; memory stays flat on large streams."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from pathlib import Path

import httpx
import pytest

from streamhold.models import parse_offset
from streamhold.store.chunk_files import FILE_CHUNK_MIN
from tests._server import ServerProcess

pytestmark = pytest.mark.timeout(240)

RECORD = re.compile(rb"<w(\d+):(\d+):x*>\n")


class MemoryPeak:
    """Samples a process's private (anonymous) and file-mapped resident memory, keeping the peaks in MiB.

    File-mapped pages are SQLite's memory map of the database file: page cache the kernel can drop,
    bounded by the mmap_size pragma; the private pages are what the server itself holds.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = {"RssAnon": 0.0, "RssFile": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                key = line.split(":", 1)[0]
                if key in self.peak:
                    self.peak[key] = max(self.peak[key], int(line.split()[1]) / 1024)
            time.sleep(0.01)

    def __enter__(self) -> MemoryPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


async def storm(
    url: str, name: str, writers: int, seconds: float, acknowledged: dict[bytes, int], large: bool = False
) -> None:
    """Concurrent appends until the server dies, noting each acknowledged record with its next offset.

    With `large`, a quarter of the writers send records big enough for chunk files.
    """
    deadline = time.monotonic() + seconds

    async def writer(w: int) -> None:
        async with httpx.AsyncClient(timeout=5) as client:
            seq = 0
            while time.monotonic() < deadline:
                pad = (w * 7 + seq * 13) % 90
                if large and w % 4 == 0:
                    pad += FILE_CHUNK_MIN + seq * 1013 % 40000
                record = b"<w%d:%d:%s>\n" % (w, seq, b"x" * pad)
                try:
                    response = await client.post(
                        f"{url}/v1/stream/{name}", content=record, headers={"content-type": "text/plain"}
                    )
                except httpx.HTTPError:
                    return  # the server is gone; nothing after this was acknowledged
                if response.status_code != 204:
                    return
                acknowledged[record] = parse_offset(response.headers["stream-next-offset"]) or 0
                seq += 1

    await asyncio.gather(*(writer(w) for w in range(writers)))


@pytest.mark.parametrize(
    ("large", "database"),
    [(False, "sqlite"), (True, "sqlite"), (False, "postgres")],
    ids=["small", "with-large", "postgres"],
)
async def test_sigkill_in_a_storm_of_appends_loses_nothing_acknowledged(
    tmp_path: Path, large: bool, database: str, request: pytest.FixtureRequest
) -> None:
    env = {"STREAMHOLD_DATA_DIR": str(tmp_path / "data")}
    if database == "postgres":  # several batches in flight at once, each on a connection of its own
        env["STREAMHOLD_DATABASE_URL"] = request.getfixturevalue("pg_url")
    with ServerProcess(env=env) as server:
        async with httpx.AsyncClient() as client:
            created = await client.put(
                f"{server.url}/v1/stream/crash", headers={"content-type": "text/plain"}
            )
            assert created.status_code == 201
        loop = asyncio.get_running_loop()
        acknowledged: dict[bytes, int] = {}
        storming = asyncio.ensure_future(storm(server.url, "crash", 16, 30, acknowledged, large))
        deadline = time.monotonic() + 20
        while len(acknowledged) < 300 and time.monotonic() < deadline:  # noqa: ASYNC110 - polls another task's progress
            await asyncio.sleep(0.05)
        await loop.run_in_executor(None, server.kill)
        await storming
        assert len(acknowledged) >= 300, "the storm was under way when the process was killed"
        await loop.run_in_executor(None, server.restart)
        async with httpx.AsyncClient(timeout=30) as client:
            body = (await client.get(f"{server.url}/v1/stream/crash")).content

    if large:
        assert any((tmp_path / "data" / "streamhold.db-chunks").iterdir()), "large records are in a file"
    records = RECORD.findall(body)
    assert b"".join(RECORD.sub(b"", body)) == b"", "nothing torn: the content is whole records only"
    last_seq: dict[bytes, int] = {}
    for w, seq in records:
        assert int(seq) == last_seq.get(w, -1) + 1, "each writer's records are in call order, without gaps"
        last_seq[w] = int(seq)
    for record, offset in acknowledged.items():
        assert body[offset - len(record) : offset] == record, (
            "an acknowledged record is where its offset says"
        )


async def test_writing_and_reading_256_mib_keeps_memory_flat(tmp_path: Path) -> None:
    env = {"STREAMHOLD_DATA_DIR": str(tmp_path / "data")}
    piece = bytes(range(256)) * 16384  # 4 MiB
    total = 64 * len(piece)
    with ServerProcess(env=env) as server:
        async with httpx.AsyncClient(timeout=60) as client:
            url = f"{server.url}/v1/stream/big"
            assert (
                await client.put(url, headers={"content-type": "application/octet-stream"})
            ).status_code == 201
            with MemoryPeak(server.pid) as idle:
                await asyncio.sleep(0.3)
            baseline = idle.peak["RssAnon"]
            sampler = MemoryPeak(server.pid).__enter__()
            for _ in range(64):
                response = await client.post(
                    url, content=piece, headers={"content-type": "application/octet-stream"}
                )
                assert response.status_code == 204
            offset, received = "-1", 0
            while True:
                async with client.stream("GET", url, params={"offset": offset}) as response:
                    assert response.status_code == 200
                    async for chunk in response.aiter_bytes():
                        assert chunk == piece[received % len(piece) :][: len(chunk)] or _matches(
                            piece, received, chunk
                        )
                        received += len(chunk)
                    offset = response.headers["stream-next-offset"]
                    if response.headers.get("stream-up-to-date") == "true":
                        break
            sampler.__exit__()
    assert received == total
    peak = sampler.peak["RssAnon"]
    print(
        f"server private memory peak {peak:.0f} MiB (idle {baseline:.0f} MiB), "
        f"database file mapping peak {sampler.peak['RssFile']:.0f} MiB, for a {total >> 20} MiB stream"
    )
    assert peak - baseline < 96, f"private memory grew by {peak - baseline:.0f} MiB while moving 256 MiB"


def _matches(piece: bytes, position: int, chunk: bytes) -> bool:
    repeated = piece * 3
    start = position % len(piece)
    return repeated[start : start + len(chunk)] == chunk


async def test_sigkill_among_concurrent_creates_loses_no_acknowledged_stream(tmp_path: Path) -> None:
    """Creates share commits: each is acknowledged only once its shared commit is done."""
    acknowledged: list[str] = []
    with ServerProcess(env={"STREAMHOLD_DATA_DIR": str(tmp_path / "data")}) as server:
        stop = time.monotonic() + 30

        async def creator(c: int) -> None:
            async with httpx.AsyncClient(timeout=5) as client:
                for i in range(10_000):
                    if time.monotonic() > stop:
                        return
                    name = f"made/{c}/{i}"
                    try:
                        response = await client.put(f"{server.url}/v1/stream/{name}")
                    except httpx.HTTPError:
                        return  # the server is gone; nothing after this was acknowledged
                    if response.status_code != 201:
                        return
                    acknowledged.append(name)

        loop = asyncio.get_running_loop()
        creating = asyncio.ensure_future(asyncio.gather(*(creator(c) for c in range(16))))
        deadline = time.monotonic() + 20
        while len(acknowledged) < 300 and time.monotonic() < deadline:  # noqa: ASYNC110 - polls another task's progress
            await asyncio.sleep(0.05)
        await loop.run_in_executor(None, server.kill)
        await creating
        assert len(acknowledged) >= 300, "the creates were under way when the process was killed"
        await loop.run_in_executor(None, server.restart)
        async with httpx.AsyncClient(timeout=30) as client:
            missing = [
                name
                for name in acknowledged
                if (await client.head(f"{server.url}/v1/stream/{name}")).status_code != 200
            ]
    assert missing == [], "every acknowledged create exists after kill -9"
