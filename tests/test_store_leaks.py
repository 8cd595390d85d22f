"""What the store keeps for a stream goes when the stream goes: counters, chunk files, file space, locks."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from streamhold.errors import StreamClosedError
from streamhold.settings import Settings
from streamhold.store import chunk_files
from streamhold.store import store as store_module
from streamhold.store.batches import PENDING_LIMIT
from streamhold.store.chunk_files import FILE_CHUNK_MIN
from streamhold.store.schema import StreamRow
from streamhold.store.store import Store
from streamhold.store.transactions import NewStream

pytestmark = pytest.mark.timeout(60)


async def settle(store: Store) -> None:
    """Wait for the store's background work (compaction, trimming, file removal) to finish."""
    for _ in range(100):
        if not store._followups:
            return
        await asyncio.gather(*list(store._followups), return_exceptions=True)


async def add_small_chunk(store: Store, stream_id: str) -> None:
    await store.append(stream_id, b"x" * (PENDING_LIMIT + 1))
    assert stream_id in store._small_chunks


async def test_small_chunk_counts_go_with_deleted_and_expired_streams(settings: Settings) -> None:
    async with Store.open(settings) as store:
        deleted, _ = await store.create(NewStream("leaks"))
        expiring, _ = await store.create(NewStream("leaks", expires_at=time.time() + 0.5))
        await add_small_chunk(store, deleted.id)
        await add_small_chunk(store, expiring.id)
        await store.delete(deleted.id)
        assert deleted.id not in store._small_chunks
        await asyncio.sleep(0.6)
        assert await store.sweep() >= 1
        assert expiring.id not in store._small_chunks


async def test_a_chunk_file_written_just_before_a_crash_is_removed_after_a_later_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chunk_files, "REMOVE_GRACE", 0.3)
    settings = Settings(data_dir=tmp_path)
    async with Store.open(settings) as store:
        assert store.files is not None
        state, _ = await store.create(NewStream("leaks"))
        await store.append(state.id, b"k" * FILE_CHUNK_MIN)
        kept = store.files.path(state.id)
        stray = store.files.path("stream_" + "0" * 32)
    stray.write_bytes(b"s" * FILE_CHUNK_MIN)  # a file whose commit never happened, as a crash leaves it
    async with Store.open(settings) as store:
        assert stray.exists(), "too new to remove at once: a read may still be using it"
        for _ in range(40):
            if not stray.exists():
                break
            await asyncio.sleep(0.05)
        assert not stray.exists()
        assert kept.exists()


@pytest.mark.parametrize("ending", ["the append fails", "its client goes away"])
async def test_a_close_racing_a_spooled_body_leaves_no_bytes_in_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    monkeypatch.setattr(store_module, "TRIM_RETRY_S", 0.1)
    async with Store.open(Settings(data_dir=tmp_path)) as store:
        assert store.files is not None
        state, _ = await store.create(NewStream("leaks"))
        await store.append(state.id, b"a" * 10)
        body = b"b" * (4 * FILE_CHUNK_MIN)
        spool = await store.spool(state.id, len(body))
        assert spool is not None
        spool.add(body[: len(body) // 2])
        await store.append(state.id, b"", close=True)
        await settle(store)
        spool.add(body[len(body) // 2 :])
        if ending == "the append fails":
            with pytest.raises(StreamClosedError):
                await store.append(state.id, body, spool=spool)
        else:
            spool.close()
        path = store.files.path(state.id)
        for _ in range(40):
            await settle(store)
            if not path.exists() or path.stat().st_size <= 10:
                break
            await asyncio.sleep(0.05)
        assert not path.exists() or path.stat().st_size <= 10
        assert await store.read(state.id, 0, 10) == b"a" * 10


async def test_one_sqlite_process_redoes_a_stale_compression(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    finished: list[tuple[int, str]] = []

    async def finish(self: Store, stream_id: str) -> None:
        finished.append((id(self), stream_id))

    settings = Settings(data_dir=tmp_path)
    async with Store.open(settings) as first, Store.open(settings) as second:
        state, _ = await first.create(NewStream("leaks"))
        await first.append_nowait(state.id, b"z" * 100, close=True, compress=True)

        def long_ago(conn: Any) -> tuple[None, list[Any]]:
            conn.execute(
                update(StreamRow).where(StreamRow.id == state.id).values(closed_at=time.time() - 3600)
            )
            return None, []

        await first.writer.call(long_ago)
        monkeypatch.setattr(Store, "finish", finish)
        await first.sweep()
        await second.sweep()
        await first.sweep()
        await settle(first)
        await settle(second)
        assert finished and {store for store, _ in finished} == {id(first)}


def record_directory_syncs(monkeypatch: pytest.MonkeyPatch) -> set[tuple[int, int]]:
    """From now on, the (device, inode) of each directory that is fsynced."""
    synced: set[tuple[int, int]] = set()
    fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        found = os.fstat(fd)
        if stat.S_ISDIR(found.st_mode):
            synced.add((found.st_dev, found.st_ino))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return synced


def identity(path: Path) -> tuple[int, int]:
    found = path.stat()
    return found.st_dev, found.st_ino


async def test_directories_made_at_first_start_are_synced_into_their_parents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced = record_directory_syncs(monkeypatch)
    data_dir = tmp_path / "new" / "data"
    async with Store.open(Settings(data_dir=data_dir)) as store:
        assert store.files is not None
        assert identity(tmp_path) in synced  # holds the name "new"
        assert identity(tmp_path / "new") in synced  # holds the name "data"
        assert identity(data_dir) in synced  # holds the chunk files' directory


async def test_small_chunk_counts_are_bounded(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Counts of streams that another process deleted are never told gone here: they are dropped in bulk."""
    monkeypatch.setattr("streamhold.store.store.NAME_CACHE", 2)
    async with Store.open(settings) as store:
        for _ in range(5):
            state, _ = await store.create(NewStream("leaks"))
            await add_small_chunk(store, state.id)
            assert len(store._small_chunks) <= 2
