"""Prometheus text exposition (format 0.0.4), written by hand, and the request-latency middleware."""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import parse_qs

from litestar.datastructures import State
from litestar.types import ASGIApp, Message, Receive, Scope, Send

CONTENT_TYPE = "text/plain; version=0.0.4"  # Litestar adds "; charset=utf-8" to text types
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LIVE_MODES = ("long-poll", "sse")
_STATE_KEY = "request_metrics"

Labels = tuple[tuple[str, str], ...]


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return str(int(value)) if float(value).is_integer() and abs(value) < 2**53 else repr(float(value))


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_escape_label(value)}"' for key, value in labels) + "}"


class Exposition:
    """Builds one scrape: each metric family once, with its HELP and TYPE lines before its samples."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._names: set[str] = set()

    def family(self, name: str, kind: str, help_text: str, samples: Iterable[tuple[Labels, float]]) -> None:
        """Add a counter, gauge or untyped family; counters must be named ``*_total``."""
        if kind == "counter" and not name.endswith("_total"):
            raise ValueError(f"counter {name} must end in _total")
        self._header(name, kind, help_text)
        self._lines.extend(f"{name}{_labels(labels)} {_number(value)}" for labels, value in samples)

    def scalar(self, name: str, kind: str, help_text: str, value: float) -> None:
        """Add a family with one unlabelled sample."""
        self.family(name, kind, help_text, [((), value)])

    def histogram(self, name: str, help_text: str, histogram: Histogram) -> None:
        """Add a histogram: cumulative `_bucket` samples up to `le="+Inf"`, then `_sum` and `_count`."""
        self._header(name, "histogram", help_text)
        for labels, series in histogram.series():
            running = 0
            for bound, count in zip((*histogram.buckets, math.inf), series.counts, strict=True):
                running += count
                self._lines.append(f"{name}_bucket{_labels((*labels, ('le', _number(bound))))} {running}")
            self._lines.append(f"{name}_sum{_labels(labels)} {_number(series.total)}")
            self._lines.append(f"{name}_count{_labels(labels)} {running}")

    def _header(self, name: str, kind: str, help_text: str) -> None:
        if name in self._names:
            raise ValueError(f"metric family {name} added twice")
        self._names.add(name)
        escaped = help_text.replace("\\", "\\\\").replace("\n", "\\n")
        self._lines += [f"# HELP {name} {escaped}", f"# TYPE {name} {kind}"]

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"


@dataclass
class _Series:
    counts: list[int]
    total: float = 0.0


@dataclass
class Histogram:
    """Observations counted into fixed buckets, one series per label set."""

    buckets: tuple[float, ...] = LATENCY_BUCKETS
    _series: dict[Labels, _Series] = field(default_factory=dict)

    def observe(self, labels: Labels, value: float) -> None:
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = _Series([0] * (len(self.buckets) + 1))
        # bisect_left: a value equal to a bound belongs in that bound's bucket (le means "less or equal").
        series.counts[bisect.bisect_left(self.buckets, value)] += 1
        series.total += value

    def series(self) -> list[tuple[Labels, _Series]]:
        return sorted(self._series.items())


@dataclass
class RequestMetrics:
    """This process's HTTP figures: handler latency (not live waits) and responses by status."""

    latency: Histogram = field(default_factory=Histogram)
    responses: dict[Labels, int] = field(default_factory=dict)
    live_requests: dict[str, int] = field(default_factory=dict)

    def record(self, labels: Labels, status: int, seconds: float | None) -> None:
        """One response: its status, and its latency unless it was a live read (`seconds` None)."""
        if seconds is not None:
            self.latency.observe(labels, seconds)
        key = (*labels, ("code", str(status)))
        self.responses[key] = self.responses.get(key, 0) + 1


def request_metrics(state: State) -> RequestMetrics:
    """The app's request metrics, created on first use."""
    metrics = state.get(_STATE_KEY)
    if metrics is None:
        metrics = RequestMetrics()
        state[_STATE_KEY] = metrics
    return metrics


def _live_mode(scope: Scope) -> str | None:
    query = scope.get("query_string", b"")
    if b"live=" not in query:
        return None
    values = parse_qs(query.decode("latin-1")).get("live", [])
    return values[0] if len(values) == 1 and values[0] in LIVE_MODES else None


def _mount_path(scope: Scope) -> str | None:
    """The path of a mounted ASGI handler (such as the protocol's), which routing leaves no template for."""
    handler = scope.get("route_handler")
    paths = getattr(handler, "paths", None)
    return min(paths) if paths else None


def request_timing(app: ASGIApp) -> ASGIApp:
    """Middleware: time from request to response headers, by method and route template.

    Live reads are counted but not timed: a long-poll's wait and an SSE stream's life are not latency.
    """

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        metrics = request_metrics(scope["litestar_app"].state)
        method = scope["method"]
        route = scope.get("path_template") or _mount_path(scope) or "unmatched"
        live = _live_mode(scope)
        started = time.perf_counter()

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                labels = (("method", method), ("route", route))
                if live is not None:
                    metrics.live_requests[live] = metrics.live_requests.get(live, 0) + 1
                seconds = None if live is not None else time.perf_counter() - started
                metrics.record(labels, message["status"], seconds)
            await send(message)

        await app(scope, receive, timed_send)

    return middleware
