"""The dashboard's row of the access matrix: who may sign in, and what each sign-in sees and may delete.

An API key's sign-in sees everything; a `manage` token's sees, filters, counts and deletes only the streams
of its namespaces (exact, or a prefix written `exports/*`), and reads private streams in the viewer only
there. A token without `manage` cannot sign in; a revoked or expired token's sign-in is over on its next
request, on every process. All on SQLite, in process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar import Litestar

from streamhold.main import create_app
from streamhold.models import StreamFilter
from streamhold.settings import Settings
from streamhold.store.store import NewStream, Store
from streamhold.web import session
from tests.test_dashboard import BOARD, csrf_of, names, total

pytestmark = pytest.mark.timeout(60)

KEY = "dashboard-access-key"
ADMIN = {"authorization": f"Bearer {KEY}"}
BASE = "http://127.0.0.1"
# name -> (namespace, private); the SDK's streams are named by their id, so the table shows ids for them.
STREAMS = {
    "chat-public": ("chat", False),
    "chat-private": ("chat", True),
    "exports-private": ("exports", True),
    "daily-public": ("exports/daily", False),
    "other-public": ("other", False),
    "other-private": ("other", True),
}
# Who sees which streams, and which namespaces their figures show.
SEES = {
    "admin": set(STREAMS),
    "chat": {"chat-public", "chat-private"},
    "exports": {"exports-private", "daily-public"},
}


@asynccontextmanager
async def app_on(data_dir: Path) -> AsyncIterator[Litestar]:
    app = create_app(Settings(data_dir=data_dir, api_keys=(KEY,), public_url=BASE))
    async with app.lifespan():
        yield app


def browser(app: Litestar) -> httpx.AsyncClient:
    """A browser of its own: its own cookie jar, against the app in process."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE)


async def mint(app: Litestar, scopes: list[str], namespaces: list[str], ttl: float = 0) -> dict[str, Any]:
    async with browser(app) as admin:
        made = await admin.post(
            "/tokens", json={"scopes": scopes, "namespaces": namespaces, "ttl": ttl}, headers=ADMIN
        )
    assert made.status_code == 201, made.text
    return dict(made.json())


async def sign_in(client: httpx.AsyncClient, secret: str) -> httpx.Response:
    return await client.post("/signin", data={"key": secret, "next": "/"})


async def seed(app: Litestar) -> dict[str, str]:
    """The streams of `STREAMS`; returns name -> stream id."""
    store: Store = app.state.store
    ids = {}
    for name, (namespace, private) in STREAMS.items():
        visibility = "private" if private else "public"
        made = NewStream(namespace, "text/plain", initial=name.encode(), visibility=visibility)
        state, _ = await store.create(made)
        ids[name] = state.id
    return ids


async def live_names(store: Store, ids: dict[str, str]) -> set[str]:
    by_id = {stream_id: name for name, stream_id in ids.items()}
    _, states = await store.list(StreamFilter())
    return {by_id[s.id] for s in states}


def figure(page: str, name: str) -> str:
    return re.search(rf'data-figure="{name}">([^<]*)<', page).group(1)  # type: ignore[union-attr]


def namespaces_shown(page: str) -> set[str]:
    return set(re.findall(r'<li[^>]* data-namespace="([^"]+)"', page))


async def observe(client: httpx.AsyncClient, ids: dict[str, str], own: str) -> dict[str, Any]:
    """What one sign-in gets for each operation of the matrix (deleting last)."""
    by_id = {stream_id: name for name, stream_id in ids.items()}
    got: dict[str, Any] = {}
    page = await client.get("/")
    got["list"] = page.status_code
    if page.status_code != 200:
        got["location"] = page.headers.get("location")
        got["delete other"] = (
            await client.delete(f"/dashboard/streams/{ids['other-public']}", headers=BOARD)
        ).status_code
        return got
    got["shown"] = {by_id[n] for n in names(page.text)}
    got["total"] = total(page.text)
    got["figure"] = (figure(page.text, "streams"), figure(page.text, "open"), figure(page.text, "appends"))
    got["namespaces"] = namespaces_shown(page.text)
    filtered = await client.get("/?namespace=other")
    got["filter other"] = (
        filtered.status_code,
        {by_id[n] for n in names(filtered.text)},
        total(filtered.text),
    )
    chat = await client.get("/?namespace=chat")
    got["filter chat"] = {by_id[n] for n in names(chat.text)}
    charts = await client.get("/", headers={"hx-request": "true", "hx-target": "charts"})
    got["charts"] = charts.status_code
    got["view chat-private"] = (await client.get(f"/watch/{ids['chat-private']}")).status_code
    got["view other-private"] = (await client.get(f"/watch/{ids['other-private']}")).status_code
    got["view other-public"] = (await client.get(f"/watch/{ids['other-public']}")).status_code
    change = {**BOARD, "x-csrf-token": csrf_of(page.text)}
    other = await client.delete(f"/dashboard/streams/{ids['other-public']}", headers=change)
    got["delete other"] = other.status_code
    if other.status_code == 403:
        got["delete other says"] = other.text
    got["delete own"] = (await client.delete(f"/dashboard/streams/{ids[own]}", headers=change)).status_code
    return got


async def test_the_dashboard_matrix(tmp_path: Path) -> None:
    async with app_on(tmp_path) as app:
        ids = await seed(app)
        store: Store = app.state.store
        expired = await mint(app, ["read", "manage"], ["chat"], ttl=1)
        minted_at = time.monotonic()
        tokens = {
            "chat": await mint(app, ["read", "manage"], ["chat"]),
            "exports": await mint(app, ["read", "manage"], ["exports/*"]),
            "readonly": await mint(app, ["read"], ["chat"]),
            "revoked": await mint(app, ["read", "manage"], ["chat"]),
            "expired": expired,
        }
        clients = {who: browser(app) for who in ("admin", *tokens)}
        try:
            assert (await sign_in(clients["admin"], KEY)).status_code == 303
            for who, made in tokens.items():
                signed = await sign_in(clients[who], made["token"])
                if who == "readonly":
                    assert signed.status_code == 403 and "this token lacks the manage scope" in signed.text
                    assert session.COOKIE not in signed.cookies
                else:
                    assert signed.status_code == 303 and session.COOKIE in signed.cookies, who
            async with browser(app) as admin_api:
                unknown = await sign_in(admin_api, "sht_0123456789abcdef_" + "0" * 64)
                assert unknown.status_code == 401 and "not one of this server" in unknown.text
                revoked = await admin_api.delete(f"/tokens/{tokens['revoked']['id']}", headers=ADMIN)
                assert revoked.status_code == 204
            await asyncio.sleep(max(0.0, 1.1 - (time.monotonic() - minted_at)))

            # Token sign-ins first: the admin's deletes come last, so every sign-in sees the same streams.
            own = {"chat": "chat-public", "exports": "daily-public", "admin": "other-private"}
            got = {
                who: await observe(clients[who], ids, own.get(who, ""))
                for who in (*own, "revoked", "expired")
            }
            got["readonly"] = {"list": (await clients["readonly"].get("/")).status_code}
        finally:
            for client in clients.values():
                await client.aclose()

        ended = {"list": 303, "location": "/signin?ended=token", "delete other": 401}
        assert got["revoked"] == ended and got["expired"] == ended
        assert got["readonly"] == {"list": 303}
        outside = "this sign-in's token does not cover namespace other: nothing was deleted"
        assert got["chat"] == {
            "list": 200,
            "shown": SEES["chat"],
            "total": 2,
            "figure": ("2", "2", "—"),
            "namespaces": {"chat"},
            "filter other": (200, set(), 0),
            "filter chat": SEES["chat"],
            "charts": 403,
            "view chat-private": 200,
            "view other-private": 403,
            "view other-public": 200,
            "delete other": 403,
            "delete other says": outside,
            "delete own": 200,
        }
        assert got["exports"] == {
            **got["chat"],
            "shown": SEES["exports"],
            "namespaces": {"exports", "exports/daily"},
            "filter chat": set(),
            "view chat-private": 403,
        }
        assert got["admin"]["shown"] == set(STREAMS) - {"chat-public", "daily-public"}, "after their deletes"
        assert got["admin"]["total"] == 4 and got["admin"]["figure"][:2] == ("4", "4")
        assert got["admin"]["namespaces"] == {"chat", "exports", "other"}
        assert got["admin"]["filter other"] == (200, {"other-public", "other-private"}, 2)
        assert got["admin"]["charts"] == 200
        assert [got["admin"][f"view {n}"] for n in ("chat-private", "other-private", "other-public")] == [
            200
        ] * 3
        assert got["admin"]["delete other"] == 200 and got["admin"]["delete own"] == 200
        assert await live_names(store, ids) == {"chat-private", "exports-private"}


async def test_a_token_sign_in_bulk_deletes_only_its_namespaces(tmp_path: Path) -> None:
    async with app_on(tmp_path) as app:
        ids = await seed(app)
        made = await mint(app, ["manage"], ["exports/*"])
        async with browser(app) as client:
            assert (await sign_in(client, made["token"])).status_code == 303
            page = await client.get("/?state=open")
            assert total(page.text) == 2
            change = {**BOARD, "x-csrf-token": csrf_of(page.text)}
            # A manage token without `read` lists its private streams but does not read them.
            assert (await client.get(f"/watch/{ids['exports-private']}")).status_code == 403
            # Its page's CSRF token stops a writer only where the token may write, and starts no demo.
            stop = await client.post(f"/stream/{ids['daily-public']}/stop", headers=change)
            assert stop.status_code == 403 and "lacks the write scope" in stop.text
            demo = await client.post("/demo", data={"csrf": csrf_of(page.text)})
            assert demo.status_code == 403 and "demo needs an API key" in demo.text
            # Confirming 2 streams of an unfiltered view deletes the token's 2, not the server's 6.
            done = await client.delete("/dashboard/streams?expected=2", headers=change)
            assert done.status_code == 200 and "Deleted 2 streams." in done.text
        assert await live_names(app.state.store, ids) == set(STREAMS) - SEES["exports"]


async def test_a_revocation_ends_the_sign_in_on_another_process(tmp_path: Path) -> None:
    async with app_on(tmp_path) as one, app_on(tmp_path) as two:
        await seed(one)
        made = await mint(one, ["manage"], ["chat"])
        async with browser(one) as first, browser(two) as second:
            assert (await sign_in(first, made["token"])).status_code == 303
            second.cookies.update(first.cookies)
            page = await second.get("/")
            assert page.status_code == 200 and total(page.text) == 2, "one sign-in, both processes"
            async with browser(one) as admin:
                assert (await admin.delete(f"/tokens/{made['id']}", headers=ADMIN)).status_code == 204
            started = time.monotonic()
            statuses = []
            while time.monotonic() - started < 3.0:  # bounded: the claim is one second
                statuses.append((await second.get("/")).status_code)
                if statuses[-1] != 200:
                    break
                await asyncio.sleep(0.02)
            elapsed = time.monotonic() - started
            assert statuses[-1] == 303 and elapsed < 1.0, (statuses, elapsed)
            ended = await second.get("/", headers={"hx-request": "true", "hx-target": "streams"})
            assert ended.status_code == 401 and ended.headers["hx-redirect"] == "/signin?ended=token"
            form = await second.get("/signin?ended=token")
            assert "revoked or has expired" in form.text


def test_an_older_database_gains_the_token_column(tmp_path: Path) -> None:
    async def open_and_add(id_hash: str, token_id: str | None = None) -> None:
        async with Store.open(Settings(data_dir=tmp_path)) as store:
            await store.sign_ins.add(id_hash, time.time() + 60, token_id)

    asyncio.run(open_and_add("a" * 64))
    with sqlite3.connect(tmp_path / "streamhold.db") as conn:
        conn.execute("ALTER TABLE sessions DROP COLUMN token_id")
    asyncio.run(open_and_add("b" * 64, "t1"))
    with sqlite3.connect(tmp_path / "streamhold.db") as conn:
        kept = conn.execute("SELECT id_hash, token_id FROM sessions ORDER BY id_hash").fetchall()
    assert kept == [("a" * 64, None), ("b" * 64, "t1")]


def test_token_sign_in_cookies_are_signed_by_their_token() -> None:
    from streamhold.store.tokens import TokenRecord

    record = TokenRecord("t1", ("manage",), ("chat",), "", 0.0, None, None, "ab" * 32)
    value = session._signed(session._token_secret(record), 2000)
    found = session.verify_token(value, record, now=1000.0)
    assert found is not None and found.scoped and found.principal.namespaces == ("chat",)
    assert session.verify(value, Settings(api_keys=("k",)), now=1000.0) is None, "not an API key's cookie"
    other = dataclasses.replace(record, secret_hash="cd" * 32)
    assert session.verify_token(value, other, now=1000.0) is None
    assert session.verify_token(value, dataclasses.replace(record, revoked_at=999.0), now=1000.0) is None
    assert session.verify_token(value, dataclasses.replace(record, expires_at=1000.0), now=1000.0) is None
