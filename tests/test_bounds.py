"""What one client can cost the server: memory per reader, time on the event loop, connections held.

Each test plays the client a hostile or careless user would write, against a real server subprocess,
and measures the server process itself (its resident memory, how long /healthz takes meanwhile).
"""

from __future__ import annotations

import asyncio
import gzip
import random
import resource
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from sqlalchemy import select, update

from streamhold.settings import Settings
from streamhold.store import transactions
from streamhold.store.schema import GzipChunkRow, StreamRow
from streamhold.store.store import NewStream, Store
from tests._server import ServerProcess, settled_rss

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
        block = bytes(32 * MIB)
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


async def _plain_stream(data_dir: Path, size: int, close: bool = True) -> str:
    """An uncompressed stream of `size` bytes, closed unless asked; its id."""
    async with Store.open(Settings(data_dir=data_dir)) as store:
        state, _ = await store.create(NewStream(namespace="bounds", content_type="application/octet-stream"))
        for at in range(0, size, 32 * MIB):
            await store.append(state.id, bytes(min(32 * MIB, size - at)))
        if close:
            await store.append(state.id, b"", close=True)
        return state.id


def _stalled_reader(server: ServerProcess, path: str) -> socket.socket:
    """A client that asks for `path` and never reads the answer, with a small receive buffer."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept-Encoding: identity\r\n\r\n".encode())
    return sock


def _drain(sock: socket.socket, limit: float) -> tuple[int, bool]:
    """Read what the server sent, for at most `limit` seconds: (bytes received, whether it closed)."""
    sock.settimeout(0.5)
    received, deadline = 0, time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            data = sock.recv(1024 * 1024)
        except TimeoutError:
            return received, False
        except ConnectionResetError:
            return received, True
        if not data:
            return received, True
        received += len(data)
    return received, False


def test_clients_that_never_read_hold_little_memory(tmp_path: Path) -> None:
    """300 clients ask for a 32 MiB stream (by each way of reading it) and never read a byte."""
    stream_id = asyncio.run(_plain_stream(tmp_path, 32 * MIB))
    open_id = asyncio.run(_plain_stream(tmp_path, 32 * MIB, close=False))
    env = {"STREAMHOLD_DATA_DIR": str(tmp_path), "STREAMHOLD_SEND_TIMEOUT": "60"}
    with ServerProcess(env=env) as server:
        httpx.get(f"{server.url}/stream/{stream_id}", headers={"range": "bytes=0-9"})
        before = settled_rss(server.pid, 2)
        paths = [  # the content URL, a protocol catch-up, the viewer's download
            f"/stream/{stream_id}",
            f"/v1/stream/{stream_id}?offset=-1",
            f"/watch/{stream_id}?download=1",
            f"/stream/{open_id}",  # tailed
        ]
        readers = [_stalled_reader(server, paths[i % len(paths)]) for i in range(300)]
        try:
            grown = settled_rss(server.pid) - before
            assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200
        finally:
            for sock in readers:
                sock.close()
    assert grown < 100 * MIB, f"300 clients that never read grew the server by {grown / MIB:.0f} MiB"


def test_a_client_that_stops_reading_is_closed_after_the_send_timeout(tmp_path: Path) -> None:
    stream_id = asyncio.run(_plain_stream(tmp_path, 32 * MIB))
    env = {"STREAMHOLD_DATA_DIR": str(tmp_path), "STREAMHOLD_SEND_TIMEOUT": "1"}
    with ServerProcess(env=env) as server:
        with _stalled_reader(server, f"/stream/{stream_id}") as sock:
            time.sleep(3)
            received, closed = _drain(sock, 20)
    assert closed and received < 32 * MIB, f"got {received} bytes; the connection was {closed=}"


def test_sign_in_and_out_refuse_a_large_form_before_reading_it(tmp_path: Path) -> None:
    env = {"STREAMHOLD_DATA_DIR": str(tmp_path), "STREAMHOLD_API_KEYS": "k" * 32}
    body = b"key=" + b"x" * (5 * 1000 * 1000)
    with ServerProcess(env=env) as server:
        for path in ("/signin", "/signout"):
            response = httpx.post(
                f"{server.url}{path}",
                content=body,
                headers={"content-type": "application/x-www-form-urlencoded", "origin": server.url},
            )
            assert response.status_code == 413, (path, response.status_code)
        small = httpx.post(
            f"{server.url}/signin",
            data={"key": "k" * 32, "next": "/"},
            headers={"origin": server.url},
        )
        assert small.status_code == 303 and "set-cookie" in small.headers


def _closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed this non-blocking socket (what it sent before is read and dropped)."""
    for _ in range(100):
        try:
            if sock.recv(65536) == b"":
                return True
        except ConnectionResetError:
            return True
        except BlockingIOError:
            return False
    return False


def test_idle_and_slow_header_connections_are_closed(tmp_path: Path) -> None:
    env = {
        "STREAMHOLD_DATA_DIR": str(tmp_path),
        "STREAMHOLD_HEADER_TIMEOUT": "1",
        "STREAMHOLD_IDLE_TIMEOUT": "1",
    }
    with ServerProcess(env=env) as server:
        address = ("127.0.0.1", server.port)
        silent = socket.create_connection(address)
        slow = socket.create_connection(address)
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        kept = socket.create_connection(address)
        kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        kept.recv(65536)
        blank = socket.create_connection(address)  # blank lines between requests start none
        blank.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        blank.recv(65536)
        blank.sendall(b"\r\n")
        socks = (silent, slow, kept, blank)
        for sock in socks:
            sock.setblocking(False)
        for _ in range(8):  # a header line (or a blank one) every 0.4 s: slow, but never done
            time.sleep(0.4)
            for sock, line in ((slow, b"X-Trickle: 1\r\n"), (blank, b"\r\n")):
                try:
                    sock.sendall(line)
                except OSError:  # closed by the server
                    pass
        closed = [_closed_by_server(sock) for sock in socks]
        for sock in socks:
            sock.close()
    assert closed == [True] * 4, "(silent, slow headers, idle keep-alive, blank lines) closed"


def test_live_reads_outlast_the_idle_timeout(tmp_path: Path) -> None:
    env = {
        "STREAMHOLD_DATA_DIR": str(tmp_path),
        "STREAMHOLD_HEADER_TIMEOUT": "1",
        "STREAMHOLD_IDLE_TIMEOUT": "1",
        "STREAMHOLD_LONG_POLL_TIMEOUT": "5",
        "STREAMHOLD_SSE_KEEPALIVE": "5",
    }
    with ServerProcess(env=env) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        assert client.put("/v1/stream/quiet", headers={"content-type": "text/plain"}).status_code == 201
        results: dict[str, object] = {}

        def long_poll() -> None:
            results["poll"] = client.get("/v1/stream/quiet", params={"offset": "now", "live": "long-poll"})

        def sse() -> None:
            with client.stream("GET", "/v1/stream/quiet", params={"offset": "now", "live": "sse"}) as events:
                for line in events.iter_lines():
                    if line.startswith("data:") and "late" in line:
                        results["sse"] = line
                        return

        threads = [threading.Thread(target=long_poll), threading.Thread(target=sse)]
        for thread in threads:
            thread.start()
        time.sleep(2.5)
        late = client.post("/v1/stream/quiet", content=b"late", headers={"content-type": "text/plain"})
        assert late.is_success
        for thread in threads:
            thread.join(10)
    poll = results.get("poll")
    assert isinstance(poll, httpx.Response) and poll.status_code == 200 and poll.content == b"late"
    assert str(results.get("sse")).removeprefix("data:").strip() == "late"


def test_connections_past_the_cap_are_answered_503_with_retry_after(tmp_path: Path) -> None:
    env = {
        "STREAMHOLD_DATA_DIR": str(tmp_path),
        "STREAMHOLD_MAX_CONNECTIONS": "20",
        "STREAMHOLD_HEADER_TIMEOUT": "30",
    }
    with ServerProcess(env=env) as server:
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(25)]
        try:
            time.sleep(0.3)
            refused = httpx.get(f"{server.url}/healthz", timeout=5)
        finally:
            for sock in idle:
                sock.close()
        time.sleep(0.3)
        again = httpx.get(f"{server.url}/healthz", timeout=5)
    assert refused.status_code == 503 and refused.headers.get("retry-after"), refused
    assert again.status_code == 200


def test_the_server_raises_its_open_file_limit(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 512:
        pytest.skip("needs a finite hard limit on open files above 512")
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))  # the server inherits it
    try:
        with ServerProcess(env={"STREAMHOLD_DATA_DIR": str(tmp_path)}) as server:
            limits = psutil.Process(server.pid).rlimit(psutil.RLIMIT_NOFILE)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert limits == (hard, hard)


def _post_head(path: str, length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/octet-stream\r\n"
        f"content-length: {length}\r\n\r\n"
    ).encode()


def _answer(sock: socket.socket) -> bytes:
    """One whole response with a Content-Length body."""
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        assert piece, f"closed before a whole answer: {data!r}"
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(65536)
    return head


def _endless(sock: socket.socket, pause: float, limit: float) -> tuple[int, float]:
    """Send pieces of a body that never ends until the server closes: (bytes taken, seconds it took)."""
    chunk = bytes(64 * 1024)
    sent, began = 0, time.monotonic()
    try:
        while time.monotonic() - began < limit:
            sock.sendall(chunk)
            sent += 64 * 1024
            time.sleep(pause)
    except OSError:  # closed by the server
        pass
    return sent, time.monotonic() - began


def test_an_early_answer_reaches_the_client_and_the_rest_of_the_body_is_bounded(tmp_path: Path) -> None:
    """A refused body (413 before it is read) still gets its answer, sent at once or slowly; the server
    then reads and drops the rest, up to 16 MiB (or the append limit) and 5 s, and closes past that."""
    with ServerProcess(env={"STREAMHOLD_DATA_DIR": str(tmp_path)}) as server:
        path = "/v1/stream/early"
        httpx.put(server.url + path, headers={"content-type": "application/octet-stream"}).raise_for_status()
        address = ("127.0.0.1", server.port)
        for pause in (0.0, 0.02):  # all at once, then a mebibyte every 20 ms
            with socket.create_connection(address) as sock:
                sock.sendall(_post_head(path, 10 * MIB))
                for _ in range(10):
                    sock.sendall(bytes(MIB))
                    time.sleep(pause)
                assert _answer(sock).startswith(b"HTTP/1.1 413 ")
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                assert _answer(sock).startswith(b"HTTP/1.1 200 "), "the connection is still good"

        with socket.create_connection(address) as flood:  # as fast as loopback goes: bounded by bytes
            flood.sendall(_post_head(path, 2**40))  # refused at once: a terabyte declared
            taken, seconds = _endless(flood, 0.0, 30)
        print(f"a flood after the answer: {taken / MIB:.0f} MiB taken in {seconds:.2f} s")
        assert taken < 48 * MIB, "16 MiB are read after an early answer, and the sockets' buffers hold some"
        with socket.create_connection(address) as trickle:  # slowly: bounded by time
            trickle.sendall(_post_head(path, 2**40))
            taken, seconds = _endless(trickle, 0.1, 30)
        print(f"a trickle after the answer: {taken / MIB:.1f} MiB taken in {seconds:.2f} s")
        assert seconds < 8.5, "5 s of reading what follows an early answer, then the connection closes"
        assert httpx.get(server.url + "/healthz").status_code == 200
