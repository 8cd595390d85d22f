"""A read never claims an offset it did not deliver: gzip-at-close and delete racing every read path."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from streamhold.errors import StreamNotFoundError
from streamhold.main import create_app
from streamhold.models import StreamState, parse_offset
from streamhold.settings import Settings
from streamhold.store.store import Store
from streamhold.store.transactions import NewStream
from tests._server import LOOPBACK

pytestmark = pytest.mark.timeout(90)

SMALL = b"".join(b"line %05d of a closed stream\n" % i for i in range(2000))  # inline catch-up
LARGE = SMALL * 40  # over the inline limit: a streamed catch-up body


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[AsyncTestClient[Any]]:
    quick = dataclasses.replace(settings, sse_keepalive=0.3, long_poll_timeout=0.5)
    async with AsyncTestClient(create_app(quick), base_url=LOOPBACK) as client:
        yield client


def store_of(client: AsyncTestClient[Any]) -> Store:
    store: Store = client.app.state.store
    return store


async def in_app(client: AsyncTestClient[Any], fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """Run a store coroutine on the app's own event loop (the test client serves it from another thread)."""
    return await asyncio.to_thread(client.blocking_portal.call, fn, *args)


async def closed_stream(client: AsyncTestClient[Any], name: str, data: bytes) -> StreamState:
    """A closed stream marked for compression whose gzip body is not swapped in yet."""
    store = store_of(client)

    async def make() -> StreamState | None:
        state, _ = await store.create(NewStream(namespace="race", name=name, content_type="text/plain"))
        await store.append_nowait(state.id, data, close=True, compress=True)
        return await store.get(state.id)

    fresh = await in_app(client, make)
    assert fresh is not None and fresh.closed and not fresh.compressed
    return fresh


def between_state_and_bytes(
    monkeypatch: pytest.MonkeyPatch, store: Store, action: Callable[[str], Awaitable[None]]
) -> None:
    """Run `action` (a gzip swap, a delete) right after the next read of a stream's state by name."""
    original = store.get_by_name
    fired = False

    async def racing(name: str) -> StreamState | None:
        nonlocal fired
        state = await original(name)
        if state is not None and not fired:
            fired = True
            await action(state.id)
        return state

    monkeypatch.setattr(store, "get_by_name", racing)


def compress(store: Store) -> Callable[[str], Awaitable[None]]:
    async def run(stream_id: str) -> None:
        await store.finish(stream_id)
        state = await store.get(stream_id)
        assert state is not None and state.compressed

    return run


def claimed(response: Any) -> int:
    position = parse_offset(response.headers["stream-next-offset"])
    assert position is not None
    return position


@pytest.mark.parametrize("data", [SMALL, LARGE], ids=["inline", "streamed"])
async def test_catch_up_racing_the_gzip_swap_delivers_every_claimed_byte(
    client: AsyncTestClient[Any], monkeypatch: pytest.MonkeyPatch, data: bytes
) -> None:
    store = store_of(client)
    await closed_stream(client, "swap", data)
    between_state_and_bytes(monkeypatch, store, compress(store))
    response = await client.get("/v1/stream/swap", params={"offset": "-1"})
    assert response.status_code == 200
    assert claimed(response) == len(response.content)
    assert response.content == data[: claimed(response)]


@pytest.mark.parametrize("data", [SMALL, LARGE], ids=["inline", "streamed"])
async def test_catch_up_racing_a_delete_is_404_not_a_short_200(
    client: AsyncTestClient[Any], monkeypatch: pytest.MonkeyPatch, data: bytes
) -> None:
    store = store_of(client)
    await closed_stream(client, "gone", data)
    between_state_and_bytes(monkeypatch, store, store.delete)
    try:
        response = await client.get("/v1/stream/gone", params={"offset": "-1"})
    except Exception:  # a streamed body cut off mid-way: the client sees an incomplete transfer
        return
    assert response.status_code == 404, (response.status_code, len(response.content), response.headers)


async def test_a_streamed_catch_up_finishes_across_a_gzip_swap_in_its_middle(
    client: AsyncTestClient[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = store_of(client)
    await closed_stream(client, "mid", LARGE)
    original = store.iter_content
    fired = False

    def swapping(
        state: StreamState, start: int = 0, end: int | None = None, *_: Any, **__: Any
    ) -> AsyncIterator[bytes]:
        async def pieces() -> AsyncIterator[bytes]:
            nonlocal fired
            async for piece in original(state, start, end, slice_size=64 * 1024):
                yield piece
                if not fired:  # once, after the first slice (the compression reads the stream too)
                    fired = True
                    await compress(store)(state.id)

        return pieces()

    monkeypatch.setattr(store, "iter_content", swapping)
    response = await client.get("/v1/stream/mid", params={"offset": "-1"})
    assert response.status_code == 200
    assert len(response.content) == claimed(response) == len(LARGE)
    assert response.content == LARGE


async def test_long_poll_racing_the_gzip_swap_delivers_every_claimed_byte(
    client: AsyncTestClient[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = store_of(client)
    await closed_stream(client, "poll", SMALL)
    between_state_and_bytes(monkeypatch, store, compress(store))
    response = await client.get("/v1/stream/poll", params={"offset": "-1", "live": "long-poll"})
    assert response.status_code == 200
    assert response.content == SMALL and claimed(response) == len(SMALL)


def sse_controls(text: str) -> list[tuple[dict[str, Any], int]]:
    """Each control event with the number of data bytes delivered before it."""
    delivered, controls = 0, []
    for event in text.split("\n\n"):
        lines = event.split("\n")
        if lines[0] == "event: data":
            delivered += len("\n".join(line[5:] for line in lines[1:] if line.startswith("data:")).encode())
        elif lines[0] == "event: control":
            controls.append((json.loads("".join(line[5:] for line in lines[1:])), delivered))
    return controls


async def test_sse_racing_the_gzip_swap_never_claims_an_offset_it_did_not_send(
    client: AsyncTestClient[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = store_of(client)
    await closed_stream(client, "sse", SMALL)
    between_state_and_bytes(monkeypatch, store, compress(store))
    response = await client.get("/v1/stream/sse", params={"offset": "-1", "live": "sse"})
    controls = sse_controls(response.text)
    assert controls, response.text
    for control, delivered in controls:
        assert parse_offset(control["streamNextOffset"]) == delivered, controls
        if control.get("upToDate"):  # the stream is closed: up to date only at its end
            assert delivered == len(SMALL), controls
    assert controls[-1][0].get("streamClosed") and controls[-1][1] == len(SMALL)


async def test_watch_page_racing_the_gzip_swap_shows_the_content(
    client: AsyncTestClient[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = store_of(client)
    await closed_stream(client, "page", SMALL)
    between_state_and_bytes(monkeypatch, store, compress(store))
    response = await client.get("/watch/page")
    assert response.status_code == 200
    assert "line 01999 of a closed stream" in response.text
    assert f'data-offset="{len(SMALL)}"' in response.text


async def test_watch_page_racing_a_delete_is_the_gone_page(
    client: AsyncTestClient[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = store_of(client)
    await closed_stream(client, "page-gone", SMALL)
    between_state_and_bytes(monkeypatch, store, store.delete)
    response = await client.get("/watch/page-gone")
    assert response.status_code == 404


async def test_store_reads_racing_a_delete_raise_not_found(client: AsyncTestClient[Any]) -> None:
    store = store_of(client)
    state = await closed_stream(client, "direct", SMALL)
    await in_app(client, store.delete, state.id)

    async def whole() -> bytes:
        return b"".join([piece async for piece in store.iter_content(state)])

    with pytest.raises(StreamNotFoundError):
        await in_app(client, store.read, state.id, 0, len(SMALL))
    with pytest.raises(StreamNotFoundError):
        await in_app(client, whole)


async def test_readers_polling_through_gzip_swaps_and_deletes_get_whole_bodies(
    client: AsyncTestClient[Any],
) -> None:
    """Real races: readers poll `offset=-1` while streams are closed with gzip and deleted."""
    store = store_of(client)
    checked = {"200": 0, "404": 0}
    stop = asyncio.Event()

    async def reader() -> None:
        while not stop.is_set():
            response = await client.get("/v1/stream/loop", params={"offset": "-1"})
            if response.status_code == 200:
                assert claimed(response) == len(response.content), "a short 200"
                checked["200"] += 1
            else:
                assert response.status_code == 404, response.status_code
                checked["404"] += 1
            await asyncio.sleep(0)

    async def churn() -> None:
        rng = random.Random(7)
        deadline = time.monotonic() + 3
        for _ in range(40):
            if time.monotonic() > deadline:
                break
            state = await closed_stream(client, "loop", SMALL[: rng.randrange(1000, len(SMALL))])
            await asyncio.sleep(rng.random() / 100)
            if rng.random() < 0.5:
                await in_app(client, store.finish, state.id)
                await asyncio.sleep(rng.random() / 100)
            await in_app(client, store.delete, state.id)
        stop.set()

    readers = [asyncio.ensure_future(reader()) for _ in range(6)]
    try:
        await churn()
        await asyncio.gather(*readers)
    finally:
        stop.set()
        for task in readers:
            task.cancel()
    assert checked["200"] > 0


# --- offsets of a deleted stream -----------------------------------------------------------------


def generation_of(offset: str) -> int:
    return int(offset.split("_")[0])


async def test_an_offset_of_a_deleted_stream_is_410_in_the_next_stream_of_its_name(
    client: AsyncTestClient[Any],
) -> None:
    url, plain = "/v1/stream/reused", {"content-type": "text/plain"}
    assert (await client.put(url, headers=plain, content=b"old stream ")).status_code == 201
    old = (await client.get(url, params={"offset": "-1"})).headers["stream-next-offset"]
    assert (await client.delete(url)).status_code == 204
    created = await client.put(url, headers=plain, content=b"a new stream, longer than the old one")
    assert created.status_code == 201
    new = created.headers["stream-next-offset"]
    for mode in ({}, {"live": "long-poll"}, {"live": "sse"}):
        stale = await client.get(url, params={"offset": old, **mode})
        assert stale.status_code == 410, (mode, stale.status_code, stale.text)
        assert "offset=-1" in stale.json()["error"]
    assert generation_of(new) > generation_of(old)
    resumed = await client.get(url, params={"offset": "-1", "live": "sse"}, headers={"last-event-id": old})
    assert resumed.status_code == 410
    whole = await client.get(url, params={"offset": "-1"})
    assert whole.content == b"a new stream, longer than the old one"
    assert whole.headers["stream-next-offset"] == new
    again = await client.get(url, params={"offset": new})
    assert again.status_code == 200 and again.content == b""
    start = await client.get(url, params={"offset": "0000000000000000_0000000000000000"})
    assert start.content == whole.content  # the all-zero offset is every stream's start


async def test_a_closed_stream_answers_appends_with_its_own_final_offset(
    client: AsyncTestClient[Any],
) -> None:
    url, plain = "/v1/stream/final", {"content-type": "text/plain"}
    created = await client.put(url, headers={**plain, "stream-closed": "true"}, content=b"done")
    refused = await client.post(url, headers=plain, content=b"more")
    assert refused.status_code == 409
    assert refused.headers["stream-next-offset"] == created.headers["stream-next-offset"]
    assert generation_of(refused.headers["stream-next-offset"]) > 0


async def test_generations_rise_across_expiry_and_across_stores_of_one_database(settings: Settings) -> None:
    async with Store.open(settings) as first, Store.open(settings) as second:
        seen = []
        for store in (first, second, first, second):
            state, created = await store.create(
                NewStream(namespace="gen", name="gen/one", expires_at=time.time() + 0.3)
            )
            assert created
            seen.append(state.generation)
            await asyncio.sleep(0.35)  # expired: the next create of the name replaces it
        assert seen == sorted(seen) and len(set(seen)) == len(seen) and seen[0] > 0


async def test_a_database_from_before_generations_keeps_its_offsets(tmp_path: Any) -> None:
    from sqlalchemy import create_engine, text

    settings = Settings(data_dir=tmp_path, public_url="http://sh.test")
    async with Store.open(settings) as store:
        old, _ = await store.create(NewStream(namespace="up", name="up/old", initial=b"kept"))
    engine = create_engine(f"sqlite:///{tmp_path / 'streamhold.db'}")
    with engine.begin() as conn:  # the schema as it was before generations
        conn.execute(text("DROP TABLE counters"))
        conn.execute(text("ALTER TABLE streams DROP COLUMN generation"))
    engine.dispose()
    async with AsyncTestClient(create_app(settings), base_url=LOOPBACK) as client:
        read = await client.get("/v1/stream/up/old", params={"offset": "0000000000000000_0000000000000002"})
        assert read.status_code == 200 and read.content == b"pt"
        assert read.headers["stream-next-offset"] == "0000000000000000_0000000000000004"
        created = await client.put("/v1/stream/up/new", headers={"content-type": "text/plain"})
        assert generation_of(created.headers["stream-next-offset"]) > 0


async def test_a_fork_takes_its_source_offsets_only_up_to_the_fork_point(
    client: AsyncTestClient[Any],
) -> None:
    plain = {"content-type": "text/plain"}
    source = await client.put("/v1/stream/src", headers=plain, content=b"abc")
    at_fork = source.headers["stream-next-offset"]
    forked = await client.put("/v1/stream/fork", headers={**plain, "stream-forked-from": "/v1/stream/src"})
    assert forked.status_code == 201
    appended = await client.post("/v1/stream/src", headers=plain, content=b"def")
    past_fork = appended.headers["stream-next-offset"]
    await client.post("/v1/stream/fork", headers=plain, content=b"XYZ")
    inherited = await client.get("/v1/stream/fork", params={"offset": at_fork})
    assert inherited.status_code == 200 and inherited.content == b"XYZ"
    assert (await client.get("/v1/stream/fork", params={"offset": past_fork})).status_code == 410


async def test_a_fork_of_a_fork_starts_at_any_offset_its_source_reads_from(
    client: AsyncTestClient[Any],
) -> None:
    plain = {"content-type": "text/plain"}
    first = await client.put("/v1/stream/first", headers=plain, content=b"0123456789")
    generation = first.headers["stream-next-offset"].split("_")[0]
    middle = f"{generation}_{5:016d}"  # an offset of `first`, which its fork `second` reads from too
    await client.put("/v1/stream/second", headers={**plain, "stream-forked-from": "/v1/stream/first"})
    await client.post("/v1/stream/second", headers=plain, content=b"ABC")
    assert (await client.get("/v1/stream/second", params={"offset": middle})).content == b"56789ABC"
    third = await client.put(
        "/v1/stream/third",
        headers={**plain, "stream-forked-from": "/v1/stream/second", "stream-fork-offset": middle},
    )
    assert third.status_code == 201, third.text
    assert (await client.get("/v1/stream/third", params={"offset": "-1"})).content == b"01234"


async def test_a_source_offset_past_the_fork_point_is_refused_with_a_reason_about_forks(
    client: AsyncTestClient[Any],
) -> None:
    plain = {"content-type": "text/plain"}
    await client.put("/v1/stream/origin", headers=plain, content=b"abc")
    await client.put("/v1/stream/branch", headers={**plain, "stream-forked-from": "/v1/stream/origin"})
    appended = await client.post("/v1/stream/origin", headers=plain, content=b"def")
    later = appended.headers["stream-next-offset"]
    refused = await client.get("/v1/stream/branch", params={"offset": later})
    assert refused.status_code == 410
    assert "fork" in refused.json()["error"], refused.text
