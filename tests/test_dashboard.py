"""The dashboard at `/`: page and partials from one handler, filters, paging, deletes, sessions, CSRF."""

from __future__ import annotations

import dataclasses
import html
import json
import re
import statistics
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from litestar import Litestar
from sqlalchemy import create_engine, func, insert, select

from streamhold.main import create_app
from streamhold.models import new_stream_id
from streamhold.settings import Settings
from streamhold.store.schema import chunks, metadata_pairs, streams
from streamhold.store.transactions import NewStream
from streamhold.web import session
from streamhold.web.dashboard import Rate
from streamhold.web.dashboard_query import View

pytestmark = pytest.mark.timeout(120)

POLL = {"hx-request": "true", "hx-target": "streams"}
BOARD = {"hx-request": "true", "hx-target": "board"}
KEY = "dashboard-test-key-1"


class Client(httpx.AsyncClient):
    """An in-process client that also holds the app, whose store and hub run on the test's own event loop."""

    app: Litestar


@asynccontextmanager
async def serve(settings: Settings) -> AsyncIterator[Client]:
    """The app with its lifespan entered, in this task (Litestar's lifespan must exit where it started)."""
    app = create_app(settings)
    async with app.lifespan():
        async with Client(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as client:
            client.app = app
            yield client


def names(page: str) -> list[str]:
    """The stream names of the table rows, in order."""
    return [html.unescape(n) for n in re.findall(r'<tr data-id="[^"]+" data-name="([^"]*)"', page)]


def total(page: str) -> int:
    return int(re.search(r'data-total="(\d+)"', page).group(1))  # type: ignore[union-attr]


def csrf_of(page: str) -> str:
    return re.search(r'"X-CSRF-Token": "([0-9a-f]+)"', page).group(1)  # type: ignore[union-attr]


async def put(client: Client, name: str, body: bytes = b"", **headers: str) -> None:
    response = await client.put(f"/v1/stream/{name}", headers={"content-type": "text/plain", **headers})
    assert response.status_code == 201, response.text
    if body:
        response = await client.post(
            f"/v1/stream/{name}", content=body, headers={"content-type": "text/plain"}
        )
        assert response.status_code in (200, 204), response.text


async def create(client: Client, namespace: str, **options: Any) -> str:
    stream = await client.app.state.service.create(namespace, **options)
    return stream.id


async def test_one_handler_serves_page_table_and_board(settings: Settings) -> None:
    async with serve(settings) as client:
        await put(client, "exports/a1", b"hello")
        page = await client.get("/")
        assert page.status_code == 200 and page.text.startswith("<!doctype html>")
        assert 'id="figures"' in page.text and 'id="namespaces"' in page.text and 'id="filters"' in page.text
        assert page.headers["cache-control"] == "no-store" and "HX-Request" in page.headers["vary"]
        table = await client.get("/?namespace=exports", headers=POLL)
        assert table.text.lstrip().startswith('<div id="streams"') and "<html" not in table.text
        assert 'id="filters"' not in table.text and 'id="figures" class="dash-figures"' in table.text
        assert 'hx-swap-oob="true"' in table.text and "hx-push-url" not in table.headers
        board = await client.get("/?prefix=&namespace=exports&meta=&sort=created&dir=desc", headers=BOARD)
        assert board.text.lstrip().startswith('<section id="board"') and 'id="filters"' in board.text
        assert board.headers["hx-push-url"] == "/?namespace=exports"
        restore = await client.get("/", headers={**BOARD, "hx-history-restore-request": "true"})
        assert restore.text.startswith("<!doctype html>")


async def test_table_shows_every_column(settings: Settings) -> None:
    async with serve(settings) as client:
        await put(client, "exports/report 1.csv", b"x" * 2048)
        await client.post("/v1/stream/exports/report 1.csv", headers={"stream-closed": "true"})
        agent = await create(
            client, "agent", content_type="application/json", metadata={"user": "u<1>"}, ttl=3600
        )
        page = (await client.get("/")).text
        assert names(page) == [agent, "exports/report 1.csv"]
        row = page[page.index('data-name="exports/report 1.csv"') :].split("</tr>")[0]
        assert 'href="/watch/exports/report%201.csv"' in row and "stream_" in row
        assert ">exports<" in row and "text/plain" in row and "2.0 KiB" in row
        assert 'class="badge closed"' in row and "expiring" not in row and ">never<" in row
        row = page[page.index(f'data-name="{agent}"') :].split("</tr>")[0]
        assert f'href="/watch/{agent}"' in row and "application/json" in row and 'class="badge open"' in row
        assert 'class="badge expiring"' in row and "in 59 min" in row
        assert "user=u&lt;1&gt;" in row and "u<1>" not in row
        assert '<td class="num readers"><span class="muted">0</span>' in row
        with client.app.state.hub.watch(agent, "sse"):
            page = (await client.get("/")).text
            row = page[page.index(f'data-name="{agent}"') :].split("</tr>")[0]
            assert '<span class="reading">1</span>' in row
            assert re.search(r'data-figure="readers">1<', page) and "1 sse" in page
        assert re.search(r'data-figure="streams">2<', page) and re.search(r'data-figure="open">1<', page)
        assert re.search(r'data-figure="stored">2\.0 KiB<', page)
        panel = page[page.index('id="namespaces"') :].split("</section>")[0]
        assert panel.index('data-namespace="exports"') < panel.index('data-namespace="agent"')
        exports = panel[panel.index('data-namespace="exports"') :].split("</li>")[0]
        assert (
            '"ns-count">1<' in exports
            and '"ns-bytes">2.0 KiB<' in exports
            and 'href="/?namespace=exports"' in exports
        )
        agent_line = panel[panel.index('data-namespace="agent"') :].split("</li>")[0]
        assert '"ns-count">1<' in agent_line and '"ns-bytes">0 B<' in agent_line


async def test_filters_by_namespace_metadata_state_and_prefix(settings: Settings) -> None:
    async with serve(settings) as client:
        await put(client, "exports/a1", b"1")
        await put(client, "exports/a2")
        await client.post("/v1/stream/exports/a2", headers={"stream-closed": "true"})
        await put(client, "logs/b1")
        u1 = await create(client, "agent", metadata={"user": "u1", "env": "prod"})
        u1_dev = await create(client, "agent", metadata={"user": "u1", "env": "dev"}, ttl=600)
        await create(client, "agent", metadata={"user": "u2", "env": "prod"})

        async def shown(query: str) -> list[str]:
            response = await client.get("/?" + query, headers=POLL)
            return sorted(names(response.text))

        assert await shown("namespace=exports") == ["exports/a1", "exports/a2"]
        assert await shown("meta=user%3Du1") == sorted([u1, u1_dev])
        assert await shown("meta=user%3Du1&meta=env%3Dprod") == [u1]
        assert await shown("namespace=exports&state=closed") == ["exports/a2"]
        assert await shown("state=expiring") == [u1_dev]
        assert await shown("prefix=exports%2Fa") == ["exports/a1", "exports/a2"]
        assert await shown("prefix=" + u1[:-4]) == [u1]
        page = (await client.get("/?meta=user%3Du1")).text
        assert '<option value="agent">agent (2)</option>' in page and "exports (" not in page
        assert 'value="user=u1"' in page and 'aria-label="Remove user=u1"' in page
        page = (await client.get("/?namespace=gone&meta=oops")).text
        assert '<option value="gone" selected>gone (0)</option>' in page
        assert "is not a key=value pair" in page and total(page) == 0


def test_view_round_trips_through_the_url() -> None:
    view = View.from_query(
        "namespace=a&meta=k%3Dv%3Dw&meta=k%3Dv%3Dw&meta=x%3D&state=open&prefix=p&sort=size&dir=asc&page=3"
    )
    assert view.meta == (("k", "v=w"), ("x", ""))
    assert View.from_query(view.query) == view
    assert view.url(namespace="b").endswith("page=1") is False and "page=" not in view.url(namespace="b")
    assert view.url(page=4).endswith("page=4")
    assert View.from_query(urlsplit(view.sort_url("size")).query).direction == "desc"
    assert View.from_query(urlsplit(view.sort_url("namespace")).query).direction == "asc"
    bad = View.from_query("state=nope&sort=drop&dir=sideways&page=-2")
    assert (bad.state, bad.sort, bad.direction, bad.page) == ("", "created", "desc", 1) and bad.problems
    assert View().url() == "/"


async def test_sorts_and_pages(settings: Settings) -> None:
    async with serve(settings) as client:
        store = client.app.state.store
        now = time.time()
        rows = [_row(f"n{i % 3}", f"s{i:03d}", now - 1000 + i, tail=(i * 37) % 120) for i in range(120)]
        await store.writer.call(lambda conn: (conn.execute(insert(streams), rows), []))
        await store.reset_counters()
        first = (await client.get("/", headers=POLL)).text
        assert total(first) == 120 and names(first)[:2] == ["n2/s119", "n1/s118"] and len(names(first)) == 50
        assert "Page 1 of 3" in first and "1–50" in first
        last = (await client.get("/?page=3", headers=POLL)).text
        assert len(names(last)) == 20 and names(last)[-1] == "n0/s000" and "Page 3 of 3" in last
        beyond = (await client.get("/?page=99", headers=POLL)).text
        assert names(beyond) == names(last)
        by_size = names((await client.get("/?sort=size&dir=asc", headers=POLL)).text)
        sizes = {r["name"]: r["tail"] for r in rows}
        assert [sizes[n] for n in by_size] == sorted(sizes[n] for n in by_size)
        assert sizes[by_size[0]] == 0
        by_ns = names((await client.get("/?sort=namespace&dir=desc", headers=POLL)).text)
        assert {n.split("/")[0] for n in by_ns} == {"n2", "n1"} and by_ns[0].startswith("n2/")
        assert (
            'href="/?sort=size&amp;dir=asc&amp;page=2&amp;cursor='
            in (await client.get("/?sort=size&dir=asc")).text
        )


async def test_next_and_previous_links_walk_every_sort_by_cursor(settings: Settings) -> None:
    """Every sort's pages, followed through their Next links and back through Previous, show each stream once,
    in order, ties broken by id; a new stream created meanwhile shifts no row onto a second page."""
    async with serve(settings) as client:
        store = client.app.state.store
        now = time.time()
        # Ties in every sort key: three creation times, four sizes, two namespaces.
        rows = [_row(f"n{i % 2}", f"s{i:03d}", now - 100 + i % 3, tail=i % 4) for i in range(120)]
        await store.writer.call(lambda conn: (conn.execute(insert(streams), rows), []))
        await store.reset_counters()
        by_name = {r["name"]: r for r in rows}
        keys = {
            "created": lambda r: (r["created_at"], r["id"]),
            "size": lambda r: (r["tail"], r["id"]),
            "namespace": lambda r: (r["namespace"], r["created_at"], r["id"]),
        }

        def link(page: str, rel: str) -> str | None:
            found = re.search(rf'href="([^"]+)"[^>]*class="{rel}"|class="{rel}"[^>]*href="([^"]+)"', page)
            return html.unescape(found.group(1) or found.group(2)) if found else None

        for sort, key in keys.items():
            for direction in ("asc", "desc"):
                expected = [r["name"] for r in sorted(rows, key=key, reverse=direction == "desc")]
                url: str | None = f"/?sort={sort}&dir={direction}"
                seen: list[str] = []
                pages = []
                back: str | None = None
                while url is not None:
                    page = (await client.get(url, headers=POLL)).text
                    pages.append(names(page))
                    seen += names(page)
                    if len(pages) == 1:  # a stream created after the first page: not on the later ones
                        await store.create(NewStream(namespace="n0", name=f"late-{sort}-{direction}"))
                    url = link(page, "next")
                    if len(pages) == 3:
                        back = link(page, "prev")
                assert [n for n in seen if n in by_name] == expected, (sort, direction)
                assert len(pages) == 3 and back is not None and "cursor=" in back
                assert names((await client.get(back, headers=POLL)).text) == pages[1]


async def test_a_poll_that_finds_nothing_new_swaps_only_the_figures(settings: Settings) -> None:
    async with serve(settings) as client:
        await put(client, "live/a", b"abc")
        table = await client.get("/?namespace=live", headers=POLL)
        poll_url = html.unescape(re.search(r'hx-get="([^"]+)"', table.text).group(1))  # type: ignore[union-attr]
        assert parse_qs(urlsplit(poll_url).query)["namespace"] == ["live"]
        same = await client.get(poll_url, headers=POLL)
        assert same.headers["hx-reswap"] == "none"
        assert (
            'id="streams"' not in same.text
            and 'id="figures"' in same.text
            and 'hx-swap-oob="true"' in same.text
        )
        await client.post("/v1/stream/live/a", content=b"more bytes", headers={"content-type": "text/plain"})
        grown = await client.get(poll_url, headers=POLL)
        assert "hx-reswap" not in grown.headers and "13 B" in grown.text


def test_rate_samples_the_writer_counters() -> None:
    rate = Rate()
    assert rate.sample(100, 1000, now=0.0) is None
    assert rate.sample(150, 1500, now=0.2) is None
    assert rate.sample(300, 3000, now=2.0) == (100.0, 1000.0)
    for t in range(3, 40):
        last = rate.sample(300 + 10 * (t - 2), 0, now=float(t))
    assert last is not None and last[0] == pytest.approx(10.0)


async def test_delete_one_ends_readers_and_purges_chunks(settings: Settings) -> None:
    async with serve(settings) as client:
        await put(client, "exports/gone", b"x" * 5000)
        await put(client, "exports/kept", b"y")
        store, hub = client.app.state.store, client.app.state.hub
        doomed = await store.get_by_name("exports/gone")
        page = (await client.get("/?namespace=exports")).text
        delete_url = html.unescape(
            re.search(rf'hx-delete="(/dashboard/streams/{doomed.id}[^"]*)"', page).group(1)
        )  # type: ignore[union-attr]
        with hub.watch(doomed.id, "sse") as waiter:
            response = await client.delete(delete_url, headers={**BOARD, "x-csrf-token": csrf_of(page)})
            assert response.status_code == 200
            assert await waiter.wait(2) or waiter.gone
            assert waiter.gone
        assert names(response.text) == ["exports/kept"] and "Deleted exports/gone." in response.text
        assert "hx-push-url" not in response.headers and 'id="figures"' in response.text
        assert (await client.get("/v1/stream/exports/gone")).status_code == 404
        assert (await client.post(f"/stream/{doomed.id}/info", json={})).status_code == 404
        engine = create_engine(settings.sqlalchemy_url)
        try:
            with engine.connect() as conn:
                left = conn.execute(
                    select(func.count()).select_from(chunks).where(chunks.c.stream_id == doomed.id)
                )
                assert left.scalar_one() == 0
        finally:
            engine.dispose()
        again = await client.delete(delete_url, headers={**BOARD, "x-csrf-token": csrf_of(page)})
        assert again.status_code == 200 and "already gone" in again.text


async def test_delete_every_stream_of_a_filter(settings: Settings) -> None:
    async with serve(settings) as client:
        for i in range(4):
            await put(client, f"tmp/t{i}", b"z" * 100)
        await put(client, "keep/k")
        page = (await client.get("/?namespace=tmp")).text
        button = re.search(r'hx-delete="(/dashboard/streams\?[^"]+)"\s+hx-confirm="([^"]+)"', page)
        assert button is not None
        url, confirm = html.unescape(button.group(1)), html.unescape(button.group(2))
        assert "expected=4" in url and confirm.startswith("Delete all 4 streams matching this filter?")
        token = {"x-csrf-token": csrf_of(page)}
        await put(client, "tmp/late")
        refused = await client.delete(url, headers={**BOARD, **token})
        assert "Nothing was deleted" in refused.text and total(refused.text) == 5
        url = url.replace("expected=4", "expected=5")
        done = await client.delete(url, headers={**BOARD, **token})
        assert "Deleted 5 streams." in done.text and total(done.text) == 0
        engine = create_engine(settings.sqlalchemy_url)
        try:
            with engine.connect() as conn:
                names_left = conn.execute(select(streams.c.name).where(streams.c.namespace == "tmp")).all()
                chunks_left = conn.execute(select(func.count()).select_from(chunks)).scalar_one()
            assert names_left == [] and chunks_left == 0
        finally:
            engine.dispose()
        assert names((await client.get("/", headers=POLL)).text) == ["keep/k"]
        missing = await client.delete("/dashboard/streams?namespace=keep", headers={**BOARD, **token})
        assert missing.status_code == 400


async def test_changes_need_the_csrf_token_even_without_keys(settings: Settings) -> None:
    async with serve(settings) as client:
        await put(client, "a/b")
        state = await client.app.state.store.get_by_name("a/b")
        page = (await client.get("/")).text
        assert 'action="/signout"' not in page
        assert (await client.delete(f"/dashboard/streams/{state.id}", headers=BOARD)).status_code == 403
        forged = {**BOARD, "x-csrf-token": "0" * 64}
        assert (await client.delete(f"/dashboard/streams/{state.id}", headers=forged)).status_code == 403
        cross = {**BOARD, "x-csrf-token": csrf_of(page), "origin": "https://evil.example"}
        assert (await client.delete(f"/dashboard/streams/{state.id}", headers=cross)).status_code == 403
        assert await client.app.state.store.get(state.id) is not None
        same = {**BOARD, "x-csrf-token": csrf_of(page), "origin": "http://127.0.0.1"}
        assert (await client.delete(f"/dashboard/streams/{state.id}", headers=same)).status_code == 200
        assert (await client.get("/signin")).headers["location"] == "/"


async def test_keys_require_a_session(settings: Settings) -> None:
    async with serve(dataclasses.replace(settings, api_keys=(KEY, "other-key"))) as keyed:
        await keyed.put(
            "/v1/stream/x/1", headers={"authorization": f"Bearer {KEY}", "content-type": "text/plain"}
        )
        state = await keyed.app.state.store.get_by_name("x/1")
        page = await keyed.get("/?namespace=x")
        assert page.status_code == 303 and page.headers["location"] == "/signin?next=/%3Fnamespace%3Dx"
        partial = await keyed.get(
            "/?namespace=x", headers={**POLL, "hx-current-url": "http://127.0.0.1/?namespace=x"}
        )
        assert (
            partial.status_code == 401 and partial.headers["hx-redirect"] == "/signin?next=/%3Fnamespace%3Dx"
        )
        assert "stream" not in partial.text.lower().replace("sign in first", "")
        deleted = await keyed.delete(f"/dashboard/streams/{state.id}", headers={"x-csrf-token": "a" * 64})
        assert deleted.status_code == 401
        cross = await keyed.get("/", headers={"sec-fetch-site": "cross-site"})
        assert cross.status_code == 200 and 'http-equiv="refresh"' in cross.text
        form = await keyed.get("/signin?next=/%3Fnamespace%3Dx")
        assert 'type="password" name="key"' in form.text and 'value="/?namespace=x"' in form.text
        wrong = await keyed.post("/signin", data={"key": "nope", "next": "/"})
        assert (
            wrong.status_code == 401
            and "not one of this server" in wrong.text
            and session.COOKIE not in wrong.cookies
        )
        evil = await keyed.post("/signin", data={"key": KEY}, headers={"origin": "https://evil.example"})
        assert evil.status_code == 403
        ok = await keyed.post("/signin", data={"key": KEY, "next": "//evil.example/"})
        assert ok.status_code == 303 and ok.headers["location"] == "/"
        cookie = ok.headers["set-cookie"].lower()
        assert (
            "httponly" in cookie
            and "samesite=strict" in cookie
            and "max-age=43200" in cookie
            and "path=/" in cookie
        )
        page = await keyed.get("/?namespace=x")
        assert page.status_code == 200 and names(page.text) == ["x/1"] and 'action="/signout"' in page.text
        token = csrf_of(page.text)
        assert (await keyed.delete(f"/dashboard/streams/{state.id}", headers=BOARD)).status_code == 403
        assert (
            await keyed.delete(f"/dashboard/streams/{state.id}", headers={**BOARD, "x-csrf-token": token})
        ).status_code == 200
        assert (await keyed.post("/signout", data={})).status_code == 403
        out = await keyed.post("/signout", data={"csrf": token})
        assert (
            out.status_code == 303
            and out.headers["location"] == "/signin"
            and "max-age=0" in out.headers["set-cookie"].lower()
        )
        keyed.cookies.clear()
        assert (await keyed.get("/")).status_code == 303


def test_session_cookies_are_signed_expire_and_die_with_their_key() -> None:
    settings = Settings(api_keys=("k1", "k2"))
    value = session.issue("k2", now=1000.0)
    current = session.verify(value, settings, now=1001.0)
    assert current is not None and current.signed_in and len(current.csrf) == 64
    assert session.verify(value, settings, now=1000.0 + session.SESSION_SECONDS) is None
    assert session.verify(value, Settings(api_keys=("k1",)), now=1001.0) is None
    head, _, mac = value.rpartition(".")
    assert session.verify(f"{head}.{'0' * len(mac)}", settings, now=1001.0) is None
    forged_expiry = value.replace(value.split(".")[1], str(10**12), 1)
    assert session.verify(forged_expiry, settings, now=1001.0) is None
    other = session.verify(session.issue("k2", now=1000.0), settings, now=1001.0)
    assert other is not None and other.csrf != current.csrf
    assert [session.safe_next(u) for u in ("/?a=1", "//x.example", "https://x.example", "/\\x")] == [
        "/?a=1",
        "/",
        "/",
        "/",
    ]


def _row(namespace: str, name: str, created: float, tail: int = 0, **extra: Any) -> dict[str, Any]:
    return {
        "id": new_stream_id(),
        "name": f"{namespace}/{name}",
        "namespace": namespace,
        "content_type": "text/plain",
        "json_mode": False,
        "metadata_json": json.dumps(extra.pop("metadata", {})),
        "created_at": created,
        "updated_at": created,
        "closed_at": None,
        "tail": tail,
        "stored_bytes": tail,
        "appends": 1,
        "compact_from": 0,
        "compress": False,
        "compressed": False,
        "ttl_seconds": None,
        "sliding": False,
        "expires_at": None,
        "last_seq": None,
        "fork_source": None,
        "fork_offset": None,
        "deleted": False,
        **extra,
    }


async def test_ten_thousand_streams_stay_fast(settings: Settings) -> None:
    async with serve(settings) as client:
        store = client.app.state.store
        now = time.time()
        rows, pairs = [], []
        for i in range(10_000):
            expires = now + 3600 + i * 60 if i % 4 else None
            row = _row(
                f"ns{i % 20}",
                f"s{i}",
                now - i,
                tail=(i * 7919) % 1_000_000,
                expires_at=expires,
                closed_at=now if i % 3 == 0 else None,
                metadata={"user": f"u{i % 50}"},
            )
            rows.append(row)
            pairs.append({"stream_id": row["id"], "key": "user", "value": f"u{i % 50}"})

        def load(conn: Any) -> tuple[None, list[Any]]:
            conn.execute(insert(streams), rows)
            conn.execute(insert(metadata_pairs), pairs)
            return None, []

        await store.writer.call(load)
        await store.reset_counters()
        timings: dict[str, float] = {}
        for label, query in [
            ("first page", ""),
            ("deep page by size", "sort=size&dir=asc&page=150"),
            ("namespace + metadata + state", "namespace=ns7&meta=user%3Du7&state=open"),
        ]:
            seconds = []
            for _ in range(5):
                started = time.perf_counter()
                response = await client.get("/?" + query, headers=POLL)
                seconds.append(time.perf_counter() - started)
                assert response.status_code == 200
            timings[label] = statistics.median(seconds) * 1000
            if not query:
                assert total(response.text) == 10_000 and len(names(response.text)) == 50
        started = time.perf_counter()
        full = await client.get("/")
        timings["full page"] = (time.perf_counter() - started) * 1000
        assert "Page 1 of 200" in full.text and '<option value="ns0">ns0 (500)</option>' in full.text
        engine = "postgres" if settings.database_url else "sqlite"
        print(f"\n10,000 streams on {engine}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in timings.items()))
        assert max(timings.values()) < 300, timings
