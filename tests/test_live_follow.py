"""live.follow, the one loop behind every live read: replay, wait on the doorbell, end when closed or gone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

import pytest

from streamhold.errors import StreamError
from streamhold.live import CLOSED, DATA, IDLE, UP_TO_DATE, Event, LiveHub, follow
from streamhold.models import StreamState
from streamhold.settings import Settings
from streamhold.store.store import Store
from streamhold.store.transactions import NewStream

pytestmark = pytest.mark.timeout(60)
SLICE = 4


@pytest.fixture
async def opened(settings: Settings) -> AsyncIterator[tuple[Store, LiveHub]]:
    async with Store.open(settings) as store, LiveHub.open(store, settings) as hub:
        yield store, hub


async def pieces(store: Store, hub: LiveHub, state: StreamState, **options: float) -> list[Event[bytes]]:
    async def step(current: StreamState, position: int) -> tuple[bytes, int]:
        data = await store.read(current.id, position, min(current.tail, position + SLICE))
        return data, position + len(data)

    idle_after = options.pop("idle_after", 5.0)
    reread = bool(options.pop("reread", False))
    seen: list[Event[bytes]] = []
    async with aclosing(
        follow(hub, store, state, 0, step, kind="sdk", idle_after=idle_after, reread=reread, **options)
    ) as events:
        async for event in events:
            assert event.kind != DATA or event.position <= event.state.tail, "read past the committed tail"
            seen.append(event)
    return seen


async def test_follow_replays_in_slices_then_tails_commits_until_closed(
    opened: tuple[Store, LiveHub],
) -> None:
    store, hub = opened
    state, _ = await store.create(NewStream(namespace="f", name="f/one"))
    await store.append(state.id, b"0123456789")
    reading = asyncio.create_task(pieces(store, hub, state, idle_after=0.2, reread=True))
    await asyncio.sleep(0.5)  # caught up, waiting, and idle at least once
    await store.append(state.id, b"abc")
    await store.append(state.id, b"", close=True)
    seen = await asyncio.wait_for(reading, 10)

    data = [e for e in seen if e.kind == DATA]
    assert b"".join(e.piece or b"" for e in data) == b"0123456789abc"
    assert all(len(e.piece or b"") <= SLICE for e in data), "a piece larger than the slice"
    kinds = [e.kind for e in seen]
    # A piece that reaches the tail says so itself: UP_TO_DATE comes only after waits that brought nothing.
    assert kinds[:4] == [DATA, DATA, DATA, IDLE] and UP_TO_DATE in kinds
    assert kinds[-1] == CLOSED and seen[-1].position == 13
    assert hub.live_readers(state.id) == 0, "the follow kept its registration"


async def test_follow_of_a_stream_deleted_while_waiting_raises(opened: tuple[Store, LiveHub]) -> None:
    store, hub = opened
    state, _ = await store.create(NewStream(namespace="f", name="f/two"))
    await store.append(state.id, b"abc")
    reading = asyncio.create_task(pieces(store, hub, state))
    await asyncio.sleep(0.2)
    await store.delete(state.id)
    with pytest.raises(StreamError):
        await asyncio.wait_for(reading, 10)
    assert hub.live_readers(state.id) == 0


async def test_follow_ends_at_its_deadline_and_when_cancelled(opened: tuple[Store, LiveHub]) -> None:
    store, hub = opened
    state, _ = await store.create(NewStream(namespace="f", name="f/three"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    seen = await pieces(store, hub, state, deadline=started + 0.3)
    assert [e.kind for e in seen] == [UP_TO_DATE] and loop.time() - started < 2.0

    gone_away: asyncio.Future[None] = loop.create_future()
    loop.call_later(0.2, gone_away.set_result, None)
    started = loop.time()
    async with aclosing(
        follow(hub, store, state, 0, _nothing, kind="long-poll", idle_after=30.0, cancel=gone_away)
    ) as events:
        kinds = [event.kind async for event in events]
    assert kinds == [UP_TO_DATE] and loop.time() - started < 2.0, "a client that went away was not noticed"


async def _nothing(state: StreamState, position: int) -> tuple[None, int]:
    return None, state.tail
