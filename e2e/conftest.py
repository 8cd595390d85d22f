"""Browser tests: Playwright on Debian's Chromium against a real `streamhold serve` subprocess."""

from __future__ import annotations

import contextlib
import functools
import http.server
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import BrowserContext, Page

from tests._server import ServerProcess, free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# A module that needs another size marks itself: pytest.mark.browser_context_args(viewport={...}).
VIEWPORT = {"width": 1440, "height": 900}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run browser tests last: Playwright's sync API leaves an event loop that async tests trip over."""
    here = Path(__file__).parent
    items.sort(key=lambda item: here in Path(item.fspath).parents)


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict[str, Any]) -> dict[str, Any]:
    """Launch the system Chromium; Playwright cannot download its own browser here."""
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is not installed: `make test` installs it (apt-get install chromium)")
    return {
        **browser_type_launch_args,
        "executable_path": CHROMIUM,
        "args": [
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
        ],
    }


@pytest.fixture(scope="session")
def browser_context_args(browser_context_args: dict[str, Any]) -> dict[str, Any]:
    """Every test's `context` (and `page`) opens at one desktop size unless its module says otherwise."""
    return {**browser_context_args, "viewport": VIEWPORT}


@pytest.fixture
def page(context: BrowserContext) -> Iterator[Page]:
    """A tab that fails the test on any script error (refused requests, 401 and 403, are expected)."""
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    tab.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    yield tab
    assert not [e for e in errors if "401" not in e and "403" not in e], errors


def serve(data_dir: Path, **env: str) -> ServerProcess:
    """A `streamhold serve` subprocess on a free port, its SQLite database under `data_dir`."""
    return ServerProcess(port=free_port(), env={"STREAMHOLD_DATA_DIR": str(data_dir), **env})


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for a module's tests that do not stop it; each keeps to names of its own."""
    with serve(tmp_path_factory.mktemp("shared") / "data") as process:
        yield process


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A fresh server of the test's own, with a short long-poll, for tests that stop or restart it."""
    with serve(tmp_path / "data", STREAMHOLD_LONG_POLL_TIMEOUT="2") as process:
        yield process


class Site:
    """Another origin: a static file server on its own 127.0.0.1 port, serving pages the test writes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        handler = functools.partial(_QuietHandler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def page(self, name: str, html: str) -> str:
        (self.root / name).write_text(html)
        return f"{self.origin}/{name}"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def running_site(root: Path) -> Iterator[Site]:
    root.mkdir()
    other = Site(root)
    other.thread.start()
    try:
        yield other
    finally:
        other.httpd.shutdown()
        other.httpd.server_close()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    with running_site(tmp_path / "site") as other:
        yield other
