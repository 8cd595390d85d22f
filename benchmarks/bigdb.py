"""The big-db scenario (opt-in, `--big`): a database of many streams, filled through the store, then listed.

The fill runs in a child process (`python -m benchmarks.bigdb --data-dir DIR --streams N`), through the
store's own create path: concurrent `Store.create` calls, which the writer commits together, each returning
only once its commit is durable. One data directory grows from one size to the next. A server then starts on
it, and one client at a time asks for the list API's first and last page (by offset, as Agentuity's SDK
does) and a deep page by cursor, sorted by created, size and updated, and for the dashboard; the server's
resident memory is sampled meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from benchmarks import servers
from benchmarks.stats import latency_ms, rate
from benchmarks.wire import Client

NAMESPACES = 20
CREATORS = 256  # concurrent creates: the writer commits those queued together in one transaction
PAGE = 50
SAMPLES = 100
SIZES = (100_000, 1_000_000)
# Created walks an index; size and updated scan the table (README, "A million streams").
SORTS = ("created", "size", "updated")


def label(streams: int) -> str:
    return f"big-db-{streams // 1_000_000}M" if streams % 1_000_000 == 0 else f"big-db-{streams // 1000}k"


async def fill(data_dir: Path, streams: int) -> dict[str, Any]:
    """Create streams until the store holds `streams` of them: two closed with 64 bytes for one left open."""
    os.environ["STREAMHOLD_DATA_DIR"] = str(data_dir)
    from streamhold.models import StreamFilter
    from streamhold.settings import Settings
    from streamhold.store.store import Store
    from streamhold.store.transactions import NewStream

    async with Store.open(Settings.from_env()) as store:
        have, _ = await store.list(StreamFilter(), limit=1)
        queue = iter(range(have, streams))

        async def creator() -> None:
            for i in queue:
                new = NewStream(
                    namespace=f"ns{i % NAMESPACES}",
                    name=f"big/{i:07d}",
                    content_type="text/plain",
                    metadata={"user": f"u{i % 1000}"},
                    closed=i % 3 != 0,
                    initial=b"x" * 64 if i % 3 else b"",
                )
                await store.create(new)

        started = time.monotonic()
        await asyncio.gather(*(creator() for _ in range(CREATORS)))
        seconds = time.monotonic() - started
        total, _ = await store.list(StreamFilter(), limit=1)
    return {"created": streams - have, "seconds": round(seconds, 1), "total": total}


async def fill_in_child(data_dir: Path, streams: int, deadline: float) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks.bigdb",
        "--data-dir",
        str(data_dir),
        "--streams",
        str(streams),
        cwd=servers.REPO,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), deadline)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    if process.returncode != 0:
        raise RuntimeError(f"the fill exited with {process.returncode}")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


async def _timed(samples: int, call: Callable[[], Awaitable[bool]]) -> tuple[list[float], int]:
    latencies, failed = [], 0
    for _ in range(samples):
        started = time.monotonic()
        failed += not await call()
        latencies.append(time.monotonic() - started)
    return latencies, failed


async def _page_calls(
    listed: Callable[[dict[str, Any]], Awaitable[Any]], sort: str, total: int
) -> list[tuple[str, Callable[[], Awaitable[bool]]]]:
    """The first page, the last (by offset) and a page from a cursor half-way, of one sort, newest first."""
    order = {"sort": sort, "direction": "desc"}
    # A cursor half-way down: the page after it costs what the first does.
    middle = await listed({**order, "limit": 1, "offset": total // 2})
    deep = (middle or {}).get("next_cursor")

    async def page(body: dict[str, Any]) -> bool:
        found = await listed({**order, "limit": PAGE, **body})
        return found is not None and len(found["streams"]) == PAGE

    async def first_page() -> bool:
        return await page({})

    async def last_page() -> bool:
        return await page({"offset": total - PAGE})

    async def cursor_page() -> bool:
        return await page({"cursor": deep})

    # The created sort keeps the names of the runs before the other sorts were measured.
    prefix = "list" if sort == "created" else f"list_{sort}"
    return [
        (f"{prefix}_first", first_page),
        (f"{prefix}_last", last_page),
        (f"{prefix}_cursor_deep", cursor_page),
    ]


async def measure(origin: Any, streams: int, samples: int = SAMPLES) -> dict[str, Any]:
    """List pages and dashboard latencies (p50/p99) against a server holding `streams` streams."""
    client = Client(origin)
    json_headers = {"content-type": "application/json"}

    async def listed(body: dict[str, Any]) -> Any:
        resp = await client.request("POST", "/stream/list", json_headers, json.dumps(body).encode())
        return json.loads(resp.body) if resp.status == 200 else None

    first = await listed({"limit": PAGE})
    total = first["total"] if first else 0
    calls: list[tuple[str, Callable[[], Awaitable[bool]]]] = []
    for sort in SORTS:
        calls += await _page_calls(listed, sort, total)

    async def dashboard() -> bool:
        resp = await client.request("GET", "/")
        return resp.status == 200 and b'data-total="' in resp.body

    metrics: dict[str, Any] = {"streams": total}
    failed = 0
    for name, call in [*calls, ("dashboard", dashboard)]:
        await call()  # warm
        latencies, bad = await _timed(samples, call)
        failed += bad
        shown = latency_ms(latencies)
        metrics[f"{name}_p50_ms"], metrics[f"{name}_p99_ms"] = shown["p50_ms"], shown["p99_ms"]
    metrics["failed_requests"] = failed
    client.close()
    return {"metrics": metrics, "checks": {"stream_count_matches": total == streams}}


class BigDb:
    """One data directory that grows from one size to the next through the run's big-db scenarios."""

    def __init__(self) -> None:
        self.data_dir = servers.fresh_data_dir("big-db")

    async def run(self, streams: int, deadline: float) -> dict[str, Any]:
        filled = await fill_in_child(self.data_dir, streams, deadline)
        server = servers.start_streamhold(data_dir=self.data_dir)
        try:
            await servers.wait_ready(server, limit_s=120.0)
            async with servers.RssSampler(server.pid) as rss:
                measured = await measure(server.origin, streams)
                rss.sample()
            metrics = {
                "fill_s": filled["seconds"],
                "fill_creates_per_s": rate(filled["created"], filled["seconds"]),
                **measured["metrics"],
                "server_peak_rss_mib": rss.peak_mib,
            }
            return {
                "params": {"streams": streams, "namespaces": NAMESPACES, "page": PAGE, "samples": SAMPLES},
                "metrics": metrics,
                "checks": measured["checks"],
            }
        finally:
            servers.stop(server, keep_data=True)

    def close(self) -> None:
        servers.remove_data_dir(self.data_dir)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bigdb", description=__doc__)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--streams", type=int, required=True)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(fill(args.data_dir, args.streams))), flush=True)


if __name__ == "__main__":
    main()
