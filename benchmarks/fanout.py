"""Fan-out: one writer appends a timestamped mark every 10 ms; N SSE readers in another process tail it.

The readers only record (arrival time, raw bytes) while the writer runs and parse afterwards, so that the
reader process spends as little of the machine's two cores as possible during the measurement.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import re
import time
from collections import Counter
from multiprocessing.connection import Connection as Pipe
from typing import Any, cast

from benchmarks.config import Sizes, Target
from benchmarks.proto import Streams, stream_path
from benchmarks.sse import SseParser
from benchmarks.stats import decode_marks, encode_mark, latency_ms, loss_and_duplicates, rate
from benchmarks.wire import HttpError, ResponseParser, parse_origin

TEXT = "text/plain"
_CONNECT_CONCURRENCY = 50
_READY_S = 20.0
_CLOSED = re.compile(rb'"streamClosed"\s*:\s*true')


class Recorder(asyncio.Protocol):
    """One SSE reader that stores what arrives and when, and parses nothing until asked."""

    def __init__(self, request: bytes) -> None:
        loop = asyncio.get_running_loop()
        self.request = request
        self.chunks: list[tuple[float, bytes]] = []
        self.ready: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self._head = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.chunks.append((time.monotonic(), data))
        if not self.ready.done():
            self._head += data
            if b"event: control" in self._head or b"event:control" in self._head:
                self.ready.set_result(None)
            elif not self._head.startswith(b"HTTP/1.1 200") and len(self._head) >= 12:
                self.ready.set_exception(HttpError(self._head[:40].decode("latin-1", "replace")))
        if b"streamClosed" in data and _CLOSED.search(data):
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(HttpError("connection closed before the first control event"))
        if not self.closed.done():
            self.closed.set_result(None)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def marks(self) -> list[tuple[int, int, float]]:
        """Parse the recording: (sequence, sent-at ns, arrived-at s) for every mark in a data event."""
        found: list[tuple[int, int, float]] = []
        sse = SseParser()

        def on_body(data: bytes, t: float) -> None:
            for event in sse.feed(data, t):
                if event.kind == "data":
                    found.extend((seq, sent, event.t) for seq, sent in decode_marks(event.data))

        parser = ResponseParser(on_body)
        for t, data in self.chunks:
            try:
                parser.feed(data, t)
            except HttpError:
                break
        return found


async def _readers(
    pipe: Pipe, origin_url: str, path: str, readers: int, connect_s: float, drain_s: float
) -> dict[str, Any]:
    origin = parse_origin(origin_url)
    loop = asyncio.get_running_loop()
    request = (
        f"GET {path}?offset=-1&live=sse HTTP/1.1\r\nHost: {origin.host}:{origin.port}\r\n"
        "Accept: text/event-stream\r\nAccept-Encoding: identity\r\n\r\n"
    ).encode()
    gate = asyncio.Semaphore(_CONNECT_CONCURRENCY)
    recorders: list[Recorder] = []
    errors: list[str] = []

    async def connect() -> None:
        async with gate:
            recorder = Recorder(request)
            try:
                await asyncio.wait_for(
                    loop.create_connection(lambda: recorder, origin.host, origin.port), _READY_S
                )
                await asyncio.wait_for(recorder.ready, _READY_S)
                recorders.append(recorder)
            except TimeoutError:
                errors.append(f"no answer or no first control event within {_READY_S:.0f} s")
                recorder.close()
            except (OSError, HttpError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                recorder.close()

    t0 = time.monotonic()
    try:
        await asyncio.wait_for(asyncio.gather(*(connect() for _ in range(readers))), connect_s)
    except TimeoutError:
        errors.append(f"connecting took longer than {connect_s} s")
    pipe.send(
        {"connected": len(recorders), "errors": tally(errors), "connect_s": round(time.monotonic() - t0, 3)}
    )

    # The writer answers with the count it sent once it has closed the stream.
    cpu0, wall0 = time.process_time(), time.monotonic()
    message = await poll_pipe(pipe, 600.0)
    cpu_share = (time.process_time() - cpu0) / max(1e-9, time.monotonic() - wall0)
    sent = int(message.get("sent", 0)) if message else 0
    pending = [r.closed for r in recorders if not r.closed.done()]
    if pending:
        await asyncio.wait(pending, timeout=drain_s)
    unfinished = sum(1 for r in recorders if not r.closed.done())
    for r in recorders:
        r.close()
    return {**_analyse(recorders, sent, unfinished, errors), "cpu_share": round(cpu_share, 3)}


def _analyse(recorders: list[Recorder], sent: int, unfinished: int, errors: list[str]) -> dict[str, Any]:
    latencies: list[float] = []
    lost = duplicated = out_of_order = readers_with_loss = 0
    for recorder in recorders:
        marks = recorder.marks()
        first_seen: set[int] = set()
        for seq, sent_ns, arrived in marks:
            if seq not in first_seen:
                first_seen.add(seq)
                latencies.append(arrived - sent_ns / 1e9)
        counts = loss_and_duplicates((seq for seq, _, _ in marks), sent)
        lost += counts["lost"]
        duplicated += counts["duplicated"]
        out_of_order += counts["out_of_order"]
        readers_with_loss += 1 if counts["lost"] else 0
        recorder.chunks.clear()
    return {
        "latency": latency_ms(latencies),
        "delivered": len(latencies),
        "lost": lost,
        "duplicated": duplicated,
        "out_of_order": out_of_order,
        "readers_with_loss": readers_with_loss,
        "readers_not_closed": unfinished,
        "errors": tally(errors),
    }


def tally(errors: list[str]) -> list[str]:
    return [f"{count} x {text}" for text, count in Counter(errors).most_common(5)]


async def poll_pipe(pipe: Pipe, wait_s: float) -> dict[str, Any] | None:
    # Polled from the event loop rather than a thread, so that a cancelled run leaves no thread blocked.
    give_up = time.monotonic() + wait_s
    while time.monotonic() < give_up:
        if pipe.poll():
            value = pipe.recv()
            return value if isinstance(value, dict) else None
        await asyncio.sleep(0.05)
    return None


def reader_process(
    pipe: Pipe, origin_url: str, path: str, readers: int, connect_s: float, drain_s: float
) -> None:
    """Entry point of the reader process: connect, report, record, then report the analysis."""
    from benchmarks.servers import raise_fd_limit

    raise_fd_limit()
    try:
        import uvloop

        result = uvloop.run(_readers(pipe, origin_url, path, readers, connect_s, drain_s))
    except ImportError:
        result = asyncio.run(_readers(pipe, origin_url, path, readers, connect_s, drain_s))
    try:
        pipe.send({"result": result})
    except (BrokenPipeError, OSError):
        pass  # the harness gave up on us already


async def receive_from(pipe: Pipe, wait_s: float, what: str) -> dict[str, Any]:
    message = await poll_pipe(pipe, wait_s)
    if message is None:
        raise TimeoutError(f"the reader process did not report {what} within {wait_s:.0f} s")
    return message


async def _write(streams: Streams, name: str, sizes: Sizes) -> tuple[int, float, list[float], bool]:
    """Append marks on the beat until the window ends; stop early if one append never comes back."""
    count = int(sizes.fanout_seconds / sizes.fanout_interval_s)
    start = time.monotonic()
    stop_at = start + sizes.fanout_seconds
    times: list[float] = []
    stalled = False
    for seq in range(count):
        now = time.monotonic()
        if now >= stop_at:
            break
        due = start + seq * sizes.fanout_interval_s
        if due > now:
            await asyncio.sleep(due - now)
        t0 = time.monotonic()
        try:
            await streams.append(name, encode_mark(seq), TEXT)
        except TimeoutError:
            stalled = True  # a result about the server, not a failure of the scenario
            break
        times.append(time.monotonic() - t0)
    return len(times), time.monotonic() - start, times, stalled


async def fanout(target: Target, sizes: Sizes, readers: int) -> dict[str, Any]:
    """N SSE readers tail one stream written every 10 ms: writer pace, delivery latency, loss, duplicates."""
    name = target.stream_name("fanout", str(readers))
    streams = Streams(target.origin)
    await streams.create(name, TEXT)
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    connect_s = 30.0 + readers * 0.05
    process = context.Process(
        target=reader_process,
        name=f"bench-fanout-readers-{readers}",
        daemon=True,
        args=(
            theirs,
            target.origin.url,
            stream_path(target.origin, name),
            readers,
            connect_s,
            sizes.fanout_drain_s,
        ),
    )
    process.start()
    finished = False
    try:
        ready = await receive_from(ours, connect_s + 30.0, "its connections")
        if not ready.get("connected"):
            raise HttpError(f"no SSE reader could connect: {ready.get('errors')}")
        sent, elapsed, append_times, stalled = await _write(streams, name, sizes)
        try:
            await streams.close_stream(name)
            closed = True
        except TimeoutError:
            closed = False  # the readers then stop after the drain time
        ours.send({"sent": sent})
        result = (await receive_from(ours, sizes.fanout_drain_s + 120.0, "its results"))["result"]
        finished = True
    finally:
        streams.client.close()
        stop_process(process, grace=5.0 if finished else 0.0)
    expected_rate = 1.0 / sizes.fanout_interval_s
    return {
        "params": {
            "readers": readers,
            "seconds": sizes.fanout_seconds,
            "interval_ms": sizes.fanout_interval_s * 1000,
        },
        "metrics": {
            "writer_msgs_per_s": rate(sent, elapsed),
            **{f"delivery_{k}": v for k, v in result["latency"].items()},
            "lost": result["lost"],
            "duplicated": result["duplicated"],
        },
        "checks": {
            "readers_connected": ready["connected"],
            "all_readers_connected": ready["connected"] == readers,
            "connect_s": ready["connect_s"],
            "messages_sent": sent,
            "writer_stalled": stalled,
            "stream_closed": closed,
            "pace_target_msgs_per_s": expected_rate,
            "append_p99_ms": latency_ms(append_times)["p99_ms"],
            "delivered": result["delivered"],
            "out_of_order": result["out_of_order"],
            "readers_with_loss": result["readers_with_loss"],
            "readers_not_closed": result["readers_not_closed"],
            "reader_process_cpu_share": result["cpu_share"],
            "reader_errors": result["errors"],
        },
    }


def stop_process(process: multiprocessing.process.BaseProcess, grace: float) -> None:
    process.join(grace)
    if process.is_alive():
        process.terminate()
        process.join(5.0)
    if process.is_alive():
        process.kill()
        process.join(5.0)
