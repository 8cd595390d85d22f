"""Operator endpoints: /healthz, /readyz and /metrics (Prometheus text)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

from litestar import Request, Response, get
from litestar.datastructures import State
from litestar.di import NamedDependency
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from ..live import LiveHub
from ..store.store import Store
from .metrics import request_metrics, request_timing

__all__ = ["healthz", "metrics", "readyz", "request_timing", "routes"]

CHECK_TIMEOUT = 3.0
NO_STORE = {"cache-control": "no-store"}
_FIGURES_KEY = "server_figures"
STREAM_TOTALS = (
    ("streamhold_streams", "streams", "Live streams (not expired, not deleted) in the database."),
    ("streamhold_open_streams", "open", "Live streams not closed yet."),
    ("streamhold_stored_bytes", "stored_bytes", "Bytes the live streams take in the database (compressed)."),
    ("streamhold_content_bytes", "content_bytes", "Uncompressed content bytes of the live streams."),
)
PROCESS_FIGURES: tuple[tuple[str, str, str, Callable[[Store, LiveHub], float]], ...] = (
    ("streamhold_appends_total", "counter", "Appends committed by this process.",
     lambda store, _: store.writer.appends),
    ("streamhold_appended_bytes_total", "counter", "Bytes appended by this process.",
     lambda store, _: store.writer.bytes_appended),
    ("streamhold_commits_total", "counter", "Write transactions of this process (appends share them).",
     lambda store, _: store.writer.commits),
    ("streamhold_doorbells_sent_total", "counter", "Doorbell messages this process published.",
     lambda _, hub: hub.sent),
    ("streamhold_doorbells_received_total", "counter", "Doorbell messages from other processes.",
     lambda _, hub: hub.received),
    ("streamhold_doorbell_publish_failures_total", "counter",
     "Doorbell messages this process could not publish (readers elsewhere waited for a timeout).",
     lambda _, hub: hub.publish_failures),
    ("streamhold_channels_connected", "gauge",
     "Whether this process's doorbell subscription is up (always 1 without a channels backend).",
     lambda _, hub: hub.connected),
    ("streamhold_channels_resubscribed_total", "counter",
     "Times this process subscribed again after losing the channels backend.",
     lambda _, hub: hub.resubscribed),
    ("streamhold_storage_full_total", "counter",
     "Appends, creates and closes this process refused (507) because storage was full or below the reserve.",
     lambda store, _: store.space.refusals),
    ("streamhold_storage_free_bytes", "gauge",
     "Free space the storage reserve is judged by: the SQLite database's filesystem and free pages, "
     "less what its next checkpoint takes (-1 when not measured).",
     lambda store, _: store.space.measured_free()),
)
FAMILIES: dict[str, type[CounterMetricFamily] | type[GaugeMetricFamily]] = {
    "counter": CounterMetricFamily,
    "gauge": GaugeMetricFamily,
}
DATABASE_UP = "Whether the database answered."
LIVE_READERS = "Readers tailing a stream on this process, by kind."


@get("/healthz", sync_to_thread=False)
def healthz() -> Response[dict[str, str]]:
    """The process is up."""
    return Response({"status": "ok"}, headers=NO_STORE)


@get("/readyz")
async def readyz(store: NamedDependency[Store], hub: NamedDependency[LiveHub]) -> Response[dict[str, str]]:
    """Ready when the database answers, storage is not full, and a doorbell published now comes back."""
    problems: dict[str, str] = {}
    storage = store.space.problem()
    if storage is not None:
        problems["storage"] = storage
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            await store.ping()
    except Exception as exc:
        problems["database"] = type(exc).__name__
    if not hub.connected:
        problems["channels"] = "not subscribed"
    elif not await hub.ping(CHECK_TIMEOUT):
        problems["channels"] = "no answer from the channels backend"
    body = {"status": "unready" if problems else "ready", **problems}
    return Response(body, status_code=503 if problems else 200, headers=NO_STORE)


class ServerFigures:
    """The database's stream totals and this process's writer and live-hub figures, read when scraped."""

    def __init__(self, state: State) -> None:
        self._state = state
        self.summary: dict[str, Any] | None = None

    def describe(self) -> Iterator[Metric]:
        """Every family, without samples: lets the registry refuse a clashing name."""
        yield GaugeMetricFamily("streamhold_database_up", DATABASE_UP)
        for name, _, help_text in STREAM_TOTALS:
            yield GaugeMetricFamily(name, help_text)
        for name, kind, help_text, _ in PROCESS_FIGURES:
            yield FAMILIES[kind](name, help_text)
        yield GaugeMetricFamily("streamhold_live_readers", LIVE_READERS, labels=("kind",))

    def collect(self) -> Iterator[Metric]:
        store, hub, summary = self._state.store, self._state.hub, self.summary
        yield GaugeMetricFamily("streamhold_database_up", DATABASE_UP, value=summary is not None)
        if summary is not None:
            for name, key, help_text in STREAM_TOTALS:
                yield GaugeMetricFamily(name, help_text, value=summary[key])
        for name, kind, help_text, read in PROCESS_FIGURES:
            yield FAMILIES[kind](name, help_text, value=read(store, hub))
        readers = GaugeMetricFamily("streamhold_live_readers", LIVE_READERS, labels=("kind",))
        for kind, count in sorted(hub.readers.items()):
            readers.add_metric([kind], count)
        yield readers


def _server_figures(state: State) -> ServerFigures:
    """The app's server figures, registered with its metrics on first use."""
    figures = state.get(_FIGURES_KEY)
    if figures is None:
        figures = state[_FIGURES_KEY] = ServerFigures(state)
        request_metrics(state).registry.register(figures)
    return figures


@get("/metrics")
async def metrics(request: Request[Any, Any, Any], store: NamedDependency[Store]) -> Response[bytes]:
    """Prometheus text: stream totals from the database (all processes), everything else for this process."""
    state = request.app.state
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            summary: dict[str, Any] | None = await store.summary()
    except Exception:
        summary = None
    figures = _server_figures(state)
    # A collector cannot await, so the database totals are read above and handed over; nothing awaits
    # between here and the exposition, so no other scrape can interleave.
    figures.summary = summary
    body = request_metrics(state).exposition()
    # Given as a header: Litestar would append a second charset to a text media type.
    return Response(body, headers={**NO_STORE, "content-type": CONTENT_TYPE_PLAIN_0_0_4})


routes = [healthz, readyz, metrics]
