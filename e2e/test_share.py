"""A private stream opened from a share link, in a browser that holds no key: live tail, reload, expiry."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from playwright.sync_api import BrowserContext, Page, expect

from e2e.conftest import serve
from tests._server import ServerProcess

KEY = "admin-key-for-share-e2e"
SECRET = "share-secret-for-the-browser-tests"
ADMIN = {"authorization": f"Bearer {KEY}"}
TEXT = {"content-type": "text/plain", **ADMIN}
TIMEOUT = 15_000


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    """A server with a key (links open its private streams) and a keyless one, started side by side."""
    root = tmp_path_factory.mktemp("share")
    keyed = {"STREAMHOLD_API_KEYS": KEY, "STREAMHOLD_SECRET": SECRET, "STREAMHOLD_READS": "private"}
    keyless = {"STREAMHOLD_SECRET": SECRET}
    made = {"keyed": serve(root / "keyed", **keyed), "keyless": serve(root / "keyless", **keyless)}
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(ServerProcess.start, made.values()))
        yield made
    finally:
        for server in made.values():
            server.stop()


@pytest.fixture(scope="module")
def keyed_server(servers: dict[str, ServerProcess]) -> ServerProcess:
    return servers["keyed"]


def private_stream(server: ServerProcess, name: str, first: str) -> None:
    made = httpx.put(f"{server.url}/v1/stream/{name}", headers=TEXT, content=first.encode())
    assert made.status_code == 201, made.text


def append(server: ServerProcess, name: str, text: str) -> None:
    appended = httpx.post(f"{server.url}/v1/stream/{name}", headers=TEXT, content=text.encode())
    assert appended.status_code == 204


def share(server: ServerProcess, name: str, ttl: float) -> str:
    made = httpx.post(f"{server.url}/stream/{name}/share", json={"ttl": ttl}, headers=ADMIN)
    assert made.status_code == 201, made.text
    return str(made.json()["url"])


def shown(page: Page) -> str:
    return str(page.locator("#raw").text_content())


def test_a_share_link_tails_reloads_and_expires(keyed_server: ServerProcess, page: Page) -> None:
    name = "shared-tail"
    private_stream(keyed_server, name, "first line\n")
    assert httpx.get(f"{keyed_server.url}/watch/{name}").status_code == 401, "the stream is private"
    link = share(keyed_server, name, 3600)
    page.goto(link)
    expect(page.locator("#watch")).to_have_attribute("data-state", "live", timeout=TIMEOUT)
    append(keyed_server, name, "second line\n")
    expect(page.locator("#raw")).to_contain_text("second line", timeout=TIMEOUT)

    page.reload()
    expect(page.locator("#watch")).to_have_attribute("data-state", "live", timeout=TIMEOUT)
    append(keyed_server, name, "third line\n")
    expect(page.locator("#raw")).to_contain_text("third line", timeout=TIMEOUT)
    assert shown(page) == "first line\nsecond line\nthird line\n", "no gap and no duplicate after a reload"
    download = page.locator("#download").get_attribute("href") or ""
    assert "share=" in download


def test_the_copy_link_of_a_shared_page_is_that_link(
    keyed_server: ServerProcess, context: BrowserContext, page: Page
) -> None:
    name = "shared-copy"
    private_stream(keyed_server, name, "copied\n")
    link = share(keyed_server, name, 3600)
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.goto(link)
    expect(page.locator("#watch")).to_have_attribute("data-state", "live", timeout=TIMEOUT)
    page.click("#copy-link")
    expect(page.locator("#copy-link")).to_have_text("Copied ✓")
    assert page.evaluate("navigator.clipboard.readText()") == link


def test_an_expired_link_shows_why_on_reload(keyed_server: ServerProcess, page: Page) -> None:
    name = "shared-expiry"
    private_stream(keyed_server, name, "brief\n")
    link = share(keyed_server, name, 1)
    page.goto(link)
    expect(page.locator("#raw")).to_contain_text("brief", timeout=TIMEOUT)
    expires = int(link.rsplit("?share=", 1)[1].split(".")[3])  # whole seconds, by the server's clock
    time.sleep(max(0.0, expires + 0.2 - time.time()))
    answer = page.reload()
    assert answer is not None and answer.status == 403
    expect(page.locator("body")).to_contain_text("this share link has expired: ask for a new one")


def test_copy_link_on_a_private_stream_makes_a_share_link(
    servers: dict[str, ServerProcess], context: BrowserContext, page: Page
) -> None:
    """A page that may make links (here a keyless server's) copies a new link of the chosen lifetime."""
    server = servers["keyless"]
    name = "copied-private"
    made = httpx.put(
        f"{server.url}/v1/stream/{name}",
        headers={"content-type": "text/plain", "streamhold-visibility": "private"},
        content=b"hello\n",
    )
    assert made.status_code == 201
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.goto(f"{server.url}/watch/{name}")
    expect(page.locator("#watch")).to_have_attribute("data-state", "live", timeout=TIMEOUT)
    page.select_option("#share-ttl", "86400")
    page.click("#copy-link")
    expect(page.locator("#copy-link")).to_have_text("Copied ✓")
    copied = str(page.evaluate("navigator.clipboard.readText()"))
    assert copied.startswith(f"{server.url}/watch/{name}?share=v1.")
    expires = int(copied.rsplit("?share=", 1)[1].split(".")[3])
    assert abs(expires - time.time() - 86400) < 60
