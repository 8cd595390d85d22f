"""Operator endpoints: /healthz, /readyz and /metrics (Prometheus text)."""

from __future__ import annotations

import asyncio
from typing import Any

from litestar import Request, Response, get
from litestar.di import NamedDependency

from ..live import LiveHub
from ..store.store import Store
from .metrics import CONTENT_TYPE, Exposition, request_metrics, request_timing

__all__ = ["healthz", "metrics", "readyz", "request_timing", "routes"]

CHECK_TIMEOUT = 3.0
NO_STORE = {"cache-control": "no-store"}
STREAM_TOTALS = (
    ("streamhold_streams", "streams", "Live streams (not expired, not deleted) in the database."),
    ("streamhold_open_streams", "open", "Live streams not closed yet."),
    ("streamhold_stored_bytes", "stored_bytes", "Bytes the live streams take in the database (compressed)."),
    ("streamhold_content_bytes", "content_bytes", "Uncompressed content bytes of the live streams."),
)


@get("/healthz", sync_to_thread=False)
def healthz() -> Response[dict[str, str]]:
    """The process is up."""
    return Response({"status": "ok"}, headers=NO_STORE)


@get("/readyz")
async def readyz(store: NamedDependency[Store], hub: NamedDependency[LiveHub]) -> Response[dict[str, str]]:
    """Ready when the database answers and a doorbell published now comes back through the subscription."""
    problems: dict[str, str] = {}
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


@get("/metrics")
async def metrics(
    request: Request[Any, Any, Any], store: NamedDependency[Store], hub: NamedDependency[LiveHub]
) -> Response[str]:
    """Prometheus text: stream totals from the database (all processes), everything else for this process."""
    out = Exposition()
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            summary: dict[str, Any] | None = await store.summary()
    except Exception:
        summary = None
    out.scalar("streamhold_database_up", "gauge", "Whether the database answered.", summary is not None)
    if summary is not None:
        for name, key, help_text in STREAM_TOTALS:
            out.scalar(name, "gauge", help_text, summary[key])
    writer = store.writer
    process = (
        ("streamhold_appends_total", "counter", "Appends committed by this process.", writer.appends),
        ("streamhold_appended_bytes_total", "counter", "Bytes appended by this process.",
         writer.bytes_appended),
        ("streamhold_commits_total", "counter", "Write transactions of this process (appends share them).",
         writer.commits),
        ("streamhold_doorbells_sent_total", "counter", "Doorbell messages this process published.", hub.sent),
        ("streamhold_doorbells_received_total", "counter", "Doorbell messages from other processes.",
         hub.received),
        ("streamhold_doorbell_publish_failures_total", "counter",
         "Doorbell messages this process could not publish (readers elsewhere waited for a timeout).",
         hub.publish_failures),
        ("streamhold_channels_connected", "gauge",
         "Whether this process's doorbell subscription is up (always 1 without a channels backend).",
         hub.connected),
        ("streamhold_channels_resubscribed_total", "counter",
         "Times this process subscribed again after losing the channels backend.", hub.resubscribed),
    )
    for name, kind, help_text, value in process:
        out.scalar(name, kind, help_text, value)
    out.family(
        "streamhold_live_readers",
        "gauge",
        "Readers tailing a stream on this process, by kind.",
        [((("kind", kind),), count) for kind, count in sorted(hub.readers.items())],
    )
    http = request_metrics(request.app.state)
    out.histogram(
        "streamhold_http_request_duration_seconds",
        "Time from request to response headers, by method and route; live reads are not timed.",
        http.latency,
    )
    out.family(
        "streamhold_http_responses_total",
        "counter",
        "HTTP responses of this process by method, route and status code.",
        sorted(http.responses.items()),
    )
    out.family(
        "streamhold_live_requests_total",
        "counter",
        "Live reads (long-poll, SSE) started on this process, by mode.",
        [((("mode", mode),), count) for mode, count in sorted(http.live_requests.items())],
    )
    return Response(out.text(), media_type=CONTENT_TYPE, headers=NO_STORE)


routes = [healthz, readyz, metrics]
