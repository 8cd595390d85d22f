"""The comparison table printed at the end of a run, and the list of failed checks under it."""

from __future__ import annotations

import statistics
from typing import Any

# Checks whose value must be exactly this; anything else is printed under the table.
_MUST_BE = {
    "bytes_ok": True,
    "closed": True,
    "bytes_match_stored": True,
    "stored_intact": True,
    "reached_close": True,
    "durable": True,
    "out_of_order": 0,
    "offset_regressions": 0,
    "readers_with_loss": 0,
    "readers_not_closed": 0,
    "all_readers_connected": True,
    "writer_stalled": False,
    "stream_closed": True,
    "stream_exists": True,
}
_ZERO_METRICS = ("lost", "duplicated")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 1 else f"{value:,.2f}" if abs(value) < 100 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _ratio(a: Any, b: Any) -> str:
    numeric = (int, float)
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, numeric) or not isinstance(b, numeric):
        return ""
    if b == 0:
        return "=" if a == 0 else ""
    return f"{a / b:.2f}x"


def _status(line: dict[str, Any] | None) -> str | None:
    if line is None:
        return "n/a"
    if line.get("skipped"):
        return "n/a"
    if line.get("error"):
        return "error"
    return None


def combined(rounds: list[dict[str, Any]], keep: set[int] | None = None) -> dict[str, Any]:
    """One server's rounds of one scenario as one line: over the rounds that ran (and are in `keep`), the
    median of each numeric metric, or the largest for maxima and peaks; an error if any round failed."""
    if len(rounds) == 1:
        return rounds[0]
    failed = [line for line in rounds if line.get("error")]
    if failed:
        return failed[0]
    ran = [line for line in rounds if not line.get("skipped") and (keep is None or line.get("round") in keep)]
    if not ran:
        return rounds[0]
    metrics: dict[str, Any] = {}
    for name in ran[0].get("metrics") or {}:
        values = [line["metrics"].get(name) for line in ran]
        numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
        if len(numbers) != len(values):
            metrics[name] = values[0]
        elif name.startswith("max_") or "peak" in name:
            metrics[name] = max(numbers)
        else:
            metrics[name] = statistics.median(numbers)
    metrics["rounds"] = len(ran)
    return {**ran[0], "metrics": metrics}


def _shared_rounds(per_server: dict[str, list[dict[str, Any]]]) -> set[int]:
    """The rounds that every server that ran at all ran, so that no median leans on rounds another server
    did not get to (when the run's budget ends partway)."""
    ran = [{line.get("round") for line in lines if not line.get("skipped")} for lines in per_server.values()]
    ran = [rounds for rounds in ran if rounds]
    return set.intersection(*ran) if ran else set()


def table(lines: list[dict[str, Any]], servers: list[str]) -> str:
    """One row per (scenario, metric), one column per server, and the first/second ratio. A scenario run in
    several rounds shows each server's median over the rounds that every server ran."""
    keys: list[str] = []
    grouped: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for line in lines:
        if line["key"] not in grouped:
            keys.append(line["key"])
            grouped[line["key"]] = {}
        grouped[line["key"]].setdefault(line["server"], []).append(line)
    by_key = {
        key: {server: combined(rounds, _shared_rounds(per)) for server, rounds in per.items()}
        for key, per in grouped.items()
    }
    header = ["scenario", "metric", *servers]
    if len(servers) == 2:
        header.append(f"ratio {servers[0]}/{servers[1]}")
    rows: list[list[str]] = []
    for key in keys:
        results = by_key[key]
        metrics: list[str] = []
        for server in servers:
            for name in (results.get(server) or {}).get("metrics") or {}:
                if name not in metrics:
                    metrics.append(name)
        if not metrics:
            metrics = ["-"]
        for name in metrics:
            values = []
            for server in servers:
                line = results.get(server)
                status = _status(line)
                values.append(status if status else (line or {}).get("metrics", {}).get(name))
            row = [key, name, *(_cell(v) for v in values)]
            if len(servers) == 2:
                row.append("" if name == "rounds" else _ratio(values[0], values[1]))
            rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    for row in rows:
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [c.rjust(w) for c, w in zip(row[2:], widths[2:], strict=True)]
        out.append("  ".join(cells))
    return "\n".join(out)


def problems(lines: list[dict[str, Any]]) -> list[str]:
    """Errors, skips with a reason, and checks that did not hold, one sentence each."""
    found = []
    for line in lines:
        where = f"{line['server']} / {line['key']}"
        if line.get("round"):
            where += f" (round {line['round']})"
        if line.get("error"):
            found.append(f"{where}: error: {line['error']}")
            continue
        if line.get("skipped"):
            if not line.get("not_applicable"):
                found.append(f"{where}: n/a: {line['skipped']}")
            continue
        for name in _ZERO_METRICS:
            value = (line.get("metrics") or {}).get(name)
            if value:
                found.append(f"{where}: {name} = {value} (must be 0)")
        for name, value in (line.get("checks") or {}).items():
            if name in _MUST_BE and value is not None and value != _MUST_BE[name]:
                found.append(f"{where}: check {name} = {value!r} (expected {_MUST_BE[name]!r})")
    return found
