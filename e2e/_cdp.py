"""Chromium driven over the DevTools protocol alone, for what Playwright cannot show: a hidden tab.

Playwright keeps every page it drives visible (it turns on focus emulation, which holds a page shown), so
a test of a background tab opens its page here instead. `Page.setWebLifecycleState` "frozen" hides the
page and halts its scripts; "active" lets them run again while it stays hidden, as a background tab does.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from typing import Any

from websockets.sync.client import ClientConnection, connect

from e2e.conftest import CHROMIUM
from tests._server import HOST, free_port


class CdpPage:
    """One headless Chromium with one page, driven by CDP commands over its WebSocket."""

    def __init__(self) -> None:
        self.port = free_port()
        self.profile = tempfile.mkdtemp(prefix="cdp-profile-")
        self.process = subprocess.Popen(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                f"--user-data-dir={self.profile}",
                f"--remote-debugging-address={HOST}",
                f"--remote-debugging-port={self.port}",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.ws: ClientConnection | None = None
        self.closing = contextlib.ExitStack()
        self.session = ""
        self.counter = 0

    def __enter__(self) -> CdpPage:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://{HOST}:{self.port}/json/version", timeout=1) as answer:
                    browser_url = json.load(answer)["webSocketDebuggerUrl"]
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.ws = self.closing.enter_context(connect(browser_url, max_size=None))
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.send("Page.enable", session=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.closing.close()
        self.process.kill()
        self.process.wait(timeout=10)
        shutil.rmtree(self.profile, ignore_errors=True)

    def send(self, method: str, params: dict[str, Any] | None = None, session: bool = False) -> Any:
        """A command's result (to the page when `session`, else to the browser); events are passed over."""
        assert self.ws is not None
        self.counter += 1
        message: dict[str, Any] = {"id": self.counter, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session
        self.ws.send(json.dumps(message))
        while True:
            answer = json.loads(self.ws.recv(timeout=30))
            if answer.get("id") == self.counter:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer.get("result", {})

    def goto(self, url: str) -> None:
        self.send("Page.navigate", {"url": url}, session=True)

    def evaluate(self, expression: str) -> Any:
        params = {"expression": expression, "returnByValue": True, "awaitPromise": True}
        result = self.send("Runtime.evaluate", params, session=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.evaluate(expression):
            if time.monotonic() > deadline:
                raise AssertionError(f"not true within {timeout} s: {expression}")
            time.sleep(0.05)

    def lifecycle(self, state: str) -> None:
        """ "frozen" (hidden, scripts halted) or "active" (scripts run; a frozen page stays hidden)."""
        self.send("Page.setWebLifecycleState", {"state": state}, session=True)

    def show(self) -> None:
        """Bring the page back to visible, as the tab coming to the front."""
        self.send("Emulation.setFocusEmulationEnabled", {"enabled": True}, session=True)
