"""Stopping a stream's writer: POST /stream/{id}/stop, seen in-process, remotely and on another process."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import create_engine, inspect, text

from streamhold import demo
from streamhold.live import LiveHub, encode_doorbells
from streamhold.main import create_app
from streamhold.models import Change
from streamhold.sdk.local import LocalStreams
from streamhold.sdk.remote import RemoteStreams, UnauthorizedError
from streamhold.settings import Settings
from streamhold.store.store import Store
from tests._cluster import cluster, fresh_database, server_env
from tests._server import LOOPBACK, ServerProcess

pytestmark = pytest.mark.timeout(90)

KEY = "stop-test-key"
UNKNOWN = "stream_" + "0" * 32


@asynccontextmanager
async def local_streams(settings: Settings) -> AsyncIterator[LocalStreams]:
    async with Store.open(settings) as store, LiveHub.open(store, settings) as hub:
        yield LocalStreams(store, hub, settings)


async def test_wait_stop_sees_a_stop_within_a_second(settings: Settings) -> None:
    async with local_streams(settings) as streams:
        stream = await streams.create("jobs", content_type="text/plain")
        await stream.write("working\n")
        assert not stream.stop_requested and not (await streams.get(stream.id)).stop_requested
        waiting = asyncio.ensure_future(stream.wait_stop())
        await asyncio.sleep(0.1)
        assert not waiting.done()
        asked = time.monotonic()
        assert await streams.stop(stream.id) is True
        async with asyncio.timeout(1.0):
            assert await waiting is True
        assert time.monotonic() - asked < 1.0
        assert stream.stop_requested and (await streams.get(stream.id)).stop_requested
        await stream.close()
        # A stop of a closed stream is a no-op.
        assert await streams.stop(stream.id) is False


async def test_a_stop_is_durable_and_seen_by_a_later_writer(settings: Settings) -> None:
    async with local_streams(settings) as streams:
        stream = await streams.create("jobs")
        await streams.stop(stream.id)
    async with local_streams(settings) as streams:  # as after a restart: the record remembers
        assert (await streams.get(stream.id)).stop_requested
        again = await streams.create("jobs")
        # A writer that only starts waiting now learns of a stop asked of its stream before.
        await streams.stop(again.id)
        async with asyncio.timeout(1.0):
            assert await again.wait_stop() is True
        await again.close()


async def test_wait_stop_ends_when_the_stream_is_closed(settings: Settings) -> None:
    async with local_streams(settings) as streams:
        stream = await streams.create("jobs")
        await stream.close()
        async with asyncio.timeout(1.0):
            assert await stream.wait_stop() is False


def test_the_stop_flag_rides_the_doorbell_only_when_set() -> None:
    """Processes of earlier versions read the first four fields of an item: they must stay as they were."""
    message = encode_doorbells("o", [Change("s1", 5, False), Change("s2", -1, False, stop=True)])[0]
    items = json.loads(message)["c"]
    assert items == [["s1", 5, False, False], ["s2", -1, False, False, True]]


def test_an_old_database_gains_the_column(settings: Settings) -> None:
    async def open_once() -> None:
        async with local_streams(settings) as streams:
            stream = await streams.create("jobs")
            assert await streams.stop(stream.id)

    asyncio.run(open_once())
    engine = create_engine(settings.sqlalchemy_url)
    try:
        with engine.begin() as conn:
            assert "stop_requested_at" in {c["name"] for c in inspect(conn).get_columns("streams")}
            conn.execute(text("ALTER TABLE streams DROP COLUMN stop_requested_at"))
        asyncio.run(open_once())  # upgraded on open, then used
        with engine.connect() as conn:
            assert "stop_requested_at" in {c["name"] for c in inspect(conn).get_columns("streams")}
    finally:
        engine.dispose()


async def test_stop_over_http(settings: Settings) -> None:
    async with AsyncTestClient(create_app(settings), base_url=LOOPBACK) as client:
        created = (await client.post("/stream", json={"name": "jobs"})).json()
        stream_id = created["id"]
        assert created["stop_requested"] is False
        assert (await client.get(f"/stream/{stream_id}/stop")).json()["stop_requested"] is False
        response = await client.post(f"/stream/{stream_id}/stop")
        assert response.status_code == 202 and response.json()["stop_requested"] is True
        assert (await client.post(f"/stream/{stream_id}/info")).json()["stop_requested"] is True
        status = await client.get(f"/stream/{stream_id}/stop", params={"wait": "5"})
        assert status.json()["stop_requested"] is True  # already asked: answered at once
        assert (await client.post(f"/stream/{stream_id}/complete")).status_code == 204
        closed = await client.post(f"/stream/{stream_id}/stop")
        assert closed.status_code == 200
        assert closed.json()["stopped"] is False and closed.json()["reason"] == "closed"
        missing = await client.post(f"/stream/{UNKNOWN}/stop")
        assert missing.status_code == 404 and "not found" in missing.json()["error"]
        bad = await client.get(f"/stream/{stream_id}/stop", params={"wait": "99"})
        assert bad.status_code == 400 and "wait must be" in bad.json()["error"]


async def test_a_protocol_stream_is_stopped_by_its_name(tmp_path: Path) -> None:
    async with AsyncTestClient(create_app(Settings(data_dir=tmp_path)), base_url=LOOPBACK) as client:
        created = await client.put("/v1/stream/jobs-1", headers={"content-type": "text/plain"})
        assert created.status_code == 201
        response = await client.post("/stream/jobs-1/stop")
        assert response.status_code == 202 and response.json()["id"].startswith("stream_")


async def test_stop_needs_the_write_right(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path, api_keys=(KEY,)))
    auth = {"authorization": f"Bearer {KEY}"}
    async with AsyncTestClient(app, base_url=LOOPBACK) as client:
        stream_id = (await client.post("/stream", json={"name": "jobs"}, headers=auth)).json()["id"]
        for headers in ({}, {"authorization": "Bearer wrong"}):
            refused = await client.post(f"/stream/{stream_id}/stop", headers=headers)
            assert refused.status_code == 401 and "API key" in refused.text
            assert (await client.get(f"/stream/{stream_id}/stop", headers=headers)).status_code == 401
        # Unknown streams are not told apart from known ones without a key.
        assert (await client.post(f"/stream/{UNKNOWN}/stop")).status_code == 401
        assert (await client.post(f"/stream/{stream_id}/stop", headers=auth)).status_code == 202
        assert (await client.get(f"/stream/{stream_id}/stop", headers=auth)).json()["stop_requested"]


async def test_a_token_stops_only_streams_of_its_namespaces(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path, api_keys=(KEY,)))
    auth = {"authorization": f"Bearer {KEY}"}
    async with AsyncTestClient(app, base_url=LOOPBACK) as client:
        stream_id = (await client.post("/stream", json={"name": "jobs"}, headers=auth)).json()["id"]

        async def token(scope: str, namespace: str) -> dict[str, str]:
            body = {"scopes": [scope], "namespaces": [namespace]}
            minted = await client.post("/tokens", json=body, headers=auth)
            return {"authorization": f"Bearer {minted.json()['token']}"}

        other = await client.post(f"/stream/{stream_id}/stop", headers=await token("write", "chat"))
        assert other.status_code == 403 and "namespace jobs" in other.text
        reader = await client.post(f"/stream/{stream_id}/stop", headers=await token("read", "jobs"))
        assert reader.status_code == 403 and "write scope" in reader.text
        assert (await client.get(f"/stream/{stream_id}/stop", headers=auth)).json()["stop_requested"] is False
        writer = await client.post(f"/stream/{stream_id}/stop", headers=await token("write", "jobs"))
        assert writer.status_code == 202


def _stop_button(page: str) -> re.Match[str] | None:
    return re.search(r'id="stop" data-stream="(stream_[0-9a-f]{32})" data-csrf="([0-9a-f]*)"', page)


async def test_the_viewer_offers_stop_to_a_signed_in_operator(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path, api_keys=(KEY,)))
    auth = {"authorization": f"Bearer {KEY}"}
    async with AsyncTestClient(app, base_url=LOOPBACK) as client:
        stream_id = (await client.post("/stream", json={"name": "jobs"}, headers=auth)).json()["id"]
        assert _stop_button((await client.get(f"/watch/{stream_id}")).text) is None  # not signed in
        signin = await client.post("/signin", data={"key": KEY, "next": "/"}, follow_redirects=False)
        assert signin.status_code == 303
        page = (await client.get(f"/watch/{stream_id}")).text
        button = _stop_button(page)
        assert button is not None and button.group(1) == stream_id and "/static/stop.js" in page
        # The session alone is not enough: the page's CSRF token must come with it.
        refused = await client.post(f"/stream/{stream_id}/stop", headers={"x-csrf-token": "0" * 64})
        assert refused.status_code == 403 and "CSRF" in refused.text
        stopped = await client.post(f"/stream/{stream_id}/stop", headers={"x-csrf-token": button.group(2)})
        assert stopped.status_code == 202 and stopped.json()["stop_requested"] is True
        assert (await client.post(f"/stream/{stream_id}/complete", headers=auth)).status_code == 204
        assert _stop_button((await client.get(f"/watch/{stream_id}")).text) is None  # closed: nothing to stop


async def _wait_closed(client: Any, stream_id: str, within: float) -> float:
    """Seconds until the stream is closed, polling its record; fails after `within` seconds."""
    began = time.monotonic()
    while time.monotonic() - began < within:
        if (await client.post(f"/stream/{stream_id}/info")).json()["completed"]:
            return time.monotonic() - began
        await asyncio.sleep(0.02)
    raise AssertionError(f"stream {stream_id} was not closed within {within} s")


async def _wait_bytes(client: Any, stream_id: str, within: float = 10.0) -> None:
    began = time.monotonic()
    while (await client.post(f"/stream/{stream_id}/info")).json()["size_bytes"] == 0:
        assert time.monotonic() - began < within, "the demo wrote nothing"
        await asyncio.sleep(0.05)


async def test_the_demo_stops_within_a_second(tmp_path: Path) -> None:
    async with AsyncTestClient(create_app(Settings(data_dir=tmp_path)), base_url=LOOPBACK) as client:
        started = (await client.post("/demo", headers={"accept": "application/json"})).json()
        answer, audit = started["stream_id"], started["audit_stream_id"]
        await _wait_bytes(client, answer)
        assert (await client.post(f"/stream/{answer}/stop")).status_code == 202
        assert await _wait_closed(client, answer, 1.0) < 1.0
        content = (await client.get(f"/stream/{answer}")).text
        assert content.endswith(demo.STOPPED_LINE) and len(content) < len(demo.ANSWER)
        await _wait_closed(client, audit, 1.0)
        last = json.loads("{" + (await client.get(f"/stream/{audit}")).text.rsplit("}{", 1)[1])
        assert last["event"] == "stopped" and last["tokens"] > 0


async def test_a_demo_stopped_inside_a_code_block_closes_it(tmp_path: Path) -> None:
    typed = asyncio.Event()

    async def tokens() -> AsyncIterator[str]:
        for token in ["# T\n", "``", "`py\n", "x = 1\n"]:
            yield token
        typed.set()
        await asyncio.sleep(60)  # a model that stalls: the stop must not wait for its next token

    async with local_streams(Settings(data_dir=tmp_path)) as streams:
        answer, audit = await streams.create("demo"), await streams.create("demo")
        running = asyncio.ensure_future(demo.run(answer, audit, tokens(), "m", "p"))
        await typed.wait()
        await streams.stop(answer.id)
        async with asyncio.timeout(1.0):
            await running
        content = b"".join([piece async for piece in streams.download(answer.id)]).decode()
        assert content == "# T\n```py\nx = 1\n\n```" + demo.STOPPED_LINE


async def test_stop_crosses_processes(tmp_path: Path, pg_server: str) -> None:
    """A stop posted to process A reaches a demo writer and a remote-SDK writer served by process B."""
    with fresh_database(pg_server) as database:
        with cluster(server_env(database, database, tmp_path)) as (a, b):
            async with httpx.AsyncClient(timeout=10) as client:
                started = (await client.post(f"{b.url}/demo", headers={"accept": "application/json"})).json()
                answer = started["stream_id"]
                await _wait_bytes(_On(client, b.url), answer)
                asked = time.monotonic()
                assert (await client.post(f"{a.url}/stream/{answer}/stop")).status_code == 202
                await _wait_closed(_On(client, b.url), answer, 1.0)
                assert time.monotonic() - asked < 1.0
                content = (await client.get(f"{a.url}/stream/{answer}")).text
                assert content.endswith(demo.STOPPED_LINE)

                async with RemoteStreams(b.url) as streams:
                    stream = await streams.create("jobs", content_type="text/plain")
                    await stream.write("working\n")
                    assert stream.stop_requested is False  # starts the watch on B
                    waiting = asyncio.ensure_future(stream.wait_stop())
                    await asyncio.sleep(0.3)
                    assert not waiting.done()
                    asked = time.monotonic()
                    assert (await client.post(f"{a.url}/stream/{stream.id}/stop")).status_code == 202
                    async with asyncio.timeout(1.0):
                        assert await waiting is True
                    assert time.monotonic() - asked < 1.0
                    await asyncio.sleep(0.2)
                    assert stream.stop_requested and (await streams.get(stream.id)).stop_requested
                    await stream.close()
                    assert await streams.stop(stream.id) is False  # closed: nothing to stop


async def test_the_remote_sdk_needs_a_key_to_stop(tmp_path: Path) -> None:
    env = {"STREAMHOLD_DATA_DIR": str(tmp_path), "STREAMHOLD_API_KEYS": KEY}
    with ServerProcess(env=env) as server:
        async with RemoteStreams(server.url, api_key=KEY) as streams:
            stream = await streams.create("jobs")
            async with RemoteStreams(server.url) as keyless:
                with pytest.raises(UnauthorizedError):
                    await keyless.stop(stream.id)
            assert await streams.stop(stream.id) is True
            async with asyncio.timeout(1.0):
                assert await stream.wait_stop() is True
            await stream.close()


class _On:
    """An httpx client bound to one server's origin, for helpers that post paths."""

    def __init__(self, client: httpx.AsyncClient, origin: str) -> None:
        self._client = client
        self._origin = origin

    async def post(self, path: str, **options: Any) -> httpx.Response:
        return await self._client.post(self._origin + path, **options)


async def test_the_stop_status_answers_whoever_may_stop(tmp_path: Path) -> None:
    """GET /stream/{id}/stop, which pages ask before showing Stop, follows the POST's rules."""
    listed = "http://127.0.0.1:8123"
    settings = Settings(data_dir=tmp_path, cors_origins=(listed,))
    async with AsyncTestClient(create_app(settings), base_url=LOOPBACK) as client:
        stream_id = (await client.post("/stream", json={"name": "jobs"})).json()["id"]
        for origin, status in (
            (None, 200),
            (LOOPBACK, 200),
            (listed, 200),
            ("https://elsewhere.example", 403),
        ):
            headers = {"origin": origin} if origin else {}
            probe = await client.get(f"/stream/{stream_id}/stop", headers=headers)
            post = await client.post(f"/stream/{stream_id}/stop", headers=headers)
            assert probe.status_code == status and post.status_code in (status, 202), (origin, probe.text)
        refused = await client.get(
            f"/stream/{stream_id}/stop", headers={"origin": "https://elsewhere.example"}
        )
        assert "STREAMHOLD_CORS_ORIGINS" in refused.json()["error"]


async def test_the_stop_status_takes_the_viewers_session_and_a_tokens_namespace(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path, api_keys=(KEY,)))
    auth = {"authorization": f"Bearer {KEY}"}
    async with AsyncTestClient(app, base_url=LOOPBACK) as client:
        stream_id = (await client.post("/stream", json={"name": "jobs"}, headers=auth)).json()["id"]
        minted = await client.post(
            "/tokens", json={"scopes": ["write"], "namespaces": ["chat"]}, headers=auth
        )
        other = {"authorization": f"Bearer {minted.json()['token']}"}
        outside = await client.get(f"/stream/{stream_id}/stop", headers=other)
        assert outside.status_code == 403 and "namespace jobs" in outside.text
        await client.post("/signin", data={"key": KEY, "next": "/"}, follow_redirects=False)
        button = _stop_button((await client.get(f"/watch/{stream_id}")).text)
        assert button is not None
        probe = await client.get(f"/stream/{stream_id}/stop", headers={"x-csrf-token": button.group(2)})
        assert probe.status_code == 200 and probe.json()["stop_requested"] is False
