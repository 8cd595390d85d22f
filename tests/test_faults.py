"""The fault and race harness: a seeded random workload against real servers, kill -9 and a full disk.

Each configuration runs a few seconds in the default test run; `make torture` (STREAMHOLD_TORTURE=1) runs
each for minutes. Replay a failure with the seed it prints: STREAMHOLD_FAULT_SEED=<seed>.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import random
import threading
from collections import Counter
from pathlib import Path

import pytest

from tests._cluster import server_env, start_servers, stop_servers
from tests._fault_check import check, report
from tests._fault_history import History
from tests._fault_workload import Plan, Workload
from tests._server import ServerProcess
from tests._tmpfs import fill, small_disk

TORTURE = os.environ.get("STREAMHOLD_TORTURE", "") not in ("", "0")
SECONDS = float(os.environ.get("STREAMHOLD_FAULT_SECONDS") or (90 if TORTURE else 4))
TUNING = {"long_poll_timeout": 0.5, "sse_keepalive": 0.5, "sweep_interval": 0.5}


@pytest.fixture
def seed() -> int:
    """The seed to replay (STREAMHOLD_FAULT_SEED), or a fresh one; printed by every run."""
    given = os.environ.get("STREAMHOLD_FAULT_SEED")
    return int(given) if given else random.SystemRandom().randrange(1, 10**9)


def run(servers: list[ServerProcess], plan: Plan, seed: int, keep: Path) -> History:
    """Run the workload and the checker; fail with the seed and the history's tail on any violation."""
    history = History(seed)
    print(f"fault harness seed {seed} ({plan.seconds:.0f} s, {len(servers)} server(s))")
    asyncio.run(Workload(servers, plan, history).run())
    violations = check(history)
    acked = sum(a.outcome == "ack" for a in history.appends.values())
    print(
        f"seed {seed}: {len(history.appends)} appends ({acked} acknowledged), {len(history.reads)} reads, "
        f"{history.kills} kill(s), {len(history.incarnations)} incarnations, {len(violations)} violation(s)"
    )
    if violations:
        saved = keep / "fault-history.pickle"
        saved.write_bytes(pickle.dumps(history))
        logs = "\n".join(server.log_tail(15) for server in servers)
        pytest.fail(f"{report(history, violations)}\nwhole history: {saved}\n{logs}", pytrace=False)
    assert acked > 0, f"seed {seed}: no append was acknowledged; the workload did not run"
    return history


def sqlite_env(data: Path) -> dict[str, str]:
    return {
        "STREAMHOLD_DATA_DIR": str(data),
        **{f"STREAMHOLD_{k.upper()}": str(v) for k, v in TUNING.items()},
    }


def test_one_process_sqlite(tmp_path: Path, seed: int) -> None:
    with ServerProcess(env=sqlite_env(tmp_path / "data"), startup_timeout=60) as server:
        run([server], Plan(seconds=SECONDS), seed, tmp_path)


def test_one_process_postgres(tmp_path: Path, pg_url: str, seed: int) -> None:
    env = server_env(pg_url, pg_url, tmp_path, **TUNING)
    with ServerProcess(env=env, startup_timeout=60) as server:
        run([server], Plan(seconds=SECONDS), seed, tmp_path)


def test_two_processes_postgres(tmp_path: Path, pg_url: str, seed: int) -> None:
    servers = start_servers(2, server_env(pg_url, pg_url, tmp_path, **TUNING))
    try:
        run(servers, Plan(seconds=SECONDS), seed, tmp_path)
    finally:
        stop_servers(servers)


def test_two_processes_sqlite(tmp_path: Path, seed: int) -> None:
    """Two processes on one SQLite file, without a channels backend: each wakes only its own readers."""
    servers = start_servers(2, sqlite_env(tmp_path / "data"))
    try:
        run(servers, Plan(seconds=SECONDS), seed, tmp_path)
    finally:
        stop_servers(servers)


def test_full_disk_sqlite(tmp_path: Path, seed: int) -> None:
    """A data directory that fills up: writes fail, but nothing acknowledged is lost and no hole appears."""
    with small_disk(tmp_path / "disk", "16m") as data:
        with ServerProcess(env=sqlite_env(data), startup_timeout=60) as server:
            ballast = data / "ballast"
            fill(ballast, leave=1024 * 1024)
            # Space comes back halfway through: what is written after the failures must follow on, no hole.
            freeing = threading.Timer(SECONDS / 2, ballast.unlink)
            freeing.start()
            try:
                # kill -9 on a full disk makes restarts slow: only the long run adds it.
                plan = Plan(
                    seconds=SECONDS,
                    kills=TORTURE,
                    big_weight=30.0,
                    big_max=256 * 1024,
                    disk_full=True,
                    retry_for=3.0,  # writes keep failing while the disk is full: do not wait for space
                )
                history = run([server], plan, seed, tmp_path)
            finally:
                freeing.cancel()
    statuses = Counter(a.statuses[-1] if a.statuses else "none" for a in history.appends.values())
    print(f"seed {seed}: answers to appends on the full disk: {dict(statuses)}")
