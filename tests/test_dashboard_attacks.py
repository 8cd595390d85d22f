"""Attacks on a scoped token's reach: look-alike namespaces, and routes that forget to check the namespace.

A token covers its namespaces exactly as `Principal.covers` says (case and all), on the dashboard, the
/stream API and the stop routes alike. All on SQLite (the default store), in process.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from streamhold.models import StreamFilter
from streamhold.settings import Settings
from streamhold.store.store import NewStream, Store
from streamhold.web import session
from tests.test_dashboard import BOARD, csrf_of, names, total
from tests.test_dashboard_access import KEY, app_on, browser, mint, sign_in

pytestmark = pytest.mark.timeout(60)

# Namespaces that look like `exports` or sit beside it: an `exports/*` token covers only the first two.
NAMESPACES = ("exports", "exports/daily", "Exports/secret", "EXPORTS", "exports2", "exports_x/y", "chat")
COVERED = {"exports", "exports/daily"}


async def seed(store: Store) -> dict[str, str]:
    """One private stream per namespace; returns stream id -> namespace."""
    made = {}
    for namespace in NAMESPACES:
        state, _ = await store.create(NewStream(namespace, "text/plain", initial=b"x", visibility="private"))
        made[state.id] = namespace
    return made


async def test_a_prefix_token_does_not_reach_namespaces_that_differ_only_in_case(tmp_path: Path) -> None:
    async with app_on(tmp_path) as app:
        store: Store = app.state.store
        namespace_of = await seed(store)
        made = await mint(app, ["read", "manage"], ["exports/*"])
        bearer = {"authorization": f"Bearer {made['token']}"}
        async with browser(app) as client:
            listed = await client.post("/stream/list", json={}, headers=bearer)
            assert listed.status_code == 200
            assert {namespace_of[s["id"]] for s in listed.json()["streams"]} == COVERED
            assert listed.json()["total"] == 2

            assert (await sign_in(client, made["token"])).status_code == 303
            page = await client.get("/")
            assert {namespace_of[n] for n in names(page.text)} == COVERED and total(page.text) == 2
            change = {**BOARD, "x-csrf-token": csrf_of(page.text)}
            done = await client.delete("/dashboard/streams?expected=10", headers=change)
            assert done.status_code == 200 and "Deleted 2 streams." in done.text
        _, left = await store.list(StreamFilter())
        assert sorted(s.namespace for s in left) == sorted(set(NAMESPACES) - COVERED)


async def test_namespace_patterns_match_exactly_on_both_engines(settings: Settings) -> None:
    async with Store.open(settings) as store:
        namespace_of = await seed(store)
        for extra in ("ex%orts/a", "exp_rts/b"):
            state, _ = await store.create(NewStream(extra, "text/plain", visibility="private"))
            namespace_of[state.id] = extra
        for patterns, expected in [
            (("exports/*",), COVERED),
            (("ex%orts/*", "exp_rts/*"), {"ex%orts/a", "exp_rts/b"}),
            (("Exports/*", "EXPORTS"), {"Exports/secret", "EXPORTS"}),
            (("exports_x/*",), {"exports_x/y"}),
        ]:
            total_found, found = await store.list(StreamFilter(namespaces=patterns))
            assert {namespace_of[s.id] for s in found} == expected, patterns
            assert total_found == len(expected)
            summary = await store.summary(StreamFilter(namespaces=patterns))
            assert {n["namespace"] for n in summary["namespaces"]} == expected


async def test_a_writer_asks_for_stops_only_in_its_namespaces(tmp_path: Path) -> None:
    async with app_on(tmp_path) as app:
        namespace_of = await seed(app.state.store)
        by_namespace = {namespace: stream_id for stream_id, namespace in namespace_of.items()}
        made = await mint(app, ["write"], ["exports/*"])
        bearer = {"authorization": f"Bearer {made['token']}"}
        async with browser(app) as client:
            own = await client.get(f"/stream/{by_namespace['exports/daily']}/stop", headers=bearer)
            assert own.status_code == 200 and own.json()["stop_requested"] is False
            other = await client.get(f"/stream/{by_namespace['chat']}/stop?wait=5", headers=bearer)
            assert other.status_code == 403 and "does not cover namespace chat" in other.text


async def test_forged_cookie_and_count_digits_are_refused_not_crashed_on(tmp_path: Path) -> None:
    async with app_on(tmp_path) as app:
        await seed(app.state.store)
        made = await mint(app, ["manage"], ["exports/*"])
        async with browser(app) as client:
            # "²" is a digit to str.isdigit but not to int(); 5,000 digits are past int()'s limit.
            for expiry in (b"\xb2", b"9" * 5000):
                cookie = [(b"cookie", b"streamhold_session=v1." + expiry + b".abc.def")]
                page = await client.get("/", headers=cookie)
                assert page.status_code == 303 and page.headers["location"] == "/signin"
                stop = await client.post("/stream/abc/stop", headers=cookie)
                assert stop.status_code == 401
            assert (await sign_in(client, made["token"])).status_code == 303
            change = {**BOARD, "x-csrf-token": csrf_of((await client.get("/")).text)}
            for expected in ("%C2%B2", "9" * 5000):
                done = await client.delete(f"/dashboard/streams?expected={expected}", headers=change)
                assert done.status_code == 400 and "expected=N" in done.text
            assert total((await client.get("/")).text) == 2, "nothing was deleted"


async def test_a_csrf_token_or_cookie_field_from_another_sign_in_changes_nothing(tmp_path: Path) -> None:
    async with app_on(tmp_path) as app:
        namespace_of = await seed(app.state.store)
        target = next(i for i, namespace in namespace_of.items() if namespace == "exports")
        first, second = [await mint(app, ["manage"], ["exports/*"]) for _ in range(2)]
        clients = [browser(app) for _ in range(3)]
        try:
            for client, secret in zip(clients, (first["token"], second["token"], KEY), strict=True):
                assert (await sign_in(client, secret)).status_code == 303
            csrfs = [csrf_of((await client.get("/")).text) for client in clients]
            for holder, client in enumerate(clients):
                for owner, csrf in enumerate(csrfs):
                    if owner != holder:
                        change = {**BOARD, "x-csrf-token": csrf}
                        sent = await client.delete(f"/dashboard/streams/{target}", headers=change)
                        assert sent.status_code == 403, (holder, owner)
            # The token's cookie with its expiry pushed on, or with the other token's random id, is no one's.
            version, expires, nonce, mac = clients[0].cookies[session.COOKIE].split(".")
            other_nonce = clients[1].cookies[session.COOKIE].split(".")[2]
            later, swapped = f"{int(expires) + 1}.{nonce}", f"{expires}.{other_nonce}"
            for forged in (f"{version}.{later}.{mac}", f"{version}.{swapped}.{mac}"):
                async with browser(app) as stranger:
                    stranger.cookies.set(session.COOKIE, forged)
                    assert (await stranger.get("/")).status_code == 303
            # Signed out, the token's cookie signs no one in again.
            kept = clients[0].cookies[session.COOKIE]
            assert (await clients[0].post("/signout", data={"csrf": csrfs[0]})).status_code == 303
            async with browser(app) as replay:
                replay.cookies.set(session.COOKIE, kept)
                assert (await replay.get("/")).status_code == 303
        finally:
            for client in clients:
                await client.aclose()
        assert target in {s.id for s in (await app.state.store.list(StreamFilter()))[1]}
