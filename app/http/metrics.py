"""Prometheus metrics of one app (its own prometheus_client registry) and the request-latency middleware."""

from __future__ import annotations

import time
from collections.abc import Iterable
from urllib.parse import parse_qs

from litestar.datastructures import State
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LIVE_MODES = ("long-poll", "sse")
_STATE_KEY = "request_metrics"

Labels = tuple[tuple[str, str], ...]


class RequestMetrics:
    """One app's registry, with this process's HTTP figures: handler latency (not live waits), responses."""

    def __init__(self) -> None:
        # A registry per app, never prometheus_client's global one: several apps share a test process.
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "streamhold_http_request_duration_seconds",
            "Time from request to response headers, by method and route; live reads are not timed.",
            ("method", "route"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.responses = Counter(
            "streamhold_http_responses_total",
            "HTTP responses of this process by method, route and status code.",
            ("method", "route", "code"),
            registry=self.registry,
        )
        self.live_requests = Counter(
            "streamhold_live_requests_total",
            "Live reads (long-poll, SSE) started on this process, by mode.",
            ("mode",),
            registry=self.registry,
        )

        # `labels()` checks and locks on every call, several times the cost of the count itself on the
        # append path; each label set's child is looked up once and kept.
        self._timers: dict[Labels, Histogram] = {}
        self._responses: dict[tuple[Labels, int], Counter] = {}

    def record(self, labels: Labels, status: int, seconds: float | None) -> None:
        """One response: its status, and its latency unless it was a live read (`seconds` None)."""
        if seconds is not None:
            timer = self._timers.get(labels)
            if timer is None:
                timer = self._timers[labels] = self.latency.labels(**dict(labels))
            timer.observe(seconds)
        responses = self._responses.get((labels, status))
        if responses is None:
            child = self.responses.labels(**dict(labels), code=str(status))
            responses = self._responses[labels, status] = child
        responses.inc()

    def exposition(self) -> bytes:
        """The registry in Prometheus text (`CONTENT_TYPE_PLAIN_0_0_4`)."""
        return generate_latest(_WithoutCreated(self.registry))


class _WithoutCreated:
    """The registry's families minus their `_created` samples.

    prometheus_client adds a `<name>_created` gauge to every counter and histogram, and its switch to stop
    that is process-wide; dropping them here keeps the exposition to Streamhold's own names.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        for family in self._registry.collect():
            family.samples = [s for s in family.samples if s.name != f"{family.name}_created"]
            yield family


def request_metrics(state: State) -> RequestMetrics:
    """The app's metrics, created on first use."""
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


# Written here rather than Litestar's PrometheusMiddleware: that one keeps its metrics in the process-wide
# registry under other names and labels, and would time a long-poll's wait as latency.
def request_timing(app: ASGIApp) -> ASGIApp:
    """Middleware: time from request to response headers, by method and route template.

    Live reads are counted but not timed: a long-poll's wait and an SSE stream's life are not latency.
    """

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        metrics = request_metrics(scope["litestar_app"].state)
        method = str(scope.get("method", ""))
        route = scope.get("path_template") or _mount_path(scope) or "unmatched"
        live = _live_mode(scope)
        started = time.perf_counter()

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                labels = (("method", method), ("route", route))
                if live is not None:
                    metrics.live_requests.labels(mode=live).inc()
                seconds = None if live is not None else time.perf_counter() - started
                metrics.record(labels, message["status"], seconds)
            await send(message)

        await app(scope, receive, timed_send)

    return middleware
