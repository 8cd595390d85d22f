"""Helpers for the operator commands' tests: run `streamhold` as a subprocess, write and read streams."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx

from tests._server import REPO_ROOT

MAX_READS = 10_000
STARTUP = 60.0  # seconds a server may take to start on a loaded machine


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`streamhold ARGS` with none of the developer's STREAMHOLD_* variables; never raises on its exit."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STREAMHOLD_")}
    return subprocess.run(
        [sys.executable, "-m", "streamhold.cli", *args],
        cwd=REPO_ROOT,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def create(client: httpx.Client, namespace: str = "backup") -> str:
    response = client.post("/stream", json={"name": namespace})
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def append(client: httpx.Client, stream_id: str, data: bytes) -> None:
    response = client.post(f"/stream/{stream_id}/append", content=data)
    assert response.status_code == 204, response.text


def complete(client: httpx.Client, stream_id: str, compress: bool) -> None:
    headers = {"x-compress": "gzip"} if compress else {}
    response = client.post(f"/stream/{stream_id}/complete", headers=headers)
    assert response.status_code == 204, response.text


def read_all(client: httpx.Client, stream_id: str) -> bytes | None:
    """The whole content of a stream through the protocol's catch-up reads; None if it is not there."""
    content = bytearray()
    offset = "-1"
    for _ in range(MAX_READS):
        response = client.get(f"/v1/stream/{stream_id}", params={"offset": offset})
        if response.status_code == 404:
            return None
        assert response.status_code == 200, response.text
        content += response.content
        offset = response.headers["stream-next-offset"]
        if response.headers.get("stream-up-to-date") == "true":
            return bytes(content)
    raise AssertionError(f"stream {stream_id} still not read to its end after {MAX_READS} reads")
