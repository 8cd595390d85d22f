"""Operator endpoints on real servers: /healthz, /readyz (both ways), /metrics as Prometheus text."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from streamhold.http.metrics import Exposition, Histogram
from tests._cluster import (
    Channels,
    Labels,
    live_readers,
    metric,
    offset_number,
    open_channels,
    parse_metrics,
    read_sse,
    scrape,
    server_env,
    set_database_online,
    wait_for_readers,
    wait_for_status,
)
from tests._server import ServerProcess

pytestmark = pytest.mark.timeout(120)

TEXT = {"content-type": "text/plain"}
STREAM_ROUTE = "/v1/stream"  # the protocol is one mounted handler


@pytest.fixture(params=["redis", "postgres"])
def channels(request: pytest.FixtureRequest, pg_server: str) -> Iterator[Channels]:
    with open_channels(request.param, pg_server) as opened:
        yield opened


def test_exposition_escapes_labels_and_builds_cumulative_buckets() -> None:
    histogram = Histogram(buckets=(0.1, 1.0))
    labels: Labels = (("route", 'a"b\\c\nd'),)
    for value in (0.05, 0.1, 0.5, 7.0):
        histogram.observe(labels, value)
    out = Exposition()
    out.histogram("x_seconds", "Help with a \\ and a\nnewline.", histogram)
    out.scalar("y_total", "counter", "A counter.", 3)
    text = out.text()
    assert "# HELP x_seconds Help with a \\\\ and a\\nnewline.\n# TYPE x_seconds histogram\n" in text
    assert 'x_seconds_bucket{route="a\\"b\\\\c\\nd",le="0.1"} 2\n' in text
    samples = parse_metrics(text)
    route = 'a"b\\c\nd'
    # A value equal to a bound counts in that bound's bucket ("le" is less than or equal).
    buckets = [metric(samples, "x_seconds_bucket", route=route, le=le) for le in ("0.1", "1", "+Inf")]
    assert buckets == [2, 3, 4]
    assert metric(samples, "x_seconds_count", route=route) == 4
    assert math.isclose(metric(samples, "x_seconds_sum", route=route), 7.65)
    assert metric(samples, "y_total") == 3
    with pytest.raises(ValueError, match="_total"):
        out.scalar("y", "counter", "Counters end in _total.", 1)
    with pytest.raises(ValueError, match="twice"):
        out.scalar("y_total", "counter", "Again.", 1)


def check_histograms(samples: dict[str, dict[Labels, float]], name: str) -> None:
    """Every series: buckets cumulative in `le` order, ending at +Inf equal to _count."""
    series: dict[Labels, list[tuple[float, float]]] = {}
    for labels, value in samples[f"{name}_bucket"].items():
        le = dict(labels)["le"]
        rest = tuple(pair for pair in labels if pair[0] != "le")
        series.setdefault(rest, []).append((math.inf if le == "+Inf" else float(le), value))
    assert series
    for rest, buckets in series.items():
        buckets.sort()
        counts = [count for _, count in buckets]
        assert counts == sorted(counts) and buckets[-1][0] == math.inf, buckets
        assert samples[f"{name}_count"][rest] == counts[-1]
        assert rest in samples[f"{name}_sum"]


async def test_metrics_describe_streams_appends_readers_and_latency(tmp_path: Path) -> None:
    env = {"STREAMHOLD_DATA_DIR": str(tmp_path), "STREAMHOLD_LONG_POLL_TIMEOUT": "1"}
    with ServerProcess(env=env) as server:
        async with httpx.AsyncClient(timeout=30) as client:
            one, two = f"{server.url}/v1/stream/ops/one", f"{server.url}/v1/stream/ops/two"
            assert (await client.put(one, headers=TEXT)).status_code == 201
            assert (await client.put(two, headers={**TEXT, "stream-closed": "true"})).status_code == 201
            for body in (b"hello", b"metrics", b"!"):
                assert (await client.post(one, content=body, headers=TEXT)).status_code == 204
            assert (await client.get(one, params={"offset": "-1"})).content == b"hellometrics!"
            baseline = await live_readers(client, server)
            sse = asyncio.create_task(read_sse(client, one))
            tail = (await client.head(one)).headers["stream-next-offset"]
            poll = asyncio.create_task(client.get(one, params={"offset": tail, "live": "long-poll"}))
            await wait_for_readers(client, server, baseline, sse=1, long_poll=1)

            response = await client.get(f"{server.url}/metrics")
            assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
            samples = parse_metrics(response.text)
            assert metric(samples, "streamhold_database_up") == 1
            assert metric(samples, "streamhold_streams") == 2
            assert metric(samples, "streamhold_open_streams") == 1
            assert metric(samples, "streamhold_content_bytes") == 13
            assert metric(samples, "streamhold_stored_bytes") == 13
            assert metric(samples, "streamhold_appends_total") == 3
            assert metric(samples, "streamhold_appended_bytes_total") == 13
            assert metric(samples, "streamhold_commits_total") >= 5
            assert metric(samples, "streamhold_live_readers", kind="sse") == 1
            assert metric(samples, "streamhold_live_readers", kind="long-poll") == 1
            assert metric(samples, "streamhold_channels_connected") == 1
            assert metric(samples, "streamhold_doorbells_sent_total") == 0  # in-process: nothing to publish
            ready = await client.get(f"{server.url}/readyz")
            assert ready.status_code == 200 and ready.json() == {"status": "ready"}
            latency = "streamhold_http_request_duration_seconds"
            check_histograms(samples, latency)
            assert metric(samples, f"{latency}_count", method="POST", route=STREAM_ROUTE) == 3
            assert metric(samples, f"{latency}_count", method="PUT", route=STREAM_ROUTE) == 2
            assert metric(samples, f"{latency}_sum", method="POST", route=STREAM_ROUTE) > 0
            responses = "streamhold_http_responses_total"
            assert metric(samples, responses, method="POST", route=STREAM_ROUTE, code="204") == 3
            assert metric(samples, responses, method="PUT", route=STREAM_ROUTE, code="201") == 2

            waited = await poll  # a long-poll that waited its full second: counted, but not as latency
            assert waited.status_code == 204
            assert (await client.post(one, headers={"stream-closed": "true"})).status_code == 204
            received = await asyncio.wait_for(sse, 10)
            assert bytes(received.data) == b"hellometrics!"
            assert received.arrivals[-1][2] == offset_number(tail)

            samples = await scrape(client, server)
            check_histograms(samples, latency)
            assert metric(samples, "streamhold_live_readers", kind="sse") == 0
            assert metric(samples, "streamhold_live_readers", kind="long-poll") == 0
            assert metric(samples, "streamhold_live_requests_total", mode="long-poll") == 1
            assert metric(samples, "streamhold_live_requests_total", mode="sse") == 1
            assert metric(samples, responses, method="GET", route=STREAM_ROUTE, code="204") == 1
            # Timed GETs: only the catch-up read; the long-poll's one-second wait would land above 0.5 s.
            gets = {"method": "GET", "route": STREAM_ROUTE}
            assert metric(samples, f"{latency}_count", **gets) == 1
            assert metric(samples, f"{latency}_bucket", le="0.5", **gets) == 1
            assert metric(samples, f"{latency}_count", method="HEAD", route=STREAM_ROUTE) == 1
            assert metric(samples, "streamhold_open_streams") == 0


async def test_readyz_follows_the_channels_backend(channels: Channels, pg_url: str, tmp_path: Path) -> None:
    with ServerProcess(env=server_env(pg_url, channels.url, tmp_path)) as server:
        async with httpx.AsyncClient(timeout=10) as client:
            readyz = f"{server.url}/readyz"
            await wait_for_status(client, readyz, 200, within=10)
            channels.cut()
            try:
                _, response = await wait_for_status(client, readyz, 503, within=10)
                assert response.json()["status"] == "unready" and "channels" in response.json()
                assert "database" not in response.json()
                assert (await client.get(f"{server.url}/healthz")).status_code == 200
                assert metric(await scrape(client, server), "streamhold_channels_connected") == 0
            finally:
                channels.restore()
            took, response = await wait_for_status(client, readyz, 200, within=15)
            assert response.json() == {"status": "ready"}
            print(f"[{channels.kind}] ready again {took:.2f} s after the channels backend came back")
            samples = await scrape(client, server)
            assert metric(samples, "streamhold_channels_connected") == 1
            assert metric(samples, "streamhold_channels_resubscribed_total") >= 1


async def test_readyz_follows_the_database(pg_server: str, pg_url: str, tmp_path: Path) -> None:
    env = {"STREAMHOLD_DATA_DIR": str(tmp_path), "STREAMHOLD_DATABASE_URL": pg_url}
    with ServerProcess(env=env) as server:
        async with httpx.AsyncClient(timeout=10) as client:
            readyz = f"{server.url}/readyz"
            await wait_for_status(client, readyz, 200, within=10)
            set_database_online(pg_server, pg_url, False)
            try:
                _, response = await wait_for_status(client, readyz, 503, within=10)
                assert "database" in response.json() and "channels" not in response.json()
                assert (await client.get(f"{server.url}/healthz")).status_code == 200
                samples = await scrape(client, server)
                assert metric(samples, "streamhold_database_up") == 0
                assert "streamhold_streams" not in samples
            finally:
                set_database_online(pg_server, pg_url, True)
            await wait_for_status(client, readyz, 200, within=15)
            assert metric(await scrape(client, server), "streamhold_database_up") == 1
