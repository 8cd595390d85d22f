"""<streamhold-stream> and the embed iframe on another origin's page, reading a PRIVATE stream through real
share links: a stop link (content and protocol URL), a read-only link, an altered one and an expired one."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from playwright.sync_api import BrowserContext, Page, expect

from e2e.conftest import Site, running_site, serve
from e2e.test_embed import wait_element
from streamhold.web.client import VERSION
from tests._server import ServerProcess

pytestmark = pytest.mark.timeout(90)

KEY = "admin-key-for-embedded-share-links"
SECRET = "secret-for-embedded-share-links"
ADMIN = {"authorization": f"Bearer {KEY}"}
TIMEOUT = 15_000
NAME = "embedded-private"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with running_site(tmp_path_factory.mktemp("embed-share") / "site") as other:
        yield other


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory, site: Site) -> Iterator[ServerProcess]:
    """A server with keys and a secret, whose embed page the test site may frame."""
    env = {
        "STREAMHOLD_API_KEYS": KEY,
        "STREAMHOLD_SECRET": SECRET,
        "STREAMHOLD_EMBED_ORIGINS": site.origin,
        "STREAMHOLD_LONG_POLL_TIMEOUT": "2",
        "STREAMHOLD_SSE_KEEPALIVE": "1",  # a live read ends at its first event after its link expired
    }
    with serve(tmp_path_factory.mktemp("embed-share") / "data", **env) as process:
        yield process


def share(base: str, stream_id: str, ttl: float, stop: bool) -> dict[str, str]:
    made = httpx.post(f"{base}/stream/{stream_id}/share", json={"ttl": ttl, "stop": stop}, headers=ADMIN)
    assert made.status_code == 201, made.text
    return dict(made.json())


def query(link: dict[str, str]) -> str:
    return link["content_url"].split("?", 1)[1]


def private(base: str, name: str, first: str) -> str:
    """A new private stream's id."""
    headers = {"content-type": "text/plain", "streamhold-visibility": "private", **ADMIN}
    made = httpx.put(f"{base}/v1/stream/{name}", content=first.encode(), headers=headers)
    assert made.status_code == 201, made.text
    return str(httpx.head(f"{base}/v1/stream/{name}", headers=ADMIN).headers["streamhold-stream-id"])


def append(base: str, text: str, close: bool = False) -> None:
    headers = {"content-type": "text/plain", **ADMIN, **({"stream-closed": "true"} if close else {})}
    httpx.post(f"{base}/v1/stream/{NAME}", content=text.encode(), headers=headers).raise_for_status()


def page_of(base: str, elements: dict[str, str], frames: dict[str, str] | None = None) -> str:
    tags = [f'<streamhold-stream id="{i}" src="{s}" stop></streamhold-stream>' for i, s in elements.items()]
    for i, src in (frames or {}).items():
        tags.append(f'<iframe id="{i}" src="{src}" width="800" height="300"></iframe>')
    body = "\n".join(tags)
    return f"""<!doctype html><meta charset="utf-8"><link rel="icon" href="data:,">
<script type="module" src="{base}/static/streamhold-{VERSION}.js"></script>
{body}"""


def text_of(page: Page, element: str) -> str:
    return str(page.eval_on_selector(element, "e => e.text"))


def refused(page: Page, element: str, why: str, kept: str = "") -> None:
    """The element shows it could not read, and why, and nothing of the stream but what it `kept`."""
    wait_element(page, element, "refused")
    expect(page.locator(f"{element} .streamhold-note")).to_contain_text(why, timeout=TIMEOUT)
    assert text_of(page, element) == kept
    assert page.locator(f"{element} .streamhold-view").text_content() == kept
    expect(page.locator(f"{element} .streamhold-stop")).to_be_hidden()  # a refused link stops nothing


def test_share_links_as_src_on_another_origin(
    keyed_server: ServerProcess, site: Site, context: BrowserContext
) -> None:
    base = keyed_server.url
    stream_id = private(base, NAME, "first line\n")
    for path in (f"/v1/stream/{NAME}", f"/stream/{stream_id}", f"/watch/{NAME}"):
        assert httpx.get(f"{base}{path}").status_code == 401, f"{path}: the stream is private"

    stopper, reader = share(base, stream_id, 3600, True), share(base, stream_id, 3600, False)
    assert stopper["content_url"].startswith(f"{base}/stream/{stream_id}?share=")
    good = stopper["content_url"]
    tampered = good[:-5] + ("A" if good[-5] != "A" else "B") + good[-4:]  # one character of the MAC
    elements = {
        "stopper": stopper["content_url"],
        "protocol": f"{base}/v1/stream/{NAME}?{query(stopper)}",
        "reader": reader["content_url"],
        "page-link": stopper["url"],  # the link's viewer page names the stream as well
        "tampered": tampered,
    }
    frames = {
        "frame": f"{base}/watch/{NAME}?embed=1&{query(reader)}",
        "bad-frame": f"{base}/watch/{NAME}?embed=1&{tampered.split('?', 1)[1]}",
    }
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.goto(site.page("shared.html", page_of(base, elements, frames)))
    for element in ("#stopper", "#protocol", "#reader", "#page-link"):
        wait_element(page, element, "live")
        assert text_of(page, element) == "first line\n"
    refused(page, "#tampered", "this share link is not valid")
    watch = page.frame_locator("#frame").locator("#watch")
    expect(watch).to_have_attribute("data-state", "live", timeout=TIMEOUT)
    expect(page.frame_locator("#bad-frame").locator("body")).to_contain_text("this share link is not valid")

    append(base, "second line\n")  # tailed live by every reader
    both = "first line\nsecond line\n"
    for element in ("#stopper", "#protocol", "#reader", "#page-link"):
        has = "([e, t]) => document.querySelector(e).text === t"
        page.wait_for_function(has, arg=[element, both], timeout=TIMEOUT)
    expect(page.frame_locator("#frame").locator("#raw")).to_have_text("first line\nsecond line\n")
    expect(page.locator("#stopper .streamhold-view")).to_contain_text("second line")

    # Stop shows for a stop link only, in each of its URL forms.
    expect(page.locator("#stopper .streamhold-stop")).to_be_visible(timeout=TIMEOUT)
    expect(page.locator("#protocol .streamhold-stop")).to_be_visible(timeout=TIMEOUT)
    expect(page.locator("#page-link .streamhold-stop")).to_be_visible(timeout=TIMEOUT)
    page.wait_for_timeout(200)
    assert not page.locator("#reader .streamhold-stop").is_visible()
    assert not page.locator("#tampered .streamhold-stop").is_visible()

    def stop_requested() -> bool:
        answer = httpx.get(f"{base}/stream/{stream_id}/stop", headers=ADMIN)
        assert answer.status_code == 200, answer.text
        return bool(answer.json()["stop_requested"])

    assert not stop_requested()
    page.click("#stopper .streamhold-stop")
    expect(page.locator("#stopper .streamhold-stop")).to_have_text("Stopping…")
    for _ in range(100):
        if stop_requested():
            break
        page.wait_for_timeout(50)
    assert stop_requested()
    assert page.locator("#stopper .streamhold-stop-note").is_hidden()
    append(base, "stopped\n", close=True)  # the writer stops
    for element in ("#stopper", "#protocol", "#reader", "#page-link"):
        wait_element(page, element, "closed")
    expect(page.locator("#stopper .streamhold-stop")).to_be_hidden()
    expect(page.locator("#protocol .streamhold-stop")).to_be_hidden()
    expect(watch).to_have_attribute("data-state", "closed", timeout=TIMEOUT)
    # Refused requests (403) are the only errors the page logged.
    assert not [e for e in errors if "403" not in e], errors

    # A stop link that expires: read (and Stop) while it lasts, refused with the reason after, live and on
    # the reload.
    brief = share(base, private(base, "embedded-brief", "brief\n"), 4, True)
    framed = {"brief-frame": f"{base}/watch/embedded-brief?embed=1&{query(brief)}"}
    page.goto(site.page("brief.html", page_of(base, {"brief": brief["content_url"]}, framed)))
    wait_element(page, "#brief", "live")
    viewer = page.frame_locator("#brief-frame").locator("#watch")
    expect(viewer).to_have_attribute("data-state", "live", timeout=TIMEOUT)
    expect(page.locator("#brief .streamhold-stop")).to_be_visible(timeout=TIMEOUT)
    assert text_of(page, "#brief") == "brief\n"
    expires = int(query(brief).split(".")[3])  # whole seconds, by the server's clock
    time.sleep(max(0.0, expires + 0.2 - time.time()))
    # The live read ended at expiry and its reconnect was refused; what arrived before stays.
    refused(page, "#brief", "this share link has expired", kept="brief\n")
    expect(viewer).to_have_attribute("data-state", "refused", timeout=TIMEOUT)  # the embed too
    expect(viewer.locator("#status")).to_contain_text("this share link has expired")
    expect(viewer.locator("#raw")).to_have_text("brief\n")
    page.reload()
    refused(page, "#brief", "this share link has expired")
    expect(viewer).to_have_attribute("data-state", "refused", timeout=TIMEOUT)
    expect(viewer.locator("#refusal")).to_have_text("this share link has expired: ask for a new one")
    assert viewer.locator("#raw").count() == 0
