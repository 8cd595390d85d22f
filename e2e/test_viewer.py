"""The live viewer in Chromium against a real `streamhold serve`: reloads, offline spells, restarts, two
devices, closed and hostile streams. Each test ends comparing what the page holds with what was written."""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect

from tests._server import ServerProcess

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.browser_context_args(viewport={"width": 1100, "height": 800}),
]

TIMEOUT = 15_000


class Writer(threading.Thread):
    """Appends `pieces` to a stream over HTTP, one every `interval` seconds, then closes it."""

    def __init__(self, base: str, name: str, content_type: str, pieces: list[str], interval: float) -> None:
        super().__init__(daemon=True)
        self.url = f"{base}/v1/stream/{name}"
        self.content_type = content_type
        self.pieces = pieces
        self.interval = interval
        self.written = ""
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.Client(timeout=10) as client:
                for piece in self.pieces:
                    response = client.post(
                        self.url, content=piece.encode(), headers={"content-type": self.content_type}
                    )
                    response.raise_for_status()
                    self.written += piece
                    time.sleep(self.interval)
                client.post(self.url, headers={"stream-closed": "true"}).raise_for_status()
        except BaseException as exc:  # surfaced by finish()
            self.error = exc

    def finish(self) -> str:
        self.join(30)
        assert not self.is_alive(), "the writer did not finish"
        if self.error is not None:
            raise self.error
        return self.written


def create(base: str, name: str, content_type: str, body: str = "", closed: bool = False) -> None:
    headers = {"content-type": content_type}
    if closed:
        headers["stream-closed"] = "true"
    response = httpx.put(f"{base}/v1/stream/{name}", content=body.encode(), headers=headers)
    assert response.status_code == 201, response.text


def append(base: str, name: str, content_type: str, body: str, close: bool = False) -> None:
    headers = {"content-type": content_type}
    if close:
        headers["stream-closed"] = "true"
    httpx.post(f"{base}/v1/stream/{name}", content=body.encode(), headers=headers).raise_for_status()


def tokens(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = ["durable", "stream", "offset", "résumé", "naïve", "→", "ok", "token", "🙂", "the", "of", "byte"]
    out = []
    for n in range(count):
        word = rng.choice(words)
        out.append(f"\n\n## Part {n // 25}\n\n" if n % 25 == 0 else f" {word}" if n % 7 else f" **{word}**\n")
    return out


def state(page: Page) -> str:
    return str(page.eval_on_selector("#watch", "e => e.dataset.state"))


def wait_state(page: Page, expected: str, timeout: int = TIMEOUT) -> None:
    page.wait_for_function(
        "s => document.getElementById('watch').dataset.state === s", arg=expected, timeout=timeout
    )


def raw(page: Page) -> str:
    return str(page.eval_on_selector("#raw", "e => e.textContent"))


def assert_shows(page: Page, expected: str) -> None:
    """The page's received text equals `expected`, exactly (after waiting for it to settle)."""
    try:
        page.wait_for_function(
            "t => document.getElementById('raw').textContent === t", arg=expected, timeout=TIMEOUT
        )
    except Exception:
        pass
    assert raw(page) == expected


def test_reload_mid_stream(shared_server: ServerProcess, context: BrowserContext) -> None:
    base = shared_server.url
    create(base, "e2e/reload", "text/markdown", "# Reload me\n")
    writer = Writer(base, "e2e/reload", "text/markdown", tokens(140, 1), 0.02)
    page = context.new_page()
    page.goto(f"{base}/watch/e2e/reload")
    writer.start()
    wait_state(page, "live")
    page.wait_for_function(
        "() => Number(document.getElementById('watch').dataset.offset) > 200", timeout=TIMEOUT
    )
    page.reload()
    assert int(page.eval_on_selector("#watch", "e => e.dataset.offset")) > 200  # the server render caught up
    wait_state(page, "live")
    written = "# Reload me\n" + writer.finish()
    wait_state(page, "closed")
    assert_shows(page, written)
    expect(page.locator(".md h1")).to_have_text("Reload me")
    assert page.locator(".md h2").count() == written.count("\n## ")


def test_offline_for_seconds_and_back(shared_server: ServerProcess, context: BrowserContext) -> None:
    base = shared_server.url
    create(base, "e2e/offline", "text/plain")
    writer = Writer(base, "e2e/offline", "text/plain", [f"line {n}\r\n" for n in range(90)], 0.05)
    page = context.new_page()
    page.goto(f"{base}/watch/e2e/offline")
    wait_state(page, "live")
    writer.start()
    page.wait_for_function("() => document.getElementById('raw').textContent.length > 30", timeout=TIMEOUT)
    context.set_offline(True)
    wait_state(page, "reconnecting", timeout=5000)
    expect(page.locator("#status")).to_contain_text("Offline")
    time.sleep(3)
    behind = raw(page)
    context.set_offline(False)
    written = writer.finish()
    assert len(behind) < len(written)
    wait_state(page, "closed")
    assert_shows(page, written)


def test_server_killed_and_restarted_mid_stream(server: ServerProcess, context: BrowserContext) -> None:
    base = server.url
    first = [f"{n},row {n}\n" for n in range(30)]
    create(base, "e2e/restart.csv", "text/csv", "id,name\n")
    page = context.new_page()
    page.goto(f"{base}/watch/e2e/restart.csv")
    wait_state(page, "live")
    for piece in first:
        append(base, "e2e/restart.csv", "text/csv", piece)
    assert_shows(page, "id,name\n" + "".join(first))
    server.kill()
    wait_state(page, "reconnecting", timeout=5000)
    server.start()
    second = [f"{n},row {n}\n" for n in range(30, 60)]
    for piece in second:
        append(base, "e2e/restart.csv", "text/csv", piece)
    append(base, "e2e/restart.csv", "text/csv", "", close=True)
    wait_state(page, "closed", timeout=20_000)
    assert_shows(page, "id,name\n" + "".join(first + second))
    cells = page.locator("table.csv tbody tr td:nth-child(2)").all_text_contents()
    assert cells == [str(n) for n in range(60)]


def test_two_devices_share_a_link(shared_server: ServerProcess, browser: Browser) -> None:
    base = shared_server.url
    create(base, "e2e/shared.csv", "text/csv", 'id,name,note\n1,"Smith, Jo","said ""hi"""\n')
    phone = browser.new_context(viewport={"width": 390, "height": 800}, is_mobile=True)
    laptop = browser.new_context(permissions=["clipboard-read", "clipboard-write"])
    try:
        first = laptop.new_page()
        first.goto(f"{base}/watch/e2e/shared.csv")
        wait_state(first, "live")
        first.click("#copy-link")
        expect(first.locator("#copy-link")).to_have_text("Copied ✓")
        link = first.evaluate("navigator.clipboard.readText()")
        assert link == f"{base}/watch/e2e/shared.csv"
        second = phone.new_page()
        second.goto(link)
        wait_state(second, "live")
        append(base, "e2e/shared.csv", "text/csv", "2,Ada,multi")
        for page in (first, second):
            expect(page.locator("table.csv tr.partial")).to_contain_text("multi")
        append(base, "e2e/shared.csv", "text/csv", '-part\n3,"line\nbreak",x\n', close=True)
        written = 'id,name,note\n1,"Smith, Jo","said ""hi"""\n2,Ada,multi-part\n3,"line\nbreak",x\n'
        for page in (first, second):
            wait_state(page, "closed")
            assert_shows(page, written)
            rows = page.eval_on_selector_all(
                "table.csv tbody tr", "rows => rows.map(r => [...r.cells].slice(1).map(c => c.textContent))"
            )
            assert rows == [
                ["1", "Smith, Jo", 'said "hi"'],
                ["2", "Ada", "multi-part"],
                ["3", "line\nbreak", "x"],
            ]
            assert page.locator("table.csv thead th").all_text_contents() == ["#", "id", "name", "note"]
    finally:
        phone.close()
        laptop.close()


def test_closed_stream_makes_no_connection(shared_server: ServerProcess, context: BrowserContext) -> None:
    base = shared_server.url
    body = "finished\r\nartifact ✓\n"
    create(base, "e2e/closed", "text/plain", body, closed=True)
    page = context.new_page()
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(f"{base}/watch/e2e/closed")
    page.wait_for_load_state("networkidle")
    assert state(page) == "closed" and raw(page) == body
    expect(page.locator("#status")).to_have_text("Closed")
    assert not [url for url in requests if "/v1/stream/" in url]


HOSTILE = {
    "text/plain": '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2;alert(1)">',
    "text/markdown": (
        "# <script>window.__pwned=1</script>\n\n[click](javascript:alert(1)) ![x](javascript:alert(2)) "
        '<img src=x onerror="alert(3)">\n\n```html\n</code></pre><script>alert(4)</script>\n```\n\n'
        "| a | b |\n|---|---|\n| <svg onload=alert(5)> | [ok](https://example.org) |\n"
    ),
    "text/csv": 'name,html\n"<script>alert(1)</script>","<img src=x onerror=alert(2)>"\n',
    "application/x-ndjson": '{"html":"<script>alert(1)</script>","k":"</pre><img src=x onerror=alert(2)>"}\n',
}


@pytest.mark.parametrize("content_type", list(HOSTILE))
def test_hostile_content_cannot_inject(
    shared_server: ServerProcess, context: BrowserContext, content_type: str
) -> None:
    base = shared_server.url
    name = f"e2e/hostile-{content_type.replace('/', '-')}"
    payload = HOSTILE[content_type]
    create(base, name, content_type, payload)
    page = context.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(f"{base}/watch/{name}")
    wait_state(page, "live")
    live = payload.split("\n", 1)[1] if content_type == "text/csv" else payload
    append(base, name, content_type, live, close=True)
    wait_state(page, "closed")
    assert_shows(page, payload + live)
    page.wait_for_timeout(300)
    assert dialogs == [] and page.evaluate("window.__pwned") is None
    assert page.locator("#watch img, #watch svg, #watch iframe, #watch object, #watch script").count() == 0
    scripts = page.eval_on_selector_all("script", "s => s.map(e => e.getAttribute('src'))")
    assert all(src and src.startswith("/static/") for src in scripts)
    hrefs = page.eval_on_selector_all("#rendered a", "links => links.map(a => a.href)")
    assert all(href.startswith(("http://", "https://", "mailto:")) for href in hrefs)
    if content_type == "text/markdown":
        assert hrefs == ["https://example.org/"] * 2
        assert "</code></pre><script>alert(4)</script>" in page.locator(".md pre code").first.text_content()


def test_large_stream_shows_the_latest_part_and_loads_earlier(
    shared_server: ServerProcess, context: BrowserContext
) -> None:
    base = shared_server.url
    body = "".join(f"{n:06d} {'é' * 40} {'x' * 50}\n" for n in range(7000))
    create(base, "e2e/big", "text/plain")
    data = body.encode()
    for at in range(0, len(data), 200_000):
        httpx.post(
            f"{base}/v1/stream/e2e/big",
            content=data[at : at + 200_000],
            headers={"content-type": "text/plain"},
        )
    page = context.new_page()
    page.goto(f"{base}/watch/e2e/big")
    wait_state(page, "live")
    start = int(page.eval_on_selector("#watch", "e => e.dataset.start"))
    assert start > 0 and raw(page) == data[start:].decode()
    expect(page.locator("#earlier")).to_be_visible()
    for _ in range(10):
        if not page.locator("#earlier").is_visible():
            break
        previous = start
        page.click("#load-earlier")
        page.wait_for_function(
            "s => Number(document.getElementById('watch').dataset.start) < s", arg=previous, timeout=TIMEOUT
        )
        start = int(page.eval_on_selector("#watch", "e => e.dataset.start"))
        assert raw(page) == data[start:].decode()
    assert start == 0 and raw(page) == body


def test_growing_past_two_windows_keeps_the_latest_part(
    shared_server: ServerProcess, context: BrowserContext
) -> None:
    base = shared_server.url
    create(base, "e2e/grow", "text/plain")
    page = context.new_page()
    page.goto(f"{base}/watch/e2e/grow")
    wait_state(page, "live")
    data = "".join(f"{n:07d} {'ü' * 30} {'v' * 60}\n" for n in range(7000)).encode()
    for at in range(0, len(data), 100_000):
        httpx.post(
            f"{base}/v1/stream/e2e/grow",
            content=data[at : at + 100_000],
            headers={"content-type": "text/plain"},
        )
    page.wait_for_function(
        "n => Number(document.getElementById('watch').dataset.offset) === n", arg=len(data), timeout=TIMEOUT
    )
    start = int(page.eval_on_selector("#watch", "e => e.dataset.start"))
    assert 0 < start <= len(data) - 256 * 1024 and raw(page) == data[start:].decode()
    expect(page.locator("#earlier")).to_be_visible()


def test_follows_the_reader_and_jumps_to_live(shared_server: ServerProcess, browser: Browser) -> None:
    base = shared_server.url
    context = browser.new_context(viewport={"width": 900, "height": 500})
    try:
        create(base, "e2e/follow", "text/plain", "".join(f"early line {n}\n" for n in range(80)))
        page = context.new_page()
        page.goto(f"{base}/watch/e2e/follow")
        wait_state(page, "live")
        at_bottom = "() => innerHeight + scrollY >= document.scrollingElement.scrollHeight - 60"
        page.wait_for_function(at_bottom, timeout=TIMEOUT)
        append(base, "e2e/follow", "text/plain", "".join(f"more {n}\n" for n in range(20)))
        page.wait_for_function("() => document.getElementById('raw').textContent.includes('more 19')")
        page.wait_for_function(at_bottom, timeout=TIMEOUT)  # it kept to the newest content
        page.mouse.wheel(0, -2000)
        page.wait_for_function("() => scrollY < 200", timeout=TIMEOUT)
        append(base, "e2e/follow", "text/plain", "".join(f"later {n}\n" for n in range(20)))
        expect(page.locator("#jump")).to_be_visible()
        page.wait_for_timeout(300)
        assert page.evaluate("scrollY") < 200  # the reader was not dragged down
        page.click("#jump")
        page.wait_for_function(at_bottom, timeout=TIMEOUT)
        expect(page.locator("#jump")).to_be_hidden()
        append(base, "e2e/follow", "text/plain", "", close=True)
        wait_state(page, "closed")
        expected = "".join(
            [
                *(f"early line {n}\n" for n in range(80)),
                *(f"more {n}\n" for n in range(20)),
                *(f"later {n}\n" for n in range(20)),
            ]
        )
        assert_shows(page, expected)
    finally:
        context.close()


def test_json_records_and_a_deleted_stream(shared_server: ServerProcess, context: BrowserContext) -> None:
    base = shared_server.url
    create(base, "e2e/events", "application/json", json.dumps([{"event": "start", "n": 0}]))
    page = context.new_page()
    page.goto(f"{base}/watch/e2e/events")
    wait_state(page, "live")
    sent = [{"event": "step", "n": n, "text": "<b>ünï</b>"} for n in range(1, 6)]
    append(base, "e2e/events", "application/json", json.dumps(sent[:2]))
    append(base, "e2e/events", "application/json", json.dumps(sent[2:]))
    expect(page.locator("li.record")).to_have_count(6)
    shown = [json.loads(text) for text in page.locator("li.record pre").all_text_contents()]
    assert shown == [{"event": "start", "n": 0}, *sent]
    assert_shows(
        page, "".join(json.dumps(r, separators=(",", ":"), ensure_ascii=False) + "\n" for r in shown)
    )
    httpx.delete(f"{base}/v1/stream/e2e/events").raise_for_status()
    wait_state(page, "gone")
    expect(page.locator("#status")).to_have_text("Gone")
    expect(page.locator(".gone-note")).to_be_visible()


def test_a_stream_deleted_and_created_again_is_not_continued(
    shared_server: ServerProcess, context: BrowserContext
) -> None:
    base = shared_server.url
    create(base, "e2e/reborn", "text/plain", "first life\n")
    page = context.new_page()
    page.goto(f"{base}/watch/e2e/reborn")
    wait_state(page, "live")
    httpx.delete(f"{base}/v1/stream/e2e/reborn").raise_for_status()
    create(base, "e2e/reborn", "text/plain", "a second life, longer than the first one\n")
    wait_state(page, "gone")
    assert raw(page) == "first life\n"  # nothing of the new stream joined the old one's text


def test_binary_stream_shows_size_and_hex(shared_server: ServerProcess, context: BrowserContext) -> None:
    base = shared_server.url
    httpx.put(f"{base}/v1/stream/e2e/blob", content=b"\x89PNG\r\n", headers={"content-type": "image/png"})
    page = context.new_page()
    page.goto(f"{base}/watch/e2e/blob")
    wait_state(page, "live")
    httpx.post(f"{base}/v1/stream/e2e/blob", content=bytes(range(64)), headers={"content-type": "image/png"})
    expect(page.locator("#size")).to_have_text("70 B")
    expect(page.locator("#hex tbody tr")).to_have_count(5)
    expect(page.locator("#hex tbody tr").first).to_contain_text("89 50 4e 47 0d 0a 00 01")
    expect(page.locator("#hex-caption")).to_have_text("The first 70 bytes")


def test_demo_from_the_page(shared_server: ServerProcess, context: BrowserContext, tmp_path: Path) -> None:
    base = shared_server.url
    page = context.new_page()
    response = page.goto(f"{base}/watch/no/such/stream")
    assert response is not None and response.status == 404
    expect(page.locator("#status")).to_have_text("Gone")
    page.click(".gone-card button.demo-button")
    page.wait_for_url(f"{base}/watch/stream_*")
    expect(page.locator(".md h1")).to_have_text("How a durable stream survives a refresh", timeout=TIMEOUT)
    expect(page.locator(".watch-meta a")).to_have_count(1)  # the audit stream's link
    page.screenshot(path=str(tmp_path / "demo.png"))
    wait_state(page, "closed", timeout=20_000)
    name = page.url.rsplit("/", 1)[1]
    assert_shows(page, httpx.get(f"{base}/v1/stream/{name}?offset=-1").text)
    assert (
        page.locator(".md pre code.language-python").count() == 1 and page.locator(".md ol li").count() == 3
    )
