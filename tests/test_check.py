"""`streamhold check`: a healthy store passes (also while serving); damage and strays are reported; repair."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests._operator import STARTUP, append, cli, complete, create, read_all
from tests._server import ServerProcess

KIB = 1024
STRAY_AGE = 60  # seconds in the past, beyond the chunk files' removal grace


class Store:
    """A store written by a real server: an open stream with chunk files, a compressed one, a small one."""

    def __init__(
        self, data: Path, open_id: str, gzip_id: str, small_id: str, contents: dict[str, bytes]
    ) -> None:
        self.data = data
        self.open_id = open_id
        self.gzip_id = gzip_id
        self.small_id = small_id
        self.contents = contents


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    data = tmp_path_factory.mktemp("check") / "data"
    pieces = {
        "open": [b"a" * 100, os.urandom(70 * KIB), b"b" * 50, os.urandom(100 * KIB)],
        "gzip": [b"line of text\n" * 7000, b"tail\n", bytes(range(256)) * 400],
        "small": [b"x" * 300, b"y" * 300],
    }
    with (
        ServerProcess(env={"STREAMHOLD_DATA_DIR": str(data)}, startup_timeout=STARTUP) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        ids = {kind: create(client) for kind in pieces}
        for kind, parts in pieces.items():
            for part in parts:
                append(client, ids[kind], part)
        complete(client, ids["gzip"], compress=True)
        complete(client, ids["small"], compress=False)
        info = client.post(f"/stream/{ids['gzip']}/info").json()
        assert info["compressed"] is True
        # The compressed stream's plain chunk file goes once its removal grace is over: wait for it, so that
        # the store is settled and holds no file a check would rightly call stray.
        gone = data / "streamhold.db-chunks" / f"{ids['gzip']}.chunks"
        deadline = time.monotonic() + 60
        while gone.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not gone.exists()
        live = cli("check", "--data-dir", str(data))
        assert live.returncode == 0, live.stdout + live.stderr  # read-only beside a serving process
        assert "ok: 3 streams, 1 chunk files checked" in live.stdout
    contents = {ids[kind]: b"".join(parts) for kind, parts in pieces.items()}
    yield Store(data, ids["open"], ids["gzip"], ids["small"], contents)


@pytest.fixture
def store(written: Store, tmp_path: Path) -> Store:
    """A copy of the written store that a test may damage."""
    copy = tmp_path / "data"
    shutil.copytree(written.data, copy)
    return Store(copy, written.open_id, written.gzip_id, written.small_id, written.contents)


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_healthy_store_passes_and_serves(store: Store) -> None:
    result = cli("check", "--data-dir", str(store.data))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    with ServerProcess(env={"STREAMHOLD_DATA_DIR": str(store.data)}, startup_timeout=STARTUP) as server:
        with httpx.Client(base_url=server.url) as client:
            for stream_id, content in store.contents.items():
                assert read_all(client, stream_id) == content


def test_truncated_chunk_file_is_reported(store: Store) -> None:
    path = store.data / "streamhold.db-chunks" / f"{store.open_id}.chunks"
    os.truncate(path, 100 + 70 * KIB + 50 + 10 * KIB)  # the second file chunk is cut short
    result = cli("check", "--data-dir", str(store.data))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert store.open_id in lines[0] and "bytes long" in lines[0]


def test_missing_chunk_file_is_reported(store: Store) -> None:
    (store.data / "streamhold.db-chunks" / f"{store.open_id}.chunks").unlink()
    result = cli("check", "--data-dir", str(store.data))
    assert result.returncode == 1
    assert f"stream {store.open_id}: chunk file" in result.stderr and "missing" in result.stderr


def test_flipped_bytes_in_a_gzip_piece_are_reported(store: Store) -> None:
    with sqlite3.connect(store.data / "streamhold.db") as conn:
        seq, data = conn.execute(
            "SELECT seq, data FROM gzip_chunks WHERE stream_id = ? ORDER BY seq LIMIT 1", (store.gzip_id,)
        ).fetchone()
        damaged = bytearray(data)
        for at in range(len(damaged) // 2, len(damaged) // 2 + 8):
            damaged[at] ^= 0xFF
        conn.execute(
            "UPDATE gzip_chunks SET data = ? WHERE stream_id = ? AND seq = ?",
            (bytes(damaged), store.gzip_id, seq),
        )
    result = cli("check", "--data-dir", str(store.data))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert store.gzip_id in lines[0] and "gzip" in lines[0]


def test_inconsistent_tail_is_reported(store: Store) -> None:
    with sqlite3.connect(store.data / "streamhold.db") as conn:
        conn.execute("UPDATE streams SET tail = tail + 5 WHERE id = ?", (store.small_id,))
    result = cli("check", "--data-dir", str(store.data))
    assert result.returncode == 1
    assert f"stream {store.small_id}" in result.stderr and "tail" in result.stderr


def test_stray_is_reported_and_removed_by_repair_only(store: Store) -> None:
    chunks = store.data / "streamhold.db-chunks"
    stray = chunks / "stream_00000000000000000000000000000000.chunks"
    stray.write_bytes(b"left over" * 1000)
    os.utime(stray, (time.time() - STRAY_AGE, time.time() - STRAY_AGE))
    fresh = chunks / "stream_11111111111111111111111111111111.chunks"
    fresh.write_bytes(b"an append on its way")  # within the grace: perhaps not committed yet, not judged
    os.utime(fresh, (time.time() + 3600, time.time() + 3600))  # stays within it however slow this test runs
    before = _digests(chunks)

    found = cli("check", "--data-dir", str(store.data))
    assert found.returncode == 1
    assert found.stderr.strip().splitlines() == [
        f"stray chunk file {stray}: no chunk refers to it (`--repair` removes it)"
    ]
    assert _digests(chunks) == before  # a check without --repair changes nothing

    repaired = cli("check", "--data-dir", str(store.data), "--repair")
    assert repaired.returncode == 0, repaired.stderr
    assert f"removed stray chunk file {stray}" in repaired.stdout
    assert not stray.exists()
    del before[stray.name]
    assert _digests(chunks) == before  # referenced data and the fresh file untouched
    assert cli("check", "--data-dir", str(store.data)).returncode == 0


def test_no_store_is_a_clear_failure(tmp_path: Path) -> None:
    result = cli("check", "--data-dir", str(tmp_path / "nothing"))
    assert result.returncode == 1
    assert "no database here" in result.stderr


def test_repair_waits_the_grace_after_it_saw_a_file_unreferenced(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file just unreferenced (its stream compressed or deleted) may still be read by a read that found its
    row a moment before, however old the file is: repair removes it a grace after it saw it unused, as the
    server does, never at once."""
    from streamhold.store import check as checking

    monkeypatch.setattr(checking, "REMOVE_GRACE", 2.0)
    stray = store.data / "streamhold.db-chunks" / "stream_22222222222222222222222222222222.chunks"
    stray.write_bytes(b"written long ago, unreferenced a moment ago" * 100)
    os.utime(stray, (time.time() - STRAY_AGE, time.time() - STRAY_AGE))
    reports: list[checking.Report] = []
    started = time.monotonic()
    database = store.data / "streamhold.db"
    repair = threading.Thread(target=lambda: reports.append(checking.check(database, repair=True)))
    repair.start()
    time.sleep(1.0)
    assert stray.exists(), "removed at once, with no grace for reads that found its row"
    repair.join(timeout=30)
    assert not stray.exists() and reports[0].removed == [stray] and reports[0].ok
    assert time.monotonic() - started >= 2.0
