"""CPU time spent by a server under test, and by its PostgreSQL backends when it stores in PostgreSQL.

A server on SQLite does its database work in its own process; one on PostgreSQL hands part of it to the
backend processes serving its connections, which run on the same cores. Both are counted, so that servers
on either database compare by what an append costs the machine. PostgreSQL's shared processes (WAL writer,
checkpointer) serve every database on the server and are left out.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float | None:
    """User plus system CPU seconds of one process so far (None once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces: count fields from after its closing parenthesis.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def backend_pids(admin_url: str, database: str) -> list[int]:
    """The PIDs of the PostgreSQL backends connected to `database` (the server runs on this machine)."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND backend_type = 'client backend'",
            (database,),
        ).fetchall()
    return [int(row[0]) for row in rows]


@dataclass
class CpuMeter:
    """CPU seconds of a server process and of its database's backends between `start` and `stop`."""

    pid: int | None
    admin_url: str | None = None
    database: str | None = None
    _server: float = 0.0
    _backends: dict[int, float] = field(default_factory=dict)

    async def _backend_times(self) -> dict[int, float]:
        if self.admin_url is None or self.database is None:
            return {}
        pids = await asyncio.to_thread(backend_pids, self.admin_url, self.database)
        times = {pid: process_cpu_s(pid) for pid in pids}
        return {pid: t for pid, t in times.items() if t is not None}

    async def start(self) -> None:
        self._server = (process_cpu_s(self.pid) if self.pid else None) or 0.0
        self._backends = await self._backend_times()

    async def stop(self) -> tuple[float | None, float | None]:
        """(server seconds, database backends' seconds) since `start`; None where there is nothing to read."""
        server = process_cpu_s(self.pid) if self.pid else None
        used = None if server is None else server - self._server
        if self.database is None:
            return used, (0.0 if used is not None else None)
        # A backend that connected meanwhile counts from zero; one that left meanwhile is not counted.
        now = await self._backend_times()
        return used, sum(t - self._backends.get(pid, 0.0) for pid, t in now.items())


def per_thousand(seconds: float | None, count: int) -> float | None:
    """CPU seconds per 1,000 operations, rounded for a result line."""
    return None if seconds is None or count == 0 else round(seconds * 1000 / count, 4)
