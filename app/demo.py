"""The demo agent: an LLM answer streamed into a text/markdown stream, with a JSON audit stream beside it.

The answer comes from a real OpenAI-compatible model when STREAMHOLD_LLM_BASE_URL and STREAMHOLD_LLM_MODEL
are set, and otherwise from a simulated model that types a canned answer at a realistic pace.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from .models import iso
from .sdk.base import Stream
from .sdk.context import AgentContext
from .settings import Settings

DEMO_TTL = 24 * 3600
MAX_RUNNING = 8
MAX_TOKENS = 8192
MAX_SECONDS = 180.0
SIMULATED_RATE = 50.0
PROGRESS_EVERY = 40
STOPPED_LINE = "\n\n> **Stopped:** someone pressed Stop, so the answer ends here.\n"
PROMPT = "How does a durable stream survive a page refresh? Show how to write one from Python."
SYSTEM = (
    "You answer in GitHub-flavoured Markdown: a heading, a short paragraph, a numbered list, "
    "a Python code block and a one-line quote at the end. Keep it under 250 words."
)
ANSWER = """# How a durable stream survives a refresh

A durable stream is an **append-only log with a URL**. The writer appends to it; every reader keeps
its own *offset*, the byte where it stopped reading. Nothing rides on a fragile socket that dies with
the tab.

## What happens when you reload this page

1. The server renders everything written so far, straight from the store.
2. The page opens a live connection **from that exact byte**.
3. Every event carries the next offset, so a reconnect resumes where it stopped: no gap, no duplicate.

## Writing one from Python

```python
async def answer(ctx: AgentContext, prompt: str) -> dict[str, str]:
    stream = await ctx.stream.create("answers", content_type="text/markdown")

    async def write() -> None:
        async for token in model.stream(prompt):
            await stream.write(token)
        await stream.close()

    ctx.wait_until(write)  # keeps writing after the response is sent
    return {"watch": stream.viewer_url}
```

| reader | resumes from |
|---|---|
| this tab, after a reload | the last offset it rendered |
| your phone, with the copied link | the same URL, the same bytes |
| a script with `curl` | `?offset=` of its choice |

> Try it now: reload the page, or open the link on another device. The answer keeps arriving.
"""


@dataclass(frozen=True)
class DemoStarted:
    """The two streams of a demo run: the Markdown answer and its JSON audit log."""

    answer: Stream
    audit: Stream
    source: str

    def as_dict(self) -> dict[str, str]:
        return {
            "stream_id": self.answer.id,
            "viewer_url": self.answer.viewer_url,
            "url": self.answer.url,
            "audit_stream_id": self.audit.id,
            "audit_viewer_url": self.audit.viewer_url,
            "source": self.source,
        }


class DemoBusyError(Exception):
    """Too many demos are running at once."""


_running: set[str] = set()


def tokenize(text: str) -> list[str]:
    """Split text into token-sized pieces (a few characters, with their leading spaces), losslessly."""
    return re.findall(r"\s*\S{1,4}|\s+", text)


async def simulated_tokens(
    text: str = ANSWER, rate: float | None = None, seed: int | None = None
) -> AsyncIterator[str]:
    """A model that types `text` at about `rate` tokens a second, pausing a little at line ends."""
    rng = random.Random(seed)
    rate = rate or SIMULATED_RATE
    await asyncio.sleep(min(0.4, 12 / rate))  # time to first token
    for token in tokenize(text):
        pause = rng.uniform(0.4, 1.6) / rate
        if token.endswith("\n"):
            pause *= 2
        await asyncio.sleep(pause)
        yield token


async def openai_tokens(
    base_url: str, model: str, prompt: str, api_key: str = "", read_timeout: float = 60.0
) -> AsyncIterator[str]:
    """Stream the answer of an OpenAI-compatible `/chat/completions` endpoint, delta by delta."""
    payload = {
        "model": model,
        "stream": True,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
    }
    headers = {"accept": "text/event-stream"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    limits = httpx.Timeout(read_timeout, connect=10.0)
    async with httpx.AsyncClient(timeout=limits) as client:
        url = base_url.rstrip("/") + "/chat/completions"
        async with client.stream("POST", url, json=payload, headers=headers) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode("utf-8", errors="replace")[:300]
                raise RuntimeError(f"the model endpoint answered {response.status_code}: {body}")
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                try:
                    chunk = json.loads(data)
                except ValueError:
                    continue
                if isinstance(chunk, dict) and chunk.get("error"):
                    raise RuntimeError(f"the model reported an error: {json.dumps(chunk['error'])[:300]}")
                choices = chunk.get("choices") if isinstance(chunk, dict) else None
                for choice in choices or []:
                    content = (choice.get("delta") or {}).get("content")
                    if isinstance(content, str) and content:
                        yield content


def token_source(settings: Settings, prompt: str = PROMPT) -> tuple[str, AsyncIterator[str]]:
    """The configured model (name and tokens): the real one when configured, else the simulated one."""
    if settings.llm_base_url and settings.llm_model:
        tokens = openai_tokens(settings.llm_base_url, settings.llm_model, prompt, settings.llm_api_key)
        return settings.llm_model, tokens
    return "simulated", simulated_tokens()


async def start(ctx: AgentContext, settings: Settings, prompt: str = PROMPT) -> DemoStarted:
    """Create the answer and audit streams and start writing them in the background."""
    if len(_running) >= MAX_RUNNING:
        raise DemoBusyError(f"{MAX_RUNNING} demos are already running; try again in a few seconds")
    model, tokens = token_source(settings, prompt)
    audit = await ctx.stream.create(
        "demo", content_type="application/json", metadata={"demo": "audit"}, ttl=DEMO_TTL
    )
    answer = await ctx.stream.create(
        "demo", content_type="text/markdown", metadata={"demo": "answer", "audit": audit.id}, ttl=DEMO_TTL
    )
    _running.add(answer.id)
    ctx.wait_until(run(answer, audit, tokens, model, prompt))
    return DemoStarted(answer, audit, model)


@dataclass
class _Written:
    """How much of the answer has been written so far."""

    tokens: int = 0
    bytes: int = 0
    digest: Any = field(default_factory=hashlib.sha256)
    fences: int = 0  # Markdown code fences opened or closed so far
    tail: str = ""  # the last characters written, to find a fence split between tokens


async def _write_tokens(answer: Stream, audit: Stream, tokens: AsyncIterator[str], written: _Written) -> None:
    began = time.monotonic()
    async for token in tokens:
        data = token.encode()
        answer.write(data)
        written.digest.update(data)
        seen = written.tail + token
        written.fences += seen.count("```") - written.tail.count("```")
        written.tail = seen[-2:]
        written.tokens, written.bytes = written.tokens + 1, written.bytes + len(data)
        if written.tokens % PROGRESS_EVERY == 0:
            progress = {"event": "progress", "tokens": written.tokens, "bytes": written.bytes}
            audit.write({**progress, "elapsed_ms": _ms(began)})
        if written.tokens >= MAX_TOKENS:
            break


async def _stop_asked(answer: Stream, audit: Stream) -> bool:
    """True once a stop of either stream is asked (POST /stream/{id}/stop, the viewer's Stop button)."""
    waits = [asyncio.ensure_future(answer.wait_stop()), asyncio.ensure_future(audit.wait_stop())]
    try:
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        return any(wait.result() for wait in done)
    finally:
        for wait in waits:
            wait.cancel()


async def run(answer: Stream, audit: Stream, tokens: AsyncIterator[str], model: str, prompt: str) -> None:
    """Write the answer token by token and the audit records beside it, until done or asked to stop; always
    close both streams."""
    began = time.monotonic()
    written = _Written()
    outcome: dict[str, Any] = {"event": "cancelled"}
    writing = stopping = None
    try:
        audit.write(
            {
                "event": "request",
                "at": iso(time.time()),
                "model": model,
                "prompt": prompt,
                "answer_stream": answer.id,
            }
        )
        async with asyncio.timeout(MAX_SECONDS):
            writing = asyncio.ensure_future(_write_tokens(answer, audit, tokens, written))
            stopping = asyncio.ensure_future(_stop_asked(answer, audit))
            await asyncio.wait((writing, stopping), return_when=asyncio.FIRST_COMPLETED)
            if not writing.done() and not stopping.result():  # a stream was closed elsewhere: no stop
                await writing
        if writing.done():
            writing.result()
            outcome = {"event": "complete", "sha256": written.digest.hexdigest()}
        else:
            writing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writing
            # Stopped inside a code block: close it, or the line would show as code.
            answer.write(("\n```" if written.fences % 2 else "") + STOPPED_LINE)
            outcome = {"event": "stopped"}
    except Exception as exc:  # the reader should see why the answer stopped, in both streams
        answer.write(f"\n\n> **The model call failed:** {exc}\n")
        outcome = {"event": "error", "message": str(exc)}
    finally:
        for task in (writing, stopping):
            if task is not None and not task.done():
                task.cancel()
        _running.discard(answer.id)
        counts = {"tokens": written.tokens, "bytes": written.bytes}
        audit.write({**outcome, **counts, "at": iso(time.time()), "duration_ms": _ms(began)})
        await asyncio.gather(answer.close(), audit.close())


def _ms(began: float) -> int:
    return int((time.monotonic() - began) * 1000)
