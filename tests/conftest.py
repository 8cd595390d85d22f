"""Shared fixtures: settings on SQLite and on a real PostgreSQL (existing server, or a throwaway one)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from streamhold.settings import Settings

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"


def _reachable(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=3):
            return True
    except psycopg.Error:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _throwaway_postgres() -> tuple[str, subprocess.Popen[bytes], Path] | None:
    """Start a private PostgreSQL from the installed binaries (as the postgres user when run as root)."""
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    if not bins:
        return None
    bindir = bins[-1].parent
    root = Path(tempfile.mkdtemp(prefix="streamhold-pg-", dir="/tmp"))
    prefix: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    data = root / "data"
    subprocess.run(
        [*prefix, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
        check=True,
        capture_output=True,
    )
    port = _free_port()
    process = subprocess.Popen(
        [
            *prefix,
            str(bindir / "postgres"),
            "-D",
            str(data),
            "-p",
            str(port),
            "-k",
            str(root),
            "-h",
            "127.0.0.1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if _reachable(url):
            return url, process, root
        time.sleep(0.2)
    process.kill()
    return None


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """An admin URL of a reachable PostgreSQL server."""
    url = os.environ.get("STREAMHOLD_TEST_POSTGRES", DEFAULT_PG)
    if _reachable(url):
        yield url
        return
    started = _throwaway_postgres()
    if started is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI needs PostgreSQL: none at {url} and no binaries under /usr/lib/postgresql")
        pytest.skip(
            f"SKIPPED LOUDLY: no PostgreSQL at {url} and none installed to start; "
            "PostgreSQL tests did not run"
        )
    url, process, root = started
    try:
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """A fresh, empty database for one test, dropped afterwards."""
    name = f"streamhold_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = pg_server.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(pg_server, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgres"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Settings for one test, once on SQLite and once on PostgreSQL."""
    if request.param == "postgres":
        url = request.getfixturevalue("pg_url")
        return Settings(
            data_dir=tmp_path, database_url=url, long_poll_timeout=2.0, public_url="http://sh.test"
        )
    return Settings(data_dir=tmp_path, long_poll_timeout=2.0, public_url="http://sh.test")
