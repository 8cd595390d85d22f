"""`streamhold demo`: the demo agent against a running server, or a server started in this process."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import time
from collections.abc import Callable

import httpx

from .demo import MAX_SECONDS
from .main import create_app
from .settings import Settings
from .urls import listen_origin, protocol_url

DEFAULT_SERVER = "http://127.0.0.1:8000"


def _server_answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def _post_demo(client: httpx.AsyncClient, api_key: str) -> dict[str, str]:
    headers = {"accept": "application/json"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    response = await client.post("/demo", headers=headers)
    if response.status_code != 201:
        raise RuntimeError(f"POST /demo answered {response.status_code}: {response.text[:300]}")
    return dict(response.json())


def _announce(started: dict[str, str], echo: Callable[[str], None]) -> None:
    model = started.get("source", "simulated")
    echo(f"Streaming an answer from the {model} model. Open the live viewer:")
    echo(f"  {started['viewer_url']}")
    echo(f"Audit stream (JSON): {started['audit_viewer_url']}")


async def _wait_closed(client: httpx.AsyncClient, name: str, stop: Callable[[], bool]) -> None:
    deadline = time.monotonic() + MAX_SECONDS + 30
    while time.monotonic() < deadline and not stop():
        response = await client.head(protocol_url("", name))
        if response.status_code != 200 or response.headers.get("stream-closed") == "true":
            return
        await asyncio.sleep(0.25)


async def serve_demo(
    settings: Settings, port: int, linger: float, echo: Callable[[str], None]
) -> dict[str, str]:
    """Serve the app in this process, run the demo through its own POST /demo, then linger; returns URLs."""
    import uvicorn

    public_url = settings.public_url or listen_origin("127.0.0.1", port)
    settings = dataclasses.replace(settings, public_url=public_url)
    config = uvicorn.Config(
        create_app(settings),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="on",
        access_log=False,
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    serving = asyncio.get_running_loop().create_task(server.serve())
    try:
        for _ in range(400):
            if server.started or serving.done():
                break
            await asyncio.sleep(0.05)
        if not server.started:
            raise RuntimeError(f"could not start a server on 127.0.0.1:{port}")
        stop = lambda: server.should_exit or serving.done()  # noqa: E731 - Ctrl-C sets should_exit
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            started = await _post_demo(client, settings.api_keys[0] if settings.api_keys else "")
            _announce(started, echo)
            await _wait_closed(client, started["stream_id"], stop)
        if linger > 0 and not stop():
            echo(f"The answer is complete. The server stays up for {linger:.0f} s (Ctrl-C stops it).")
            await asyncio.wait({serving}, timeout=linger)
        return started
    finally:
        server.should_exit = True
        await serving


def cli_demo(
    url: str, port: int, linger: float, in_process: bool, echo: Callable[[str], None]
) -> dict[str, str]:
    """`streamhold demo`: against the server at `url` (or a local one that answers), else in this process."""
    if not url and not in_process and _server_answers(DEFAULT_SERVER):
        url = DEFAULT_SERVER
    if url and not in_process:

        async def remote() -> dict[str, str]:
            async with httpx.AsyncClient(base_url=url.rstrip("/"), timeout=10) as client:
                return await _post_demo(client, os.environ.get("STREAMHOLD_API_KEY", ""))

        started = asyncio.run(remote())
        _announce(started, echo)
        return started
    port = port or (8000 if _port_free(8000) else 0)
    if not port:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
    try:
        return asyncio.run(serve_demo(Settings.from_env(), port, linger, echo))
    except KeyboardInterrupt:
        return {}
