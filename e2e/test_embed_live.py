"""<streamhold-stream> on another site's page, in Chromium: its Stop button, a share link's query carried
on every request (seen by a recording proxy in front of the server), and a hidden tab that keeps following."""

from __future__ import annotations

import time
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from playwright.sync_api import BrowserContext, expect

from e2e._recording_proxy import RecordingProxy
from e2e.conftest import Site, running_site, serve
from e2e.test_embed import FOLLOW, outcome, post, put, wait_element
from streamhold.web.client import VERSION
from tests._server import ServerProcess

pytestmark = pytest.mark.timeout(90)

TIMEOUT = 15_000
SHARE = "s3cr3t-Link_1"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """One other site for the module's tests, whose origin the server knows."""
    with running_site(tmp_path_factory.mktemp("live") / "site") as other:
        yield other


@pytest.fixture(scope="module")
def stop_server(tmp_path_factory: pytest.TempPathFactory, site: Site) -> Iterator[ServerProcess]:
    """A keyless server that takes changes (a stop) from the test site's origin; each test has its names."""
    env = {"STREAMHOLD_CORS_ORIGINS": site.origin, "STREAMHOLD_LONG_POLL_TIMEOUT": "2"}
    with serve(tmp_path_factory.mktemp("live") / "data", **env) as process:
        yield process


def stop_asked(base: str, stream: str) -> bool:
    return bool(httpx.get(f"{base}/stream/{stream}/stop").json()["stop_requested"])


def test_stop_button_and_share_query_on_every_request(
    stop_server: ServerProcess, site: Site, context: BrowserContext
) -> None:
    base = stop_server.url
    put(base, "blog/stop.md", "text/markdown", b"# Stoppable\n\n")
    by_id = httpx.post(f"{base}/stream", json={"name": "blog", "contentType": "text/plain"}).json()["id"]
    httpx.post(f"{base}/stream/{by_id}/append", content=b"by id\n").raise_for_status()
    put(base, "blog/viewed.md", "text/markdown", b"# Viewed\n\n")
    with RecordingProxy(base) as proxy:
        src = f"{proxy.url}/v1/stream/blog/stop.md?share={SHARE}&theme=dark"
        content_src = f"{proxy.url}/stream/{by_id}?share={SHARE}"
        html = f"""<!doctype html><meta charset="utf-8"><link rel="icon" href="data:,">
<script type="module" src="{proxy.url}/static/streamhold-{VERSION}.js"></script>
<streamhold-stream id="named" src="{src}" stop></streamhold-stream>
<streamhold-stream id="by-id" src="{content_src}" stop></streamhold-stream>
<streamhold-stream id="no-stop" src="{src}"></streamhold-stream>"""
        url = site.page("stop.html", html)
        page = context.new_page()
        page.goto(url)
        for element in ("#named", "#by-id", "#no-stop"):
            wait_element(page, element, "live")
        expect(page.locator("#named .streamhold-stop")).to_be_visible(timeout=TIMEOUT)
        expect(page.locator("#by-id .streamhold-stop")).to_be_visible(timeout=TIMEOUT)
        assert page.locator("#no-stop button").count() == 0
        # The viewer opened by a share link reads with it, and its own Stop is the same control.
        viewer = context.new_page()
        viewer.goto(f"{proxy.url}/watch/blog/viewed.md?share={SHARE}")
        expect(viewer.locator("#watch")).to_have_attribute("data-state", "live", timeout=TIMEOUT)
        expect(viewer.locator("#stop")).to_be_visible(timeout=TIMEOUT)
        # follow() by long-poll, and a dropped network: the reconnects keep the query too.
        module = f"{proxy.url}/static/streamhold-{VERSION}.js"
        polled = int(page.evaluate(FOLLOW, [module, src, {"live": "long-poll"}]))
        context.set_offline(True)
        wait_element(page, "#named", "reconnecting", timeout=5000)
        mark = len(proxy.seen)
        context.set_offline(False)
        wait_element(page, "#named", "live")
        reconnects = [
            p for _, p in proxy.seen[mark:] if p.startswith("/v1/stream/blog/stop.md") and "live=sse" in p
        ]
        assert reconnects and all(f"share={SHARE}&theme=dark" in p for p in reconnects), reconnects

        # A page of an origin the server does not take changes from shows no Stop button.
        elsewhere = context.new_page()
        asked: list[int] = []
        elsewhere.on(
            "response", lambda r: asked.append(r.status) if r.url.split("?")[0].endswith("/stop") else None
        )
        elsewhere.goto(url.replace("127.0.0.1", "localhost"))
        wait_element(elsewhere, "#named", "live")
        wait_element(elsewhere, "#by-id", "live")
        for _ in range(100):
            if len(asked) == 2:
                break
            elsewhere.wait_for_timeout(50)
        assert asked == [403, 403]
        elsewhere.wait_for_timeout(100)
        hidden = elsewhere.locator(".streamhold-stop").evaluate_all("bs => bs.map(b => b.hidden)")
        assert hidden == [True, True]
        elsewhere.close()

        stream_id = httpx.head(f"{base}/v1/stream/blog/stop.md").headers["streamhold-stream-id"]
        # A press the server refuses says so beside the button, which stays to be pressed again.
        refusal = {"status": 403, "content_type": "application/json", "body": '{"error": "not now"}'}
        page.route("**/stop?*", lambda route: route.fulfill(**refusal))
        page.click("#named .streamhold-stop")
        expect(page.locator("#named .streamhold-stop-note")).to_have_text(
            "Could not stop the stream: not now"
        )
        expect(page.locator("#named .streamhold-stop")).to_be_enabled()
        page.unroute("**/stop?*")
        assert not stop_asked(base, stream_id)
        page.click("#named .streamhold-stop")
        expect(page.locator("#named .streamhold-stop-note")).to_be_hidden()
        expect(page.locator("#named .streamhold-stop")).to_have_text("Stopping…")
        for _ in range(100):
            if stop_asked(base, stream_id):
                break
            page.wait_for_timeout(50)
        assert stop_asked(base, stream_id)
        post(base, "blog/stop.md", "text/markdown", b"Stopped.\n", close=True)  # the writer stops
        wait_element(page, "#named", "closed")
        expect(page.locator("#named .streamhold-stop")).to_be_hidden()
        assert page.eval_on_selector("#named", "e => e.text") == "# Stoppable\n\nStopped.\n"
        assert outcome(page, polled)["result"]["closed"] is True
        assert page.eval_on_selector("#by-id", "e => e.text") == "by id\n"
        post(base, "blog/viewed.md", "text/markdown", b"Done.\n", close=True)
        expect(viewer.locator("#watch")).to_have_attribute("data-state", "closed", timeout=TIMEOUT)
        expect(viewer.locator("#stop")).to_be_hidden()
        expect(viewer.locator(".md")).to_contain_text("Done.")

    # What reached the server: every request for a stream carried the share link's query.
    to_streams = [(m, p) for m, p in proxy.seen if p.startswith(("/v1/stream/", "/stream/"))]
    assert len(to_streams) >= 20
    for method, path in to_streams:
        query = parse_qs(urlsplit(path).query)
        assert query.get("share") == [SHARE], (method, path)
        if path.startswith("/v1/stream/blog/stop.md"):
            assert query.get("theme") == ["dark"], (method, path)
    kinds = {
        (m, k) for m, p in to_streams for k in ("offset=", "live=sse", "live=long-poll", "/stop?") if k in p
    }
    wanted = {
        ("GET", "offset="),
        ("GET", "live=sse"),
        ("GET", "live=long-poll"),
        ("GET", "/stop?"),
        ("POST", "/stop?"),
    }
    assert wanted <= kinds, kinds
    assert ("HEAD", f"/v1/stream/blog/stop.md?share={SHARE}&theme=dark") in to_streams
    assert any(p.startswith("/v1/stream/blog/viewed.md?") and "live=sse" in p for _, p in to_streams)
    # The content URL was read through its protocol URL, the query kept across the redirect.
    assert any(p.startswith(f"/stream/{by_id}?") for m, p in to_streams)
    assert any(p.startswith(f"/v1/stream/{by_id}?") and "live=sse" in p for m, p in to_streams)


HIDDEN_PAGE = """<!doctype html><meta charset="utf-8"><link rel="icon" href="data:,">
<script type="module" src="{module}"></script>
<script>
  window.__seen = {{ chunks: [], visibility: [], lifecycle: [] }};
  document.addEventListener("visibilitychange", () => __seen.visibility.push(document.visibilityState));
  for (const name of ["freeze", "resume"]) document.addEventListener(name, () => __seen.lifecycle.push(name));
  // The element's events do not bubble: catch them on their way down.
  const chunk = (e) => __seen.chunks.push([e.detail.from, e.detail.offset]);
  document.addEventListener("streamhold-data", chunk, true);
</script>
<streamhold-stream id="s" src="{src}" format="markdown"></streamhold-stream>"""


def test_a_hidden_tab_keeps_following(stop_server: ServerProcess, site: Site) -> None:
    from e2e._cdp import CdpPage  # a browser of its own: Playwright keeps its pages visible

    base = stop_server.url
    name = "blog/hidden-tab.md"
    written = "# Hidden\n\n"
    put(base, name, "text/markdown", written.encode())
    html = HIDDEN_PAGE.format(module=f"{base}/static/streamhold-{VERSION}.js", src=f"{base}/v1/stream/{name}")

    def write(label: str, count: int) -> None:
        nonlocal written
        for n in range(count):
            piece = f"{label} {n} **ok**\n\n"
            post(base, name, "text/markdown", piece.encode())
            written += piece

    def shows(text: str) -> str:
        """All of `text` received, and its last line rendered as Markdown."""
        last = text.strip().splitlines()[-1].replace("**", "")
        return (
            f"document.querySelector('#s').text === {text!r} && "
            f"document.querySelector('#s .md').textContent.includes({last!r})"
        )

    with CdpPage() as tab:
        tab.goto(site.page("hidden.html", html))
        tab.wait_for("document.querySelector('#s')?.dataset.state === 'live'")
        assert tab.evaluate("document.visibilityState") == "visible"
        tab.lifecycle("frozen")
        tab.lifecycle("active")  # running again, still in the background
        assert tab.evaluate("[document.visibilityState, document.hidden]") == ["hidden", True]
        write("While hidden", 8)
        tab.wait_for(shows(written))  # rendered while the tab is hidden
        assert tab.evaluate("document.visibilityState") == "hidden"
        tab.lifecycle("frozen")  # a background tab the browser froze: no script runs
        write("While frozen", 8)
        time.sleep(0.5)
        tab.lifecycle("active")
        tab.wait_for(shows(written))
        assert tab.evaluate("document.visibilityState") == "hidden"
        tab.show()
        assert tab.evaluate("document.visibilityState") == "visible"
        post(base, name, "text/markdown", b"Back in front.\n", close=True)
        written += "Back in front.\n"
        tab.wait_for("document.querySelector('#s').dataset.state === 'closed'")
        assert tab.evaluate("document.querySelector('#s').text") == written
        seen = tab.evaluate("__seen")
    assert seen["visibility"][:1] == ["hidden"] and seen["visibility"][-1] == "visible"
    assert seen["lifecycle"] == ["freeze", "resume", "freeze", "resume"]
    chunks = seen["chunks"]
    for before, after in zip(chunks, chunks[1:], strict=False):
        assert after[0] == before[1]  # no gap, no duplicate
    assert chunks[-1][1] == httpx.head(f"{base}/v1/stream/{name}").headers["stream-next-offset"]
