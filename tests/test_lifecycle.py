"""One rule for live, closed, expired and gone: the protocol, the /stream API and the SDK agree on it."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from streamhold.main import create_app
from streamhold.models import (
    Lifecycle,
    StreamGoneError,
    StreamNotFoundError,
    StreamState,
    lifecycle,
    require_live,
)
from streamhold.sdk.local import LocalStreams
from streamhold.settings import Settings
from streamhold.store.store import Store
from streamhold.store.transactions import NewStream
from tests._server import LOOPBACK

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[AsyncTestClient[Any]]:
    quick = dataclasses.replace(settings, sse_keepalive=0.3, long_poll_timeout=0.5)
    async with AsyncTestClient(create_app(quick), base_url=LOOPBACK) as client:
        yield client


async def in_app(client: AsyncTestClient[Any], fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """Run a coroutine on the app's own event loop (the test client serves it from another thread)."""
    return await asyncio.to_thread(client.blocking_portal.call, fn, *args)


async def surfaces(client: AsyncTestClient[Any], state: StreamState) -> dict[str, Any]:
    """What each surface answers for this stream: protocol GET and HEAD, /stream GET and info, SDK get."""
    service: LocalStreams = client.app.state.service

    async def sdk() -> str:
        try:
            info = await service.get(state.id)
        except StreamNotFoundError:
            return "StreamNotFoundError"
        chunks = [chunk async for chunk in service.download(state.id)]
        return f"closed:{b''.join(chunks)!r}" if info.closed_at is not None else "open"

    protocol = await client.get(f"/v1/stream/{state.name}", params={"offset": "-1"})
    content = await client.get(f"/stream/{state.id}")
    return {
        "protocol": (protocol.status_code, protocol.headers.get("stream-closed")),
        "protocol-head": (await client.head(f"/v1/stream/{state.name}")).status_code,
        "stream": (content.status_code, content.headers.get("stream-closed")),
        "stream-info": (await client.post(f"/stream/{state.id}/info")).status_code,
        "sdk": await in_app(client, sdk),
    }


async def make(client: AsyncTestClient[Any], name: str, **options: Any) -> StreamState:
    store: Store = client.app.state.store

    async def create() -> StreamState:
        state, _ = await store.create(
            NewStream(namespace="life", name=name, content_type="text/plain", **options)
        )
        await store.append(state.id, b"hello", close=True)
        return state

    state: StreamState = await in_app(client, create)
    return state


async def test_the_three_surfaces_agree_on_closed_expired_and_deleted_streams(
    client: AsyncTestClient[Any],
) -> None:
    store: Store = client.app.state.store
    closed = await make(client, "life/closed")
    expired = await make(client, "life/expired", expires_at=time.time() + 0.3)
    deleted = await make(client, "life/deleted")
    source = await make(client, "life/source")
    await in_app(
        client,
        store.create,
        NewStream(namespace="life", name="life/fork", content_type="text/plain", fork_from="life/source"),
    )
    await in_app(client, store.delete, deleted.id)
    await in_app(client, store.delete, source.id)  # soft-deleted: its fork still reads its bytes
    await asyncio.sleep(0.35)

    assert await surfaces(client, closed) == {
        "protocol": (200, "true"),
        "protocol-head": 200,
        "stream": (200, "true"),
        "stream-info": 200,
        "sdk": "closed:b'hello'",
    }
    gone = {
        "protocol": (404, None),
        "protocol-head": 404,
        "stream": (404, None),
        "stream-info": 404,
        "sdk": "StreamNotFoundError",
    }
    assert await surfaces(client, expired) == gone
    assert await surfaces(client, deleted) == gone
    # The protocol tells a deleted stream with forks (410) from a missing one; the /stream API and the
    # SDK, as Agentuity's, answer not found.
    assert await surfaces(client, source) == {**gone, "protocol": (410, None), "protocol-head": 410}

    fresh = await in_app(client, store.get, source.id)
    assert lifecycle(fresh) is Lifecycle.DELETED
    with pytest.raises(StreamGoneError):
        require_live(fresh)


def test_the_rule_judges_expiry_at_the_given_time_and_closure_from_the_record() -> None:
    base: dict[str, Any] = dict(
        id="stream_x",
        name="x",
        namespace="default",
        content_type="text/plain",
        json_mode=False,
        metadata={},
        created_at=0.0,
        updated_at=0.0,
        closed_at=None,
        tail=0,
        stored_bytes=0,
        appends=0,
        compress=False,
        compressed=False,
        ttl_seconds=None,
        sliding=False,
        expires_at=100.0,
        last_seq=None,
        fork_source=None,
        fork_offset=None,
        deleted=False,
    )
    state = StreamState(**base)
    assert lifecycle(None) is Lifecycle.MISSING
    assert lifecycle(state, now=99.0) is Lifecycle.OPEN
    assert lifecycle(state, now=100.0) is Lifecycle.EXPIRED
    assert lifecycle(dataclasses.replace(state, closed_at=50.0), now=99.0) is Lifecycle.CLOSED
    # Expired wins over deleted: both are unreadable, and an expired stream is a 404 on every surface.
    assert lifecycle(dataclasses.replace(state, deleted=True), now=100.0) is Lifecycle.EXPIRED
    assert lifecycle(dataclasses.replace(state, deleted=True), now=99.0) is Lifecycle.DELETED
