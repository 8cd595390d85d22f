"""Several processes that open one new SQLite database at the same moment all start, and all write."""

from __future__ import annotations

import asyncio
import multiprocessing
from multiprocessing.synchronize import Barrier
from pathlib import Path

from streamhold.settings import Settings
from streamhold.store.store import Store
from streamhold.store.transactions import NewStream

PROCESSES = 4
ROUNDS = 12


def _open_and_write(data_dir: Path, barrier: Barrier, results: multiprocessing.Queue[str]) -> None:
    async def run() -> str:
        async with Store.open(Settings(data_dir=data_dir)) as store:
            state, _ = await store.create(NewStream(namespace="opening", content_type="text/plain"))
            await store.append(state.id, b"written")
            return state.id

    barrier.wait()
    try:
        results.put(asyncio.run(run()))
    except Exception as error:  # the test reports what went wrong in the process
        results.put(f"failed: {error!r}")


def test_processes_opening_one_new_database_at_once_all_start(tmp_path: Path) -> None:
    # Fork, so each process starts at once instead of importing the app first.
    context = multiprocessing.get_context("fork")
    for round_ in range(ROUNDS):
        data_dir = tmp_path / f"round-{round_}"
        barrier = context.Barrier(PROCESSES)
        results: multiprocessing.Queue[str] = context.Queue()
        processes = [
            context.Process(target=_open_and_write, args=(data_dir, barrier, results))
            for _ in range(PROCESSES)
        ]
        for process in processes:
            process.start()
        outcomes = [results.get(timeout=60) for _ in processes]
        for process in processes:
            process.join(timeout=30)
        failed = [outcome for outcome in outcomes if outcome.startswith("failed")]
        assert not failed, f"round {round_}: {failed}"
        assert len(set(outcomes)) == PROCESSES

        assert asyncio.run(_written(data_dir, outcomes)) == PROCESSES


async def _written(data_dir: Path, stream_ids: list[str]) -> int:
    async with Store.open(Settings(data_dir=data_dir)) as store:
        return sum([await store.read(stream_id, 0, 7) == b"written" for stream_id in stream_ids])
