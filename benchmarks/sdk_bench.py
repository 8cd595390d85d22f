"""In-process writes through Streamhold's Python SDK (no HTTP); only Streamhold has this, so peers show n/a.

Run by the harness in a child process (`python -m benchmarks.sdk_bench --writes N --data-dir DIR`) so that
importing `app` and its store cannot disturb the harness; it prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.stats import rate

PAYLOAD = b"x" * 16
NOT_AVAILABLE = 3
LIFECYCLE_TASKS = 64


async def _write_all(streams: Any, name: str, writes: int, await_each: bool) -> tuple[float, Any]:
    stream = await streams.create(name)
    t0 = time.monotonic()
    for _ in range(writes):
        pending = stream.write(PAYLOAD)  # enqueued at call time; awaiting each is optional
        if await_each:
            await pending
    await stream.close()  # returns once every write is committed
    elapsed = time.monotonic() - t0
    info = None
    if hasattr(streams, "get"):
        with contextlib.suppress(Exception):
            info = await streams.get(stream.id)
    return elapsed, info


async def _lifecycles(streams: Any, total: int, tasks: int) -> tuple[float, float]:
    """`tasks` concurrent tasks each create a stream, write once and close it, `total` times in all."""
    left = [total]

    async def worker() -> None:
        while left[0] > 0:
            left[0] -= 1
            stream = await streams.create("lifecycle")
            stream.write(PAYLOAD)
            await stream.close()

    t0, cpu0 = time.monotonic(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    return time.monotonic() - t0, time.process_time() - cpu0


async def sdk_writes(writes: int, data_dir: Path, lifecycles: int = 0) -> dict[str, Any]:
    """Write 16-byte chunks to one stream through `create_agent_context()`: writes/s until durable."""
    os.environ["STREAMHOLD_DATA_DIR"] = str(data_dir)
    # Imported here, lazily: the harness must work without Streamhold.
    from streamhold.sdk.context import create_agent_context
    from streamhold.settings import Settings

    settings = Settings.from_env()
    context = create_agent_context(settings)
    async with contextlib.AsyncExitStack() as stack:
        if hasattr(context, "__aenter__"):
            context = await stack.enter_async_context(context)
        streams = context.stream
        elapsed, info = await _write_all(streams, "bench", writes, await_each=False)
        awaited = max(1, writes // 10)
        awaited_elapsed, _ = await _write_all(streams, "bench-awaited", awaited, await_each=True)
        lifecycle_elapsed, lifecycle_cpu = (
            await _lifecycles(streams, lifecycles, LIFECYCLE_TASKS) if lifecycles else (0.0, 0.0)
        )
    size = getattr(info, "size_bytes", None)
    return {
        "params": {
            "writes": writes,
            "write_bytes": len(PAYLOAD),
            "awaited_writes": awaited,
            "lifecycles": lifecycles,
            "lifecycle_tasks": LIFECYCLE_TASKS,
        },
        "metrics": {
            "writes_per_s": rate(writes, elapsed),
            "awaited_writes_per_s": rate(awaited, awaited_elapsed),
            # create + one write + close, by 64 concurrent tasks
            "lifecycles_per_s": rate(lifecycles, lifecycle_elapsed) if lifecycles else None,
            # the process's CPU time (all threads) per sequence: steadier than the rate on a shared machine
            "lifecycle_cpu_us": round(1e6 * lifecycle_cpu / lifecycles, 1) if lifecycles else None,
        },
        "checks": {"durable": True, "bytes_ok": None if size is None else size == writes * len(PAYLOAD)},
        "elapsed_s": round(elapsed, 3),
    }


async def run_in_child(
    writes: int, data_dir: Path, repo: Path, limit_s: float, lifecycles: int = 0
) -> dict[str, Any]:
    """Run the SDK scenario in a child Python; return its result, or {"skipped"|"error": why}."""
    cmd = [sys.executable, "-m", "benchmarks.sdk_bench", "--writes", str(writes), "--data-dir", str(data_dir)]
    cmd += ["--lifecycles", str(lifecycles)]
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        cwd=repo,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), limit_s)
    except BaseException as exc:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if isinstance(exc, TimeoutError):
            return {"error": f"the SDK scenario took longer than {limit_s:.0f} s"}
        raise
    lines = [line for line in out.decode(errors="replace").splitlines() if line.startswith("{")]
    if proc.returncode == 0 and lines:
        result: dict[str, Any] = json.loads(lines[-1])
        return result
    if lines:
        text = str(json.loads(lines[-1]).get("error", "unknown error"))
    else:
        tail = err.decode(errors="replace").strip().splitlines()
        text = tail[-1] if tail else f"exit code {proc.returncode} and no output"
    return {"skipped" if proc.returncode == NOT_AVAILABLE else "error": text}


def main() -> None:
    """Command line entry for the child process."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--writes", type=int, default=20_000)
    parser.add_argument("--lifecycles", type=int, default=0, help="create+write+close sequences to time")
    parser.add_argument("--data-dir", type=Path, required=True)
    args = parser.parse_args()
    args.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        result = asyncio.run(sdk_writes(args.writes, args.data_dir, args.lifecycles))
    except (ImportError, AttributeError) as exc:
        print(json.dumps({"error": f"Streamhold's SDK is not usable here: {type(exc).__name__}: {exc}"}))
        sys.exit(NOT_AVAILABLE)
    except Exception as exc:  # reported to the harness as this scenario's error
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        sys.exit(1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
