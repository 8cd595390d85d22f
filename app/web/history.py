"""This process's recent figures for the dashboard's charts: fixed-size rings, sampled on a timer.

The last hour keeps every sample (one per `interval`); the last 24 h keeps one point per 5 minutes. Both are
rings of a fixed length, so the memory they take never grows however long the process runs.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ..live import LiveHub
from ..store.store import Store

log = logging.getLogger("streamhold.history")

HOUR = 3600.0
DAY = 86400.0
BUCKET = 300.0
METRICS = ("appends", "bytes", "readers", "stored")
# A 5-minute point of a level (stored bytes) is its last reading; of a rate or a reader count, the mean.
LEVELS = frozenset({"stored"})

Point = tuple[float, float]


class Ring:
    """The last `capacity` (time, value) points; pushing onto a full ring drops the oldest."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("a ring needs room for at least one point")
        self._points: collections.deque[Point] = collections.deque(maxlen=capacity)

    @property
    def capacity(self) -> int:
        return self._points.maxlen or 0

    def __len__(self) -> int:
        return len(self._points)

    def push(self, t: float, value: float) -> None:
        self._points.append((t, value))

    def since(self, start: float) -> list[Point]:
        """The points at or after `start`, oldest first."""
        return [p for p in self._points if p[0] >= start]


@dataclass
class _Bucket:
    """A 5-minute point being gathered: its index, the sum and count of its samples, the latest sample."""

    index: int
    total: float
    count: int
    last: Point

    def point(self, level: bool) -> Point:
        t, value = self.last
        return (t, value if level else self.total / self.count)


@dataclass(frozen=True)
class Reading:
    """Counters and levels read at one instant: writer totals, live readers, stored bytes (None: unread)."""

    appends: int
    bytes: int
    readers: int
    stored: int | None


class History:
    """Per-second rates and levels of this process since it started: the last hour and the last 24 hours."""

    def __init__(self, interval: float = 10.0) -> None:
        if interval <= 0:
            raise ValueError("the sampling interval must be positive")
        self.interval = interval
        self.started_at = time.time()
        self._hour = {m: Ring(math.ceil(HOUR / interval) + 1) for m in METRICS}
        self._day = {m: Ring(int(DAY / BUCKET) + 1) for m in METRICS}
        self._open: dict[str, _Bucket] = {}
        self._counters: tuple[float, int, int] | None = None

    def record(self, now: float, reading: Reading) -> None:
        """Add one sample taken at monotonic time `now`; rates start with the second sample."""
        values: dict[str, float] = {"readers": float(reading.readers)}
        if reading.stored is not None:
            values["stored"] = float(reading.stored)
        if self._counters is not None:
            then, appends, nbytes = self._counters
            elapsed = now - then
            if elapsed > 0:
                # A counter never goes back in one process; clamp anyway rather than draw a negative rate.
                values["appends"] = max(0, reading.appends - appends) / elapsed
                values["bytes"] = max(0, reading.bytes - nbytes) / elapsed
        if self._counters is None or now > self._counters[0]:
            self._counters = (now, reading.appends, reading.bytes)
        for metric, value in values.items():
            self._hour[metric].push(now, value)
            self._gather(metric, now, value)

    def _gather(self, metric: str, now: float, value: float) -> None:
        index = int(now // BUCKET)
        bucket = self._open.get(metric)
        if bucket is not None and bucket.index != index:
            self._day[metric].push(*bucket.point(metric in LEVELS))
            bucket = None
        if bucket is None:
            self._open[metric] = _Bucket(index, value, 1, (now, value))
        else:
            bucket.total += value
            bucket.count += 1
            bucket.last = (now, value)

    def hour(self, metric: str, now: float) -> list[Point]:
        """Every sample of the last hour before `now`."""
        return self._hour[metric].since(now - HOUR)

    def day(self, metric: str, now: float) -> list[Point]:
        """One point per 5 minutes of the last 24 h, the current 5 minutes (so far) last."""
        points = self._day[metric].since(now - DAY)
        bucket = self._open.get(metric)
        if bucket is not None:
            points.append(bucket.point(metric in LEVELS))
        return [p for p in points if p[0] >= now - DAY]

    def capacity(self) -> int:
        """The most points all rings together can ever hold."""
        return sum(r.capacity for r in (*self._hour.values(), *self._day.values()))

    async def sample(self, store: Store, hub: LiveHub) -> None:
        """Read the writer's counters, the hub's readers and the store's stored bytes, and record them."""
        try:
            stored: int | None = int((await store.summary())["stored_bytes"])
        except Exception as exc:
            log.warning("history: could not read the stored bytes (%s); that point is skipped", exc)
            stored = None
        reading = Reading(
            appends=store.writer.appends,
            bytes=store.writer.bytes_appended,
            readers=sum(hub.readers.values()),
            stored=stored,
        )
        self.record(time.monotonic(), reading)

    @contextlib.asynccontextmanager
    async def running(self, store: Store, hub: LiveHub) -> AsyncIterator[History]:
        """Sample every `interval` seconds (the first at once) for as long as the context is open."""

        async def forever() -> None:
            while True:
                try:
                    await self.sample(store, hub)
                except Exception:
                    log.exception("history: a sample failed; trying again at the next interval")
                await asyncio.sleep(self.interval)

        task = asyncio.get_running_loop().create_task(forever())
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
