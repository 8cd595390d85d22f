"""API keys: every call that creates, changes, lists or describes streams needs one when keys are set;
reading content by URL stays public; a keyless server listens on loopback only; keys are never logged."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar import Litestar, post
from litestar.testing import AsyncTestClient

from streamhold.http.auth import RIGHTS, key_is_valid, require_right
from streamhold.main import create_app
from streamhold.sdk.remote import RemoteStreams, UnauthorizedError
from streamhold.settings import Settings
from tests._server import REPO_ROOT, ServerProcess, free_port

pytestmark = pytest.mark.timeout(60)

KEY = "key-for-tests-7f3a9c"
OTHER = "second-key-19bd04"

# A keyless server answers only to loopback names (DNS rebinding): tests reach it by one.
LOOPBACK = "http://127.0.0.1"


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[AsyncTestClient[Any]]:
    async with AsyncTestClient(
        create_app(Settings(data_dir=tmp_path, api_keys=(KEY, OTHER))), base_url=LOOPBACK
    ) as client:
        yield client


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def test_keys_compare_whole_and_exact() -> None:
    assert key_is_valid(KEY, (KEY, OTHER)) and key_is_valid(OTHER, (KEY, OTHER))
    for wrong in ("", KEY[:-1], KEY + "x", KEY.upper(), f" {KEY}"):
        assert not key_is_valid(wrong, (KEY, OTHER)), wrong
    assert not key_is_valid(KEY, ())


async def test_every_service_call_but_reading_content_needs_a_key(client: AsyncTestClient[Any]) -> None:
    created = await client.post("/stream", json={"name": "guarded"}, headers=bearer(KEY))
    assert created.status_code == 200
    stream_id = created.json()["id"]
    guarded = [
        ("POST", "/stream", {"json": {"name": "x"}}),
        ("POST", "/", {"json": {"name": "x"}}),
        ("POST", "/stream/list", {"json": {}}),
        ("POST", f"/stream/{stream_id}/info", {"json": {}}),
        ("POST", f"/stream/{stream_id}/append", {"content": b"x"}),
        ("POST", f"/stream/{stream_id}/complete", {}),
        ("PUT", f"/stream/{stream_id}", {"content": b"x"}),
        ("DELETE", f"/stream/{stream_id}", {}),
        ("POST", f"/{stream_id}/append", {"content": b"x"}),
    ]
    for headers in ({}, bearer("wrong"), {"authorization": KEY}, {"authorization": f"Basic {KEY}"}):
        for method, path, options in guarded:
            response = await client.request(method, path, headers=headers, **options)
            assert response.status_code == 401, (method, path, headers)
            assert "needs an API key" in response.json()["error"]
            assert response.headers["www-authenticate"] == 'Bearer realm="streamhold"'
    assert (
        await client.post(f"/stream/{stream_id}/append", content=b"ok", headers=bearer(OTHER))
    ).status_code == 204
    lowercase = {"authorization": f"bearer {KEY}"}
    assert (await client.post(f"/stream/{stream_id}/info", headers=lowercase)).json()["size_bytes"] == 2
    assert (await client.get(f"/stream/{stream_id}", params={"follow": "false"})).content == b"ok"
    assert (await client.head(f"/stream/{stream_id}")).status_code == 200
    assert (await client.post(f"/stream/{stream_id}/complete", headers=bearer(KEY))).status_code == 204
    assert (await client.get(f"/stream/{stream_id}")).content == b"ok", "content by URL is public"
    assert (await client.get(f"/{stream_id}", follow_redirects=True)).content == b"ok"
    assert (await client.delete(f"/stream/{stream_id}", headers=bearer(KEY))).status_code == 204


async def test_every_guarded_route_at_both_bases_answers_401_alike(client: AsyncTestClient[Any]) -> None:
    created = await client.post("/stream", json={"name": "guarded"}, headers=bearer(KEY))
    stream_id = created.json()["id"]
    answers = set()
    for base in ("/stream", ""):
        for method, suffix in [
            ("POST", ""),
            ("POST", "/list"),
            ("POST", f"/{stream_id}/info"),
            ("POST", f"/{stream_id}/append"),
            ("POST", f"/{stream_id}/complete"),
            ("PUT", f"/{stream_id}"),
            ("DELETE", f"/{stream_id}"),
            ("POST", "/no-such-stream/info"),  # the key is checked before the stream is looked up
        ]:
            response = await client.request(method, f"{base}{suffix}" or "/", content=b"{}")
            assert response.status_code == 401, (method, base, suffix)
            assert response.headers["www-authenticate"] == 'Bearer realm="streamhold"'
            assert response.headers["content-type"] == "application/json"
            answers.add(response.json()["error"])
    assert answers == {
        "this call needs an API key or a token: send Authorization: Bearer <key or token> (a key of "
        "STREAMHOLD_API_KEYS, or a token minted at /tokens)"
    }
    info = await client.post(f"/{stream_id}/info", headers=bearer(KEY))
    assert info.json()["size_bytes"] == 0, "the stream was left untouched"
    asked = {"origin": "https://app.example", "access-control-request-method": "POST"}
    preflight = await client.options(f"/stream/{stream_id}/append", headers=asked)
    assert preflight.status_code == 204, "a browser's preflight carries no key and is answered"
    assert preflight.headers["access-control-allow-origin"] == "*"


def test_every_guarded_handler_declares_the_right_it_needs(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path, api_keys=(KEY,)))
    handlers = [
        handler
        for route in app.routes
        for handler in getattr(route, "route_handlers", ())
        if any(require_right in (layer.guards or ()) for layer in handler.ownership_layers)
        and "OPTIONS" not in handler.http_methods  # preflights are answered before any guard
    ]
    assert {h.handler_name: h.opt["right"] for h in handlers} == {
        "create_stream": "write",
        "list_streams": "manage",
        "stream_info": "manage",
        "delete_stream": "manage",
        "append_stream": "write",
        "complete_stream": "write",
        "put_stream": "write",
        # stop_stream and stop_status check the write right themselves: or else a viewer's sign-in, a link
    }
    assert all(h.opt["right"] in RIGHTS for h in handlers)


async def test_a_guarded_handler_without_a_right_is_never_run(tmp_path: Path) -> None:
    ran = []

    @post("/undeclared", guards=[require_right])
    async def undeclared() -> None:
        ran.append(True)

    app = Litestar([undeclared])
    app.state.settings = Settings(data_dir=tmp_path, api_keys=(KEY,))
    async with AsyncTestClient(app) as plain:
        response = await plain.post("/undeclared", headers=bearer(KEY))
    assert response.status_code == 500 and not ran


async def test_protocol_writes_need_a_key_and_reads_do_not(client: AsyncTestClient[Any]) -> None:
    path, text = "/v1/stream/guarded/log", {"content-type": "text/plain"}
    for headers in ({}, bearer("wrong")):
        assert (await client.put(path, headers={**text, **headers})).status_code == 401
    assert (await client.put(path, headers={**text, **bearer(KEY)})).status_code == 201
    for headers in ({}, bearer("wrong")):
        assert (await client.post(path, content=b"x", headers={**text, **headers})).status_code == 401
        assert (await client.delete(path, headers=headers)).status_code == 401
    assert (await client.post(path, content=b"hello", headers={**text, **bearer(OTHER)})).status_code == 204
    assert (await client.get(path, params={"offset": "-1"})).content == b"hello"
    assert (await client.head(path)).status_code == 200
    assert (await client.delete(path, headers=bearer(KEY))).status_code == 204


def serve(data_dir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `streamhold serve` to its early exit (these never get to listen)."""
    return subprocess.run(
        [sys.executable, "-m", "streamhold.cli", "serve", *args],
        cwd=REPO_ROOT,
        env={"PATH": "/usr/bin:/bin", "STREAMHOLD_DATA_DIR": str(data_dir), **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1", "::"])
def test_a_keyless_server_refuses_to_listen_beyond_loopback(host: str, tmp_path: Path) -> None:
    result = serve(tmp_path, "--host", host, "--port", str(free_port()))
    assert result.returncode != 0
    assert f"refusing to listen on {host} without API keys: set STREAMHOLD_API_KEYS" in result.stderr
    assert "--insecure" in result.stderr


def test_insecure_or_keys_lift_the_refusal(tmp_path: Path) -> None:
    # 192.0.2.1 (TEST-NET-1) is on no interface here, so these get past the check and fail to bind.
    for args, env in ((["--insecure"], {}), ([], {"STREAMHOLD_API_KEYS": KEY})):
        result = serve(tmp_path, "--host", "192.0.2.1", "--port", str(free_port()), *args, env=env)
        output = result.stdout + result.stderr
        assert result.returncode != 0 and "refusing" not in output
        assert "192.0.2.1" in output, output


async def test_keys_are_never_logged(tmp_path: Path) -> None:
    env = {"STREAMHOLD_DATA_DIR": str(tmp_path), "STREAMHOLD_API_KEYS": f"{KEY},{OTHER}"}

    def verbose(port: int) -> list[str]:
        return [sys.executable, "-m", "streamhold.cli", "serve", "--port", str(port), "--log-level", "debug"]

    with ServerProcess(env=env, command=verbose) as server:
        async with RemoteStreams(server.url, api_key=KEY) as streams:
            stream = await streams.create("logged")
            await stream.write("x")
            await stream.close()
        async with RemoteStreams(server.url, api_key="wrong-key-55") as wrong:
            with pytest.raises(UnauthorizedError):
                await wrong.list()
        async with httpx.AsyncClient(base_url=server.url) as http:
            await http.post("/v1/stream/logged", headers={"authorization": "Bearer sneaky-key-66"})
        log = server.log_text()
    assert "HTTP" in log or "Uvicorn" in log or "Started" in log, "the debug log was written"
    for secret in (KEY, OTHER, "wrong-key-55", "sneaky-key-66"):
        assert secret not in log
