"""serve.py against the installed uvicorn: fails loudly when uvicorn is not the one its overrides were checked
against, or when what they override or read has changed shape.

When one of these fails after a uvicorn upgrade, re-check app/serve.py against the new uvicorn source.
"""

from __future__ import annotations

import hashlib
import inspect
import threading
import time
import tomllib
from typing import Any

import httpx
import pytest
import uvicorn
from litestar.types import Receive, Scope, Send
from uvicorn.protocols.http import httptools_impl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from streamhold import serve
from tests._server import REPO_ROOT, free_port

pytestmark = pytest.mark.timeout(60)

RECHECK = (
    "app/serve.py's Protocol (a subclass of uvicorn's HttpToolsProtocol) and Server (of uvicorn.Server) "
    f"override uvicorn internals checked against uvicorn {serve.UVICORN_VERSION}. Read each overridden "
    "method in the new uvicorn: Protocol.on_body is a copy of uvicorn's with a larger buffer; the "
    "connection cap needs on_headers_complete to start `self.app`; the timers need connection_made/lost, "
    "data_received, pause/resume_writing, `self.flow`, `self.transport` and `self.cycle`; the bounded read "
    "of a body after an early answer needs on_message_complete, on_response_complete (called once a "
    "response is sent) and the cycle's `more_body` and `response_complete`; Flag and Pipeline stand in for "
    "`flow._is_writable_event`, `cycle.message_event` and `pipeline` (check each use). Then run "
    "tests/test_bounds.py and test_cli.py::test_serve_reads_a_mebibyte_body_without_waiting_for_the_app, "
    "and update UVICORN_VERSION in app/serve.py and the digests in tests/test_serve.py."
)

# sha256 (first 16 hex digits) of the source of every uvicorn method serve.py overrides, in UVICORN_VERSION.
CHECKED = {
    "HttpToolsProtocol.connection_made": "6efb565ff3d36b91",
    "HttpToolsProtocol.connection_lost": "c91a4c9bf2e29c55",
    "HttpToolsProtocol.data_received": "010a7ae59a5d3b1a",
    "HttpToolsProtocol.on_message_begin": "96d377fdc7c2baef",
    "HttpToolsProtocol.on_headers_complete": "1ea8589acfad92d8",
    "HttpToolsProtocol.on_body": "dba9c32aeba35b6a",
    "HttpToolsProtocol.on_message_complete": "1fbad42dc31fc01f",
    "HttpToolsProtocol.on_response_complete": "64e254f28e389e76",
    "HttpToolsProtocol.pause_writing": "17a8fd215d96a13c",
    "HttpToolsProtocol.resume_writing": "7844bbaa8cceb1ef",
    "Server.__init__": "c150b55284f7511e",
    "Server.startup": "2aa1d70a244bfcf2",
    "Server.handle_exit": "553276efa26e09ea",
}
PAIRS = ((HttpToolsProtocol, serve.Protocol), (uvicorn.Server, serve.Server))


def _overrides() -> dict[str, tuple[Any, Any]]:
    """Every name serve.py's classes define that uvicorn's classes also have: (uvicorn's, ours)."""
    found = {}
    for theirs, ours in PAIRS:
        for name, value in vars(ours).items():
            own = name == "__init__" or not name.startswith("__")
            if callable(value) and own and hasattr(theirs, name):
                found[f"{theirs.__name__}.{name}"] = (getattr(theirs, name), value)
    return found


def _digest(function: Any) -> str:
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16]


def test_uvicorn_is_the_version_serve_was_checked_against() -> None:
    assert uvicorn.__version__ == serve.UVICORN_VERSION, (
        f"uvicorn {uvicorn.__version__} is installed, not {serve.UVICORN_VERSION}. " + RECHECK
    )


def test_the_package_requires_that_uvicorn() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    pins = [r for r in project["dependencies"] if r.split("[")[0].split("=")[0].strip() == "uvicorn"]
    assert pins and pins[0].endswith(f"=={serve.UVICORN_VERSION}"), (
        f"pyproject.toml requires {pins}, but serve.py was checked against uvicorn {serve.UVICORN_VERSION}. "
        + RECHECK
    )


def test_every_override_is_one_that_was_checked() -> None:
    """A method uvicorn gained under one of our names is an override nobody read: it fails here."""
    unchecked = sorted(set(_overrides()) - set(CHECKED))
    assert not unchecked, f"serve.py now overrides uvicorn's {unchecked}, unchecked. " + RECHECK
    gone = sorted(set(CHECKED) - set(_overrides()))
    assert not gone, f"uvicorn no longer has {gone}, which serve.py overrides. " + RECHECK


def test_the_overridden_uvicorn_methods_are_unchanged() -> None:
    overrides = _overrides()
    changed = sorted(name for name, (theirs, _) in overrides.items() if _digest(theirs) != CHECKED.get(name))
    assert not changed, f"uvicorn changed {changed}, which serve.py overrides. " + RECHECK


def test_the_overrides_keep_uvicorn_signatures() -> None:
    def shape(function: Any) -> list[tuple[str, Any]]:
        return [(p.name, p.kind) for p in inspect.signature(function).parameters.values()]

    for name, (theirs, ours) in _overrides().items():
        if name == "Server.__init__":  # ours adds a keyword with a default; uvicorn's must still be first
            assert shape(ours)[: len(shape(theirs))] == shape(theirs), f"{name} changed. " + RECHECK
            continue
        assert shape(ours) == shape(theirs), f"{name}'s parameters changed in uvicorn. " + RECHECK


def test_what_the_overrides_rely_on_is_still_in_uvicorn() -> None:
    source = inspect.getsource(httptools_impl)
    # The connection cap swaps `self.app` for the refusal around on_headers_complete.
    assert "app = self.app" in inspect.getsource(HttpToolsProtocol.on_headers_complete), RECHECK
    # Our own per-connection state must not collide with uvicorn's.
    for name in ("_header_timer", "_send_timer", "_drain_timer", "_drain_left", "limits"):
        assert name not in source, f"uvicorn now uses {name!r} itself. " + RECHECK
    options = inspect.signature(uvicorn.Config.__init__).parameters
    passed = ("http", "timeout_keep_alive", "timeout_graceful_shutdown", "lifespan", "access_log",
              "proxy_headers", "server_header")  # fmt: skip
    missing = [name for name in passed if name not in options]
    assert not missing, f"uvicorn.Config no longer takes {missing}. " + RECHECK


def test_a_live_connection_has_the_state_the_protocol_reads() -> None:
    """The attributes the overrides read exist on a real connection; the server announces once it listens."""
    seen: list[serve.Protocol] = []
    checked: dict[str, bool] = {}

    class Recording(serve.Protocol):
        def on_headers_complete(self) -> None:
            seen.append(self)
            super().on_headers_complete()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await receive()
        protocol = seen[-1]
        checked.update(
            connections=protocol in protocol.connections,
            transport=callable(protocol.transport.get_write_buffer_size),
            flow=callable(protocol.flow.pause_reading) and protocol.flow.write_paused is False,
            parser=callable(protocol.parser.should_upgrade),
            upgrade=protocol._should_upgrade() is False,
            loop=callable(protocol.loop.call_later),
            cycle=protocol.cycle.response_complete is False and isinstance(protocol.cycle.body, bytearray),
            more_body=protocol.cycle.more_body is False,  # the body ended with the one message
            event=callable(protocol.cycle.message_event.set),
            app=protocol.app is not None,
            header_timer=protocol._header_timer is None,  # stopped once the head is read
        )
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    port = free_port()
    announced: list[float] = []
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=Recording, lifespan="off")
    server = serve.Server(config, on_listening=lambda: announced.append(time.monotonic()))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.started and len(announced) == 1
        with httpx.Client(timeout=10) as client:
            assert client.post(f"http://127.0.0.1:{port}/", content=b"x").status_code == 204
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    missing = sorted(name for name, ok in checked.items() if not ok)
    assert checked and not missing, f"a uvicorn connection lacks what serve.py reads: {missing}. " + RECHECK
    assert server.config.loaded_app is not None, "Server.handle_exit finds the app through config.loaded_app"
