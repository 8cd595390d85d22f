"""Write scenarios: many small appends from concurrent writers, and one writer of large appends."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from benchmarks.config import Sizes, Target
from benchmarks.cpu import CpuMeter, per_thousand
from benchmarks.proto import Streams
from benchmarks.stats import MIB, latency_ms, rate

LARGE_APPEND = MIB


def small_payload(sizes: Sizes) -> bytes:
    """An LLM-token-sized append of printable random bytes."""
    return os.urandom(sizes.small_append_bytes // 2).hex().encode()[: sizes.small_append_bytes]


async def append(target: Target, sizes: Sizes) -> dict[str, Any]:
    """16 writers, each to its own stream, each making sequential 64-byte appends."""
    payload = small_payload(sizes)
    names = [target.stream_name("append", str(i)) for i in range(sizes.writers)]
    writers = [Streams(target.origin) for _ in names]
    await asyncio.gather(*(w.create(n) for w, n in zip(writers, names, strict=True)))

    async def write(streams: Streams, name: str) -> list[float]:
        latencies = []
        for _ in range(sizes.appends_per_writer):
            t0 = time.monotonic()
            await streams.append(name, payload)
            latencies.append(time.monotonic() - t0)
        return latencies

    meter = CpuMeter(target.pid, target.admin_url, target.database)
    await meter.start()
    t0 = time.monotonic()
    per_writer = await asyncio.gather(*(write(w, n) for w, n in zip(writers, names, strict=True)))
    elapsed = time.monotonic() - t0
    server_cpu, database_cpu = await meter.stop()
    latencies = [x for lat in per_writer for x in lat]
    total_cpu = None if server_cpu is None or database_cpu is None else server_cpu + database_cpu
    sizes_read = [(await w.catch_up(n)).size for w, n in zip(writers, names, strict=True)]
    for w in writers:
        w.client.close()
    expected = sizes.appends_per_writer * len(payload)
    return {
        "params": {
            "writers": sizes.writers,
            "appends_per_writer": sizes.appends_per_writer,
            "append_bytes": len(payload),
        },
        "metrics": {
            "appends_per_s": rate(len(latencies), elapsed),
            **latency_ms(latencies),
            # CPU seconds per 1,000 appends: the server process, its PostgreSQL backends (0 on SQLite), both.
            "server_cpu_s_per_1k": per_thousand(server_cpu, len(latencies)),
            "database_cpu_s_per_1k": per_thousand(database_cpu, len(latencies)),
            "cpu_s_per_1k": per_thousand(total_cpu, len(latencies)),
        },
        "checks": {"bytes_ok": all(s == expected for s in sizes_read)},
        "elapsed_s": round(elapsed, 3),
    }


async def fill_large(streams: Streams, name: str, total_mib: int) -> list[float]:
    """Append `total_mib` appends of 1 MiB of random bytes to `name`; return each append's time."""
    chunk = os.urandom(LARGE_APPEND)
    times = []
    for _ in range(total_mib):
        t0 = time.monotonic()
        await streams.append(name, chunk)
        times.append(time.monotonic() - t0)
    return times


async def append_large(target: Target, sizes: Sizes) -> dict[str, Any]:
    """One writer, sequential 1 MiB appends up to the large size (128 MiB)."""
    streams = Streams(target.origin, timeout=120.0)
    name = target.stream_name("large")
    await streams.create(name)
    t0 = time.monotonic()
    times = await fill_large(streams, name, sizes.large_total_mib)
    elapsed = time.monotonic() - t0
    size = (await streams.catch_up(name)).size
    streams.client.close()
    return {
        "params": {"append_bytes": LARGE_APPEND, "total_mib": sizes.large_total_mib},
        "metrics": {"mib_per_s": rate(sizes.large_total_mib, elapsed), **latency_ms(times)},
        "checks": {"bytes_ok": size == sizes.large_total_mib * LARGE_APPEND},
        "elapsed_s": round(elapsed, 3),
    }


async def _probe(
    streams: Streams, name: str, payload: bytes, interval_s: float, until: asyncio.Event
) -> list[float]:
    """Appends on a fixed schedule. One that is sent late because an earlier one took long counts from when
    it was due, so a stall weighs in every append it delays, not once."""
    latencies = []
    due = time.monotonic()
    while not until.is_set():
        now = time.monotonic()
        if now < due:
            await asyncio.sleep(due - now)
            now = time.monotonic()  # a timer that wakes late is the load generator's delay, not the server's
        else:
            now = due
        await streams.append(name, payload)
        latencies.append(time.monotonic() - now)
        due += interval_s
    return latencies


async def mixed(target: Target, sizes: Sizes) -> dict[str, Any]:
    """Small appends on a fixed schedule to one stream: first alone, then while one writer makes 1 MiB appends
    to another. How much one stream's large writes slow another stream's small ones."""
    payload = small_payload(sizes)
    small, large = target.stream_name("mixed", "small"), target.stream_name("mixed", "large")
    prober, writer = Streams(target.origin), Streams(target.origin, timeout=120.0)
    await prober.create(small)
    await writer.create(large)
    until = asyncio.Event()
    probing = asyncio.create_task(_probe(prober, small, payload, sizes.probe_interval_s, until))
    await asyncio.sleep(sizes.probe_alone_s)
    until.set()
    alone = await probing
    until.clear()
    probing = asyncio.create_task(_probe(prober, small, payload, sizes.probe_interval_s, until))
    t0 = time.monotonic()
    try:
        await fill_large(writer, large, sizes.mixed_total_mib)
    finally:
        until.set()
        loaded = await probing
    elapsed = time.monotonic() - t0
    small_size = (await prober.catch_up(small)).size
    large_size = (await writer.catch_up(large)).size
    prober.client.close()
    writer.client.close()
    return {
        "params": {
            "probe_interval_ms": sizes.probe_interval_s * 1000,
            "append_bytes": len(payload),
            "large_total_mib": sizes.mixed_total_mib,
        },
        "metrics": {
            **{f"alone_{k}": v for k, v in latency_ms(alone).items()},
            **{f"loaded_{k}": v for k, v in latency_ms(loaded).items()},
            "loaded_probes": len(loaded),
            "large_mib_per_s": rate(sizes.mixed_total_mib, elapsed),
        },
        "checks": {
            "bytes_ok": small_size == (len(alone) + len(loaded)) * len(payload)
            and large_size == sizes.mixed_total_mib * LARGE_APPEND
        },
        "elapsed_s": round(elapsed, 3),
    }
