"""The viewer's Stop button: pressed on one device, the demo's writer stops and every viewer shows it."""

from __future__ import annotations

import time

import httpx
from playwright.sync_api import Browser, Page, expect

from streamhold import demo
from tests._server import ServerProcess

TIMEOUT = 15_000


def _watch(browser: Browser, url: str, errors: list[str]) -> Page:
    page = browser.new_context().new_page()
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.goto(url)
    expect(page.locator("#watch")).to_have_attribute("data-state", "live", timeout=TIMEOUT)
    return page


def test_stop_from_a_second_device(shared_server: ServerProcess, browser: Browser) -> None:
    base = shared_server.url
    started = httpx.post(f"{base}/demo", headers={"accept": "application/json"}).json()
    answer = started["stream_id"]
    errors: list[str] = []
    first = _watch(browser, started["viewer_url"], errors)
    second = _watch(browser, started["viewer_url"], errors)
    try:
        for page in (first, second):
            expect(page.locator("#stop")).to_be_visible()
        heading = "How a durable stream survives a refresh"
        expect(second.locator(".md h1")).to_have_text(heading, timeout=TIMEOUT)
        second.click("#stop")
        clicked = time.monotonic()
        while not httpx.post(f"{base}/stream/{answer}/info").json()["completed"]:
            assert time.monotonic() - clicked < 1.0, "the demo writer did not stop within a second"
            time.sleep(0.02)
        stopped = httpx.get(f"{base}/stream/{answer}").text
        assert stopped.endswith(demo.STOPPED_LINE) and len(stopped) < len(demo.ANSWER)
        for page in (first, second):
            expect(page.locator("#watch")).to_have_attribute("data-state", "closed", timeout=TIMEOUT)
            expect(page.locator("#status")).to_have_text("Closed")
            expect(page.locator("#stop")).to_be_hidden()
            expect(page.locator(".md")).to_contain_text("Stopped:")
        # A reload of a closed stream offers no Stop button at all.
        first.reload()
        expect(first.locator("#status")).to_have_text("Closed")
        assert first.locator("#stop").count() == 0
    finally:
        first.context.close()
        second.context.close()
    assert not errors, errors
