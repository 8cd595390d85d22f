"""The dashboard in Chromium against a real `streamhold serve`: filters that survive a reload, deletes,
live growth without a reload, and sign-in with CSRF protection when API keys are set."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Dialog, Page, Request, expect

from e2e.conftest import VIEWPORT, serve
from tests._server import ServerProcess, free_port

pytestmark = pytest.mark.timeout(90)

TIMEOUT = 10_000
KEY = "e2e-dashboard-key"


def put(base: str, name: str, body: bytes = b"", key: str = "") -> None:
    """Create a stream over the Durable Streams protocol (and write `body` into it)."""
    headers = {"content-type": "text/plain", **({"authorization": f"Bearer {key}"} if key else {})}
    httpx.put(f"{base}/v1/stream/{name}", headers=headers).raise_for_status()
    if body:
        httpx.post(f"{base}/v1/stream/{name}", content=body, headers=headers).raise_for_status()


def create(base: str, namespace: str, metadata: dict[str, str]) -> str:
    """Create a stream with metadata over the Agentuity-style service API; returns its id."""
    body = {"name": namespace, "metadata": metadata, "headers": {"content-type": "application/json"}}
    response = httpx.post(f"{base}/stream", json=body)
    response.raise_for_status()
    return str(response.json()["id"])


def append(base: str, name: str, times: int, piece: bytes = b"y" * 100) -> None:
    with httpx.Client(headers={"content-type": "text/plain"}) as client:
        for _ in range(times):
            client.post(f"{base}/v1/stream/{name}", content=piece).raise_for_status()


def rows(page: Page) -> Any:
    return page.locator("#streams tbody tr[data-name]")


def expect_rows(page: Page, names: list[str]) -> None:
    expect(rows(page)).to_have_count(len(names), timeout=TIMEOUT)
    for name in names:
        expect(page.locator(f'#streams tr[data-name="{name}"]')).to_be_visible()


def test_filters_by_namespace_and_metadata_survive_a_reload(shared_server: ServerProcess, page: Page) -> None:
    base = shared_server.url
    put(base, "fa/one", b"1")
    put(base, "fa/two", b"22")
    put(base, "fb/three")
    alice_prod = create(base, "fagents", {"user": "alice", "env": "prod"})
    bob_prod = create(base, "fagents", {"user": "bob", "env": "prod"})
    alice_dev = create(base, "fagents", {"user": "alice", "env": "dev"})

    page.goto(base + "/")
    expect(page.locator("#f-namespace option", has_text="fa (2)")).to_have_count(1)
    page.select_option("#f-namespace", "fa")
    expect_rows(page, ["fa/one", "fa/two"])
    expect(page).to_have_url(f"{base}/?namespace=fa")

    page.select_option("#f-namespace", "fagents")
    expect_rows(page, [alice_prod, bob_prod, alice_dev])
    page.fill("#f-meta", "user=alice")
    page.press("#f-meta", "Enter")
    expect_rows(page, [alice_prod, alice_dev])
    page.fill("#f-meta", "env=prod")
    page.press("#f-meta", "Enter")
    expect_rows(page, [alice_prod])
    expect(page).to_have_url(re.compile(r"namespace=fagents&meta=user%3Dalice&meta=env%3Dprod$"))
    expect(page.locator(".filter-chip")).to_have_count(2)

    page.reload()
    expect_rows(page, [alice_prod])
    expect(page.locator("#f-namespace")).to_have_value("fagents")
    expect(page.locator(".filter-chip")).to_have_text(["user=alice×", "env=prod×"])

    page.get_by_label("Remove env=prod").click()
    expect_rows(page, [alice_prod, alice_dev])
    page.go_back()
    expect_rows(page, [alice_prod])

    page.goto(base + "/?namespace=fagents")
    page.locator(f'tr[data-name="{bob_prod}"] a.chip', has_text="user=bob").click()
    expect_rows(page, [bob_prod])
    expect(page).to_have_url(re.compile(r"meta=user%3Dbob$"))


class SseReader(threading.Thread):
    """Tails a stream with the protocol's SSE until the server ends the response."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.connected = threading.Event()
        self.ended = threading.Event()

    def run(self) -> None:
        try:
            params = {"offset": "-1", "live": "sse"}
            with httpx.stream("GET", self.url, params=params, timeout=30) as response:
                self.connected.set()
                for _ in response.iter_lines():
                    pass
        except httpx.HTTPError:
            pass
        finally:
            self.ended.set()


def test_delete_one_and_every_stream_of_a_filter(shared_server: ServerProcess, page: Page) -> None:
    base = shared_server.url
    for name in ("dx/a", "dx/b", "dx/c"):
        put(base, name, b"x" * 4000)
    put(base, "dkeep/k", b"k")
    reader = SseReader(f"{base}/v1/stream/dx/a")
    reader.start()
    assert reader.connected.wait(10)

    page.goto(base + "/?namespace=dx")
    expect_rows(page, ["dx/a", "dx/b", "dx/c"])
    expect(page.locator('tr[data-name="dx/a"] td.readers')).to_have_text("1", timeout=TIMEOUT)

    messages: list[str] = []

    def answer(accept: bool) -> Any:
        def handle(dialog: Dialog) -> None:
            messages.append(dialog.message)
            dialog.accept() if accept else dialog.dismiss()

        return handle

    page.once("dialog", answer(False))
    page.get_by_role("button", name="Delete dx/b").click()
    expect(page.locator(".notice")).to_have_count(0)
    page.wait_for_timeout(500)
    expect_rows(page, ["dx/a", "dx/b", "dx/c"])

    page.once("dialog", answer(True))
    page.get_by_role("button", name="Delete dx/a").click()
    expect(page.locator(".notice")).to_have_text("Deleted dx/a.")
    expect_rows(page, ["dx/b", "dx/c"])
    assert messages[-1].startswith("Delete dx/a?")
    assert reader.ended.wait(10), "the live reader of a deleted stream should end"
    assert httpx.get(f"{base}/v1/stream/dx/a").status_code == 404

    page.once("dialog", answer(True))
    page.locator("#delete-matching").click()
    expect(page.locator(".notice")).to_have_text("Deleted 2 streams.")
    assert messages[-1].startswith("Delete all 2 streams matching this filter?")
    expect(page.locator("#streams tr.empty")).to_contain_text("No streams match this filter.")
    expect(page).to_have_url(f"{base}/?namespace=dx")
    for name in ("dx/b", "dx/c"):
        assert httpx.head(f"{base}/v1/stream/{name}").status_code == 404
    assert httpx.head(f"{base}/v1/stream/dkeep/k").status_code == 200


def test_new_streams_and_growth_appear_without_a_reload(shared_server: ServerProcess, page: Page) -> None:
    base = shared_server.url
    put(base, "lv/old", b"o")
    page.goto(base + "/?namespace=lv&sort=size&dir=desc")
    expect_rows(page, ["lv/old"])
    page.evaluate("window.notReloaded = true")
    streams_before = int(page.locator('[data-figure="streams"]').inner_text().replace(",", ""))

    put(base, "lv/new")
    put(base, "other/not-shown")
    expect_rows(page, ["lv/new", "lv/old"])
    size = page.locator('tr[data-name="lv/new"] td.size')
    expect(size).to_have_text("0 B")
    append(base, "lv/new", 30)
    expect(size).to_have_text("2.9 KiB", timeout=TIMEOUT)
    expect(rows(page).first).to_have_attribute("data-name", "lv/new")
    expect(page.locator('[data-figure="streams"]')).to_have_text(str(streams_before + 2))
    appends = page.locator('[data-figure="appends"]')
    expect(appends).not_to_have_text(re.compile(r"^(…|0\.0)$"), timeout=TIMEOUT)
    assert page.evaluate("window.notReloaded") is True
    expect(page).to_have_url(f"{base}/?namespace=lv&sort=size&dir=desc")
    expect(page.locator("#f-namespace")).to_have_value("lv")

    polls: list[str] = []
    page.on("request", lambda request: polls.append(request.url) if "seen=" in request.url else None)
    page.wait_for_timeout(4200)
    assert 1 <= len(polls) <= 3, polls
    assert all("namespace=lv" in url and "sort=size" in url for url in polls)
    # Selecting text in the table (to copy an id) holds refreshes back until the selection is gone.
    page.locator('tr[data-name="lv/new"] .sub').select_text()
    append(base, "lv/new", 30)
    page.wait_for_timeout(4500)
    expect(size).to_have_text("2.9 KiB")
    assert page.evaluate("document.getSelection().toString()").startswith("stream_")
    page.evaluate("document.getSelection().removeAllRanges()")
    expect(size).to_have_text("5.9 KiB", timeout=TIMEOUT)

    page.evaluate("Object.defineProperty(document, 'hidden', {configurable: true, get: () => true})")
    page.wait_for_timeout(100)
    polls.clear()
    page.wait_for_timeout(4200)
    assert polls == [], "a hidden tab should not poll"


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server with API keys for the sign-in tests, each keeping to namespaces of its own."""
    with serve(tmp_path_factory.mktemp("keyed") / "data", STREAMHOLD_API_KEYS=f"{KEY},second-key") as server:
        yield server


def test_sign_in_is_required_when_keys_are_set(keyed_server: ServerProcess, browser: Browser) -> None:
    base = keyed_server.url
    put(base, "sec/one", b"1", key=KEY)
    put(base, "sec/two", b"2", key=KEY)
    context = browser.new_context(viewport=VIEWPORT)
    try:
        page = context.new_page()
        page.goto(base + "/?namespace=sec")
        expect(page).to_have_url(re.compile(r"/signin\?next="))
        expect(page.locator("#streams")).to_have_count(0)
        page.fill("#key", "wrong-key")
        page.click("button[type=submit]")
        expect(page.locator(".problem")).to_contain_text("not one of this server's API keys")
        page.fill("#key", KEY)
        page.click("button[type=submit]")
        expect(page).to_have_url(f"{base}/?namespace=sec")
        expect_rows(page, ["sec/one", "sec/two"])

        cookie = next(c for c in context.cookies() if c["name"] == "streamhold_session")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert page.evaluate("document.cookie") == ""

        stream_id = page.locator('tr[data-name="sec/one"]').get_attribute("data-id")
        status = page.evaluate(
            "async (url) => (await fetch(url, {method: 'DELETE'})).status",
            f"/dashboard/streams/{stream_id}",
        )
        assert status == 403
        assert context.request.delete(f"{base}/dashboard/streams/{stream_id}").status == 403
        assert httpx.head(f"{base}/v1/stream/sec/one").status_code == 200

        page.once("dialog", lambda dialog: dialog.accept())
        page.get_by_role("button", name="Delete sec/one").click()
        expect(page.locator(".notice")).to_have_text("Deleted sec/one.")
        expect_rows(page, ["sec/two"])

        page.get_by_role("button", name="Sign out").click()
        expect(page).to_have_url(f"{base}/signin")
        page.goto(base + "/")
        expect(page).to_have_url(f"{base}/signin")
        partial = {"hx-request": "true", "hx-target": "streams"}
        anonymous = httpx.get(f"{base}/?namespace=sec", headers=partial)
        assert anonymous.status_code == 401 and "sec/two" not in anonymous.text
    finally:
        context.close()


def test_a_manage_token_signs_in_to_its_own_namespaces(keyed_server: ServerProcess, browser: Browser) -> None:
    base = keyed_server.url
    admin = {"authorization": f"Bearer {KEY}"}
    for name in ("ops/one", "ops/two", "team/secret"):
        put(base, name, b"x", key=KEY)
    minted = httpx.post(f"{base}/tokens", json={"scopes": ["manage"], "namespaces": ["ops"]}, headers=admin)
    reader = httpx.post(f"{base}/tokens", json={"scopes": ["read"], "namespaces": ["ops"]}, headers=admin)
    token, listed = minted.json(), httpx.post(f"{base}/stream/list", json={}, headers=admin).json()
    team_id = next(s["id"] for s in listed["streams"] if s["namespace"] == "team")
    context = browser.new_context(viewport=VIEWPORT)
    try:
        page = context.new_page()
        page.goto(base + "/")
        page.fill("#key", reader.json()["token"])
        page.click("button[type=submit]")
        expect(page.locator(".problem")).to_contain_text("this token lacks the manage scope")
        page.fill("#key", token["token"])
        page.click("button[type=submit]")
        expect(page).to_have_url(f"{base}/")
        expect_rows(page, ["ops/one", "ops/two"])
        expect(page.locator('[data-figure="streams"]')).to_have_text("2")
        expect(page.locator("#namespaces li")).to_have_count(1)
        expect(page.locator('#namespaces li[data-namespace="ops"]')).to_be_visible()
        expect(page.locator("#charts")).to_have_count(0)

        page.once("dialog", lambda dialog: dialog.accept())
        page.get_by_role("button", name="Delete ops/one").click()
        expect(page.locator(".notice")).to_have_text("Deleted ops/one.")
        expect_rows(page, ["ops/two"])
        expect(page.locator('[data-figure="streams"]')).to_have_text("1")

        csrf = json.loads(page.locator("#dashboard").get_attribute("hx-headers") or "{}")["X-CSRF-Token"]
        refused = page.evaluate(
            "async ([url, csrf]) => { const r = await fetch(url, {method: 'DELETE', headers: "
            "{'X-CSRF-Token': csrf}}); return [r.status, await r.text()]; }",
            [f"/dashboard/streams/{team_id}", csrf],
        )
        assert refused == [403, "this sign-in's token does not cover namespace team: nothing was deleted"]
        assert httpx.head(f"{base}/v1/stream/team/secret").status_code == 200
        page.goto(base + "/?namespace=team")
        expect(rows(page)).to_have_count(0)

        httpx.delete(f"{base}/tokens/{token['id']}", headers=admin).raise_for_status()
        page.wait_for_timeout(1000)  # a revocation counts everywhere within a second
        page.goto(base + "/")
        expect(page).to_have_url(re.compile(r"/signin\?ended=token$"))
        expect(page.locator("[data-notice=ended]")).to_contain_text("revoked or has expired")
    finally:
        context.close()


def test_the_demo_starts_from_the_dashboard(shared_server: ServerProcess, page: Page) -> None:
    page.goto(f"{shared_server.url}/")
    page.locator(".demo-button").click()
    page.wait_for_url(re.compile(r"/watch/stream_[0-9a-f]{32}$"))
    expect(page.locator("main")).to_contain_text("How a durable stream survives a refresh", timeout=15000)


def test_charts_fill_in_live_and_say_what_they_cover(tmp_path: Any, page: Page) -> None:
    env = {"STREAMHOLD_DATA_DIR": str(tmp_path / "data"), "STREAMHOLD_HISTORY_INTERVAL": "1"}
    with ServerProcess(port=free_port(), env=env) as server:
        base = server.url
        put(base, "charts/big", b"b" * 50_000)
        put(base, f"{EVIL}/small", b"s" * 5_000)
        page.goto(base + "/")
        page.evaluate("window.notReloaded = true")
        expect(page.locator("[data-history-note]")).to_contain_text("this server process since it started")
        hour = {key: page.locator(f'.chart-card[data-chart="{key}"] figure').nth(0) for key in KEYS}
        day = page.locator('.chart-card[data-chart="appends"] figure').nth(1)

        reader = SseReader(f"{base}/v1/stream/charts/big")
        reader.start()
        assert reader.connected.wait(10)
        writer = threading.Thread(target=append, args=(base, "charts/big", 150, b"w" * 1000), daemon=True)
        writer.start()
        writer.join(30)
        assert not writer.is_alive()

        busy = re.compile(r"max [1-9]")
        expect(hour["appends"].locator(".chart-values")).to_contain_text(busy, timeout=TIMEOUT)
        expect(hour["bytes"].locator(".chart-values")).to_contain_text(re.compile(r"max [0-9.]+ KiB/s"))
        expect(hour["readers"].locator(".chart-values")).to_contain_text(busy, timeout=TIMEOUT)
        expect(hour["stored"].locator(".chart-values")).to_contain_text("latest 200 KiB", timeout=TIMEOUT)
        for figure in hour.values():
            expect(figure.locator("svg.spark polyline")).to_have_count(1)
            assert int(figure.get_attribute("data-points") or 0) >= 2
        points = hour["appends"].locator("polyline").get_attribute("points") or ""
        assert len(points.split()) >= 2 and any(float(p.split(",")[1]) < 56 for p in points.split())
        expect(day).to_contain_text("collecting…")
        expect(page.locator(".chart-card h3").first).to_contain_text("Appends per second")
        bar = page.locator("#namespaces li").filter(has_text=EVIL).locator("svg.ns-bar title")
        expect(bar).to_have_text(re.compile(rf"^{re.escape(EVIL)}: 4\.9 KiB stored \(\d+% of the largest"))
        assert page.evaluate("window.notReloaded") is True

        refreshes: list[str] = []

        def count(request: Request) -> None:
            if request.headers.get("hx-target") == "charts":
                refreshes.append(request.url)

        page.on("request", count)
        page.wait_for_timeout(4200)
        assert 1 <= len(refreshes) <= 3, refreshes
        page.evaluate("Object.defineProperty(document, 'hidden', {configurable: true, get: () => true})")
        page.wait_for_timeout(100)
        refreshes.clear()
        page.wait_for_timeout(4200)
        assert refreshes == [], "a hidden tab should not refresh its charts"
        page.evaluate("Object.defineProperty(document, 'hidden', {configurable: true, get: () => false})")
        page.evaluate("document.dispatchEvent(new Event('visibilitychange'))")
        page.wait_for_timeout(500)
        assert refreshes, "a tab that shows again refreshes its charts at once"

        shot = tmp_path / "dashboard-charts.png"
        page.locator("#charts").scroll_into_view_if_needed()
        page.screenshot(path=str(shot), full_page=True)
        print(f"\nscreenshot: {shot}")
        assert shot.stat().st_size > 10_000


KEYS = ("appends", "bytes", "readers", "stored")
EVIL = "charts<img src=x onerror=alert(1)>"  # a namespace is the name up to its first slash


def test_a_signed_in_viewer_follows_a_private_stream(keyed_server: ServerProcess, browser: Browser) -> None:
    base = keyed_server.url
    headers = {"authorization": f"Bearer {KEY}", "content-type": "text/plain"}
    private = {**headers, "streamhold-visibility": "private"}
    httpx.put(f"{base}/v1/stream/vault/answer", headers=private).raise_for_status()
    httpx.post(f"{base}/v1/stream/vault/answer", content=b"first line\n", headers=headers).raise_for_status()
    assert httpx.get(f"{base}/v1/stream/vault/answer?offset=-1").status_code == 401
    context = browser.new_context(viewport=VIEWPORT)
    try:
        page = context.new_page()
        page.goto(base + "/signin")
        page.fill("#key", KEY)
        page.click("button[type=submit]")
        expect(page).to_have_url(f"{base}/")
        page.goto(base + "/watch/vault/answer")
        expect(page.locator("#watch")).to_have_attribute("data-state", "live", timeout=TIMEOUT)
        httpx.post(f"{base}/v1/stream/vault/answer", content=b"written live\n", headers=headers)
        expect(page.locator("#watch")).to_contain_text("written live", timeout=TIMEOUT)
        page.reload()
        expect(page.locator("#watch")).to_have_attribute("data-state", "live", timeout=TIMEOUT)
        expect(page.locator("#watch")).to_contain_text("written live")
    finally:
        context.close()
