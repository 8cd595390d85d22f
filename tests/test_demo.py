"""The demo agent: simulated and real (OpenAI-compatible) models, the dual streams, POST /demo, the CLI."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from litestar.testing import AsyncTestClient

from streamhold import demo
from streamhold.cli import main as cli
from streamhold.main import create_app
from streamhold.sdk.context import AgentContext, create_agent_context
from streamhold.settings import Settings
from tests._server import ServerProcess, free_port

pytestmark = pytest.mark.timeout(60)

SHIPPED_RATE = demo.SIMULATED_RATE
DELTAS = ["# Real", " answer\n\n", "- from the ", "model ", "é\n", "```py\nprint(1)\n```\n"]

# A keyless server answers only to loopback names (DNS rebinding): tests reach it by one.
LOOPBACK = "http://127.0.0.1"


class FakeOpenAI:
    """A tiny OpenAI-compatible `/chat/completions` server on 127.0.0.1 that streams `deltas`."""

    def __init__(self, deltas: list[str], status: int = 200) -> None:
        self.deltas = deltas
        self.status = status
        self.requests: list[dict[str, Any]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                auth = self.headers.get("authorization")
                fake.requests.append({"path": self.path, "auth": auth, "body": body})
                if fake.status != 200:
                    self.send_response(fake.status)
                    self.send_header("content-type", "application/json")
                    self.end_headers()
                    self.wfile.write(b'{"error": {"message": "model overloaded"}}')
                    return
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.end_headers()
                self.wfile.write(b": a comment line the client must skip\n\n")
                first = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
                self.wfile.write(f"data: {json.dumps(first)}\n\n".encode())
                for piece in fake.deltas:
                    chunk = {"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                    time.sleep(0.01)
                done = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
                self.wfile.write(f"data: {json.dumps(done)}\n\ndata: [DONE]\n\n".encode())

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeOpenAI:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture(autouse=True)
def fast_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "SIMULATED_RATE", 4000.0)


@pytest.fixture
def local(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, public_url="http://sh.test")


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(DELTAS) as server:
        yield server


def records(text: str) -> list[dict[str, Any]]:
    """Concatenated JSON texts (what SDK writes of objects produce), one by one."""
    decoder = json.JSONDecoder()
    out, at = [], 0
    while at < len(text):
        value, at = decoder.raw_decode(text, at)
        out.append(value)
    return out


async def content(ctx: AgentContext, stream_id: str) -> str:
    return b"".join([piece async for piece in ctx.stream.download(stream_id)]).decode()


def test_tokenize_is_lossless_and_token_sized() -> None:
    tokens = demo.tokenize(demo.ANSWER)
    assert "".join(tokens) == demo.ANSWER and 200 < len(tokens) < 500
    assert max(len(t.strip()) for t in tokens) <= 4


def test_the_simulated_answer_is_markdown_with_heading_list_and_code() -> None:
    assert demo.ANSWER.startswith("# ") and "\n1. " in demo.ANSWER and "```python\n" in demo.ANSWER


async def test_simulated_tokens_type_the_answer_at_a_realistic_pace() -> None:
    text = "# Hi\n\n" + "word " * 30
    began = time.monotonic()
    tokens = [t async for t in demo.simulated_tokens(text, rate=200.0, seed=1)]
    rate = len(tokens) / (time.monotonic() - began)
    assert "".join(tokens) == text and 60 < rate < 260


def test_shipped_pace_is_a_few_seconds() -> None:
    seconds = len(demo.tokenize(demo.ANSWER)) / SHIPPED_RATE
    assert 20 <= SHIPPED_RATE <= 60 and 3 <= seconds <= 10


async def test_demo_writes_answer_and_audit_through_the_agent_context(local: Settings) -> None:
    async with create_agent_context(local) as ctx:
        started = await demo.start(ctx, local)
        answer_id, audit_id = started.answer.id, started.audit.id
    async with create_agent_context(local) as ctx:
        answer_info, audit_info = await ctx.stream.get(answer_id), await ctx.stream.get(audit_id)
        answer, audit = await content(ctx, answer_id), records(await content(ctx, audit_id))
    assert answer == demo.ANSWER and answer_info.closed and audit_info.closed
    assert answer_info.content_type == "text/markdown" and audit_info.content_type == "application/json"
    assert answer_info.metadata == {"demo": "answer", "audit": audit_id}
    assert started.as_dict()["viewer_url"] == f"http://sh.test/watch/{answer_id}"
    events = [r["event"] for r in audit]
    assert events[0] == "request" and events[-1] == "complete" and "progress" in events
    assert audit[0]["answer_stream"] == answer_id and audit[0]["model"] == "simulated"
    assert audit[-1]["sha256"] == hashlib.sha256(answer.encode()).hexdigest()


async def test_openai_tokens_parse_the_streamed_deltas(fake: FakeOpenAI) -> None:
    tokens = [t async for t in demo.openai_tokens(fake.url, "tiny-model", "Why?", api_key="sk-test")]
    assert tokens == DELTAS
    request = fake.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sk-test"
    assert request["body"]["stream"] is True and request["body"]["model"] == "tiny-model"
    assert request["body"]["messages"][-1] == {"role": "user", "content": "Why?"}


async def test_demo_streams_the_configured_model(local: Settings, fake: FakeOpenAI) -> None:
    settings = dataclasses.replace(local, llm_base_url=fake.url, llm_model="tiny-model", llm_api_key="sk")
    assert demo.token_source(settings)[0] == "tiny-model"
    async with AsyncTestClient(create_app(settings), base_url=LOOPBACK) as client:
        response = await client.post("/demo", headers={"accept": "application/json"})
        started = response.json()
        assert response.status_code == 201 and started["source"] == "tiny-model"
    async with create_agent_context(settings) as ctx:
        assert await content(ctx, started["stream_id"]) == "".join(DELTAS)
        audit = records(await content(ctx, started["audit_stream_id"]))
    assert audit[0]["model"] == "tiny-model" and audit[-1]["event"] == "complete"
    assert audit[-1]["tokens"] == len(DELTAS)


async def test_a_failing_model_is_reported_in_both_streams(local: Settings) -> None:
    with FakeOpenAI([], status=503) as broken:
        settings = dataclasses.replace(local, llm_base_url=broken.url, llm_model="m")
        async with create_agent_context(settings) as ctx:
            started = await demo.start(ctx, settings)
        async with create_agent_context(settings) as ctx:
            answer = await content(ctx, started.answer.id)
            audit = records(await content(ctx, started.audit.id))
    assert "The model call failed" in answer and "503" in answer
    assert audit[-1]["event"] == "error" and "model overloaded" in audit[-1]["message"]


async def test_too_many_demos_at_once_are_refused(local: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "MAX_RUNNING", 0)
    async with AsyncTestClient(create_app(local), base_url=LOOPBACK) as client:
        response = await client.post("/demo")
    assert response.status_code == 429 and response.headers["retry-after"] == "5"


def test_cli_demo_against_a_running_server(tmp_path: Path, fake: FakeOpenAI) -> None:
    env = {"STREAMHOLD_DATA_DIR": str(tmp_path), "STREAMHOLD_LLM_BASE_URL": fake.url}
    env["STREAMHOLD_LLM_MODEL"] = "m"
    with ServerProcess(env=env) as server:
        result = CliRunner().invoke(cli, ["demo", "--url", server.url])
        assert result.exit_code == 0, result.output
        url = re.search(r"(http://\S+/watch/stream_[0-9a-f]{32})", result.output).group(1)  # type: ignore[union-attr]
        assert url.startswith(server.url)
        assert httpx.get(url).status_code == 200 and "from the m model" in result.output


def test_cli_demo_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMHOLD_DATA_DIR", str(tmp_path))
    port = free_port()
    result = CliRunner().invoke(cli, ["demo", "--in-process", "--port", str(port), "--linger", "0"])
    assert result.exit_code == 0, result.output
    found = re.search(rf"http://127\.0\.0\.1:{port}/watch/(stream_[0-9a-f]{{32}})", result.output)
    assert found, result.output
    stream_id = found.group(1)

    async def check() -> None:
        async with create_agent_context(Settings(data_dir=tmp_path)) as ctx:
            assert (await ctx.stream.get(stream_id)).closed
            assert await content(ctx, stream_id) == demo.ANSWER

    asyncio.run(check())
