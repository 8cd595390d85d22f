"""Catch-up scenarios: read a large stream, and a closed stream made of many tiny appends, from the start."""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

from benchmarks.config import Sizes, Target
from benchmarks.proto import CatchUp, Streams
from benchmarks.stats import MIB, rate
from benchmarks.writes import LARGE_APPEND, fill_large

_FILL_WRITERS = 16


async def _timed_reads(streams: Streams, name: str, rounds: int) -> list[tuple[float, CatchUp]]:
    results = []
    for _ in range(rounds):
        t0 = time.monotonic()
        got = await streams.catch_up(name, deadline=time.monotonic() + 120.0)
        results.append((time.monotonic() - t0, got))
    return results


def _summary(results: list[tuple[float, CatchUp]], expected: int) -> dict[str, Any]:
    speeds = [got.size / MIB / elapsed for elapsed, got in results if elapsed > 0]
    return {
        "metrics": {
            "mib_per_s": round(statistics.median(speeds), 1) if speeds else None,
            "first_read_mib_per_s": round(speeds[0], 1) if speeds else None,
            "requests_per_read": results[0][1].requests if results else None,
        },
        "checks": {"bytes_ok": all(got.size == expected for _, got in results)},
    }


async def catch_up(target: Target, sizes: Sizes) -> dict[str, Any]:
    """Fill the large stream (not timed), then read it from the start a few times: median MiB/s."""
    streams = Streams(target.origin, timeout=120.0)
    name = target.stream_name("large")
    await streams.create(name)
    await fill_large(streams, name, sizes.large_total_mib)
    results = await _timed_reads(streams, name, sizes.catch_up_rounds)
    streams.client.close()
    return {
        "params": {"total_mib": sizes.large_total_mib, "rounds": sizes.catch_up_rounds},
        **_summary(results, sizes.large_total_mib * LARGE_APPEND),
        "elapsed_s": round(sum(e for e, _ in results), 3),
    }


async def catch_up_small(target: Target, sizes: Sizes) -> dict[str, Any]:
    """Fill one stream with tiny appends from 16 concurrent writers, close it, then read it from the start."""
    name = target.stream_name("small")
    payload = b"s" * (sizes.small_append_bytes - 1) + b"\n"
    writers = [Streams(target.origin) for _ in range(_FILL_WRITERS)]
    await writers[0].create(name)
    per_writer = [sizes.small_stream_appends // _FILL_WRITERS] * _FILL_WRITERS
    per_writer[0] += sizes.small_stream_appends - sum(per_writer)

    async def fill(streams: Streams, count: int) -> None:
        for _ in range(count):
            await streams.append(name, payload)

    t0 = time.monotonic()
    await asyncio.gather(*(fill(w, c) for w, c in zip(writers, per_writer, strict=True)))
    fill_elapsed = time.monotonic() - t0
    await writers[0].close_stream(name)
    for w in writers[1:]:
        w.client.close()
    results = await _timed_reads(writers[0], name, sizes.small_read_rounds)
    writers[0].client.close()
    summary = _summary(results, sizes.small_stream_appends * len(payload))
    summary["checks"]["closed"] = all(got.closed for _, got in results)
    summary["metrics"]["fill_appends_per_s"] = rate(sizes.small_stream_appends, fill_elapsed)
    return {
        "params": {
            "appends": sizes.small_stream_appends,
            "append_bytes": len(payload),
            "fill_writers": _FILL_WRITERS,
            "rounds": sizes.small_read_rounds,
        },
        **summary,
        "elapsed_s": round(sum(e for e, _ in results), 3),
    }
