"""A signed-in browser reads private streams on its own pages' live connections.

The viewer page of a private stream follows it over `/v1/stream/…`, which a browser reaches with its cookies
but no key. A sign-in's cookie therefore counts as a reader, with the sign-in's rights, for reads (GET and
HEAD) that the browser says come from this origin (`Sec-Fetch-Site: same-origin`): never for changes, never
from another site's page (the cookie is SameSite=Strict, and a same-site page of another origin is refused
by the header), and never once signed out.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from streamhold.store.store import NewStream, Store
from tests.test_dashboard_access import KEY, app_on, browser, mint, sign_in

pytestmark = pytest.mark.timeout(60)

OWN = {"sec-fetch-site": "same-origin"}


async def test_a_sign_in_reads_private_streams_from_its_own_pages_only(tmp_path: Path) -> None:
    async with app_on(tmp_path) as app:
        store: Store = app.state.store
        chat, _ = await store.create(NewStream("chat", "text/plain", initial=b"hello", visibility="private"))
        other, _ = await store.create(NewStream("other", "text/plain", initial=b"no", visibility="private"))
        token = await mint(app, ["read", "manage"], ["chat"])
        admin, scoped, stranger = browser(app), browser(app), browser(app)
        try:
            assert (await sign_in(admin, KEY)).status_code == 303
            assert (await sign_in(scoped, token["token"])).status_code == 303

            async def status(client: httpx.AsyncClient, method: str, path: str, **headers: str) -> int:
                return (await client.request(method, path, headers=headers)).status_code

            chat_url, other_url = f"/v1/stream/{chat.name}", f"/v1/stream/{other.name}"
            for method in ("GET", "HEAD"):
                assert await status(admin, method, chat_url + "?offset=-1", **OWN) == 200
                assert await status(admin, method, f"/stream/{chat.id}?follow=false", **OWN) == 200
                assert await status(scoped, method, chat_url + "?offset=-1", **OWN) == 200
                # The token's rights, not more: another namespace's private stream stays closed to it.
                assert await status(scoped, method, other_url + "?offset=-1", **OWN) == 403
                assert await status(stranger, method, chat_url + "?offset=-1", **OWN) == 401
                # Another site's page, a same-site page of another origin, or no word from the browser.
                for site in ("cross-site", "same-site", "none"):
                    elsewhere = {"sec-fetch-site": site}
                    assert await status(admin, method, chat_url + "?offset=-1", **elsewhere) == 401
                assert await status(admin, method, chat_url + "?offset=-1") == 401
            body = await admin.get(chat_url + "?offset=-1", headers=OWN)
            assert body.content == b"hello"

            # Reads only: a signed-in browser's cookie never appends, closes or deletes.
            append = await admin.post(chat_url, content=b"x", headers={**OWN, "content-type": "text/plain"})
            assert append.status_code == 401
            assert (await admin.delete(chat_url, headers=OWN)).status_code == 401
            assert (await store.get(chat.id)).tail == 5  # type: ignore[union-attr]

            # Signing out ends it at once.
            page = await admin.get("/")
            csrf = page.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
            assert (await admin.post("/signout", data={"csrf": csrf})).status_code == 303
            assert await status(admin, "GET", chat_url + "?offset=-1", **OWN) == 401
        finally:
            for client in (admin, scoped, stranger):
                await client.aclose()
