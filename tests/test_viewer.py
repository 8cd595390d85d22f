"""The watch page's server render: catch-up to the tail, escaping, windows, content types, gone, /demo."""

from __future__ import annotations

import dataclasses
import html
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from streamhold import demo
from streamhold.main import create_app
from streamhold.models import format_offset
from streamhold.sdk.context import create_agent_context
from streamhold.settings import Settings
from streamhold.web.viewer import WINDOW, view_kind

pytestmark = pytest.mark.timeout(60)

Client = AsyncTestClient[Any]
HOSTILE = '<script>alert(1)</script><img src=x onerror="alert(2)"></pre><svg onload=alert(3)>&amp;'

# A keyless server answers only to loopback names (DNS rebinding): tests reach it by one.
LOOPBACK = "http://127.0.0.1"


@pytest.fixture(autouse=True)
def fast_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    """The simulated model types fast here, so shutting an app down does not wait seconds for its demo."""
    monkeypatch.setattr(demo, "SIMULATED_RATE", 5000.0)


@pytest.fixture
def local_settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, long_poll_timeout=1.0, public_url="http://sh.test")


@pytest.fixture
async def client(local_settings: Settings) -> AsyncIterator[AsyncTestClient[Any]]:
    async with AsyncTestClient(create_app(local_settings), base_url=LOOPBACK) as client:
        yield client


async def put(client: Client, name: str, content_type: str, body: bytes = b"", **headers: str) -> None:
    headers = {"content-type": content_type, **headers}
    response = await client.put(f"/v1/stream/{name}", content=body, headers=headers)
    assert response.status_code == 201, response.text


async def post(client: Client, name: str, content_type: str, body: bytes, close: bool = False) -> None:
    headers = {"content-type": content_type}
    if close:
        headers["stream-closed"] = "true"
    response = await client.post(f"/v1/stream/{name}", content=body, headers=headers)
    assert response.status_code in (200, 204), response.text


def attr(page: str, name: str) -> str:
    match = re.search(rf'\sdata-{name}="([^"]*)"', page)
    assert match, f"data-{name} missing"
    return html.unescape(match.group(1))


def raw_text(page: str) -> str:
    """The text of <pre id="raw"> as a browser parses it (the newline after <pre> is dropped)."""
    match = re.search(r'<pre class="raw" id="raw"[^>]*>\n(.*?)</pre>', page, re.S)
    assert match, "no raw block"
    return html.unescape(match.group(1))


async def test_first_render_is_the_catch_up_to_the_tail(client: Client) -> None:
    await put(client, "answers/one", "text/plain", b"hello ")
    await post(client, "answers/one", "text/plain", "wörld\r\nline two\n".encode())
    response = await client.get("/watch/answers/one")
    assert response.status_code == 200
    page = response.text
    tail = len("hello wörld\r\nline two\n".encode())
    assert attr(page, "offset") == attr(page, "size") == str(tail) and attr(page, "start") == "0"
    assert attr(page, "state") == "connecting" and attr(page, "closed") == "false"
    assert attr(page, "kind") == "text" and attr(page, "encoding") == "text"
    assert "&#13;" in page  # a carriage return survives HTML parsing
    assert raw_text(page) == "hello wörld\r\nline two\n"
    assert "script-src 'self'" in response.headers["content-security-policy"]
    assert '<script type="module" src="/static/watch.js">' in page


async def test_content_is_escaped_everywhere(client: Client) -> None:
    for kind in ("text/plain", "text/markdown", "text/csv", "application/x-ndjson"):
        name = f"hostile/{kind.replace('/', '-')}"
        await put(client, name, kind, HOSTILE.encode())
        page = (await client.get(f"/watch/{name}")).text
        assert "<script>alert" not in page and "<img src=x" not in page and "<svg" not in page
        assert raw_text(page) == HOSTILE
    response = await client.put(
        "/v1/stream/hostile/meta%3Cb%3E", headers={"content-type": 'text/plain"><script>x()</script>'}
    )
    page = (await client.get("/watch/hostile/meta%3Cb%3E")).text
    assert response.status_code == 201 and "<script>x()" not in page and "meta&lt;b&gt;" in page


async def test_missing_deleted_and_expired_streams_are_gone(client: Client) -> None:
    response = await client.get("/watch/never/was")
    assert response.status_code == 404 and 'data-state="gone"' in response.text
    assert "watch.js" not in response.text
    await put(client, "short", "text/plain", b"x")
    assert (await client.delete("/v1/stream/short")).status_code == 204
    assert (await client.get("/watch/short")).status_code == 404
    await put(client, "expired", "text/plain", b"x", **{"stream-expires-at": "2001-01-01T00:00:00Z"})
    response = await client.get("/watch/expired")
    assert response.status_code == 404 and "This stream is not here" in response.text


async def test_closed_stream_renders_everything_and_says_closed(client: Client) -> None:
    await put(client, "done", "text/markdown", b"# Title\n\n- a\n- b\n")
    await post(client, "done", "text/markdown", b"", close=True)
    page = (await client.get("/watch/done")).text
    assert attr(page, "closed") == "true" and attr(page, "state") == "closed"
    assert raw_text(page) == "# Title\n\n- a\n- b\n" and ">Closed<" in page


@pytest.mark.parametrize(
    ("content_type", "kind"),
    [
        ("text/plain; charset=utf-8", "text"),
        ("text/html", "text"),
        ("text/markdown", "markdown"),
        ("text/csv", "csv"),
        ("text/tab-separated-values", "csv"),
        ("application/json", "json"),
        ("application/x-ndjson", "json"),
        ("application/vnd.api+json", "json"),
        ("application/octet-stream", "binary"),
        ("image/png", "binary"),
    ],
)
def test_view_kind_follows_the_content_type(content_type: str, kind: str) -> None:
    assert view_kind(content_type) == kind


async def test_sse_encoding_matches_the_protocol(client: Client) -> None:
    await put(client, "enc/json", "application/json", b'[{"a":1},{"b":"<i>"}]')
    await put(client, "enc/ndjson", "application/x-ndjson", b'{"a":1}\n')
    page = (await client.get("/watch/enc/json")).text
    assert attr(page, "encoding") == "json" and raw_text(page) == '{"a":1}\n{"b":"<i>"}\n'
    assert attr((await client.get("/watch/enc/ndjson")).text, "encoding") == "base64"


async def test_sdk_json_stream_is_text_and_viewer_url_opens_it(local_settings: Settings) -> None:
    async with create_agent_context(local_settings) as ctx:
        stream = await ctx.stream.create("audit", content_type="application/json")
        await stream.write({"event": "a"})
        await stream.write({"event": "b"})
        await stream.close()
        info = await ctx.stream.get(stream.id)
    assert stream.viewer_url == info.viewer_url == f"http://sh.test/watch/{stream.id}"
    async with AsyncTestClient(create_app(local_settings), base_url=LOOPBACK) as client:
        page = (await client.get(stream.viewer_url.removeprefix("http://sh.test"))).text
    assert attr(page, "encoding") == "text" and raw_text(page) == '{"event":"a"}{"event":"b"}'


async def test_binary_shows_size_hex_and_download(client: Client) -> None:
    body = bytes(range(256)) * 8
    await put(client, "blob.bin", "application/octet-stream", body)
    page = (await client.get("/watch/blob.bin")).text
    assert attr(page, "kind") == "binary" and "2.0 KiB" in page and "The first 1024 bytes" in page
    assert "<th>00000000</th><td>00 01 02 03" in page and 'id="raw"' not in page
    response = await client.get("/watch/blob.bin?download=1")
    assert response.content == body
    assert response.headers["content-disposition"] == 'attachment; filename="blob.bin"'
    assert response.headers["content-security-policy"] == "sandbox"


async def test_large_stream_shows_the_last_window_from_a_line_start(settings: Settings) -> None:
    lines = [f"line {n:06d} " + "x" * 90 + "\n" for n in range(6000)]
    body = "".join(lines).encode()
    async with AsyncTestClient(create_app(settings), base_url=LOOPBACK) as client:
        await put(client, "big/log", "text/plain")
        for at in range(0, len(body), 256 * 1024):
            await post(client, "big/log", "text/plain", body[at : at + 256 * 1024])
        page = (await client.get("/watch/big/log")).text
        start, end = int(attr(page, "start")), int(attr(page, "offset"))
        assert end == len(body) and len(body) - WINDOW <= start < len(body) - WINDOW + 200
        assert body[start - 1 : start] == b"\n" and raw_text(page) == body[start:].decode()
        assert 'id="earlier"' in page and "Showing the latest" in page


async def test_a_cut_utf8_character_is_left_to_the_live_connection(client: Client) -> None:
    await put(client, "half", "text/plain", "añ".encode()[:-1])
    page = (await client.get("/watch/half")).text
    assert attr(page, "offset") == "1" and attr(page, "size") == "2" and raw_text(page) == "a"


async def test_json_mode_window_and_earlier_range_start_between_messages(client: Client) -> None:
    await put(client, "events", "application/json")
    batch = [{"n": n, "pad": "y" * (n % 50 + 60)} for n in range(4000)]
    for at in range(0, len(batch), 500):
        await post(client, "events", "application/json", json.dumps(batch[at : at + 500]).encode())
    page = (await client.get("/watch/events")).text
    start = int(attr(page, "start"))
    records = [json.loads(line) for line in raw_text(page).splitlines()]
    assert start > 0 and records[-1] == batch[-1] and records == batch[-len(records) :]
    earlier = await client.get(f"/watch/events?before={start}")
    assert earlier.headers["stream-range-end"] == str(start)
    previous = [json.loads(line) for line in earlier.text.splitlines()]
    assert previous + records == batch[-len(previous) - len(records) :]


async def test_csv_window_carries_the_header(client: Client) -> None:
    rows = "".join(f"{n},name {n},{'z' * 40}\n" for n in range(8000))
    await put(client, "export.csv", "text/csv", ("id,name,notes\n" + rows).encode())
    page = (await client.get("/watch/export.csv")).text
    assert int(attr(page, "start")) > 0 and attr(page, "header") == "id,name,notes\n"
    assert re.match(r"\d+,name \d+,z+\n", raw_text(page))


async def test_download_is_the_whole_content_so_far(client: Client) -> None:
    await put(client, "dl/notes", "text/markdown", b"# one\n")
    await post(client, "dl/notes", "text/markdown", b"two\n")
    response = await client.get("/watch/dl/notes?download=1")
    assert response.content == b"# one\ntwo\n"
    assert 'filename="notes.md"' in response.headers["content-disposition"]


async def test_names_with_odd_characters_round_trip(client: Client) -> None:
    await put(client, "a%20b/c+d%3F", "text/plain", b"ok")
    page = (await client.get("/watch/a%20b/c+d%3F")).text
    assert attr(page, "name") == "a b/c+d?" and raw_text(page) == "ok"


async def test_demo_redirects_to_the_viewer(client: Client) -> None:
    response = await client.post("/demo", follow_redirects=False)
    assert response.status_code == 303
    location = response.headers["location"]
    assert re.fullmatch(r"/watch/stream_[0-9a-f]{32}", location)
    page = (await client.get(location)).text
    assert attr(page, "kind") == "markdown" and "audit" in page
    response = await client.post("/demo", headers={"accept": "application/json"})
    started = response.json()
    assert response.status_code == 201 and started["source"] == "simulated"
    assert started["viewer_url"] == f"http://sh.test/watch/{started['stream_id']}"
    assert started["audit_viewer_url"] == f"http://sh.test/watch/{started['audit_stream_id']}"


async def test_demo_refuses_other_sites_and_missing_keys(local_settings: Settings) -> None:
    async with AsyncTestClient(create_app(local_settings), base_url=LOOPBACK) as client:
        response = await client.post("/demo", headers={"origin": "http://evil.example"})
        assert response.status_code == 403
    keyed = dataclasses.replace(local_settings, api_keys=("k1",))
    async with AsyncTestClient(create_app(keyed), base_url=LOOPBACK) as client:
        assert (await client.post("/demo")).status_code == 401
        assert (await client.post("/demo", headers={"authorization": "Bearer nope"})).status_code == 401
        page = (await client.get("/watch/nothing")).text
        assert "/demo" not in page  # no button for a visitor who is not signed in
        headers = {"authorization": "Bearer k1", "accept": "application/json"}
        response = await client.post("/demo", headers=headers)
        assert response.status_code == 201


async def test_a_signed_in_browser_starts_the_demo_with_its_csrf_token(local_settings: Settings) -> None:
    keyed = dataclasses.replace(local_settings, api_keys=("k1",))
    async with AsyncTestClient(create_app(keyed), base_url="http://sh.test") as client:
        signed = await client.post(
            "/signin", data={"key": "k1"}, headers={"origin": "http://sh.test"}, follow_redirects=False
        )
        assert signed.status_code == 303
        page = (await client.get("/watch/x")).text
        token = re.search(r'name="csrf" value="([0-9a-f]+)"', page).group(1)  # type: ignore[union-attr]
        forged = await client.post("/demo", data={"csrf": "0" * 64}, headers={"origin": "http://sh.test"})
        assert forged.status_code == 403
        origin = {"origin": "http://sh.test"}
        started = await client.post("/demo", data={"csrf": token}, headers=origin, follow_redirects=False)
        assert started.status_code == 303 and started.headers["location"].startswith("/watch/stream_")


def test_offsets_in_the_page_are_plain_byte_positions() -> None:
    # watch.js builds the protocol's token from data-generation and data-offset; keep the shapes in step.
    assert format_offset(1234) == "0000000000000000_0000000000001234"
    assert format_offset(1234, generation=7) == "0000000000000007_0000000000001234"
