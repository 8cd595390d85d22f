"""Idle SSE readers, one per stream, on a real server: what each costs its memory, and that each hears it.

The readers are raw sockets (the benchmarks' recorder), so the test process stays small. Measured here, 400
readers cost 22 KiB each when SSE reads went through the framework's request path, and 12 KiB since; with
10,000 (`python -m benchmarks.run --only readers-10k`) it was 31 KiB, now 17.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from benchmarks.config import Target
from benchmarks.fanout import Recorder
from benchmarks.proto import Streams, stream_path
from benchmarks.scale import create_all
from benchmarks.stats import encode_mark
from benchmarks.wire import Origin, parse_origin
from tests._server import ServerProcess, settled_rss

pytestmark = pytest.mark.timeout(120)

READERS = 400
WARM_UP = 40  # readers that come and go before the baseline, so that one-time costs land in it
KIB_PER_READER = 17  # the bound: 22 KiB before, 12 KiB measured since
TEXT = "text/plain"


async def _open(origin: Origin, names: list[str]) -> list[Recorder]:
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(50)

    async def one(name: str) -> Recorder:
        request = (
            f"GET {stream_path(origin, name)}?offset=-1&live=sse HTTP/1.1\r\n"
            f"Host: {origin.host}:{origin.port}\r\n\r\n"
        ).encode()
        async with gate:
            recorder = Recorder(request)
            await asyncio.wait_for(loop.create_connection(lambda: recorder, origin.host, origin.port), 30)
            await asyncio.wait_for(recorder.ready, 30)
            return recorder

    return list(await asyncio.gather(*(one(name) for name in names)))


def _heard(recorder: Recorder) -> bool:
    return any(b"event: data" in chunk for _, chunk in recorder.chunks)


async def _idle_readers(server: ServerProcess) -> tuple[float, list[int]]:
    """(KiB of server memory per idle reader, indexes of the readers that did not hear their append)."""
    origin = parse_origin(server.url)
    names = [Target("test", origin, server.pid, "idle").stream_name(str(i)) for i in range(WARM_UP + READERS)]
    await create_all(Target("test", origin, server.pid, "idle"), names, 8, TEXT)
    for recorder in await _open(origin, names[:WARM_UP]):
        recorder.close()
    await asyncio.sleep(0.5)
    before = await asyncio.to_thread(settled_rss, server.pid, 3)
    readers = await _open(origin, names[WARM_UP:])
    streams = Streams(origin)
    try:
        grown = await asyncio.to_thread(settled_rss, server.pid, 5) - before
        for i, name in enumerate(names[WARM_UP:]):
            await streams.append(name, encode_mark(i), TEXT)
        for _ in range(300):
            if all(_heard(r) for r in readers):
                break
            await asyncio.sleep(0.1)
        missing = [i for i, r in enumerate(readers) if [seq for seq, _, _ in r.marks()] != [i]]
        open_at_end = sum(1 for r in readers if not r.closed.done())
    finally:
        streams.client.close()
        for recorder in readers:
            recorder.close()
    assert open_at_end == READERS, f"{READERS - open_at_end} readers were closed by the server"
    return grown / READERS / 1024, missing


def test_idle_sse_readers_cost_little_memory_and_each_hears_its_stream(tmp_path: Path) -> None:
    with ServerProcess(env={"STREAMHOLD_DATA_DIR": str(tmp_path)}) as server:
        per_reader, missing = asyncio.run(_idle_readers(server))
    print(f"{READERS} idle SSE readers: {per_reader:.1f} KiB of server memory each")
    assert not missing, f"{len(missing)} of {READERS} readers did not get their append, e.g. {missing[:5]}"
    assert per_reader < KIB_PER_READER, (
        f"an idle SSE reader cost the server {per_reader:.1f} KiB (bound {KIB_PER_READER} KiB)"
    )
