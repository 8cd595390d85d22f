"""Live reads: time to first byte for a waiting reader, and a reader that keeps dropping and resuming."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

from benchmarks.config import Sizes, Target
from benchmarks.proto import StreamError, Streams
from benchmarks.sse import SseEvent, SseSession
from benchmarks.stats import decode_marks, encode_mark, latency_ms, loss_and_duplicates
from benchmarks.wire import HttpError

TEXT = "text/plain"
_EVENT_TIMEOUT = 10.0
_PARK_S = 0.02  # a long-poll is sent this long before the append, so that it is waiting at the server


async def _next_of(session: SseSession, kind: str) -> SseEvent:
    while True:
        event = await session.next(_EVENT_TIMEOUT)
        if event is None:
            raise StreamError("the server ended the SSE stream early")
        if event.kind == kind:
            return event


async def _ttfb_sse(target: Target, samples: int) -> list[float]:
    name = target.stream_name("ttfb-sse")
    writer = Streams(target.origin)
    await writer.create(name, TEXT)
    session = await SseSession.open(target.origin, writer.path(name), "-1")
    try:
        await _next_of(session, "control")
        latencies = []
        for i in range(samples):
            await asyncio.sleep(0.005)
            t0 = time.monotonic()
            await writer.append(name, b"t%d;" % i, TEXT)
            data = await _next_of(session, "data")
            latencies.append(data.t - t0)
            await _next_of(session, "control")
        return latencies
    finally:
        session.close()
        writer.client.close()


async def _ttfb_long_poll(target: Target, samples: int) -> tuple[list[float], int]:
    name = target.stream_name("ttfb-lp")
    writer, reader = Streams(target.origin), Streams(target.origin)
    offset = await writer.create(name, TEXT)
    latencies, early = [], 0
    try:
        for i in range(samples):
            poll = asyncio.create_task(reader.long_poll(name, offset, limit_s=_EVENT_TIMEOUT))
            await asyncio.sleep(_PARK_S)
            if poll.done():  # answered before the append: not a waiting reader, so not a sample
                early += 1
                offset = (await poll).header("stream-next-offset") or offset
                continue
            t0 = time.monotonic()
            await writer.append(name, b"t%d;" % i, TEXT)
            resp = await poll
            if resp.status == 200:
                latencies.append(resp.t_first_byte - t0)
            else:
                early += 1
            offset = resp.header("stream-next-offset") or offset
        return latencies, early
    finally:
        writer.client.close()
        reader.client.close()


async def ttfb(target: Target, sizes: Sizes) -> dict[str, Any]:
    """A reader waits at the tail of a fresh stream; time from an append to the reader's first byte."""
    sse = await _ttfb_sse(target, sizes.ttfb_samples)
    long_poll, early = await _ttfb_long_poll(target, sizes.ttfb_samples)
    sse_ms, lp_ms = latency_ms(sse), latency_ms(long_poll)
    return {
        "params": {"samples": sizes.ttfb_samples},
        "metrics": {
            "sse_p50_ms": sse_ms["p50_ms"],
            "sse_p99_ms": sse_ms["p99_ms"],
            "long_poll_p50_ms": lp_ms["p50_ms"],
            "long_poll_p99_ms": lp_ms["p99_ms"],
        },
        "checks": {
            "sse_samples": len(sse),
            "long_poll_samples": len(long_poll),
            "long_poll_not_waiting": early,
        },
    }


class _Resumer:
    """A reader that keeps only what a control event (or a long-poll reply) vouched for, and resumes there."""

    def __init__(self, target: Target, name: str, rng: random.Random) -> None:
        self.target = target
        self.name = name
        self.rng = rng
        self.streams = Streams(target.origin)
        self.offset = "-1"
        self.parts: list[str] = []
        self.offset_regressions = 0
        self.regression_examples: list[str] = []
        self.drops = 0

    def _commit(self, data: list[str], next_offset: str, via: str) -> None:
        if next_offset < self.offset:
            self.offset_regressions += 1
            if len(self.regression_examples) < 3:
                self.regression_examples.append(f"{via}: {self.offset} -> {next_offset}")
        self.parts.extend(data)
        self.offset = next_offset

    async def sse_cycle(self, until_closed: bool = False) -> bool:
        """Read by SSE, then drop after a few events or a few ms; True once the stream is closed."""
        session = await SseSession.open(self.target.origin, self.streams.path(self.name), self.offset)
        limit_events = self.rng.randint(1, 4)
        drop_mid_event = self.rng.random() < 0.5
        give_up = time.monotonic() + (_EVENT_TIMEOUT if until_closed else self.rng.uniform(0.005, 0.05))
        pending: list[str] = []
        seen = 0
        try:
            while (left := give_up - time.monotonic()) > 0:
                try:
                    event = await session.next(left)
                except TimeoutError:
                    break
                if event is None:
                    break
                if event.kind == "data":
                    pending.append(event.data)
                    seen += 1
                    if not until_closed and seen >= limit_events and drop_mid_event:
                        break  # the data has no control event yet, so it is thrown away
                elif event.kind == "control":
                    control = event.control()
                    self._commit(pending, str(control.get("streamNextOffset", self.offset)), "sse control")
                    pending = []
                    if control.get("streamClosed"):
                        return True
                    if not until_closed and seen >= limit_events:
                        break
        finally:
            session.close()
            self.drops += 0 if until_closed else 1
        return False

    async def long_poll_cycle(self) -> None:
        """One to three long-polls; the last is dropped while it may still be waiting."""
        polls = self.rng.randint(1, 3)
        for k in range(polls):
            poll = asyncio.create_task(self.streams.long_poll(self.name, self.offset, limit_s=_EVENT_TIMEOUT))
            if k == polls - 1:
                done, _ = await asyncio.wait({poll}, timeout=self.rng.uniform(0.001, 0.03))
                if not done:
                    poll.cancel()
                    await asyncio.gather(poll, return_exceptions=True)
                    self.drops += 1
                    return
            resp = await poll
            body = [resp.body.decode()] if resp.status == 200 and resp.body else []
            self._commit(body, resp.header("stream-next-offset") or self.offset, f"long-poll {resp.status}")
        self.drops += 1  # the last poll answered in time; dropping now loses nothing in flight

    def text(self) -> str:
        """Everything committed so far."""
        return "".join(self.parts)


async def resume(target: Target, sizes: Sizes) -> dict[str, Any]:
    """A writer appends every few ms while a reader drops its connection N times, resuming each time."""
    name = target.stream_name("resume")
    writer = Streams(target.origin)
    await writer.create(name, TEXT)
    stop = asyncio.Event()
    sent = 0

    async def write() -> None:
        nonlocal sent
        write_until = time.monotonic() + 120.0
        while not stop.is_set() and sent < 100_000 and time.monotonic() < write_until:
            await writer.append(name, encode_mark(sent), TEXT)
            sent += 1
            await asyncio.sleep(sizes.resume_interval_s)

    reader = _Resumer(target, name, random.Random(8))
    writing = asyncio.create_task(write())
    try:
        for cycle in range(sizes.resume_drops):
            if writing.done():
                break
            if cycle % 2 == 0:
                await reader.sse_cycle()
            else:
                await reader.long_poll_cycle()
    finally:
        stop.set()
        await writing
    await writer.close_stream(name)
    closed = False
    for _ in range(5):
        try:
            if closed := await reader.sse_cycle(until_closed=True):
                break
        except (HttpError, StreamError):
            await asyncio.sleep(0.1)
    stored = (await writer.catch_up(name, keep_body=True)).body.decode()
    writer.client.close()
    reader.streams.client.close()
    got = reader.text()
    counts = loss_and_duplicates((seq for seq, _ in decode_marks(got)), sent)
    return {
        "params": {"drops": sizes.resume_drops, "write_interval_ms": sizes.resume_interval_s * 1000},
        "metrics": {"lost": counts["lost"], "duplicated": counts["duplicated"]},
        "checks": {
            "messages_sent": sent,
            "drops_done": reader.drops,
            "out_of_order": counts["out_of_order"],
            "offset_regressions": reader.offset_regressions,
            "offset_regression_examples": reader.regression_examples,
            "reached_close": closed,
            "bytes_match_stored": got == stored,
            "stored_intact": [s for s, _ in decode_marks(stored)] == list(range(sent)),
        },
    }
