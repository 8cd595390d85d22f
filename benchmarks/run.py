"""Run the load scenarios against Streamhold and the reference server, alternating, and print one table.

python -m benchmarks.run [--quick] [--only SCENARIO[,...]] [--servers streamhold,reference] [--rounds N]
python -m benchmarks.run --only append --servers streamhold-pg,streamhold --rounds 5  (PostgreSQL, SQLite)
python -m benchmarks.run --url http://127.0.0.1:8000 [--label NAME] [--pid PID]
python -m benchmarks.run --big [--big-streams 100000,1000000] --only big-db --servers streamhold
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import bigdb, fanout, live, readers, reads, report, scale, sdk_bench, servers, writes
from benchmarks.config import FULL, QUICK, Sizes, Target
from benchmarks.wire import parse_origin

ScenarioFn = Callable[[Target, Sizes], Awaitable[dict[str, Any]]]
STARTERS: dict[str, Callable[[argparse.Namespace], servers.Server]] = {
    "streamhold": lambda _args: servers.start_streamhold(),
    # Streamhold on a new database of the PostgreSQL server at --postgres, dropped after the scenario.
    "streamhold-pg": lambda args: servers.start_streamhold_postgres(args.postgres),
    "reference": lambda _args: servers.start_reference(),
}
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
RESULTS = Path(__file__).resolve().parent / "results"  # ignored by the repo's .gitignore
GROUPS = (
    "append",
    "append-large",
    "catch-up",
    "catch-up-small",
    "ttfb",
    "fanout",
    "resume",
    "mixed",
    "sdk",
    "create",
    "append-spread",
    "readers-10k",
    "big-db",  # only with --big
)


@dataclass(frozen=True)
class Spec:
    """One scenario: its key in the table, its group for --only, its deadline in seconds per run, and how many
    rounds each server runs it (the table shows each server's median)."""

    key: str
    group: str
    run: ScenarioFn | None
    deadline: float
    rounds: int = 1


def specs(sizes: Sizes, big: tuple[int, ...] = ()) -> list[Spec]:
    """Every scenario in the order they run; the big-db ones (one per size in `big`) last."""
    fanouts = [
        Spec(
            f"fanout-{n}",
            "fanout",
            functools.partial(fanout.fanout, readers=n),
            60.0 + n * 0.1 + sizes.fanout_seconds + sizes.fanout_drain_s,
        )
        for n in sizes.fanout_readers
    ]
    return [
        Spec("append", "append", writes.append, 120.0),
        # The disk syncs quickly until a burst of fresh writes is spent, then at its sustained pace; one round
        # each would hand the quick disk to whichever server goes first.
        Spec("append-large", "append-large", writes.append_large, 120.0, rounds=sizes.disk_rounds),
        Spec("catch-up", "catch-up", reads.catch_up, 180.0),
        Spec("catch-up-small", "catch-up-small", reads.catch_up_small, 120.0),
        Spec("ttfb", "ttfb", live.ttfb, 90.0),
        *fanouts,
        Spec("resume", "resume", live.resume, 120.0),
        Spec("mixed", "mixed", writes.mixed, 120.0),
        Spec("sdk", "sdk", None, 120.0),
        Spec("create", "create", scale.create, 120.0, rounds=sizes.disk_rounds),
        Spec("append-spread", "append-spread", scale.append_spread, 480.0, rounds=sizes.spread_rounds),
        Spec("readers-10k", "readers-10k", readers.idle_readers, 240.0 + sizes.idle_readers * 0.02),
        # The fill of each size (from the one before) takes most of its deadline: about 3,000 creates/s.
        *(Spec(bigdb.label(n), "big-db", None, 300.0 + n / 500) for n in big),
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--only", help=f"comma-separated scenarios: {', '.join(GROUPS)} (or fanout-N)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test of a minute or two")
    parser.add_argument(
        "--servers",
        default="streamhold,reference",
        help="servers to start and compare (default: streamhold,reference)",
    )
    parser.add_argument("--url", help="run against an already running server at this loopback origin instead")
    parser.add_argument("--label", default="url", help="column name for --url (default: url)")
    parser.add_argument("--pid", type=int, help="PID of the --url server, to report its memory")
    parser.add_argument("--out", type=Path, help="results file (default: benchmarks/results/<time>.jsonl)")
    parser.add_argument("--budget", type=float, help="seconds after which remaining scenarios are skipped")
    parser.add_argument(
        "--big", action="store_true", help="add the big-db scenario: fill a database of many streams, list it"
    )
    parser.add_argument(
        "--big-streams",
        default=",".join(str(n) for n in bigdb.SIZES),
        help="comma-separated sizes the big-db scenario fills to and measures at (default: 100000,1000000)",
    )
    parser.add_argument(
        "--rounds", type=int, help="rounds per server of every chosen scenario (default: each scenario's own)"
    )
    parser.add_argument(
        "--postgres",
        default=DEFAULT_POSTGRES,
        help=f"admin URL of the PostgreSQL server that streamhold-pg uses (default: {DEFAULT_POSTGRES})",
    )
    parser.add_argument(
        "--database", help="with --url: the PostgreSQL database the server stores in, to count its CPU too"
    )
    args = parser.parse_args(argv)
    try:
        args.big_sizes = tuple(sorted(int(n) for n in args.big_streams.split(","))) if args.big else ()
    except ValueError:
        parser.error(f"--big-streams takes whole numbers separated by commas; got {args.big_streams!r}")
    if any(n < bigdb.PAGE * 2 for n in args.big_sizes):
        parser.error(f"--big-streams sizes must be at least {bigdb.PAGE * 2}")
    chosen = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in STARTERS]
    if unknown or not chosen:
        parser.error(f"--servers takes {', '.join(STARTERS)}; got {args.servers!r}")
    args.server_list = [args.label] if args.url else chosen
    if args.url:
        try:
            args.origin = parse_origin(args.url)
        except ValueError as exc:
            parser.error(str(exc))
    return args


def select(all_specs: list[Spec], only: str | None) -> list[Spec]:
    """The specs named by --only (a group such as `fanout` or a key such as `fanout-100`)."""
    if not only:
        return all_specs
    wanted = {w.strip() for w in only.split(",") if w.strip()}
    known = {s.group for s in all_specs} | {s.key for s in all_specs}
    if wanted - known:
        raise SystemExit(f"unknown scenario(s) {sorted(wanted - known)}; choose from {', '.join(GROUPS)}")
    return [s for s in all_specs if s.group in wanted or s.key in wanted]


class Harness:
    """Runs specs against servers, keeps the result lines, and stops every server it started."""

    def __init__(self, args: argparse.Namespace, sizes: Sizes, out: Path, run_id: str) -> None:
        self.args = args
        self.sizes = sizes
        self.out = out
        self.run_id = run_id
        self.lines: list[dict[str, Any]] = []
        self.broken: dict[str, str] = {}
        self.running: list[servers.Server] = []
        self.big: bigdb.BigDb | None = None  # the big-db scenarios' data directory, grown from size to size

    def emit(self, line: dict[str, Any]) -> None:
        """Print one JSON line and append it to the results file."""
        for key in ("error", "skipped"):
            if isinstance(line.get(key), str):
                line[key] = line[key].replace(str(servers.REPO), "<repo>")
        self.lines.append(line)
        text = json.dumps(line, separators=(",", ":"))
        print(text, flush=True)
        with self.out.open("a") as fh:
            fh.write(text + "\n")

    def line(self, server: str, spec: Spec, **fields: Any) -> dict[str, Any]:
        """A result line with the fields every line has."""
        base: dict[str, Any] = {
            "run": self.run_id,
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "server": server,
            "scenario": spec.group,
            "key": spec.key,
            "quick": self.args.quick,
            # Other work on a 2-core machine moves these numbers; the load says how quiet it was.
            "load_1m": round(os.getloadavg()[0], 2),
        }
        return {**base, **fields}

    def stop_all(self) -> None:
        """Stop every server this run started that is still running."""
        while self.running:
            servers.stop(self.running.pop())

    async def run_one(self, spec: Spec, label: str) -> dict[str, Any]:
        """Run one spec against one server (started fresh for it unless --url)."""
        if spec.group == "sdk":
            return await self._run_sdk(spec, label)
        if spec.group == "big-db":
            return await self._run_big(spec, label)
        if label in self.broken:
            return self.line(label, spec, skipped=f"{label} could not be started: {self.broken[label]}")
        server = None
        if self.args.url:
            database = self.args.database
            admin = self.args.postgres if database else None
            target = Target(label, self.args.origin, self.args.pid, self.run_id, admin, database)
        else:
            try:
                server = STARTERS[label](self.args)
                self.running.append(server)
                await servers.wait_ready(server)
            except servers.ServerStartError as exc:
                # The first line says why; the server's own log tail goes to the terminal only.
                self.broken[label] = str(exc).splitlines()[0]
                print(f"!! {label} could not be started: {exc}", file=sys.stderr, flush=True)
                return self.line(label, spec, skipped=f"{label} could not be started: {self.broken[label]}")
            target = Target(label, server.origin, server.pid, self.run_id, server.admin_url, server.database)
        try:
            result = await self._measure(spec, target)
            if result.get("error") and server is not None:
                # The data directory and log go away with the server, so show the log's end now.
                print(f"!! {label} log ends:\n{servers.log_tail(server)}", file=sys.stderr, flush=True)
            return result
        finally:
            if server is not None:
                self.running.remove(server)
                servers.stop(server)

    async def _measure(self, spec: Spec, target: Target) -> dict[str, Any]:
        assert spec.run is not None
        t0 = time.monotonic()
        async with servers.RssSampler(target.pid) as rss:
            deadline = asyncio.timeout(spec.deadline)
            try:
                async with deadline:
                    result = await spec.run(target, self.sizes)
            except Exception as exc:
                # One scenario's failure is its own line; the run goes on with the next one.
                if isinstance(exc, TimeoutError) and deadline.expired():
                    return self.line(target.label, spec, error=f"deadline of {spec.deadline:.0f} s exceeded")
                return self.line(target.label, spec, error=f"{type(exc).__name__}: {exc}")
        metrics = dict(result.get("metrics") or {})
        if target.pid is not None:
            metrics["server_peak_rss_mib"] = rss.peak_mib
        return self.line(
            target.label,
            spec,
            params=result.get("params"),
            metrics=metrics,
            checks=result.get("checks"),
            elapsed_s=result.get("elapsed_s"),
            wall_s=round(time.monotonic() - t0, 3),
            server_vmhwm_mib=servers.vm_hwm_mib(target.pid) if target.pid else None,
        )

    async def _run_sdk(self, spec: Spec, label: str) -> dict[str, Any]:
        if label != "streamhold":
            return self.line(
                label, spec, skipped="only Streamhold has an in-process Python API", not_applicable=True
            )
        data_dir = servers.fresh_data_dir("sdk")
        try:
            result = await sdk_bench.run_in_child(
                self.sizes.sdk_writes, data_dir, servers.REPO, spec.deadline, self.sizes.sdk_lifecycles
            )
        finally:
            servers.remove_data_dir(data_dir)
        return self.line(label, spec, **result)

    async def _run_big(self, spec: Spec, label: str) -> dict[str, Any]:
        if label != "streamhold" or self.args.url:
            return self.line(label, spec, skipped="big-db fills Streamhold's own store", not_applicable=True)
        if self.big is None:
            self.big = bigdb.BigDb()
        streams = next(n for n in self.args.big_sizes if bigdb.label(n) == spec.key)
        t0 = time.monotonic()
        try:
            result = await asyncio.wait_for(self.big.run(streams, spec.deadline), spec.deadline)
        except Exception as exc:
            return self.line(label, spec, error=f"{type(exc).__name__}: {exc}")
        return self.line(label, spec, **result, wall_s=round(time.monotonic() - t0, 3))

    async def run(self, chosen: list[Spec]) -> None:
        """Every chosen spec against every server, in the order `turns` gives."""
        big = sum(s.deadline for s in chosen if s.group == "big-db")
        budget = self.args.budget or (300.0 if self.args.quick else 900.0) + big
        give_up = time.monotonic() + budget
        for index, spec in enumerate(chosen):
            for round_, label in turns(index, spec.rounds, self.args.server_list):
                extra = {"round": round_, "rounds": spec.rounds} if spec.rounds > 1 else {}
                if time.monotonic() > give_up:
                    skipped = f"the run's budget of {budget:.0f} s was used up"
                    self.emit(self.line(label, spec, skipped=skipped) | extra)
                    continue
                note = f" (round {round_} of {spec.rounds})" if extra else ""
                print(f"== {spec.key} on {label}{note}", file=sys.stderr, flush=True)
                self.emit(await self.run_one(spec, label) | extra)


def turns(index: int, rounds: int, labels: list[str]) -> list[tuple[int, str]]:
    """(round, server) in running order for the index-th scenario: servers take turns going first from one
    scenario to the next, and from one round to the next (A B, B A, A B, ...), so that no server always runs
    on what the other left behind."""
    order = []
    for round_ in range(rounds):
        servers_ = labels[::-1] if (index + round_) % 2 else labels
        order += [(round_ + 1, label) for label in servers_]
    return order


async def _main(args: argparse.Namespace) -> int:
    sizes = QUICK if args.quick else FULL
    chosen = select(specs(sizes, args.big_sizes), args.only)
    if args.rounds:
        chosen = [dataclasses.replace(spec, rounds=args.rounds) for spec in chosen]
    run_id = uuid.uuid4().hex[:8]
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out: Path = args.out or RESULTS / f"{stamp}-{run_id}{'-quick' if args.quick else ''}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    harness = Harness(args, sizes, out, run_id)
    main_task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if main_task is not None:
        loop.add_signal_handler(signal.SIGTERM, main_task.cancel)
    started = time.monotonic()
    try:
        await harness.run(chosen)
    finally:
        harness.stop_all()
        if harness.big is not None:
            harness.big.close()
        loop.remove_signal_handler(signal.SIGTERM)
        _summarise(harness, args, out, time.monotonic() - started)
    if harness.broken:
        return 2
    return 1 if any(line.get("error") for line in harness.lines) else 0


def _summarise(harness: Harness, args: argparse.Namespace, out: Path, seconds: float) -> None:
    print(file=sys.stderr)
    print(report.table(harness.lines, args.server_list))
    found = report.problems(harness.lines)
    if found:
        print("\nNot clean:")
        for sentence in found:
            print(f"  - {sentence}")
    shown = out.relative_to(servers.REPO) if out.is_relative_to(servers.REPO) else out
    print(f"\n{len(harness.lines)} result lines in {shown} ({seconds:.0f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point: raise the open-files limit (servers inherit it), then run on uvloop when present."""
    args = parse_args(argv)
    servers.raise_fd_limit()
    runner: Callable[[Awaitable[int]], int]
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        return runner(_main(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\ninterrupted; every server this run started has been stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
