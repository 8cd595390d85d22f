"""Streams shown in another site's page, in Chromium: <streamhold-stream> and the embed iframe on a page
served from a second local origin, against real `streamhold serve` processes (reloads, a restart, hostile
content), and follow()'s offsets over characters split across appends."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import BrowserContext, Page

from e2e.conftest import Site, serve
from streamhold.web.client import VERSION
from tests._server import ServerProcess

pytestmark = pytest.mark.timeout(90)

TIMEOUT = 15_000
HOSTILE = (
    '<img src=x onerror="window.__pwned=1;alert(1)"> <script>window.__pwned=2;alert(2)</script>\n'
    "[click](javascript:alert(3)) <svg onload=alert(4)></svg> &amp; é 🙂\n"
)


@pytest.fixture
def embedded_server(tmp_path: Path, site: Site) -> Iterator[ServerProcess]:
    env = {"STREAMHOLD_EMBED_ORIGINS": site.origin, "STREAMHOLD_LONG_POLL_TIMEOUT": "2"}
    with serve(tmp_path / "data", **env) as process:
        yield process


def put(base: str, name: str, content_type: str, body: bytes = b"") -> None:
    response = httpx.put(f"{base}/v1/stream/{name}", content=body, headers={"content-type": content_type})
    assert response.status_code == 201, response.text


def post(base: str, name: str, content_type: str, body: bytes, close: bool = False) -> None:
    headers = {"content-type": content_type, **({"stream-closed": "true"} if close else {})}
    httpx.post(f"{base}/v1/stream/{name}", content=body, headers=headers).raise_for_status()


def embedding_page(base: str, name: str) -> str:
    src = f"{base}/v1/stream/{name}"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><link rel="icon" href="data:,"><title>A blog</title>
<script type="module" src="{base}/static/streamhold-{VERSION}.js"></script></head>
<body>
<h1>My blog post</h1>
<p>This page comes from <code id="origin"></code>; the stream from <code>{base}</code>.</p>
<script>document.getElementById("origin").textContent = location.origin;</script>
<streamhold-stream id="plain" src="{src}" format="text"></streamhold-stream>
<streamhold-stream id="md" src="{src}" format="markdown"></streamhold-stream>
<iframe id="frame" src="{base}/watch/{name}?embed=1" width="900" height="500"></iframe>
</body></html>"""


def element_text(page: Page, element: str) -> str:
    return str(page.eval_on_selector(element, "e => e.text"))


def wait_element(page: Page, element: str, state: str, timeout: int = TIMEOUT) -> None:
    # Polled on a timer: Playwright's default polls on animation frames, which a page may switch off.
    page.wait_for_function(
        "([sel, s]) => document.querySelector(sel)?.dataset.state === s",
        arg=[element, state],
        timeout=timeout,
        polling=50,
    )


def wait_everywhere(page: Page, state: str, timeout: int = TIMEOUT) -> None:
    wait_element(page, "#plain", state, timeout)
    wait_element(page, "#md", state, timeout)
    frame = page.frame_locator("#frame").locator("#watch")
    frame.and_(page.frame_locator("#frame").locator(f"[data-state={state}]")).wait_for(timeout=timeout)


def test_element_and_iframe_on_another_origin(
    embedded_server: ServerProcess, site: Site, context: BrowserContext
) -> None:
    base = embedded_server.url
    name = "blog/answer.md"
    written = "# An answer\n\n"
    put(base, name, "text/markdown", written.encode())
    page = context.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(site.page("post.html", embedding_page(base, name)))
    wait_everywhere(page, "live")

    def write(pieces: list[str]) -> None:
        nonlocal written
        for piece in pieces:
            post(base, name, "text/markdown", piece.encode())
            written += piece

    write([f"Token {n} résumé → ok.\r\n" for n in range(15)] + [HOSTILE])
    page.reload()  # mid-stream: everything is read again from the start
    wait_everywhere(page, "live")
    write([f"After reload {n} 🙂\n" for n in range(10)])
    context.set_offline(True)  # the reader's network drops while the writer goes on
    wait_element(page, "#plain", "reconnecting", timeout=5000)
    write([f"While offline {n}\n" for n in range(5)])
    context.set_offline(False)
    page.wait_for_function("t => document.querySelector('#plain').text === t", arg=written, timeout=TIMEOUT)
    embedded_server.restart()  # same data directory, same port
    write([f"After restart {n}\n" for n in range(10)])
    post(base, name, "text/markdown", b"The end.\n", close=True)
    written += "The end.\n"
    wait_everywhere(page, "closed", timeout=25_000)

    assert element_text(page, "#plain") == written
    assert element_text(page, "#md") == written
    assert page.eval_on_selector("#plain pre", "e => e.textContent") == written
    frame = page.frame_locator("#frame")
    assert frame.locator("pre#raw").text_content() == written
    # Markdown rendered in both, with the same renderer.
    assert page.locator("#md .md h1").text_content() == "An answer"
    assert frame.locator(".md h1").text_content() == "An answer"
    # Hostile content stayed text: no dialog, no element it spelled, no javascript: link.
    page.wait_for_timeout(300)
    assert dialogs == []
    assert page.evaluate("window.__pwned") is None
    for scope in (page.locator("streamhold-stream"), frame.locator("#watch")):
        assert scope.locator("img, script, svg, iframe, object").count() == 0
        hrefs = scope.locator("a").evaluate_all("links => links.map(a => a.href)")
        assert not [h for h in hrefs if not h.startswith(("http://", "https://", "mailto:"))], hrefs
    assert "<img src=x onerror=" in page.locator("#md .md").text_content()
    # The embed shows no chrome of the app.
    assert frame.locator(".topbar").count() == 0
    screenshot(page, "embed-foreign-origin.png")


def screenshot(page: Page, name: str) -> None:
    """Keep a picture of the page as evidence, where STREAMHOLD_SCREENSHOT_DIR names a folder."""
    folder = os.environ.get("STREAMHOLD_SCREENSHOT_DIR")
    if not folder:
        return
    # A frame from another origin is painted only while it is on screen: make the whole page the screen.
    height = int(page.evaluate("document.documentElement.scrollHeight"))
    page.set_viewport_size(
        {"width": page.viewport_size["width"] if page.viewport_size else 1440, "height": height}
    )
    page.wait_for_timeout(500)
    Path(folder).mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(Path(folder) / name))


def test_embed_is_refused_to_origins_not_listed(
    shared_server: ServerProcess, site: Site, context: BrowserContext
) -> None:
    base = shared_server.url  # started without STREAMHOLD_EMBED_ORIGINS
    put(base, "blog/private-frame", "text/plain", b"not for framing\n")
    page = context.new_page()
    frame_page = f'<!doctype html><iframe id="f" src="{base}/watch/blog/private-frame?embed=1"></iframe>'
    page.goto(site.page("frame.html", frame_page))
    page.wait_for_timeout(1000)
    frame = page.frame_locator("#f")
    assert frame.locator("#watch").count() == 0


# Starts follow() in the page and returns at once: the test writes meanwhile, then awaits `outcome`.
FOLLOW = """async ([module, url, options]) => {
  const { follow } = await import(module);
  const chunks = [];
  const states = [];
  const run = follow(url, {
    ...options,
    onData: (c) => chunks.push({ from: c.from, offset: c.offset, text: c.text, bytes: Array.from(c.bytes) }),
    onState: (s) => states.push(s),
  }).then((result) => ({ result, chunks, states }));
  window.__follows = [...(window.__follows || []), run];
  return window.__follows.length - 1;
}"""


def start_follow(page: Page, module: str, url: str, options: dict[str, str]) -> int:
    return int(page.evaluate(FOLLOW, [module, url, options]))


def outcome(page: Page, index: int) -> dict[str, Any]:
    result: dict[str, Any] = page.evaluate("i => window.__follows[i]", index)
    return result


def split_pieces() -> tuple[list[bytes], bytes]:
    whole = "aé€🙂\r\nb\rc 日本\n".encode()
    # Cut inside every multi-byte character, and between CR and LF.
    cuts = [1, 2, 4, 5, 8, 9, 10, 12, 13, 16, 19, 21]
    pieces = [whole[a:b] for a, b in zip([0, *cuts], [*cuts, len(whole)], strict=True)]
    assert b"".join(pieces) == whole
    return pieces, whole


@pytest.mark.parametrize("live", ["sse", "long-poll", "sse-cut"])
def test_follow_hands_exact_bytes_and_whole_characters(
    shared_server: ServerProcess, site: Site, context: BrowserContext, live: str
) -> None:
    base = shared_server.url
    name = f"blog/split-{live}"
    pieces, whole = split_pieces()
    put(base, name, "text/plain; charset=utf-8", pieces[0])
    page = context.new_page()
    page.goto(
        site.page("follow.html", '<!doctype html><meta charset="utf-8"><link rel="icon" href="data:,">\n')
    )
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    if live == "sse-cut":  # a proxy that drops SSE: follow() must fall back to long-poll
        page.route("**/*live=sse*", lambda route: route.abort())
    module = f"{base}/static/streamhold-{VERSION}.js"
    options = {"live": "long-poll"} if live == "long-poll" else {}
    url = f"{base}/v1/stream/{name}"
    first = start_follow(page, module, url, options)
    for piece in pieces[1:]:
        post(base, name, "text/plain; charset=utf-8", piece)
        page.wait_for_timeout(40)
    if live == "sse-cut":  # the stream stays open until follow() tails by long-poll (else catch-ups may do)
        for _ in range(200):
            if any("live=long-poll" in url for url in requested):
                break
            page.wait_for_timeout(50)
    post(base, name, "text/plain; charset=utf-8", b"", close=True)
    followed = outcome(page, first)
    chunks = followed["chunks"]
    assert bytes(b for chunk in chunks for b in chunk["bytes"]) == whole
    assert "".join(chunk["text"] for chunk in chunks) == whole.decode()
    assert "\ufffd" not in "".join(chunk["text"] for chunk in chunks)
    for before, after in zip(chunks, chunks[1:], strict=False):
        assert after["from"] == before["offset"]  # no gap, no duplicate
    tail = httpx.head(f"{base}/v1/stream/{name}").headers["stream-next-offset"]
    assert followed["result"] == {"offset": tail, "closed": True}
    assert followed["states"][-1] == "closed"
    tails = {m for m in ("live=sse", "live=long-poll") if any(m in url for url in requested)}
    if live == "sse":
        assert tails == {"live=sse"}
    else:  # asked for, or fallen back to once SSE was cut twice
        assert "live=long-poll" in tails
    # Resuming from an offset it handed out gives exactly the rest, split character included.
    middle = chunks[len(chunks) // 2]
    rest = outcome(page, start_follow(page, module, url, {**options, "offset": middle["offset"]}))
    tail_bytes = bytes(b for chunk in rest["chunks"] for b in chunk["bytes"])
    assert tail_bytes == whole[int(middle["offset"].split("_")[1]) :]


def test_element_picks_the_renderer_by_type_and_can_stop_at_the_tail(
    shared_server: ServerProcess, site: Site, context: BrowserContext
) -> None:
    base = shared_server.url
    put(base, "blog/table.csv", "text/csv", b"id,name\n1,<b>one</b>\n")
    put(base, "blog/events", "application/json", b'[{"event": "start", "n": 1}]')
    put(base, "blog/snapshot.txt", "text/plain", b"what is there now\n")
    put(base, "blog/hidden.md", "text/markdown", b"# Title\n\n")
    page = context.new_page()
    # As in a hidden tab, animation frames never run: the views must keep up without them.
    page.add_init_script("window.requestAnimationFrame = () => 0;")
    html = f"""<!doctype html><meta charset="utf-8"><link rel="icon" href="data:,">
<script type="module" src="{base}/static/streamhold.js"></script>
<streamhold-stream id="csv" src="{base}/v1/stream/blog/table.csv"></streamhold-stream>
<streamhold-stream id="json" src="{base}/v1/stream/blog/events"></streamhold-stream>
<streamhold-stream id="once" src="{base}/v1/stream/blog/snapshot.txt" follow="false"></streamhold-stream>
<streamhold-stream id="missing" src="{base}/v1/stream/blog/missing"></streamhold-stream>
<streamhold-stream id="hidden" src="{base}/v1/stream/blog/hidden.md"></streamhold-stream>"""
    page.goto(site.page("formats.html", html))
    wait_element(page, "#csv", "live")
    wait_element(page, "#json", "live")
    wait_element(page, "#once", "stopped")
    wait_element(page, "#missing", "gone")
    wait_element(page, "#hidden", "live")
    post(base, "blog/hidden.md", "text/markdown", b"Some **bold** words.\n")
    post(base, "blog/table.csv", "text/csv", b"2,two\n", close=True)
    post(base, "blog/events", "application/json", b'{"event": "end", "n": 2}', close=True)
    post(base, "blog/snapshot.txt", "text/plain", b"and later\n")
    wait_element(page, "#csv", "closed")
    wait_element(page, "#json", "closed")
    cells = page.locator("#csv table tbody tr td:nth-child(3)").all_text_contents()
    assert cells == ["<b>one</b>", "two"]
    assert page.locator("#csv b").count() == 0
    assert page.locator("#json .record .tag").all_text_contents() == ["start", "end"]
    assert element_text(page, "#json") == '{"event":"start","n":1}\n{"event":"end","n":2}\n'
    assert element_text(page, "#once") == "what is there now\n"
    assert page.locator("#once .streamhold-note").count() == 0
    assert "deleted or has expired" in str(page.locator("#missing .streamhold-note").text_content())
    page.locator("#hidden .md strong").wait_for(timeout=TIMEOUT)
    assert page.locator("#hidden .md h1").text_content() == "Title"
