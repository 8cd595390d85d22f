"""Operator endpoints on real servers: /healthz, /readyz (both ways), /metrics as Prometheus text."""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.parser import text_string_to_metric_families

from streamhold.http.metrics import RequestMetrics
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
LATENCY = "streamhold_http_request_duration_seconds"
RESPONSES = "streamhold_http_responses_total"


@pytest.fixture(params=["redis", "postgres"])
def channels(request: pytest.FixtureRequest, pg_server: str) -> Iterator[Channels]:
    with open_channels(request.param, pg_server) as opened:
        yield opened


def test_request_metrics_escape_labels_count_cumulatively_and_keep_apps_apart() -> None:
    first, second = RequestMetrics(), RequestMetrics()
    route = 'a"b\\c\nd'
    labels: Labels = (("method", "GET"), ("route", route))
    for seconds in (0.001, 0.05, 0.5, 20.0):
        first.record(labels, 200, seconds)
    first.record(labels, 204, None)  # a live read: counted, not timed
    text = first.exposition().decode()
    assert 'route="a\\"b\\\\c\\nd"' in text
    assert "_created" not in text
    samples = parse_metrics(text)
    gets = {"method": "GET", "route": route}
    # A value equal to a bound counts in that bound's bucket ("le" is less than or equal).
    buckets = [metric(samples, f"{LATENCY}_bucket", le=le, **gets) for le in ("0.001", "0.1", "1.0", "+Inf")]
    assert buckets == [1, 2, 3, 4]
    assert metric(samples, f"{LATENCY}_count", **gets) == 4
    assert math.isclose(metric(samples, f"{LATENCY}_sum", **gets), 20.551)
    assert metric(samples, RESPONSES, code="200", **gets) == 4
    assert metric(samples, RESPONSES, code="204", **gets) == 1
    # Each app has its own registry: the second saw nothing of the first's requests.
    assert metric(parse_metrics(second.exposition().decode()), RESPONSES, code="200", **gets) == 0


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
            assert response.headers["content-type"] == CONTENT_TYPE_PLAIN_0_0_4
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


# Every family /metrics exposes, with its Prometheus type; the README's "Operating" section lists them all.
FAMILY_TYPES = {
    "streamhold_database_up": "gauge",
    "streamhold_streams": "gauge",
    "streamhold_open_streams": "gauge",
    "streamhold_stored_bytes": "gauge",
    "streamhold_content_bytes": "gauge",
    "streamhold_appends_total": "counter",
    "streamhold_appended_bytes_total": "counter",
    "streamhold_commits_total": "counter",
    "streamhold_live_readers": "gauge",
    "streamhold_doorbells_sent_total": "counter",
    "streamhold_doorbells_received_total": "counter",
    "streamhold_doorbell_publish_failures_total": "counter",
    "streamhold_channels_connected": "gauge",
    "streamhold_channels_resubscribed_total": "counter",
    "streamhold_storage_full_total": "counter",
    "streamhold_storage_free_bytes": "gauge",
    "streamhold_http_responses_total": "counter",
    "streamhold_live_requests_total": "counter",
    "streamhold_http_request_duration_seconds": "histogram",
    "streamhold_webhook_deliveries_total": "counter",
    "streamhold_webhook_failures_total": "counter",
    "streamhold_webhook_retries_total": "counter",
    "streamhold_subscription_lease_takeovers_total": "counter",
    "streamhold_wake_events_total": "counter",
}


def documented_families() -> dict[str, set[str]]:
    """The metric names (with their label names) the README's "Operating" section lists for /metrics."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("## Operating") :]
    section = section[: section.index("\n## ")]
    found = re.findall(r"`(streamhold_[a-z_]+)(?:\{([a-z,]+)\})?`", section)
    return {name: set(labels.split(",")) if labels else set() for name, labels in found}


def families(text: str) -> dict[str, tuple[str, set[str], dict[tuple[str, Labels], float]]]:
    """By exposed name (counters with `_total`): type, label names (not `le`) and samples, per the parser."""
    out: dict[str, tuple[str, set[str], dict[tuple[str, Labels], float]]] = {}
    for family in text_string_to_metric_families(text):
        name = f"{family.name}_total" if family.type == "counter" else family.name
        labels = {key for sample in family.samples for key in sample.labels if key != "le"}
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
        out[name] = (family.type, labels, samples)
    return out


async def test_metrics_parse_with_the_documented_names_types_and_labels(tmp_path: Path) -> None:
    assert documented_families().keys() == FAMILY_TYPES.keys()
    with ServerProcess(env={"STREAMHOLD_DATA_DIR": str(tmp_path)}) as server:
        async with httpx.AsyncClient(timeout=30) as client:
            url = f"{server.url}/v1/stream/parsed"
            assert (await client.put(url, headers=TEXT)).status_code == 201
            before = families((await client.get(f"{server.url}/metrics")).text)
            for body in (b"one", b"three"):
                assert (await client.post(url, content=body, headers=TEXT)).status_code == 204
            # A long-poll from the start answers at once, and counts as a live read all the same.
            read = await client.get(url, params={"offset": "-1", "live": "long-poll"})
            assert read.content == b"onethree"
            after = families((await client.get(f"{server.url}/metrics")).text)

    assert after.keys() == FAMILY_TYPES.keys()  # no other names (no `_created` series)
    for name, labels in documented_families().items():
        assert (after[name][0], after[name][1]) == (FAMILY_TYPES[name], labels), name

    def moved(name: str, sample: str, **labels: str) -> float:
        key = (sample, tuple(sorted(labels.items())))
        return after[name][2][key] - before[name][2].get(key, 0.0)

    assert moved("streamhold_appends_total", "streamhold_appends_total") == 2
    assert moved("streamhold_appended_bytes_total", "streamhold_appended_bytes_total") == 8
    assert moved("streamhold_commits_total", "streamhold_commits_total") >= 1
    posts = {"method": "POST", "route": STREAM_ROUTE}
    assert moved(RESPONSES, RESPONSES, code="204", **posts) == 2
    assert moved(LATENCY, f"{LATENCY}_count", **posts) == 2
    assert moved(LATENCY, f"{LATENCY}_bucket", le="+Inf", **posts) == 2
    assert moved("streamhold_live_requests_total", "streamhold_live_requests_total", mode="long-poll") == 1
    assert after["streamhold_content_bytes"][2][("streamhold_content_bytes", ())] == 8
    assert after["streamhold_database_up"][2][("streamhold_database_up", ())] == 1


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
