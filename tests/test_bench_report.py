"""The benchmark's running order and its table: scenarios of several rounds are fair to both servers and
shown as medians."""

from __future__ import annotations

from typing import Any

from benchmarks import report
from benchmarks.run import turns


def _line(server: str, mib_per_s: float, **extra: Any) -> dict[str, Any]:
    return {"server": server, "key": "append-large", "metrics": {"mib_per_s": mib_per_s}, **extra}


def _row(table: str, metric: str) -> list[str]:
    return next(r for r in table.splitlines() if f" {metric} " in r).split()


def test_servers_take_turns_going_first_across_scenarios_and_rounds() -> None:
    servers = ["streamhold", "reference"]
    assert turns(0, 1, servers) == [(1, "streamhold"), (1, "reference")]
    assert turns(1, 1, servers) == [(1, "reference"), (1, "streamhold")]
    order = [label for _, label in turns(1, 4, servers)]
    assert order == ["reference", "streamhold", "streamhold", "reference"] * 2
    positions = {s: sum(i for i, label in enumerate(order) if label == s) for s in servers}
    assert positions["streamhold"] == positions["reference"]


def test_rounds_show_as_each_servers_median_and_their_largest_maximum() -> None:
    lines = [
        _line("streamhold", 300.0, round=1),
        _line("reference", 100.0, round=1),
        _line("reference", 250.0, round=2),
        _line("streamhold", 500.0, round=2),
        _line("streamhold", 400.0, round=3),
        _line("reference", 150.0, round=3),
    ]
    for n, line in enumerate(lines):
        line["metrics"]["max_ms"] = float(n)
    merged = report.combined([line for line in lines if line["server"] == "streamhold"])
    assert merged["metrics"] == {"mib_per_s": 400.0, "max_ms": 4.0, "rounds": 3}
    table = report.table(lines, ["streamhold", "reference"])
    assert _row(table, "mib_per_s")[-3:] == ["400.0", "150.0", "2.67x"]
    assert _row(table, "max_ms")[-3:] == ["4.00", "5.00", "0.80x"]


def test_only_rounds_that_every_server_ran_are_compared() -> None:
    budget = "the run's budget was used up"
    lines = [
        _line("reference", 300.0, round=1),
        _line("streamhold", 400.0, round=1),
        _line("streamhold", 100.0, round=2),
        _line("reference", 0.0, round=2, skipped=budget),
    ]
    table = report.table(lines, ["streamhold", "reference"])
    assert _row(table, "mib_per_s")[-3:] == ["400.0", "300.0", "1.33x"]
    assert _row(table, "rounds")[-2:] == ["1", "1"]
    assert report.problems(lines) == [f"reference / append-large (round 2): n/a: {budget}"]


def test_a_failed_round_fails_the_server_and_skipped_rounds_do_not_count() -> None:
    failed = report.combined(
        [_line("streamhold", 300.0), _line("streamhold", 0.0, error="deadline exceeded")]
    )
    assert failed["error"] == "deadline exceeded"
    partial = report.combined([_line("reference", 120.0), _line("reference", 0.0, skipped="budget used up")])
    assert partial["metrics"] == {"mib_per_s": 120.0, "rounds": 1}
