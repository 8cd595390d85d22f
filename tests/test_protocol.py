"""The protocol beyond the conformance suite: one record for all surfaces, live wake-ups, limits, shutdown."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import random
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from litestar import Request, post
from litestar.di import NamedDependency
from litestar.params import FromPath

from streamhold.main import create_app
from streamhold.protocol import wire
from streamhold.sdk.base import StreamService
from streamhold.settings import Settings
from streamhold.store.chunk_files import FILE_CHUNK_MIN
from streamhold.store.store import Store
from tests._cluster import Labels, metric, parse_metrics
from tests._server import ServerProcess, free_port

pytestmark = pytest.mark.timeout(90)

RESPONSES = "streamhold_http_responses_total"
READERS = "streamhold_live_readers"


@post("/test/write/{stream_id:str}", status_code=204)
async def write_in_process(
    stream_id: FromPath[str], request: Request[Any, Any, Any], stream: NamedDependency[StreamService]
) -> None:
    """Appends through the in-process store (not the protocol), the way an agent in this process would."""
    await stream.store.append(stream_id, await request.body())  # type: ignore[attr-defined]


async def scrape(http: httpx.AsyncClient, url: str) -> dict[str, dict[Labels, float]]:
    """The server's metric samples by name."""
    return parse_metrics((await http.get(f"{url}/metrics")).text)


class ThreadServer:
    """The app under uvicorn in a thread, so tests can drive live HTTP responses against it."""

    def __init__(self, settings: Settings) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = create_app(settings, route_handlers=[write_in_process])
        self.app = app
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def store(self) -> Store:
        store: Store = self.app.state.store  # set when the app starts
        return store

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def live_server(settings: Settings) -> Iterator[ThreadServer]:
    with ThreadServer(settings) as server:
        yield server


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as http:
        yield http


async def sse_events(response: httpx.Response, until: int) -> AsyncIterator[str]:
    buffer = ""
    seen = 0
    async for text in response.aiter_text():
        buffer += text
        while "\n\n" in buffer:
            event, buffer = buffer.split("\n\n", 1)
            yield event
            seen += 1
            if seen >= until:
                return


async def test_sdk_streams_are_protocol_streams_and_back(
    live_server: ThreadServer, client: httpx.AsyncClient
) -> None:
    url = live_server.url
    made = await client.put(
        f"{url}/v1/stream/reports/q4", content=b"a,b\n", headers={"content-type": "text/csv"}
    )
    assert made.status_code == 201
    listed = await client.post(f"{url}/stream/list", json={"name": "reports"})
    streams = listed.json()["streams"]
    assert [s["name"] for s in streams] == ["reports"] and streams[0]["size_bytes"] == 4
    stream_id = streams[0]["id"]
    await client.post(f"{url}/v1/stream/reports/q4", headers={"stream-closed": "true"})
    via_service = await client.get(f"{url}/stream/{stream_id}")  # an open stream would be tailed
    assert via_service.content == b"a,b\n"
    created = (
        await client.post(f"{url}/stream", json={"name": "sdk", "headers": {"content-type": "text/plain"}})
    ).json()
    await client.post(f"{url}/stream/{created['id']}/append", content=b"from the sdk")
    read = await client.get(f"{url}/v1/stream/{created['id']}", params={"offset": "-1"})
    assert read.status_code == 200 and read.content == b"from the sdk"
    assert read.headers["content-type"] == "text/plain"


async def test_in_process_appends_wake_protocol_readers(
    live_server: ThreadServer, client: httpx.AsyncClient
) -> None:
    url = live_server.url
    await client.put(f"{url}/v1/stream/wake", headers={"content-type": "text/plain"})
    head = await client.head(f"{url}/v1/stream/wake")
    tail = head.headers["stream-next-offset"]
    stream_id = (await client.post(f"{url}/stream/list", json={"name": "default"})).json()["streams"][0]["id"]

    async def long_poll() -> httpx.Response:
        return await client.get(f"{url}/v1/stream/wake", params={"offset": tail, "live": "long-poll"})

    polling = asyncio.create_task(long_poll())
    async with client.stream("GET", f"{url}/v1/stream/wake", params={"offset": tail, "live": "sse"}) as sse:
        await asyncio.sleep(0.3)
        started = time.monotonic()
        assert (await client.post(f"{url}/test/write/{stream_id}", content=b"hello")).status_code == 204
        events = [e async for e in sse_events(sse, until=3)]
    polled = await polling
    assert time.monotonic() - started < 1.5, "readers are woken on commit, not at a timeout"
    assert polled.status_code == 200 and polled.content == b"hello"
    assert any("data:hello" in e for e in events)


async def test_sse_resumes_from_last_event_id(live_server: ThreadServer, client: httpx.AsyncClient) -> None:
    url = f"{live_server.url}/v1/stream/resume"
    await client.put(url, headers={"content-type": "text/plain"})
    for word in (b"one ", b"two ", b"three"):
        await client.post(url, content=word, headers={"content-type": "text/plain"})
    async with client.stream("GET", url, params={"offset": "-1", "live": "sse"}) as sse:
        first = [e async for e in sse_events(sse, until=1)][0]
    event_id = next(line[3:] for line in first.splitlines() if line.startswith("id:"))
    assert event_id.endswith("_0000000000000013") and len(event_id) == 33
    await client.post(url, content=b" four", headers={"content-type": "text/plain"})
    resumed = {"offset": "-1", "live": "sse"}
    async with client.stream("GET", url, params=resumed, headers={"last-event-id": event_id}) as sse:
        event = [e async for e in sse_events(sse, until=1)][0]
    assert "data: four\n" in event and "one" not in event


async def test_idle_sse_gets_keepalives(tmp_path: Path, client: httpx.AsyncClient) -> None:
    settings = Settings(data_dir=tmp_path, sse_keepalive=0.2)
    with ThreadServer(settings) as server:
        url = f"{server.url}/v1/stream/idle"
        await client.put(url, headers={"content-type": "text/plain"})
        async with client.stream("GET", url, params={"offset": "now", "live": "sse"}) as sse:
            events = [e async for e in sse_events(sse, until=3)]
    assert events[0].startswith("event: control") and events[1:] == [": keep-alive", ": keep-alive"]


async def test_append_over_the_limit_is_413_and_changes_nothing(
    tmp_path: Path, client: httpx.AsyncClient
) -> None:
    with ThreadServer(Settings(data_dir=tmp_path, max_append_bytes=1000)) as server:
        url = f"{server.url}/v1/stream/limited"
        await client.put(url, content=b"start", headers={"content-type": "text/plain"})
        refused = await client.post(url, content=b"x" * 1001, headers={"content-type": "text/plain"})
        assert refused.status_code == 413 and "at most 1000 bytes" in refused.json()["error"]
        accepted = await client.post(url, content=b"y" * 1000, headers={"content-type": "text/plain"})
        assert accepted.status_code == 204
        assert (await client.get(url)).content == b"start" + b"y" * 1000


async def test_appends_answer_with_the_api_headers_even_when_they_fail(
    live_server: ThreadServer, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"{live_server.url}/v1/stream/answers"
    text = {"content-type": "text/plain"}
    await client.put(url, headers=text)
    accepted = await client.post(url, content=b"a", headers=text)
    missing = await client.post(url + "-missing", content=b"a", headers=text)

    async def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the disk is gone")

    monkeypatch.setattr(Store, "append", broken)
    failed = await client.post(url, content=b"b", headers=text)
    assert [r.status_code for r in (accepted, missing, failed)] == [204, 404, 500]
    assert "not acknowledged" in failed.json()["error"] and "stream not found" in missing.json()["error"]
    for response in (accepted, missing, failed):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["content-security-policy"] == "sandbox"
        assert response.headers["access-control-allow-origin"] == "*"
    figures = await scrape(client, live_server.url)
    for code in ("204", "404", "500"):
        assert metric(figures, RESPONSES, method="POST", route="/v1/stream", code=code) == 1


@pytest.mark.parametrize("name", ["a//b", "a/../b", "./x", "trailing/", "ctl%01char", "x" * 513])
def test_bad_stream_names_are_400(live_server: ThreadServer, name: str) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", live_server.port, timeout=10)
    connection.request("PUT", f"/v1/stream/{name}", headers={"content-type": "text/plain"})  # sent verbatim
    response = connection.getresponse()
    assert response.status == 400
    assert "name" in json.loads(response.read())["error"]


async def test_graceful_shutdown_ends_live_responses_quickly(tmp_path: Path) -> None:
    env = {"STREAMHOLD_DATA_DIR": str(tmp_path), "STREAMHOLD_LONG_POLL_TIMEOUT": "30"}
    with ServerProcess(env=env) as server:
        async with httpx.AsyncClient(timeout=40) as http:
            url = f"{server.url}/v1/stream/shutdown"
            await http.put(url, headers={"content-type": "text/plain"})
            polling = asyncio.create_task(http.get(url, params={"offset": "now", "live": "long-poll"}))
            async with http.stream("GET", url, params={"offset": "now", "live": "sse"}) as sse:
                await asyncio.sleep(0.5)
                started = time.monotonic()
                os.kill(server.pid, signal.SIGTERM)
                async for _ in sse.aiter_bytes():
                    pass  # ends cleanly: the chunked body is terminated, no error raised
            polled = await polling
            assert polled.status_code == 204
            while server.running and time.monotonic() - started < 10:  # noqa: ASYNC110 - a child process
                await asyncio.sleep(0.05)
            assert not server.running
            assert time.monotonic() - started < 3, "live responses end within a second or two of SIGTERM"


async def test_a_slow_sse_reader_does_not_make_the_server_buffer(tmp_path: Path) -> None:
    env = {"STREAMHOLD_DATA_DIR": str(tmp_path)}
    piece = b"z" * (4 << 20)
    with ServerProcess(env=env) as server:
        async with httpx.AsyncClient(timeout=60) as http:
            url = f"{server.url}/v1/stream/slow"
            await http.put(url, headers={"content-type": "text/plain"})
            for _ in range(16):
                await http.post(url, content=piece, headers={"content-type": "text/plain"})

        def private_mib() -> float:
            for line in Path(f"/proc/{server.pid}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
            return 0.0

        before = private_mib()
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(b"GET /v1/stream/slow?offset=-1&live=sse HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            sock.recv(1024)  # then read nothing more: a reader that has stalled
            await asyncio.sleep(2)
            grown = private_mib() - before
    assert grown < 24, f"the server buffered {grown:.0f} MiB for a stalled reader of a 64 MiB stream"


def _octets_head(name: str, length: int) -> bytes:
    """The request line and headers of a raw HTTP append of `length` bytes, for a client that may stall."""
    return (
        f"POST /v1/stream/{name} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


async def test_a_large_body_goes_to_disk_as_it_arrives_and_a_cut_one_commits_nothing(tmp_path: Path) -> None:
    body = random.Random(9).randbytes(4 * FILE_CHUNK_MIN)
    octets = {"content-type": "application/octet-stream"}
    with ThreadServer(Settings(data_dir=tmp_path)) as server:
        async with httpx.AsyncClient(timeout=30) as http:
            url = f"{server.url}/v1/stream/spooled"
            await http.put(url, headers=octets)
            with socket.create_connection(("127.0.0.1", server.port)) as sock:
                sock.sendall(_octets_head("spooled", len(body)) + body[: len(body) // 2])
                await asyncio.sleep(0.2)  # the server has half of the body; then the client goes away
            cut = {"method": "POST", "route": "/v1/stream", "code": "400"}
            deadline = time.monotonic() + 5
            while metric(await scrape(http, server.url), RESPONSES, **cut) != 1:
                assert time.monotonic() < deadline, "the cut-off append was not answered"
                await asyncio.sleep(0.05)
            assert (await http.post(url, content=body, headers=octets)).status_code == 204
            closing = {**octets, "stream-closed": "true"}
            assert (await http.post(url, content=body, headers=closing)).status_code == 204
            assert server.store.writer.spooled == 2, "both bodies were in the file before their commit"
            read = await http.get(url, params={"offset": "-1"})
    assert read.content == body * 2
    assert read.headers["stream-closed"] == "true"


@pytest.mark.parametrize("client", ["silent", "trickling"])
async def test_a_stalled_large_body_lets_go_of_its_stream_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client: str
) -> None:
    """While a client pauses mid-body, or sends it too slowly, the stream's other large appends still go to
    its file; the slow append, once whole, lands after them."""
    if client == "silent":
        monkeypatch.setattr(wire, "SPOOL_PATIENCE_S", 0.2)
    else:
        monkeypatch.setattr(wire, "SPOOL_HOLD_S", 0.3)
    slow, other = random.Random(10).randbytes(2 * FILE_CHUNK_MIN), random.Random(11).randbytes(FILE_CHUNK_MIN)
    octets = {"content-type": "application/octet-stream"}
    with ThreadServer(Settings(data_dir=tmp_path)) as server:
        async with httpx.AsyncClient(timeout=30) as http:
            url = f"{server.url}/v1/stream/slow"
            await http.put(url, headers=octets)
            with socket.create_connection(("127.0.0.1", server.port)) as sock:
                sock.sendall(_octets_head("slow", len(slow)) + slow[:1000])
                sent = 1000
                for _ in range(12):  # 0.6 s
                    await asyncio.sleep(0.05)
                    if client == "trickling":
                        sock.sendall(slow[sent : sent + 10])
                        sent += 10
                assert (await http.post(url, content=other, headers=octets)).status_code == 204
                assert server.store.writer.spooled == 1, "the other append's body went to the file as it came"
                sock.sendall(slow[sent:])
                assert sock.recv(1024).startswith(b"HTTP/1.1 204")
            read = await http.get(url, params={"offset": "-1"})
    assert read.content == other + slow


@pytest.mark.parametrize(
    "scope",
    [
        {"scheme": "http", "server": ("127.0.0.1", 8000), "headers": [(b"host", b"example.test:8000")]},
        {"scheme": "https", "server": ("10.0.0.1", 443), "headers": []},
        {"scheme": "http", "server": ("10.0.0.1", 8080), "headers": [], "root_path": "/base"},
        {"scheme": "http", "server": None, "headers": [(b"host", b"h.test")], "app_root_path": "/app"},
    ],
)
def test_a_created_streams_location_is_the_request_url(scope: dict[str, Any]) -> None:
    """The Location of a create, built from the ASGI scope, is what Litestar's request gives for it."""
    raw = b"/v1/stream/%C3%A9t%C3%A9/a%20b"
    full: Any = {"type": "http", "path": "/v1/stream/été/a b", "raw_path": raw + b"?x=1"}
    full.update(scope, query_string=b"x=1")
    expected = str(Request(full).base_url).rstrip("/") + raw.decode()
    assert wire.absolute_url(full) == expected
    assert wire.absolute_url(full) == expected  # and again, from the cache


async def test_unicode_names_and_sandboxed_content(
    live_server: ThreadServer, client: httpx.AsyncClient
) -> None:
    url = f"{live_server.url}/v1/stream/été/a b"
    made = await client.put(url, content=b"<script>alert(1)</script>", headers={"content-type": "text/html"})
    assert made.status_code == 201
    assert made.headers["location"].endswith("/v1/stream/%C3%A9t%C3%A9/a%20b")
    read = await client.get(made.headers["location"])
    assert read.content == b"<script>alert(1)</script>"
    assert read.headers["content-security-policy"] == "sandbox"


async def test_a_long_poll_reader_that_leaves_is_freed_at_once(tmp_path: Path) -> None:
    with ThreadServer(Settings(data_dir=tmp_path, long_poll_timeout=30)) as server:
        async with httpx.AsyncClient(timeout=60) as http:
            url = f"{server.url}/v1/stream/leaving"
            await http.put(url, headers={"content-type": "text/plain"})
            polling = asyncio.create_task(http.get(url, params={"offset": "now", "live": "long-poll"}))
            await asyncio.sleep(0.5)
            assert metric(await scrape(http, server.url), READERS, kind="long-poll") == 1
            polling.cancel()  # the client goes away mid-wait
            deadline = time.monotonic() + 5
            while metric(await scrape(http, server.url), READERS, kind="long-poll"):
                assert time.monotonic() < deadline, (
                    "the long-poll kept its registration after the client left"
                )
                await asyncio.sleep(0.1)
