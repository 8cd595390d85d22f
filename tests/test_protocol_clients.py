"""Upstream clients that nobody here wrote, driven against a real Streamhold subprocess.

- TypeScript ``@durable-streams/client`` 0.2.6 (pinned in tests/conformance/package.json) through
  tests/clients/ts_client.mjs, which prints one JSON object that is compared exactly.
- Python ``durable-streams`` 0.1.0 (PyPI). It ignores ``Stream-Closed`` and keeps long-polling a
  closed stream, so every read here goes through an httpx client with a request budget.

``STREAMHOLD_CLIENT_TESTS_TARGET=reference`` runs the same tests against the upstream Node reference
server instead; that is how the tests themselves were checked.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from durable_streams import DurableStream, LiveMode, StreamExistsError, StreamNotFoundError, stream

from tests._server import ServerProcess
from tests.conformance_run import (
    NodeHarnessError,
    ensure_node_packages,
    harness_script,
    missing_node_tools,
    reference_server,
    run_bounded,
)

TARGET_ENV = "STREAMHOLD_CLIENT_TESTS_TARGET"
LONG_POLL_TIMEOUT_S = 1.0
REQUEST_TIMEOUT_S = 5.0


def _require_node() -> Path:
    missing = missing_node_tools()
    if missing:
        pytest.skip(f"Node.js tools not on PATH: {', '.join(missing)}")
    try:
        return ensure_node_packages()
    except NodeHarnessError as exc:
        pytest.fail(f"could not install the pinned npm packages: {exc}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    if os.environ.get(TARGET_ENV) == "reference":
        _require_node()
        process = reference_server(long_poll_timeout_ms=int(LONG_POLL_TIMEOUT_S * 1000))
    else:
        data_dir = tmp_path_factory.mktemp("streamhold-data")
        process = ServerProcess(
            env={
                "STREAMHOLD_DATA_DIR": str(data_dir),
                "STREAMHOLD_LONG_POLL_TIMEOUT": str(LONG_POLL_TIMEOUT_S),
            }
        )
    with process:
        yield process


def stream_url(server: ServerProcess, label: str) -> str:
    return f"{server.url}/v1/stream/{label}-{uuid.uuid4().hex[:10]}"


class RequestBudgetExceeded(Exception):
    pass


def budgeted_client(*, max_requests: int, seconds: float) -> httpx.Client:
    """An httpx client that refuses to send past a request count or a deadline.

    The Python client's live iterators loop internally over 204s; this is what stops them.
    """
    deadline = time.monotonic() + seconds
    sent = 0

    def guard(request: httpx.Request) -> None:
        nonlocal sent
        sent += 1
        if sent > max_requests or time.monotonic() > deadline:
            raise RequestBudgetExceeded(f"request {sent} ({request.method} {request.url}) is over budget")

    return httpx.Client(timeout=REQUEST_TIMEOUT_S, event_hooks={"request": [guard]})


def catch_up(url: str, client: httpx.Client, offset: str | None = None) -> tuple[str, bool, str]:
    """Text, up-to-date flag and next offset of a catch-up read."""
    with stream(url, offset=offset, live=False, client=client, timeout=REQUEST_TIMEOUT_S) as res:
        return res.read_text(), res.up_to_date, res.offset


class BackgroundAppender(threading.Thread):
    """Appends values one by one with a pause before each, from its own handle."""

    def __init__(self, url: str, content_type: str, values: list[Any], pause: float = 0.3) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.content_type = content_type
        self.values = values
        self.pause = pause
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with DurableStream(self.url, content_type=self.content_type, batching=False) as handle:
                for value in self.values:
                    time.sleep(self.pause)
                    handle.append(value)
        except BaseException as exc:
            self.error = exc

    def finish(self) -> None:
        self.join(timeout=10)
        assert not self.is_alive(), "background appender did not finish"
        assert self.error is None, f"background append failed: {self.error!r}"


# --- TypeScript client -------------------------------------------------------------------------


EXPECTED_TS_RESULT = {
    "create": {
        "text": "text/plain",
        "json": "application/json",
        "head": {"exists": True, "contentType": "text/plain", "streamClosed": False},
    },
    "catchUp": {
        "text": "hello world",
        "textContentType": "text/plain",
        "textUpToDate": True,
        "textOffsetIsTail": True,
        "json": [{"n": 1}, {"n": 2, "tags": ["a", "b"]}],
    },
    "sseTail": {
        "items": [{"n": 1}, {"n": 2, "tags": ["a", "b"]}, {"n": 3}],
        "upToDateAtItems": 2,
        "usedSse": True,
        "usedLongPoll": False,
    },
    "longPollTail": {"text": "!", "modes": ["catch-up", "long-poll"]},
    "resume": {"fromAfterHello": "world!", "fromTail": "", "tailUpToDate": True},
    "producer": {"json": [{"n": 1}, {"n": 2, "tags": ["a", "b"]}, {"n": 3}, {"n": 4}, {"n": 5}]},
    "close": {
        "head": {"exists": True, "contentType": "text/plain", "streamClosed": True},
        "headOffsetIsFinal": True,
        "finalOffsetIsLastAppend": True,
        "appendError": {"name": "FetchError", "status": 409},
        "closeWithBodyError": {"name": "FetchError", "status": 409},
        "closeAgainSameOffset": True,
        "eofTail": {"text": "", "streamClosed": True},
        "full": "hello world!",
    },
}


@pytest.mark.timeout(300)  # includes a first-time npm install
def test_typescript_client_round_trip(server: ServerProcess) -> None:
    cache = _require_node()
    prefix = f"ts-{uuid.uuid4().hex[:10]}"
    completed = run_bounded(
        ["node", str(harness_script("ts_client.mjs")), server.url, prefix], cwd=cache, timeout=60
    )
    output = f"exit {completed.returncode}\nstdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
    assert completed.returncode == 0, output
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    offsets = result.pop("offsets")
    assert result == EXPECTED_TS_RESULT, output
    ordered = [offsets[key] for key in ("created", "afterHello", "afterWorld", "afterBang")]
    assert all(isinstance(offset, str) and offset for offset in ordered), offsets
    assert ordered == sorted(set(ordered)), f"offsets must grow strictly: {offsets}"
    assert offsets["final"] == offsets["afterBang"]


# --- Python client -----------------------------------------------------------------------------


def test_python_client_create_append_read_resume(server: ServerProcess) -> None:
    url = stream_url(server, "py-text")
    with DurableStream.create(url, content_type="text/plain", batching=False) as handle:
        created = handle.head()
        hello = handle.append("hello ")
        world = handle.append("world")
        head = handle.head()

    assert created.content_type == "text/plain"
    assert created.offset is not None
    assert created.offset < hello.next_offset < world.next_offset
    assert head.offset == world.next_offset

    with budgeted_client(max_requests=10, seconds=10) as client:
        assert catch_up(url, client) == ("hello world", True, world.next_offset)
        assert catch_up(url, client, offset=hello.next_offset) == ("world", True, world.next_offset)
        assert catch_up(url, client, offset=world.next_offset) == ("", True, world.next_offset)


def test_python_client_json_create_conflict_and_delete(server: ServerProcess) -> None:
    url = stream_url(server, "py-json")
    with DurableStream.create(url, content_type="application/json", batching=False) as handle:
        handle.append({"n": 1})
        handle.append([1, 2, 3])
        handle.append("str")
        # Same config again is an idempotent create; a different content type is a conflict.
        DurableStream.create(url, content_type="application/json").close()
        with pytest.raises(StreamExistsError):
            DurableStream.create(url, content_type="text/plain")

        with budgeted_client(max_requests=5, seconds=10) as client:
            with stream(url, live=False, client=client, timeout=REQUEST_TIMEOUT_S) as res:
                assert res.read_json() == [{"n": 1}, [1, 2, 3], "str"]

        handle.delete()
        with pytest.raises(StreamNotFoundError):
            handle.head()
        with pytest.raises(StreamNotFoundError):
            stream(url, live=False, timeout=REQUEST_TIMEOUT_S)


@pytest.mark.parametrize("live", ["long-poll", "sse"])
def test_python_client_live_tail(server: ServerProcess, live: LiveMode) -> None:
    url = stream_url(server, f"py-tail-{live}")
    with DurableStream.create(url, content_type="application/json", batching=False) as handle:
        handle.append({"n": 0})
    appender = BackgroundAppender(url, "application/json", [{"n": 1}, {"n": 2}, {"n": 3}])

    received: list[Any] = []
    with budgeted_client(max_requests=60, seconds=15) as client:
        with stream(url, offset="-1", live=live, client=client, timeout=REQUEST_TIMEOUT_S) as res:
            for item in res.iter_json():
                received.append(item)
                if len(received) == 1:
                    appender.start()  # later items can only arrive through the live tail
                if len(received) == 4:
                    break
    appender.finish()
    assert received == [{"n": 0}, {"n": 1}, {"n": 2}, {"n": 3}]


def test_python_client_sse_tail_on_text_resumes_from_offset(server: ServerProcess) -> None:
    url = stream_url(server, "py-sse-text")
    with DurableStream.create(url, content_type="text/plain", batching=False) as handle:
        handle.append("old ")
        saved = handle.append("data|").next_offset
    appender = BackgroundAppender(url, "text/plain", ["new1|", "new2|"])

    received = ""
    with budgeted_client(max_requests=30, seconds=15) as client:
        with stream(url, offset=saved, live="sse", client=client, timeout=REQUEST_TIMEOUT_S) as res:
            appender.start()
            for text in res.iter_text():
                received += text
                if received.count("|") == 2:
                    break
    appender.finish()
    assert received == "new1|new2|"


def test_python_client_reads_closed_stream(server: ServerProcess) -> None:
    """0.1.0 has no close API and ignores Stream-Closed: close with plain HTTP, read with bounded loops."""
    url = stream_url(server, "py-closed")
    with DurableStream.create(url, content_type="text/plain", batching=False) as handle:
        handle.append("all ")
        handle.append("done")
    closed = httpx.post(url, headers={"Stream-Closed": "true"}, timeout=REQUEST_TIMEOUT_S)
    assert closed.status_code == 204
    assert closed.headers["Stream-Closed"] == "true"

    with budgeted_client(max_requests=5, seconds=10) as client:
        assert catch_up(url, client) == ("all done", True, closed.headers["Stream-Next-Offset"])
        with DurableStream(url, client=client) as handle:
            assert handle.head().offset == closed.headers["Stream-Next-Offset"]

    # SSE ends by itself: the server closes the connection after the stream-closed control event.
    with budgeted_client(max_requests=3, seconds=10) as client:
        with stream(url, offset="-1", live="sse", client=client, timeout=REQUEST_TIMEOUT_S) as res:
            assert "".join(res.iter_text()) == "all done"
