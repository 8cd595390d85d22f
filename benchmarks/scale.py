"""Scale scenarios: many concurrent creators, and small appends spread over few or over many streams."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from benchmarks.config import Sizes, Target
from benchmarks.proto import Streams
from benchmarks.stats import latency_ms, rate
from benchmarks.writes import small_payload


async def create(target: Target, sizes: Sizes) -> dict[str, Any]:
    """Concurrent creators, each PUTting new streams one after another: creates/s and their latency."""
    creators = [Streams(target.origin) for _ in range(sizes.creators)]
    failed = 0

    async def run(c: int, streams: Streams) -> list[float]:
        nonlocal failed
        latencies = []
        for i in range(sizes.creates_per_creator):
            name = target.stream_name("create", str(c), str(i))
            t0 = time.monotonic()
            resp = await streams.client.request(
                "PUT", streams.path(name), {"Content-Type": "application/octet-stream"}, limit_s=30.0
            )
            latencies.append(time.monotonic() - t0)
            failed += resp.status != 201
        return latencies

    t0 = time.monotonic()
    per_creator = await asyncio.gather(*(run(c, s) for c, s in enumerate(creators)))
    elapsed = time.monotonic() - t0
    latencies = [x for lat in per_creator for x in lat]
    sample = target.stream_name("create", "0", "0")
    exists = (await creators[0].head(sample)).status == 200
    for streams in creators:
        streams.client.close()
    return {
        "params": {"creators": sizes.creators, "creates_per_creator": sizes.creates_per_creator},
        "metrics": {
            "creates_per_s": rate(len(latencies), elapsed),
            **latency_ms(latencies),
            "non_201": failed,
        },
        "checks": {"stream_exists": exists},
        "elapsed_s": round(elapsed, 3),
    }


async def _spread(target: Target, sizes: Sizes, names: list[str]) -> tuple[float, list[float], int]:
    """16 writers of 64-byte appends, each over its share of `names`: (seconds, latencies, non-2xx)."""
    payload = small_payload(sizes)
    writers = [Streams(target.origin) for _ in range(sizes.writers)]
    shares = [names[w :: sizes.writers] for w in range(sizes.writers)]
    failed = 0

    async def write(streams: Streams, share: list[str]) -> list[float]:
        nonlocal failed
        latencies = []
        for i in range(sizes.appends_per_writer):
            t0 = time.monotonic()
            resp = await streams.client.request(
                "POST",
                streams.path(share[i % len(share)]),
                {"Content-Type": "application/octet-stream"},
                payload,
                limit_s=30.0,
            )
            latencies.append(time.monotonic() - t0)
            failed += not 200 <= resp.status < 300
        return latencies

    t0 = time.monotonic()
    per_writer = await asyncio.gather(*(write(w, s) for w, s in zip(writers, shares, strict=True)))
    elapsed = time.monotonic() - t0
    for streams in writers:
        streams.client.close()
    return elapsed, [x for lat in per_writer for x in lat], failed


async def create_all(
    target: Target, names: list[str], creators: int, content_type: str = "application/octet-stream"
) -> None:
    """Create the named streams from `creators` concurrent connections."""
    clients = [Streams(target.origin) for _ in range(creators)]

    async def run(streams: Streams, share: list[str]) -> None:
        for name in share:
            await streams.create(name, content_type)

    await asyncio.gather(*(run(c, names[i::creators]) for i, c in enumerate(clients)))
    for streams in clients:
        streams.client.close()


async def append_spread(target: Target, sizes: Sizes) -> dict[str, Any]:
    """64-byte appends from 16 writers over 16 streams, then over many: both rates, and their ratio."""
    few = [target.stream_name("spread-few", str(i)) for i in range(sizes.writers)]
    many = [target.stream_name("spread-many", str(i)) for i in range(sizes.spread_streams)]
    await create_all(target, few, sizes.writers)
    await create_all(target, many, sizes.creators)
    few_s, few_lat, few_failed = await _spread(target, sizes, few)
    many_s, many_lat, many_failed = await _spread(target, sizes, many)
    few_rate, many_rate = rate(len(few_lat), few_s), rate(len(many_lat), many_s)
    many_ms = latency_ms(many_lat)
    return {
        "params": {
            "writers": sizes.writers,
            "appends_per_writer": sizes.appends_per_writer,
            "many_streams": sizes.spread_streams,
        },
        "metrics": {
            "few_appends_per_s": few_rate,
            "many_appends_per_s": many_rate,
            "many_vs_few": round(many_rate / few_rate, 3) if few_rate and many_rate else None,
            "many_p50_ms": many_ms["p50_ms"],
            "many_p99_ms": many_ms["p99_ms"],
            "non_2xx": few_failed + many_failed,
        },
        "checks": {},
        "elapsed_s": round(few_s + many_s, 3),
    }
