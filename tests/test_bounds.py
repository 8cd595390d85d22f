"""What one client can cost the server: memory per reader, time on the event loop, connections held.

Each test plays the client a hostile or careless user would write, against a real server subprocess,
and measures the server process itself (its resident memory, how long /healthz takes meanwhile).
"""

from __future__ import annotations

import asyncio
import gzip
import random
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from sqlalchemy import select, update

from app import transactions
from app.models import GzipChunkRow, StreamRow
from app.settings import Settings
from app.store import NewStream, Store
from tests._server import ServerProcess

MIB = 1024 * 1024
ZEROS = 160 * MIB  # stored gzipped in about 160 KB


def _peak_rss(pid: int) -> int:
    """The process's resident memory high-water mark (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


class _HealthProbe:
    """Times GET /healthz over and over on a thread, until stopped; keeps the slowest."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.slowest = 0.0
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            for _ in range(2000):
                if self._stop.is_set():
                    return
                began = time.perf_counter()
                assert client.get(f"{self.url}/healthz").status_code == 200
                self.slowest = max(self.slowest, time.perf_counter() - began)
                self.count += 1
                time.sleep(0.005)

    def __enter__(self) -> _HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)


async def _zeros_stream(data_dir: Path) -> str:
    """A closed stream of ZEROS zero bytes, compressed at close; its id."""
    async with Store.open(Settings(data_dir=data_dir)) as store:
        state, _ = await store.create(NewStream(namespace="bounds", content_type="application/octet-stream"))
        block = bytes(4 * MIB)
        for _ in range(ZEROS // len(block)):
            await store.append(state.id, block)
        await store.append(state.id, b"", close=True, compress=True)
        await store.finish(state.id)
        closed = await store.get(state.id)
        assert closed is not None and closed.compressed and closed.stored_bytes < 2 * MIB
        return state.id


@pytest.fixture(scope="module")
def zeros(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str]]:
    data_dir = tmp_path_factory.mktemp("zeros")
    stream_id = asyncio.run(_zeros_stream(data_dir))
    with ServerProcess(env={"STREAMHOLD_DATA_DIR": str(data_dir)}) as server:
        yield server, stream_id


def test_reading_a_highly_compressed_stream_costs_little_memory_and_no_stall(
    zeros: tuple[ServerProcess, str],
) -> None:
    """A plain read of a stream that inflates 1000-fold is inflated in bounded slices, not whole."""
    server, stream_id = zeros
    plain = {"accept-encoding": "identity"}
    with httpx.Client(timeout=60) as client:
        assert client.get(f"{server.url}/stream/{stream_id}", headers={**plain, "range": "bytes=0-9"}).content
        before = psutil.Process(server.pid).memory_info().rss
        received = 0
        with _HealthProbe(server.url) as probe:
            with client.stream("GET", f"{server.url}/stream/{stream_id}?offset=5", headers=plain) as response:
                assert response.status_code == 200
                for piece in response.iter_raw():
                    assert not piece.strip(b"\0"), "the content is zeros"
                    received += len(piece)
        grown = _peak_rss(server.pid) - before
    assert received == ZEROS - 5
    assert grown < 40 * MIB, f"one plain read of the stream grew the server by {grown / MIB:.0f} MiB"
    assert probe.count and probe.slowest < 0.1, f"/healthz took {probe.slowest * 1000:.0f} ms during the read"


def test_a_deep_range_of_a_compressed_stream_inflates_only_near_it(zeros: tuple[ServerProcess, str]) -> None:
    server, stream_id = zeros
    deep = ZEROS - 3 * MIB
    headers = {"accept-encoding": "identity", "range": f"bytes={deep}-{deep + 999}"}
    with httpx.Client(timeout=60) as client:
        client.get(f"{server.url}/healthz")
        cpu = psutil.Process(server.pid).cpu_times()
        began = time.perf_counter()
        response = client.get(f"{server.url}/stream/{stream_id}", headers=headers)
        took = time.perf_counter() - began
        spent = sum(psutil.Process(server.pid).cpu_times()[:2]) - sum(cpu[:2])
    assert response.status_code == 206 and response.content == bytes(1000)
    assert response.headers["content-range"] == f"bytes {deep}-{deep + 999}/{ZEROS}"
    assert took < 0.25 and spent < 0.15, f"a 1000-byte range took {took:.2f} s, {spent:.2f} s of CPU"


def test_the_stored_gzip_body_is_still_served_as_is(zeros: tuple[ServerProcess, str]) -> None:
    server, stream_id = zeros
    with httpx.Client(timeout=60) as client:
        raw = client.get(f"{server.url}/stream/{stream_id}", headers={"accept-encoding": "gzip"})
    assert raw.headers["content-encoding"] == "gzip"
    assert int(raw.headers["content-length"]) < 2 * MIB
    assert raw.content == bytes(ZEROS)  # one gzip body, which any client inflates whole


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    async with Store.open(settings) as opened:
        yield opened


async def _read(store: Store, stream_id: str, start: int, end: int) -> bytes:
    state = await store.get(stream_id)
    assert state is not None
    return b"".join([piece async for piece in store.iter_content(state, start, end)])


async def test_reads_from_any_offset_of_a_compressed_stream_match_the_plain_bytes(store: Store) -> None:
    rng = random.Random(3)
    body = b"".join(b"%d,%s\n" % (i, rng.randbytes(rng.randrange(40)).hex().encode()) for i in range(90_000))
    state, _ = await store.create(NewStream(namespace="gz", content_type="text/csv"))
    await store.append(state.id, body)
    await store.append(state.id, b"", close=True, compress=True)
    await store.finish(state.id)
    with store._read_engine.connect() as conn:
        starts = conn.execute(
            select(GzipChunkRow.__table__.c.plain_start).where(GzipChunkRow.__table__.c.stream_id == state.id)
        ).scalars()
        assert sorted(starts) == list(range(0, len(body), transactions.SEEK_STEP))
    for start, end in [
        (0, len(body)),
        (1, 5),
        (MIB - 3, MIB + 3),
        (2 * MIB, 3 * MIB + 7),
        (len(body) - 9, len(body)),
    ]:
        assert await _read(store, state.id, start, end) == body[start:end]
    assert gzip.decompress(b"".join([p async for p in store.iter_gzip(state.id)])) == body


async def test_a_gzip_body_stored_without_seek_points_still_reads(store: Store) -> None:
    """Bodies compressed before seek points existed are one deflate stream cut into pieces."""
    body = bytes(3 * MIB) + b"end"
    state, _ = await store.create(NewStream(namespace="gz", content_type="application/octet-stream"))
    await store.append(state.id, b"x", close=True)
    packed = gzip.compress(body)
    table = GzipChunkRow.__table__
    with store._write_engine.begin() as conn:
        for seq, at in enumerate(range(0, len(packed), 1000)):
            conn.execute(table.insert().values(stream_id=state.id, seq=seq, data=packed[at : at + 1000]))
        conn.execute(
            update(StreamRow.__table__)
            .where(StreamRow.__table__.c.id == state.id)
            .values(compressed=True, stored_bytes=len(packed), tail=len(body))
        )
    assert await _read(store, state.id, 0, len(body)) == body
    assert await _read(store, state.id, 2 * MIB, len(body)) == body[2 * MIB :]
