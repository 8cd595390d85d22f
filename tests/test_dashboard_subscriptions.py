"""The dashboard's Subscriptions panel: each subscription with what it watches, its state, its last
delivery and failures, escaped; an empty state when there are none."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from urllib.parse import quote

import pytest

from streamhold.settings import Settings
from tests.test_dashboard import POLL, serve

pytestmark = pytest.mark.timeout(120)
SUBS = "/v1/stream/__ds/subscriptions/"


def panel(page: str) -> str:
    match = re.search(r'<section id="subscriptions".*?</section>', page, re.S)
    assert match is not None, "no Subscriptions panel"
    return match.group(0)


async def test_the_panel_says_so_when_there_are_no_subscriptions(settings: Settings) -> None:
    async with serve(settings) as client:
        page = (await client.get("/")).text
    assert "No subscriptions." in panel(page) and "<table" not in panel(page)


async def test_the_panel_shows_each_subscription_escaped_with_its_failures(settings: Settings) -> None:
    # Port 9 on loopback refuses connections: every delivery fails, for real.
    settings = dataclasses.replace(settings, webhook_allow_loopback=True, webhook_timeout=2.0)
    async with serve(settings) as client:
        hook = {"type": "webhook", "pattern": "evil/<img src=x>", "webhook": {"url": "http://127.0.0.1:9/h"}}
        made = await client.put(SUBS + quote("<script>alert(1)<\\script>", safe=""), json=hook)
        assert made.status_code == 201, made.text
        await client.put("/v1/stream/wakes", headers={"content-type": "application/json"})
        pull = {"type": "pull-wake", "streams": ["jobs/1"], "wake_stream": "wakes"}
        assert (await client.put(SUBS + "workers", json=pull)).status_code == 201
        answer = await client.put(
            "/v1/stream/evil/<img src=x>", content=b"{}", headers={"content-type": "application/json"}
        )
        assert answer.status_code == 201, answer.text

        deadline = time.monotonic() + 30
        while True:
            shown = panel((await client.get("/")).text)
            if 'class="failing"' in shown:
                break
            assert time.monotonic() < deadline, shown
            await asyncio.sleep(0.2)
        polled = panel((await client.get("/", headers=POLL)).text)

    assert "<script>alert" not in shown and "<img src=x>" not in shown
    assert "&lt;script&gt;alert(1)&lt;\\script&gt;" in shown and "evil/&lt;img src=x&gt;" in shown
    rows = re.findall(r"<tr data-subscription=.*?</tr>", shown, re.S)
    assert len(rows) == 2
    failing, workers = sorted(rows, key=lambda row: "workers" in row)
    cells = [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", failing, re.S)]
    assert cells[2:4] == ["webhook", "failed"]
    assert cells[4] in ("just now", "1 minute ago")
    assert re.fullmatch(r"[1-9]\d* no answer: ConnectError.*", cells[5]), cells
    cells = [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", workers, re.S)]
    assert cells == ["workers", "jobs/1", "pull-wake", "active", "never", "0"]
    assert 'hx-swap-oob="true"' in polled, "the live poll refreshes the panel"
