"""The benchmark's CPU count: a server's own seconds, and its PostgreSQL database's backends' seconds."""

from __future__ import annotations

import os

import psycopg

from benchmarks.cpu import CpuMeter, per_thousand, process_cpu_s
from benchmarks.run import parse_args


def test_a_process_cpu_time_grows_with_its_work() -> None:
    before = process_cpu_s(os.getpid())
    assert before is not None
    sum(i * i for i in range(3_000_000))
    after = process_cpu_s(os.getpid())
    assert after is not None and after > before
    assert process_cpu_s(2**22 + 12345) is None  # no such process
    assert per_thousand(0.5, 2000) == 0.25
    assert per_thousand(None, 10) is None


async def test_the_database_backends_are_counted_apart_from_the_server(pg_server: str, pg_url: str) -> None:
    database = pg_url.rsplit("/", 1)[1]
    with psycopg.connect(pg_url, autocommit=True) as conn:
        meter = CpuMeter(os.getpid(), pg_server, database)
        await meter.start()
        conn.execute("SELECT count(*) FROM generate_series(1, 3000000)").fetchone()
        server, backends = await meter.stop()
    assert server is not None and backends is not None
    assert backends > 0.02, "the backend's work is counted"
    on_sqlite = CpuMeter(os.getpid())
    await on_sqlite.start()
    assert (await on_sqlite.stop())[1] == 0.0


def test_postgresql_beside_sqlite_in_several_rounds_is_one_command() -> None:
    args = parse_args(["--only", "append", "--servers", "streamhold-pg,streamhold", "--rounds", "3"])
    assert args.server_list == ["streamhold-pg", "streamhold"]
    assert args.rounds == 3
    assert args.postgres.startswith("postgresql://")
