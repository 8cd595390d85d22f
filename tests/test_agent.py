"""The ways in: `ctx.stream` with `wait_until`, the `stream` dependency, `create_agent_context()`.

The README's examples are run from the README itself, so they cannot drift from what works.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import re
import sys
import threading
import types
from pathlib import Path
from typing import Any

import pytest
from litestar import post
from litestar.di import NamedDependency
from litestar.handlers import HTTPRouteHandler
from litestar.testing import AsyncTestClient

from streamhold.live import LiveHub
from streamhold.main import create_app
from streamhold.sdk.context import AgentContext, create_agent_context
from streamhold.sdk.local import LocalStreams
from streamhold.settings import Settings
from streamhold.store.store import Store

pytestmark = pytest.mark.timeout(60)

README = Path(__file__).parent.parent / "README.md"

# A keyless server answers only to loopback names (DNS rebinding): tests reach it by one.
LOOPBACK = "http://127.0.0.1"


def readme_examples() -> dict[str, Any]:
    """Execute every ```python block marked `<!-- example -->` in the README; returns their names."""
    blocks = re.findall(r"<!-- example -->\n```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) == 5, "the README's examples are all here"
    names: dict[str, Any] = {}
    for index, source in enumerate(blocks):
        # A real module, because Litestar resolves handler annotations through sys.modules.
        module = types.ModuleType(f"readme_example_{index}")
        sys.modules[module.__name__] = module
        exec(compile(source, f"README.md example {index}", "exec"), module.__dict__)
        names.update(vars(module))
    return names


def stream_id(url: str) -> str:
    return url.rsplit("/", 1)[-1]


async def read(app: Any, stream_id: str) -> bytes:
    service: LocalStreams = app.state.service
    return b"".join([chunk async for chunk in service.download(stream_id)])


async def test_readme_handlers_run(settings: Settings) -> None:
    examples = readme_examples()
    handlers = [v for v in examples.values() if isinstance(v, HTTPRouteHandler)]
    app = create_app(settings, route_handlers=handlers)
    async with AsyncTestClient(app, base_url=LOOPBACK) as client:
        users = [{"name": "Ada", "email": "ada@example.com", "created": "2026-01-02"}]
        exported = (await client.post("/export", json={"user_id": "u1", "users": users})).json()
        csv_id = stream_id(exported["url"])
        assert exported["url"] == f"{settings.origin()}/stream/{csv_id}"
        assert await read(app, csv_id) == b"Name,Email,Created\nAda,ada@example.com,2026-01-02\n"
        info = await app.state.service.get(csv_id)
        assert info.compressed and info.metadata == {"user_id": "u1"} and info.expires_at is not None

        report = (await client.post("/report", json={"query": "all"})).json()
        rows = json.loads(await read(app, stream_id(report["stream_url"])))  # tails until the work closes it
        assert len(rows) == 100 and rows[0] == {"query": "all", "row": 0}

        chat = (await client.post("/chat", json={"user_id": "u7", "message": "hi"})).json()
        assert await read(app, stream_id(chat["stream_url"])) == b"Durable streams survive refreshes."
        audits = await app.state.service.list(namespace="audit", metadata={"user_id": "u7"})
        assert audits.total == 1
        audit = json.loads(await read(app, audits.streams[0].id))
        assert audit["response"] == "Durable streams survive refreshes." and audit["prompt"] == "hi"

        note = (await client.post("/notes", json={"text": "remember"})).json()
        assert await read(app, stream_id(note["url"])) == b"remember"

        raw = await client.get(f"/v1/stream/{csv_id}")
        assert (
            raw.status_code == 200 and gzip.decompress(raw.content)
            if raw.headers.get("content-encoding")
            else True
        )


async def test_readme_script_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMHOLD_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("STREAMHOLD_URL", raising=False)
    monkeypatch.delenv("STREAMHOLD_DATABASE_URL", raising=False)
    report_id = await readme_examples()["generate_daily_report"]()
    settings = Settings(data_dir=tmp_path)
    async with Store.open(settings) as store, LiveHub.open(store, settings) as hub:
        service = LocalStreams(store, hub, settings)
        body = b"".join([chunk async for chunk in service.download(report_id)])
        assert body.startswith(b"Date,Metric,Value\n") and body.endswith(b",signups,42\n")
        assert (await service.get(report_id)).metadata.keys() == {"date"}


async def test_shutdown_awaits_background_work(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    started = threading.Event()  # the app runs on the test client's own loop

    @post("/slow")
    async def slow(ctx: NamedDependency[AgentContext]) -> dict[str, str]:
        stream = await ctx.stream.create("slow", content_type="text/plain")

        async def work() -> None:
            started.set()
            await asyncio.sleep(0.5)
            await stream.write("finished after the response")
            await stream.close()

        ctx.wait_until(work)
        return {"id": stream.id}

    async with AsyncTestClient(create_app(settings, route_handlers=[slow]), base_url=LOOPBACK) as client:
        made = (await client.post("/slow")).json()
        assert started.wait(5)
    # The client's exit ran the app's shutdown, which had to wait for the work.
    async with Store.open(settings) as store:
        state = await store.get(made["id"])
        assert state is not None and state.closed
        assert await store.read(state.id, 0, state.tail) == b"finished after the response"


async def test_background_errors_are_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    @post("/fails")
    async def fails(ctx: NamedDependency[AgentContext]) -> dict[str, bool]:
        async def work() -> None:
            raise RuntimeError("the export failed")

        ctx.wait_until(work())
        return {"ok": True}

    with caplog.at_level(logging.ERROR, logger="streamhold.agent"):
        async with AsyncTestClient(
            create_app(Settings(data_dir=tmp_path), route_handlers=[fails]), base_url=LOOPBACK
        ) as client:
            assert (await client.post("/fails")).json() == {"ok": True}
    assert any("background work failed" in r.message and r.exc_info for r in caplog.records)


async def test_context_must_be_opened_before_use(tmp_path: Path) -> None:
    ctx = create_agent_context(Settings(data_dir=tmp_path))
    with pytest.raises(RuntimeError, match="async with"):
        ctx.stream  # noqa: B018
    result = await ctx.invoke(lambda: ctx.stream.list())
    assert result.total == 0
