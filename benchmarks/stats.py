"""Numbers for the result lines: percentiles, rates, and the sequence marks that live scenarios send."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Sequence

MIB = 1024 * 1024
_MARK = re.compile(r"m(\d+):(\d+);")


def percentile(values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile of unsorted values (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[rank - 1]


def ms(seconds: float | None) -> float | None:
    """Seconds to milliseconds, rounded for a result line."""
    return None if seconds is None else round(seconds * 1000.0, 3)


def latency_ms(values: Sequence[float]) -> dict[str, float | None]:
    """p50, p99 and max of latencies given in seconds, in milliseconds."""
    return {
        "p50_ms": ms(percentile(values, 50)),
        "p99_ms": ms(percentile(values, 99)),
        "max_ms": ms(max(values) if values else None),
    }


def rate(count: float, seconds: float, digits: int = 1) -> float | None:
    """count per second, rounded."""
    return round(count / seconds, digits) if seconds > 0 else None


def encode_mark(seq: int) -> bytes:
    """One message of a live scenario: its sequence number and when it was sent (monotonic ns)."""
    return f"m{seq:08d}:{time.monotonic_ns()};".encode()


def decode_marks(text: str) -> list[tuple[int, int]]:
    """Every (sequence, sent-at ns) mark in the text, in order."""
    return [(int(seq), int(sent)) for seq, sent in _MARK.findall(text)]


def loss_and_duplicates(seqs: Iterable[int], sent: int) -> dict[str, int]:
    """Count messages 0..sent-1 that were never seen, seen twice, or seen out of order."""
    seen: set[int] = set()
    duplicated = out_of_order = 0
    last = -1
    for seq in seqs:
        if seq in seen:
            duplicated += 1
        seen.add(seq)
        if seq < last:
            out_of_order += 1
        last = max(last, seq)
    lost = sum(1 for seq in range(sent) if seq not in seen)
    return {"lost": lost, "duplicated": duplicated, "out_of_order": out_of_order}
