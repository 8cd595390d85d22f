"""Many streams at once: concurrent creates share commits, and per-stream caches stay bounded (LRU)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from streamhold import clock
from streamhold.errors import StreamConflictError, StreamNotFoundError
from streamhold.live import LiveHub
from streamhold.models import LRU, StreamFilter
from streamhold.sdk.local import LocalStreams
from streamhold.settings import Settings
from streamhold.store import batches
from streamhold.store import store as store_module
from streamhold.store.store import NewStream, Store

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    async with Store.open(settings) as opened:
        yield opened


async def test_concurrent_creates_share_commits_and_keep_create_semantics(store: Store) -> None:
    commits = store.writer.commits
    news = [NewStream(namespace="many", name=f"many/{i}", content_type="text/plain") for i in range(64)]
    # The same name twice with the same settings is no error; with other settings it is a conflict,
    # which fails that create only, not the creates sharing its transaction.
    news.append(NewStream(namespace="many", name="many/0", content_type="text/plain"))
    news.append(NewStream(namespace="many", name="many/1", content_type="application/json"))
    results = await asyncio.gather(*(store.create(new) for new in news), return_exceptions=True)
    assert isinstance(results[-1], StreamConflictError)
    done = [r for r in results[:-1] if not isinstance(r, BaseException)]
    assert len(done) == 65
    assert sum(created for _, created in done) == 64, "the repeated create found the stream"
    assert results[0][0].id == results[-2][0].id  # type: ignore[index]
    assert store.writer.commits - commits < 16, "concurrent creates commit together"
    for i in range(64):
        state = await store.get_by_name(f"many/{i}")
        assert state is not None and state.content_type == "text/plain"
    # Each create holds a generation of its own, as if created one by one.
    generations = {state.generation for state, _ in done[:64]}
    assert len(generations) == 64


async def test_plain_creates_run_as_one_batch_with_create_semantics(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On SQLite, plain creates skip the per-call path: one batch, a range of generations, same answers."""
    if store.postgres:
        pytest.skip("PostgreSQL runs creates as grouped calls")
    expired = NewStream(namespace="b", name="b/expired", ttl_seconds=None, expires_at=clock.now() + 0.3)
    kept, _ = await store.create(NewStream(namespace="b", name="b/kept", content_type="text/plain"))
    await store.create(expired)
    calls: list[int] = []
    run_calls = store.writer._run_calls
    monkeypatch.setattr(store.writer, "_run_calls", lambda ops: calls.append(len(ops)) or run_calls(ops))
    commits = store.writer.commits
    news = [
        NewStream(namespace="b", name=f"b/{i}", metadata={"k": str(i)}, initial=b"body %d" % i)
        for i in range(40)
    ]
    news += [NewStream(namespace="b") for _ in range(8)]  # unnamed, as the Python API makes them
    news.append(NewStream(namespace="b", name="b/3", metadata={"k": "3"}, initial=b"body 3"))  # repeated
    news.append(NewStream(namespace="b", name="b/4", content_type="text/plain"))  # another configuration
    news.append(NewStream(namespace="b", name="b/kept", content_type="text/plain"))  # made before
    results = await asyncio.gather(*(store.create(new) for new in news), return_exceptions=True)
    assert calls == [], "plain creates ran as a batch on the driver connection"
    assert store.writer.commits - commits < 8
    assert isinstance(results[-2], StreamConflictError)
    made = [r for r in results[:48] if not isinstance(r, BaseException)]
    assert len(made) == 48 and all(created for _, created in made)
    assert results[-3] == (made[3][0], False)
    assert results[-1] == (kept, False)
    generations = [state.generation for state, _ in made]
    assert len(set(generations)) == 48 and min(generations) > kept.generation
    for i in range(40):
        state = await store.get_by_name(f"b/{i}")
        assert state == made[i][0] and state.metadata == {"k": str(i)} and state.tail == len(b"body %d" % i)
        assert await store.read(state.id, 0, state.tail) == b"body %d" % i
    listed, _ = await store.list(StreamFilter(namespace="b", metadata=(("k", "7"),)))
    assert listed == 1
    # A name whose stream expired is made again by the full create, which retires the old stream first.
    await asyncio.sleep(0.4)
    again, created = await store.create(expired)
    assert created and calls == [1] and again.generation > max(generations)


async def test_create_write_close_sequences_share_commits(store: Store) -> None:
    commits = store.writer.commits

    async def one(i: int) -> None:
        state, _ = await store.create(NewStream(namespace="seq", name=f"seq/{i}"))
        await store.append(state.id, b"hello %d" % i)
        await store.append(state.id, b"", close=True)
        await store.finish(state.id)

    await asyncio.gather(*(one(i) for i in range(48)))
    assert store.writer.commits - commits < 48, "creates, appends, closes and compactions were grouped"
    for i in range(48):
        state = await store.get_by_name(f"seq/{i}")
        assert state is not None and state.closed
        assert await store.read(state.id, 0, state.tail) == b"hello %d" % i


async def test_api_create_write_close_takes_two_commits(store: Store, settings: Settings) -> None:
    """The close joins the queued write, and a closed stream with one chunk needs no compaction."""
    async with LiveHub.open(store, settings) as hub:
        api = LocalStreams(store, hub, settings)
        calls: list[object] = []
        call = store.writer.call

        async def counted(fn: object, *args: object, **options: object) -> object:
            calls.append(fn)
            return await call(fn, *args, **options)  # type: ignore[arg-type]

        store.writer.call = counted  # type: ignore[method-assign]
        statements: list[str] = []
        if not store.postgres:
            store.writer._driver_connection().set_trace_callback(statements.append)
        commits = store.writer.commits
        stream = await api.create("short", content_type="text/plain")
        stream.write("a short answer")
        await stream.close()
        assert store.writer.commits - commits == 2, "one commit for the create, one for write and close"
        assert len(calls) == 1, "nothing to compact"
        reads = [s for s in statements if s.startswith("SELECT") and "WHERE streams.id" in s]
        assert reads == [], "the write finds the record the create left in the writer's cache"
        state = await store.get(stream.id)
        assert state is not None and state.closed and state.tail == len("a short answer")
        assert await store.read(stream.id, 0, state.tail) == b"a short answer"
        # A write that fails fails the close joined to it, which leaves nothing closed.
        gone = await api.create("short")
        await store.delete(gone.id)
        gone.write("late")
        with pytest.raises(StreamNotFoundError):
            await gone.close()


async def test_per_stream_caches_stay_within_their_bounds(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "NAME_CACHE", 20)
    monkeypatch.setattr(batches, "MAX_CACHED_ROWS", 15)
    monkeypatch.setattr(store_module.transactions, "SMALL_CHUNK", 1 << 30)  # count every chunk as small
    async with Store.open(settings) as store:
        names = [f"wide/{i}" for i in range(200)]
        ids = [(await store.create(NewStream(namespace="wide", name=n)))[0].id for n in names]
        for _ in range(2):
            for name, stream_id in zip(names, ids, strict=True):
                assert await store.resolve(name) is not None
                await store.append(stream_id, b"x" * (batches.PENDING_LIMIT + 1))
        assert len(store._names) <= 20
        assert len(store._ids) <= 20
        assert len(store._small_chunks) <= 20
        assert len(store.writer._rows) <= 15
        # Evicted by use: the streams used last are the ones kept.
        assert names[-1] in store._names and names[0] not in store._names
        assert set(store._ids.values()) == set(store._names)
        if not store.postgres:
            assert ids[-1] in store.writer._rows


def test_lru_forgets_the_least_recently_used_first() -> None:
    cache: LRU[str, int] = LRU(2)
    assert cache.put("a", 1) is None
    cache.put("b", 2)
    assert cache.get("a") == 1  # "b" is now the least recently used
    assert cache.put("c", 3) == ("b", 2)
    assert "a" in cache and "c" in cache and len(cache) == 2
    assert cache.get("b") is None
