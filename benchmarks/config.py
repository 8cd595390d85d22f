"""What a scenario is given: the server under test and the sizes of this run (full or --quick)."""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.wire import Origin


@dataclass(frozen=True)
class Sizes:
    """Every count and duration a scenario uses, so that --quick is one object away."""

    writers: int = 16
    appends_per_writer: int = 1000
    small_append_bytes: int = 64
    large_total_mib: int = 128
    disk_rounds: int = 4
    mixed_total_mib: int = 512
    probe_interval_s: float = 0.004
    probe_alone_s: float = 2.0
    catch_up_rounds: int = 3
    small_stream_appends: int = 20_000
    small_read_rounds: int = 5
    ttfb_samples: int = 200
    fanout_readers: tuple[int, ...] = (100, 500, 1000)
    fanout_seconds: float = 10.0
    fanout_interval_s: float = 0.010
    fanout_drain_s: float = 15.0
    resume_drops: int = 100
    resume_interval_s: float = 0.001
    sdk_writes: int = 20_000
    sdk_lifecycles: int = 3_000
    creators: int = 16
    creates_per_creator: int = 250
    spread_streams: int = 10_000
    spread_rounds: int = 3  # one round's share moved between 76% and 92% from run to run
    idle_readers: int = 10_000
    idle_cpu_s: float = 10.0
    idle_appends: int = 500
    idle_append_interval_s: float = 0.02


FULL = Sizes()
QUICK = Sizes(
    appends_per_writer=100,
    large_total_mib=16,
    disk_rounds=1,
    mixed_total_mib=16,
    probe_alone_s=0.5,
    catch_up_rounds=2,
    small_stream_appends=2_000,
    small_read_rounds=3,
    ttfb_samples=30,
    fanout_readers=(100,),
    fanout_seconds=3.0,
    fanout_drain_s=8.0,
    resume_drops=20,
    sdk_writes=2_000,
    sdk_lifecycles=300,
    creates_per_creator=30,
    spread_rounds=1,
    spread_streams=1_000,
    idle_readers=1_000,
    idle_cpu_s=3.0,
    idle_appends=100,
)


@dataclass(frozen=True)
class Target:
    """The server under test: its label in the table, its origin, and its PID when this run started it."""

    label: str
    origin: Origin
    pid: int | None
    run_id: str
    # When the server stores in PostgreSQL on this machine: an admin URL and its database's name, so that
    # the database's CPU time can be counted with the server's.
    admin_url: str | None = None
    database: str | None = None

    def stream_name(self, *parts: str) -> str:
        """A stream name unique to this run, so that scenarios never meet each other's streams."""
        return "-".join(("bench", self.run_id, *parts))
