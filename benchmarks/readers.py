"""Idle readers: one SSE reader on each of 10,000 streams, held by one server process.

Measures what a reader costs the server while it waits (resident memory per reader, CPU while all are
idle), then appends to streams picked at random at a modest pace and measures how soon each append reaches
its one reader. The readers live in two client processes of raw asyncio sockets (`fanout.Recorder`), which
record what arrives and parse it only at the end.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import statistics
import time
from multiprocessing.connection import Connection as Pipe
from typing import Any

import psutil

from benchmarks.config import Sizes, Target
from benchmarks.fanout import Recorder, poll_pipe, receive_from, stop_process, tally
from benchmarks.proto import Streams, stream_path
from benchmarks.scale import create_all
from benchmarks.stats import encode_mark, latency_ms, rate
from benchmarks.wire import HttpError, parse_origin

TEXT = "text/plain"
CLIENT_PROCESSES = 2
_CONNECT_CONCURRENCY = 64
_FIRST_EVENT_S = 20.0
_STALL_S = 20.0  # no new reader for this long: the server holds no more, stop trying
_SETTLE_S = 2.0
_SEED = 7


async def _hold(pipe: Pipe, origin_url: str, paths: list[str], connect_s: float) -> dict[str, Any]:
    """Open one reader per path, report how many connected, then record until told to stop."""
    origin = parse_origin(origin_url)
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(_CONNECT_CONCURRENCY)
    recorders: dict[str, Recorder] = {}
    errors: list[str] = []
    last_connected = time.monotonic()

    async def connect(path: str) -> None:
        nonlocal last_connected
        request = (
            f"GET {path}?offset=-1&live=sse HTTP/1.1\r\nHost: {origin.host}:{origin.port}\r\n"
            "Accept: text/event-stream\r\nAccept-Encoding: identity\r\n\r\n"
        ).encode()
        async with gate:
            if time.monotonic() - last_connected > _STALL_S:
                errors.append(f"gave up: no reader connected in the last {_STALL_S:.0f} s")
                return
            recorder = Recorder(request)
            try:
                await asyncio.wait_for(
                    loop.create_connection(lambda: recorder, origin.host, origin.port), _FIRST_EVENT_S
                )
                await asyncio.wait_for(recorder.ready, _FIRST_EVENT_S)
                recorders[path] = recorder
                last_connected = time.monotonic()
            except TimeoutError:
                errors.append(f"no answer or no first control event within {_FIRST_EVENT_S:.0f} s")
                recorder.close()
            except (OSError, HttpError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                recorder.close()

    t0 = time.monotonic()
    try:
        await asyncio.wait_for(asyncio.gather(*(connect(p) for p in paths)), connect_s)
    except TimeoutError:
        errors.append(f"connecting took longer than {connect_s:.0f} s")
    pipe.send({"connected": list(recorders), "errors": tally(errors), "connect_s": time.monotonic() - t0})
    try:
        await poll_pipe(pipe, 600.0)  # the writer says when it is done
        still_open = sum(1 for r in recorders.values() if not r.closed.done())
        seen: dict[str, list[int]] = {}
        arrivals: list[tuple[int, float, float]] = []  # (sequence, sent at, arrived at)
        for path, recorder in recorders.items():
            marks = recorder.marks()
            if marks:
                seen[path] = [seq for seq, _, _ in marks]
                arrivals.extend((seq, sent_ns / 1e9, arrived) for seq, sent_ns, arrived in marks)
            recorder.chunks.clear()
    finally:
        for recorder in recorders.values():
            recorder.close()
        await asyncio.sleep(0.1)  # let the closes go out before the loop ends
    return {"seen": seen, "arrivals": arrivals, "still_open": still_open}


def holder_process(pipe: Pipe, origin_url: str, paths: list[str], connect_s: float) -> None:
    """Entry point of a client process: hold its share of the readers, then report what they saw."""
    from benchmarks.servers import raise_fd_limit

    raise_fd_limit()
    try:
        import uvloop

        result = uvloop.run(_hold(pipe, origin_url, paths, connect_s))
    except ImportError:
        result = asyncio.run(_hold(pipe, origin_url, paths, connect_s))
    try:
        pipe.send({"result": result})
    except (BrokenPipeError, OSError):
        pass


def _rss(pid: int | None, samples: int = 5) -> int | None:
    """The server's resident memory: the median of a few samples over a second."""
    if pid is None:
        return None
    values = []
    for i in range(samples):
        try:
            values.append(psutil.Process(pid).memory_info().rss)
        except psutil.Error:
            return None
        if i + 1 < samples:
            time.sleep(1.0 / samples)
    return int(statistics.median(values))


async def _idle_cpu(pid: int | None, seconds: float) -> float | None:
    """The server's CPU use over `seconds`, in percent of one core."""
    if pid is None:
        return None
    try:
        proc = psutil.Process(pid)
        before, t0 = proc.cpu_times(), time.monotonic()
        await asyncio.sleep(seconds)
        after, t1 = proc.cpu_times(), time.monotonic()
    except psutil.Error:
        return None
    used = (after.user - before.user) + (after.system - before.system)
    return round(100.0 * used / (t1 - t0), 1)


async def _append(
    streams: Streams, names: list[str], count: int, interval: float
) -> tuple[dict[str, list[int]], dict[int, float], float, bool]:
    """`count` appends, each to a stream picked at random, one every `interval` seconds; stop early if one
    never comes back (a result about the server, not a failure of the scenario)."""
    pick = random.Random(_SEED)
    sent: dict[str, list[int]] = {}
    acked: dict[int, float] = {}  # sequence -> when its append was acknowledged
    start = time.monotonic()
    for seq in range(count):
        due = start + seq * interval
        now = time.monotonic()
        if due > now:
            await asyncio.sleep(due - now)
        name = pick.choice(names)
        try:
            await streams.append(name, encode_mark(seq), TEXT)
        except TimeoutError:
            return sent, acked, time.monotonic() - start, True
        acked[seq] = time.monotonic()
        sent.setdefault(name, []).append(seq)
    return sent, acked, time.monotonic() - start, False


async def idle_readers(target: Target, sizes: Sizes) -> dict[str, Any]:
    """10,000 streams with one idle SSE reader each: memory per reader, idle CPU, delivery latency."""
    count = sizes.idle_readers
    names = [target.stream_name("idle", str(i)) for i in range(count)]
    await create_all(target, names, sizes.creators, TEXT)
    paths = {stream_path(target.origin, name): name for name in names}
    await asyncio.sleep(_SETTLE_S)
    rss_before = await asyncio.to_thread(_rss, target.pid)

    context = multiprocessing.get_context("spawn")
    connect_s = 60.0 + count * 0.01
    shares = [list(paths)[i::CLIENT_PROCESSES] for i in range(CLIENT_PROCESSES)]
    pipes, processes = [], []
    for i, share in enumerate(shares):
        ours, theirs = context.Pipe()
        process = context.Process(
            target=holder_process,
            name=f"bench-idle-readers-{i}",
            daemon=True,
            args=(theirs, target.origin.url, share, connect_s),
        )
        process.start()
        pipes.append(ours)
        processes.append(process)
    streams = Streams(target.origin)
    finished = False
    try:
        ready = [await receive_from(p, connect_s + 30.0, "its connections") for p in pipes]
        open_names = [paths[path] for r in ready for path in r.get("connected", [])]
        connected = len(open_names)
        await asyncio.sleep(_SETTLE_S)
        rss_after = await asyncio.to_thread(_rss, target.pid)
        idle_cpu = await _idle_cpu(target.pid, sizes.idle_cpu_s)
        sent: dict[str, list[int]] = {}
        acked: dict[int, float] = {}
        elapsed, stalled = 0.0, False
        if connected:
            sent, acked, elapsed, stalled = await _append(
                streams, open_names, sizes.idle_appends, sizes.idle_append_interval_s
            )
        await asyncio.sleep(_SETTLE_S)  # the last appends reach their readers
        for pipe in pipes:
            pipe.send({"done": True})
        results = [(await receive_from(p, 120.0, "its results"))["result"] for p in pipes]
        finished = True
    finally:
        streams.client.close()
        for process in processes:
            stop_process(process, grace=10.0 if finished else 0.0)

    seen: dict[str, list[int]] = {}
    arrivals: list[tuple[int, float, float]] = []
    for result in results:
        seen.update({paths[path]: seqs for path, seqs in result["seen"].items()})
        arrivals.extend(tuple(a) for a in result["arrivals"])
    latencies = [arrived - sent_at for _, sent_at, arrived in arrivals]
    # After the writer had its acknowledgement: the live path alone, without the append's own commit.
    after_ack = [arrived - acked[seq] for seq, _, arrived in arrivals if seq in acked]
    append_times = [acked[seq] - sent_at for seq, sent_at, _ in arrivals if seq in acked]
    lost = duplicated = out_of_order = 0
    for name, seqs in sent.items():
        got = seen.get(name, [])
        lost += len(set(seqs) - set(got))
        duplicated += len(got) - len(set(got))
        out_of_order += sum(1 for a, b in zip(got, got[1:], strict=False) if b < a)
    per_reader = (
        round((rss_after - rss_before) / connected / 1024, 1)
        if connected and rss_before is not None and rss_after is not None
        else None
    )
    appended = sum(len(s) for s in sent.values())
    return {
        "params": {
            "streams": count,
            "appends": sizes.idle_appends,
            "append_interval_ms": sizes.idle_append_interval_s * 1000,
            "client_processes": CLIENT_PROCESSES,
        },
        "metrics": {
            "readers_connected": connected,
            "server_kib_per_reader": per_reader,
            "server_rss_before_mib": _mib(rss_before),
            "server_rss_readers_mib": _mib(rss_after),
            "server_idle_cpu_pct": idle_cpu,
            "connect_s": round(max(float(r.get("connect_s", 0.0)) for r in ready), 1),
            "appends_per_s": rate(appended, elapsed),
            **{f"delivery_{k}": v for k, v in latency_ms(latencies).items()},
            "append_p50_ms": latency_ms(append_times)["p50_ms"],
            "append_p99_ms": latency_ms(append_times)["p99_ms"],
            "after_ack_p99_ms": latency_ms(after_ack)["p99_ms"],
            "lost": lost,
            "duplicated": duplicated,
        },
        "checks": {
            "all_readers_connected": connected == count,
            "writer_stalled": stalled,
            "readers_still_open": sum(int(r["still_open"]) for r in results),
            "delivered": len(latencies),
            "out_of_order": out_of_order,
            "reader_errors": [e for r in ready for e in r.get("errors", [])],
        },
    }


def _mib(value: int | None) -> float | None:
    return None if value is None else round(value / (1024 * 1024), 1)
