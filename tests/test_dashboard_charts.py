"""The dashboard's charts: the history rings (bounded, 1 h vs 24 h) and the inline SVG renderer."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from litestar import Litestar

from streamhold.main import create_app
from streamhold.settings import Settings, SettingsError
from streamhold.web import charts
from streamhold.web.charts import HEIGHT, WIDTH, bar, line, scale
from streamhold.web.history import BUCKET, DAY, HOUR, METRICS, History, Reading, Ring
from tests._server import LOOPBACK

pytestmark = pytest.mark.timeout(60)
TEXT = {"content-type": "text/plain"}


def reading(appends: int = 0, nbytes: int = 0, readers: int = 0, stored: int | None = 0) -> Reading:
    return Reading(appends=appends, bytes=nbytes, readers=readers, stored=stored)


def test_a_ring_keeps_only_its_newest_points() -> None:
    ring = Ring(5)
    for i in range(10_000):
        ring.push(float(i), float(i * 2))
    assert len(ring) == 5 and ring.capacity == 5
    assert ring.since(0.0) == [(float(i), float(i * 2)) for i in range(9_995, 10_000)]
    assert ring.since(9_998.0) == [(9_998.0, 19_996.0), (9_999.0, 19_998.0)]
    with pytest.raises(ValueError):
        Ring(0)


def test_rates_come_from_counter_deltas_from_the_second_sample() -> None:
    history = History(interval=10)
    history.record(1000.0, reading(appends=50, nbytes=5000, readers=3, stored=700))
    assert history.hour("appends", 1000.0) == [] and history.hour("bytes", 1000.0) == []
    assert history.hour("readers", 1000.0) == [(1000.0, 3.0)]
    assert history.hour("stored", 1000.0) == [(1000.0, 700.0)]
    history.record(1010.0, reading(appends=150, nbytes=25_000, readers=1, stored=None))
    assert history.hour("appends", 1010.0) == [(1010.0, 10.0)]
    assert history.hour("bytes", 1010.0) == [(1010.0, 2000.0)]
    assert history.hour("readers", 1010.0) == [(1000.0, 3.0), (1010.0, 1.0)]
    assert history.hour("stored", 1010.0) == [(1000.0, 700.0)], "an unread level adds no point"
    history.record(1020.0, reading(appends=100, nbytes=0))
    assert history.hour("appends", 1020.0)[-1] == (1020.0, 0.0), "a counter that went back is not negative"


def test_hour_keeps_every_sample_and_day_one_point_per_five_minutes() -> None:
    history = History(interval=10)
    appends = 0
    t = 0.0
    # Two hours: 2 appends/s in the first, 8/s in the second; stored bytes climb by 100 a sample.
    for step in range(721):
        t = step * 10.0
        history.record(t, reading(appends=appends, nbytes=appends * 10, readers=step % 3, stored=step * 100))
        appends += 20 if t < HOUR else 80
    hour = history.hour("appends", t)
    assert len(hour) == 361 and hour[0][0] == t - HOUR and hour[-1][0] == t
    assert {v for _, v in hour[1:]} == {8.0}
    day = history.day("appends", t)
    assert [p[0] for p in day] == [step * BUCKET - 10 for step in range(1, 25)] + [t]
    assert [v for _, v in day[:12]] == [pytest.approx(2.0)] * 12
    assert day[12][1] == pytest.approx((2 + 29 * 8) / 30), "a 5-minute point of a rate is its mean"
    assert [v for _, v in day[13:24]] == [pytest.approx(8.0)] * 11
    assert day[-1] == (t, 8.0), "the current 5 minutes so far come last"
    readers = history.day("readers", t)
    assert readers[1][1] == pytest.approx(1.0), "reader counts are averaged over 5 minutes"
    stored = history.day("stored", t)
    assert stored[0] == (290.0, 2900.0) and stored[1] == (590.0, 5900.0), "a level keeps its last reading"


def test_memory_stays_bounded_however_long_the_process_runs() -> None:
    history = History(interval=10)
    capacity = history.capacity()
    assert capacity == len(METRICS) * (361 + 289)
    t = 0.0
    for step in range(3 * 8640):  # three days of samples
        t = step * 10.0
        history.record(t, reading(appends=step, nbytes=step, readers=1, stored=step))
    for metric in METRICS:
        assert len(history.hour(metric, t)) == 361
        day = history.day(metric, t)
        assert len(day) <= 290 and day[0][0] >= t - DAY
    held = sum(len(r) for r in (*history._hour.values(), *history._day.values()))
    assert held <= capacity


def test_points_are_scaled_to_the_chart() -> None:
    points = [(100.0, 0.0), (150.0, 5.0), (200.0, 10.0)]
    assert scale(points, start=100.0, span=100.0, top=10.0) == [
        (0.0, HEIGHT),
        (WIDTH / 2, HEIGHT / 2),
        (WIDTH, 0.0),
    ]
    assert scale([(0.0, 3.0)], start=50.0, span=100.0, top=0.0) == [(0.0, 0.0)], "clamped, and no divide by 0"
    svg = line(
        points, title="Appends", unit="per second", span_label="last hour", span=100.0, now=200.0, fmt=str
    )
    assert 'points="0,56 120,28 240,0"' in svg
    assert 'd="M0,56 L0,56 L120,28 L240,0 L240,56 Z"' in svg
    assert "min 0.0 · max 10.0 · latest 10.0" in svg and 'data-points="3"' in svg
    assert "<title>Appends (per second), last hour: min 0.0 · max 10.0 · latest 10.0</title>" in svg


def test_a_young_history_spans_the_chart_and_its_axis_says_how_far_back() -> None:
    young = line(
        [(150.0, 1.0), (200.0, 2.0)], title="t", unit="u", span_label="s", span=HOUR, now=200.0, fmt=str
    )
    assert 'points="0,28 240,0"' in young and "<span>50 s ago</span>" in young
    full = [(200.0 - HOUR - 5, 1.0), (200.0 - HOUR / 2, 1.0), (200.0, 1.0)]
    old = line(full, title="t", unit="u", span_label="s", span=HOUR, now=200.0, fmt=str)
    assert 'points="0,0 120,0 240,0"' in old and "<span>1 h ago</span>" in old
    assert [charts.duration(s) for s in (0.4, 89, 600, 3600, 86400)] == [
        "0 s",
        "89 s",
        "10 min",
        "1 h",
        "24 h",
    ]


def test_a_chart_before_two_samples_says_it_is_collecting() -> None:
    for points in ([], [(10.0, 4.0)]):
        svg = line(points, title="Stored", unit="bytes", span_label="last 24 h", span=DAY, now=10.0, fmt=str)
        assert "collecting…" in svg and "<svg" not in svg and f'data-points="{len(points)}"' in svg
        assert 'class="chart empty"' in svg and 'aria-label="Stored (bytes), last 24 h: collecting…"' in svg


def test_labels_are_escaped() -> None:
    evil = '<script>alert("x")</script>&'
    svg = line([(0.0, 1.0), (1.0, 2.0)], title=evil, unit=evil, span_label=evil, span=2.0, now=1.0, fmt=str)
    assert "<script>" not in svg and "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&amp;" in svg
    empty = line([], title=evil, unit="u", span_label="s", span=1.0, now=0.0, fmt=str)
    assert "<script>" not in empty
    bar_svg = bar(evil, 5, 10, "5 B")
    assert "<script>" not in bar_svg and "&lt;script&gt;" in bar_svg
    assert 'class="fill" width="50"' in bar_svg and "(50% of the largest namespace)" in bar_svg
    assert 'class="fill" width="0"' in bar("empty", 0, 0, "0 B")


def test_cards_format_numbers_for_people() -> None:
    history = History(interval=10)
    history.record(0.0, reading(appends=0, nbytes=0, readers=2, stored=3 * 1024 * 1024))
    history.record(10.0, reading(appends=1234, nbytes=20 * 1024 * 10, readers=3, stored=5 * 1024 * 1024))
    early = {c.key: c for c in charts.cards(history, now=10.0)}
    assert "collecting…" in early["appends"].hour, "one rate needs two readings; a line needs two rates"
    assert "latest 3" in early["readers"].hour
    history.record(20.0, reading(appends=2468, nbytes=409_600, readers=3, stored=5 * 1024 * 1024))
    cards = {c.key: c for c in charts.cards(history, now=20.0)}
    assert list(cards) == ["appends", "bytes", "readers", "stored"]
    assert "latest 123/s" in cards["appends"].hour and "collecting…" in cards["appends"].day
    assert "latest 20.0 KiB/s" in cards["bytes"].hour
    assert "min 2 · max 3 · latest 3</span>" in cards["readers"].hour
    assert "min 3.0 MiB · max 5.0 MiB · latest 5.0 MiB" in cards["stored"].hour
    note = charts.note(history, history.started_at)
    assert re.search(r"since it started \(just now\): sampled every 10 s", note)


POLL = {"hx-request": "true", "hx-target": "streams"}
CHARTS = {"hx-request": "true", "hx-target": "charts"}


@asynccontextmanager
async def serve(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, Litestar]]:
    """The app with its lifespan (and so its history sampler) running, and a client for it."""
    app = create_app(dataclasses.replace(settings, history_interval=3600.0))
    async with app.lifespan():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=LOOPBACK) as client:
            yield client, app


def card(page: str, key: str) -> str:
    return page[page.index(f'data-chart="{key}"') :].split("</article>")[0]


async def test_the_live_partial_carries_the_charts(settings: Settings) -> None:
    async with serve(settings) as (client, app):
        history: History = app.state.history
        for _ in range(200):  # the lifespan's sampler takes its first sample at once
            if history.hour("readers", time.monotonic()):
                break
            await asyncio.sleep(0.01)
        page = (await client.get("/")).text
        assert "History of this server process since it started" in page
        assert page.count('<figure class="chart') == 8 and "collecting…" in card(page, "appends")

        async def write(body: bytes) -> None:
            response = await client.post("/v1/stream/exports/a", content=body, headers=TEXT)
            assert response.status_code in (200, 204)

        assert (await client.put("/v1/stream/exports/a", headers=TEXT)).status_code == 201
        await write(b"x" * 1000)
        await history.sample(app.state.store, app.state.hub)
        await write(b"y" * 1000)
        await history.sample(app.state.store, app.state.hub)
        await write(b"z" * 48)
        await history.sample(app.state.store, app.state.hub)

        table = await client.get("/", headers=POLL)
        assert 'id="charts"' not in table.text, "charts refresh on their own, not every 2 s"
        bar_title = "<title>exports: 2.0 KiB stored (100% of the largest namespace)</title>"
        assert '<svg class="ns-bar"' in table.text and bar_title in table.text

        section = await client.get("/", headers=CHARTS)
        assert "<html" not in section.text
        assert section.text.strip().startswith('<section id="charts"') and 'id="streams"' not in section.text
        assert 'hx-trigger="every 3600s, refresh"' in section.text
        assert "HX-Target" in section.headers["vary"] and section.headers["cache-control"] == "no-store"
        appends = card(section.text, "appends")
        hour, day = appends.split("</figure>")[:2]
        assert 'data-points="2"' in hour and "<svg" in hour and "min " in hour and "latest " in hour
        assert "collecting…" in day, "the 24 h view has one 5-minute point so far"
        stored = card(section.text, "stored")
        assert "latest 2.0 KiB" in stored and "<title>Stored (bytes, all streams), last hour:" in stored
        assert card(page, "appends") != appends


    settings = dataclasses.replace(settings, api_keys=("charts-key",))
    async with serve(settings) as (client, app):
        refused = await client.get("/", headers=CHARTS)
        assert refused.status_code == 401 and "<svg" not in refused.text


def test_the_sampling_interval_is_a_setting() -> None:
    assert Settings.from_env({}).history_interval == 10.0
    assert Settings.from_env({"STREAMHOLD_HISTORY_INTERVAL": "2.5"}).history_interval == 2.5
    with pytest.raises(SettingsError, match="STREAMHOLD_HISTORY_INTERVAL must be at least 0.5"):
        Settings.from_env({"STREAMHOLD_HISTORY_INTERVAL": "0.1"})
