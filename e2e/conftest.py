"""Browser tests: Playwright on Debian's Chromium against a real `streamhold serve` subprocess."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests._server import ServerProcess, free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


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


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A fresh Streamhold server on SQLite in a temp data dir."""
    port = free_port()
    env = {"STREAMHOLD_DATA_DIR": str(tmp_path / "data"), "STREAMHOLD_LONG_POLL_TIMEOUT": "2"}
    with ServerProcess(port=port, env=env) as process:
        yield process
