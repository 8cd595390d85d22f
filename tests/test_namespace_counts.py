"""The namespace counters (store/counts.py) against a recount, the sweep's bounded batches, and cursors."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import create_engine, event, func, inspect, select, text, update

from streamhold.errors import InvalidRequestError
from streamhold.main import create_app
from streamhold.models import StreamFilter
from streamhold.settings import Settings
from streamhold.store import counts, listing, transactions
from streamhold.store.schema import STREAM_INDEXES, namespace_counts, streams
from streamhold.store.store import Store
from streamhold.store.transactions import NewStream
from tests._cluster import cluster, fresh_database, server_errors
from tests._server import ServerProcess


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    async with Store.open(settings) as opened:
        yield opened


async def agree(store: Store) -> dict[str, counts.Totals]:
    """Assert that the summary (from the counters) equals a recount of the streams; return the totals."""
    recount = await asyncio.to_thread(counts.recount_totals, store._read_engine, time.time())
    summary = await store.summary()
    from_counters = {n["namespace"]: (n["streams"], n["stored_bytes"]) for n in summary["namespaces"]}
    assert from_counters == {n: (t.streams, t.stored_bytes) for n, t in recount.items()}
    whole = counts.summed(recount)
    assert (summary["streams"], summary["open"], summary["stored_bytes"], summary["content_bytes"]) == (
        whole.streams,
        whole.open,
        whole.stored_bytes,
        whole.content_bytes,
    )
    for namespace, totals in recount.items():  # and the listing's totals, by namespace and state
        for state, expected in (
            (None, totals.streams),
            ("open", totals.open),
            ("closed", totals.streams - totals.open),
        ):
            total, _ = await store.list(StreamFilter(namespace=namespace, state=state), limit=1)
            assert total == expected, (namespace, state)
    return recount


def expire(store: Store, stream_id: str) -> None:
    with store._write_engine.begin() as conn:
        conn.execute(update(streams).where(streams.c.id == stream_id).values(expires_at=time.time() - 1))


async def test_counters_stay_exact_through_every_change(store: Store) -> None:
    a, _ = await store.create(NewStream(namespace="a", name="a/1", initial=b"hello"))
    b, _ = await store.create(NewStream(namespace="a", name="a/2"))
    c, _ = await store.create(NewStream(namespace="b", name="b/1", closed=True, initial=b"done"))
    assert (await agree(store))["a"] == counts.Totals(2, 2, 5, 5)
    await store.append(a.id, b" world")
    await store.append(b.id, b"x" * 5000)  # more than the pending limit: a chunk
    await store.append(b.id, b"", close=True, compress=True)
    await store.finish(b.id)  # compressed: its stored bytes shrink
    compressed = await store.get(b.id)
    assert compressed is not None and compressed.compressed
    totals = await agree(store)
    assert totals["a"].open == 1 and totals["a"].content_bytes == 5011
    assert totals["a"].stored_bytes == 11 + compressed.stored_bytes
    # A fork counts its source's bytes below the fork point as content; deleting the source keeps it for
    # the fork (soft delete) and takes it out of the totals once.
    fork, _ = await store.create(NewStream(namespace="b", name="b/fork", fork_from="a/1"))
    await agree(store)
    await store.delete(a.id)
    assert (await agree(store))["a"].streams == 1
    await store.sweep()
    await agree(store)
    # Expiry: counted out the moment it expires (before the sweep), and by the sweep for good.
    expire(store, c.id)
    assert (await agree(store))["b"].streams == 1
    assert await store.sweep() == 1
    await agree(store)
    # The same name made again after its expiry, and once more after the sweep retired the first.
    expire(store, b.id)
    again, created = await store.create(NewStream(namespace="a", name="a/2", initial=b"new"))
    assert created and again.id != b.id
    assert (await agree(store))["a"] == counts.Totals(1, 1, 3, 3)
    await store.delete(fork.id)
    await store.sweep()  # the deleted source goes with its last fork
    totals = await agree(store)
    assert "b" not in totals
    assert await store.delete_matching(StreamFilter(namespace="a")) == 1
    assert await agree(store) == {}
    await store.sweep()
    with store._read_engine.connect() as conn:  # folded into slot 0, and namespaces at zero forgotten
        assert conn.execute(select(namespace_counts)).all() == []


async def test_two_stores_writing_at_once_keep_the_counters_exact(settings: Settings) -> None:
    """Two stores on one database (two processes) create, append, close and delete in the same namespaces."""
    async with Store.open(settings) as one, Store.open(settings) as two:

        async def work(store: Store, tag: str) -> None:
            for i in range(12):
                state, _ = await store.create(NewStream(namespace=f"ns{i % 3}", name=f"{tag}-{i}"))
                await store.append(state.id, b"abc" * i, close=i % 2 == 0)
                if i % 4 == 0:
                    await store.delete(state.id)

        await asyncio.gather(work(one, "one"), work(two, "two"))
        await agree(one)
        await one.sweep()  # folds both stores' slots into one
        await two.sweep()
        totals = await agree(two)
        assert sum(t.streams for t in totals.values()) == 18
        with one._read_engine.connect() as conn:
            slots = set(conn.scalars(select(namespace_counts.c.slot)))
        assert slots == {0}


async def test_an_older_database_gets_its_indexes_and_counters(settings: Settings) -> None:
    async with Store.open(settings) as store:
        for i in range(3):
            await store.create(NewStream(namespace="old", name=f"old-{i}", initial=b"ab"))
        with store._write_engine.begin() as conn:  # as a version without them left it
            conn.execute(text("DROP TABLE namespace_counts"))
            for index in STREAM_INDEXES:
                conn.execute(text(f"DROP INDEX {index.name}"))
            conn.execute(text("CREATE INDEX ix_streams_namespace ON streams (namespace)"))
    async with Store.open(settings) as store:
        assert (await agree(store))["old"] == counts.Totals(3, 3, 6, 6)
        with store._read_engine.connect() as conn:
            names = {i["name"] for i in inspect(conn).get_indexes("streams")}
        assert {i.name for i in STREAM_INDEXES} <= names and "ix_streams_namespace" not in names


async def test_the_sweep_deletes_in_bounded_transactions(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transactions, "SWEEP_BATCH", 3)
    found: list[int] = []
    sweep = transactions.sweep

    def counted(*args: Any) -> Any:
        result = sweep(*args)
        found.append(result[0][0])
        return result

    monkeypatch.setattr(transactions, "sweep", counted)
    for i in range(8):
        state, _ = await store.create(NewStream(namespace="gone", name=f"gone-{i}"))
        expire(store, state.id)
    assert await store.sweep() == 8
    assert max(found) <= 3 and len(found) >= 3
    assert await agree(store) == {}


@pytest.mark.parametrize("sort", list(listing.SORTS))
async def test_cursors_and_offsets_page_through_each_sort(store: Store, sort: str) -> None:
    """Every page by cursor, forwards and back, and by offset (from the nearer end), in the sort's order."""
    for i in range(23):
        state, _ = await store.create(
            NewStream(namespace=f"n{i % 2}", name=f"s{i:02d}", initial=b"x" * (i % 3))
        )
        if i % 4 == 0:
            await store.append(state.id, b"more")
    for direction in ("asc", "desc"):
        everything = (await store.listing(StreamFilter(), sort=sort, direction=direction, limit=1000)).streams
        keys = [listing.Cursor.of(s, sort, direction).keys for s in everything]
        assert keys == sorted(keys, reverse=direction == "desc") and len(everything) == 23
        order = [s.id for s in everything]
        walked: list[str] = []
        cursor = None
        pages = []
        while True:
            page = await store.listing(StreamFilter(), sort=sort, direction=direction, limit=5, cursor=cursor)
            pages.append(page)
            walked += [s.id for s in page.streams]
            if page.next is None:
                break
            cursor = page.next
        assert walked == order and len(pages) == 5
        back = await store.listing(
            StreamFilter(), sort=sort, direction=direction, limit=5, cursor=pages[-1].previous
        )
        assert [s.id for s in back.streams] == order[15:20] and back.previous is not None
        for offset in range(0, 25, 3):
            page = await store.listing(StreamFilter(), sort=sort, direction=direction, limit=4, offset=offset)
            assert [s.id for s in page.streams] == order[offset : offset + 4] and page.total == 23


@contextlib.contextmanager
def listing_statements(store: Store) -> Iterator[list[tuple[str, Any]]]:
    """The listing queries (those with an ORDER BY) the store runs meanwhile, with their parameters."""
    pages: list[tuple[str, Any]] = []

    def seen(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        if "ORDER BY" in statement:
            pages.append((statement, parameters))

    event.listen(store._read_engine, "before_cursor_execute", seen)
    try:
        yield pages
    finally:
        event.remove(store._read_engine, "before_cursor_execute", seen)


# Size and updated have no index: it cost appends too much (README, "A million streams").
@pytest.mark.parametrize("sort", ["created", "namespace", "name"])
async def test_every_indexed_sort_walks_its_index(store: Store, sort: str) -> None:
    """A page of these sorts, first or from a cursor, reads an index in its order: no scan, no sort."""
    for i in range(6):
        state, _ = await store.create(NewStream(namespace=f"n{i % 2}", name=f"s{i}", initial=b"x" * i))
        await store.append(state.id, b"more")
    with listing_statements(store) as pages:
        for direction in ("asc", "desc"):
            first = await store.listing(StreamFilter(), sort=sort, direction=direction, limit=2)
            await store.listing(StreamFilter(), sort=sort, direction=direction, limit=2, cursor=first.next)
    assert len(pages) == 4
    with store._read_engine.connect() as conn:
        for statement, parameters in pages:
            if store.postgres:
                # So small a table is cheaper to scan and sort: forbid both, so only a missing index sorts.
                conn.exec_driver_sql("SET LOCAL enable_seqscan = off; SET LOCAL enable_sort = off")
                with psycopg.ClientCursor(conn.connection.driver_connection) as explain:
                    explain.execute("EXPLAIN " + statement, parameters)
                    plan = [row[0] for row in explain.fetchall()]
                assert any("Index Scan" in step for step in plan), plan
                assert not any("Sort" in step for step in plan), plan
            else:
                plan = [row[3] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters)]
                assert any("USING INDEX" in step for step in plan), plan
                assert not any("TEMP B-TREE" in step for step in plan), plan


@pytest.mark.parametrize("sort", ["size", "updated"])
async def test_sqlite_sorts_without_an_index_scan_the_table_once(tmp_path: Path, sort: str) -> None:
    """No index gives these orders, so the page scans the table; the expiry condition must not turn into
    searches of the expiry index whose row ids SQLite gathers first (24 MiB of them at 1,000,000 streams)."""
    async with Store.open(Settings(data_dir=tmp_path)) as store:
        for i in range(40):
            ttl = 3600 if i % 2 else None
            state, _ = await store.create(NewStream(namespace="n", name=f"s{i}", ttl_seconds=ttl))
            await store.append(state.id, b"x" * i)
        with listing_statements(store) as pages:
            page = await store.listing(StreamFilter(), sort=sort, direction="desc", limit=5, offset=30)
        assert len(page.streams) == 5 and page.total == 40
        with store._read_engine.connect() as conn:
            conn.exec_driver_sql("ANALYZE")  # with statistics, as a database that has run a while has them
            for statement, parameters in pages:
                plan = [row[3] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters)]
                assert plan[0].startswith("SCAN streams") and not any("MULTI-INDEX" in s for s in plan), plan


async def test_a_cursor_not_ours_or_of_another_sort_is_refused(store: Store) -> None:
    await store.create(NewStream(namespace="n", name="one"))
    page = await store.listing(StreamFilter(), limit=1)
    cursor = listing.Cursor.of(page.streams[0], "created", "desc").encode()

    for bad, sort in (
        ("not-a-cursor", "created"),
        (cursor, "size"),
        (cursor[:-3], "created"),
        ("W10", "created"),
    ):
        with pytest.raises(InvalidRequestError, match="cursor"):
            await store.listing(StreamFilter(), sort=sort, cursor=bad)


async def test_the_list_api_pages_by_cursor_and_by_offset(settings: Settings) -> None:
    app = create_app(settings)
    async with AsyncTestClient(app, base_url="http://127.0.0.1") as client:
        for _ in range(7):
            assert (await client.post("/stream", json={"name": "pages"})).status_code == 200
        every = (await client.post("/stream/list", json={"limit": 100})).json()
        assert every["total"] == 7 and every["next_cursor"] is None
        order = [s["id"] for s in every["streams"]]
        walked, cursor = [], None
        while True:
            body: dict[str, Any] = {"limit": 3, "sort": "size", "direction": "asc"}
            page = (
                await client.post("/stream/list", json=body | ({"cursor": cursor} if cursor else {}))
            ).json()
            walked += [s["id"] for s in page["streams"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert sorted(walked) == sorted(order) and len(walked) == 7
        last = (await client.post("/stream/list", json={"limit": 3, "offset": 6})).json()
        assert [s["id"] for s in last["streams"]] == order[6:] and last["total"] == 7
        for bad in (5, "nope"):
            refused = await client.post("/stream/list", json={"cursor": bad})
            assert refused.status_code == 400 and "cursor" in refused.json()["error"]


def test_two_server_processes_on_postgresql_keep_the_counters_exact(pg_server: str, tmp_path: Path) -> None:
    """Two `streamhold serve` processes create, append to, close and delete streams of the same namespaces at
    once, both sweeping; the totals either answers equal a recount."""
    env = {"STREAMHOLD_DATA_DIR": str(tmp_path / "data"), "STREAMHOLD_SWEEP_INTERVAL": "0.2"}
    with fresh_database(pg_server) as url, cluster({**env, "STREAMHOLD_DATABASE_URL": url}) as servers:

        async def work(server: ServerProcess, tag: str) -> None:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:

                async def one(i: int) -> None:
                    path = f"/v1/stream/ns{i % 3}/{tag}-{i}"
                    assert (await client.put(path, headers={"content-type": "text/plain"})).status_code == 201
                    closing = {"stream-closed": "true"} if i % 2 else {}
                    sent = await client.post(
                        path, content=b"abc" * (i + 1), headers={"content-type": "text/plain", **closing}
                    )
                    assert sent.status_code == 204
                    if i % 5 == 0:
                        assert (await client.delete(path)).status_code == 204

                await asyncio.gather(*(one(i) for i in range(30)))

        async def both() -> None:
            await asyncio.gather(work(servers[0], "a"), work(servers[1], "b"))

        asyncio.run(both())
        engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
        try:
            recount = counts.recount_totals(engine, time.time())
            assert sum(t.streams for t in recount.values()) == 48
            for server in servers:
                listed = httpx.post(f"{server.url}/stream/list", json={"limit": 1}).json()
                assert listed["total"] == 48
                for namespace, totals in recount.items():
                    page = httpx.post(
                        f"{server.url}/stream/list", json={"name": namespace, "limit": 1}
                    ).json()
                    assert page["total"] == totals.streams
            with engine.connect() as conn:
                counted = {
                    n: (int(s), int(o), int(b), int(c))
                    for n, s, o, b, c in conn.execute(
                        select(
                            namespace_counts.c.namespace,
                            func.sum(namespace_counts.c.streams),
                            func.sum(namespace_counts.c.open),
                            func.sum(namespace_counts.c.stored_bytes),
                            func.sum(namespace_counts.c.content_bytes),
                        ).group_by(namespace_counts.c.namespace)
                    )
                }
            assert counted == {
                n: (t.streams, t.open, t.stored_bytes, t.content_bytes) for n, t in recount.items()
            }
            assert [server_errors(server) for server in servers] == [[], []]
        finally:
            engine.dispose()
