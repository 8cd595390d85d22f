"""Access control: admin keys, scoped tokens and private streams, on both APIs and the remote SDK.

Each principal (admin, a read, write or manage token on `chat`, a token of another namespace, an expired, a
revoked token, no credential) meets each operation on a public and on a private stream, and the exact
status is asserted, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar.testing import AsyncTestClient

from streamhold.errors import StreamError
from streamhold.main import create_app
from streamhold.sdk.remote import RemoteStreams
from streamhold.settings import Settings
from tests._cluster import cluster, fresh_database
from tests._server import LOOPBACK, REPO_ROOT, ServerProcess

KEY = "admin-key-for-access-tests"
NS = "chat"
WHO = ("admin", "read", "write", "manage", "other", "expired", "revoked", "none")
NEEDS = {"create": "write", "append": "write", "close": "write", "list": "manage", "info": "manage"}
NEEDS["delete"] = "manage"
AGENTUITY_OK = {"create": 200, "append": 204, "close": 204, "read": 200, "head": 200}
AGENTUITY_OK.update({"list": 200, "info": 200, "delete": 204})
PROTOCOL_OK = {"create": 201, "append": 204, "close": 204, "read": 200, "head": 200, "delete": 204}
SDK_OK = dict.fromkeys(("create", "append", "close", "read", "list", "info", "delete"), 200)


def expected(who: str, op: str, private: bool, ok: dict[str, int]) -> int:
    """The one access rule, written out: what each principal gets for each operation."""
    if who in ("expired", "revoked"):
        return 401  # a credential that is no longer good is refused, whatever the stream
    if op in ("read", "head"):
        if not private:
            return ok[op]
        if who == "none":
            return 401
        return ok[op] if who in ("admin", "read") else 403
    if who == "none":
        return 401
    if who == "admin":
        return ok[op]
    if who == "other":  # every scope, but over namespace `other`: it may list, and sees only its own
        return ok[op] if op == "list" else 403
    return ok[op] if NEEDS[op] == who else 403


def bearer(secret: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"} if secret else {}


async def mint(
    client: AsyncTestClient[Any], scopes: list[str], namespaces: list[str], ttl: float = 0
) -> dict[str, Any]:
    made = await client.post(
        "/tokens", json={"scopes": scopes, "namespaces": namespaces, "ttl": ttl}, headers=bearer(KEY)
    )
    assert made.status_code == 201, made.text
    return dict(made.json())


async def principals(client: AsyncTestClient[Any]) -> dict[str, str | None]:
    """A credential for each principal; the expired one has expired by the time this returns."""
    expired = await mint(client, ["read", "write", "manage"], [NS], ttl=1)
    started = time.monotonic()
    creds: dict[str, str | None] = {"admin": KEY, "none": None}
    for scope in ("read", "write", "manage"):
        creds[scope] = (await mint(client, [scope], [NS]))["token"]
    creds["other"] = (await mint(client, ["read", "write", "manage"], ["other"]))["token"]
    revoked = await mint(client, ["read", "write", "manage"], [NS])
    assert (await client.delete(f"/tokens/{revoked['id']}", headers=bearer(KEY))).status_code == 204
    creds["revoked"] = revoked["token"]
    creds["expired"] = expired["token"]
    await asyncio.sleep(max(0.0, 1.1 - (time.monotonic() - started)))
    return creds


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[AsyncTestClient[Any]]:
    app = create_app(dataclasses.replace(settings, api_keys=(KEY,)))
    async with AsyncTestClient(app, base_url=LOOPBACK) as test_client:
        yield test_client


async def agentuity_create(client: AsyncTestClient[Any], secret: str | None, private: bool) -> httpx.Response:
    return await client.post("/stream", json={"name": NS, "public": not private}, headers=bearer(secret))


async def test_the_stream_api_matrix(client: AsyncTestClient[Any]) -> None:
    creds = await principals(client)
    await agentuity_create(client, KEY, private=False)  # something in `other` too, for its listing
    await client.post("/stream", json={"name": "other"}, headers=bearer(KEY))
    for private in (False, True):
        for who in WHO:
            secret = creds[who]
            made = await agentuity_create(client, KEY, private)
            stream_id = made.json()["id"]
            await client.post(f"/stream/{stream_id}/append", content=b"hi", headers=bearer(KEY))
            auth = bearer(secret)
            at = f"/stream/{stream_id}"
            answers = {
                "create": await agentuity_create(client, secret, private),
                "append": await client.post(f"{at}/append", content=b"x", headers=auth),
                "close": await client.post(f"{at}/complete", headers=auth),
            }
            # Closed, so that reading its content ends instead of following the stream.
            await client.post(f"{at}/complete", headers=bearer(KEY))
            answers["read"] = await client.get(at, headers=auth)
            answers["head"] = await client.head(at, headers=auth)
            answers["list"] = await client.post("/stream/list", json={}, headers=auth)
            answers["info"] = await client.post(f"{at}/info", headers=auth)
            answers["delete"] = await client.delete(at, headers=auth)
            got = {op: r.status_code for op, r in answers.items()}
            want = {op: expected(who, op, private, AGENTUITY_OK) for op in got}
            assert got == want, (who, "private" if private else "public")


async def test_the_protocol_matrix(client: AsyncTestClient[Any]) -> None:
    creds = await principals(client)
    text = {"content-type": "text/plain"}
    for private in (False, True):
        visibility = {"streamhold-visibility": "private" if private else "public"}
        for who in WHO:
            auth = bearer(creds[who])
            path = f"/v1/stream/{NS}/{who}-{uuid.uuid4().hex[:8]}"
            assert (await client.put(path, headers={**text, **visibility, **bearer(KEY)})).status_code == 201
            appended = await client.post(path, content=b"hi", headers={**text, **bearer(KEY)})
            assert appended.status_code == 204
            own = f"/v1/stream/{NS}/{who}-own-{uuid.uuid4().hex[:8]}"
            got = {
                "create": (await client.put(own, headers={**text, **visibility, **auth})).status_code,
                "read": (await client.get(path, params={"offset": "-1"}, headers=auth)).status_code,
                "head": (await client.head(path, headers=auth)).status_code,
                "append": (await client.post(path, content=b"x", headers={**text, **auth})).status_code,
                "close": (await client.post(path, headers={"stream-closed": "true", **auth})).status_code,
                "delete": (await client.delete(path, headers=auth)).status_code,
            }
            want = {op: expected(who, op, private, PROTOCOL_OK) for op in got}
            assert got == want, (who, "private" if private else "public")


async def _sdk_status(work: Awaitable[Any]) -> int:
    try:
        await work
    except StreamError as exc:
        return int(exc.status)
    return 200


@pytest.fixture(params=["sqlite", "postgres"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServerProcess]:
    """A real server with an admin key, on SQLite or on a fresh PostgreSQL database."""
    env = {"STREAMHOLD_API_KEYS": KEY, "STREAMHOLD_DATA_DIR": str(tmp_path / "data")}
    if request.param == "postgres":
        env["STREAMHOLD_DATABASE_URL"] = request.getfixturevalue("pg_url")
    with ServerProcess(env=env) as running:
        yield running


async def test_the_remote_sdk_matrix(server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        creds = await principals(client)  # type: ignore[arg-type]
    async with RemoteStreams(server.url, KEY) as admin:
        for private in (False, True):
            for who in WHO:
                stream = await admin.create(NS, content_type="text/plain", public=not private)
                await admin._post(f"/stream/{stream.id}/append", content=b"hi")
                async with RemoteStreams(server.url, creds[who]) as sdk:

                    async def append_and_close(sid: str = stream.id) -> None:
                        # The SDK writes to a stream it holds; another's is reached by the same calls.
                        assert (await sdk._post(f"/stream/{sid}/append", content=b"x")).status_code == 204
                        await sdk._post(f"/stream/{sid}/complete")

                    async def read(sid: str = stream.id) -> None:
                        assert b"".join([p async for p in sdk.download(sid)]).startswith(b"hi")

                    got = {
                        "create": await _sdk_status(sdk.create(NS, public=not private)),
                        "append": await _sdk_status(append_and_close()),
                    }
                    await admin._post(f"/stream/{stream.id}/complete")  # so that a download ends
                    got["read"] = await _sdk_status(read())
                    got["list"] = await _sdk_status(sdk.list())
                    got["info"] = await _sdk_status(sdk.get(stream.id))
                    got["delete"] = await _sdk_status(sdk.delete(stream.id))
                got["close"] = got["append"]
                want = {op: expected(who, op, private, SDK_OK) for op in got}
                assert got == want, (who, "private" if private else "public")


def test_a_revocation_counts_on_another_process_within_a_second(pg_server: str, tmp_path: Path) -> None:
    env = {"STREAMHOLD_API_KEYS": KEY, "STREAMHOLD_DATA_DIR": str(tmp_path / "data")}
    with fresh_database(pg_server) as url, cluster({**env, "STREAMHOLD_DATABASE_URL": url}) as (one, two):
        made = httpx.post(
            f"{one.url}/tokens", json={"scopes": ["write"], "namespaces": [NS]}, headers=bearer(KEY)
        ).json()
        path, text = f"/v1/stream/{NS}/revoked", {"content-type": "text/plain"}
        with httpx.Client(base_url=two.url, headers={**bearer(made["token"]), **text}) as holder:
            assert holder.put(path).status_code == 201, "the token minted on one process works on the other"
            assert holder.post(path, content=b"before").status_code == 204  # cached there now
            revoked = httpx.delete(f"{one.url}/tokens/{made['id']}", headers=bearer(KEY))
            assert revoked.status_code == 204
            started = time.monotonic()
            statuses = []
            while time.monotonic() - started < 3.0:  # bounded: the claim is one second
                statuses.append(holder.post(path, content=b"after").status_code)
                if statuses[-1] == 401:
                    break
                time.sleep(0.02)
            elapsed = time.monotonic() - started
        assert statuses[-1] == 401 and elapsed < 1.0, (statuses, elapsed)
        assert set(statuses[:-1]) <= {204}
        content = httpx.get(f"{one.url}{path}", params={"offset": "-1"}, headers=bearer(KEY)).content
        assert content.count(b"after") == len(statuses) - 1


def streamhold(*args: str, server: ServerProcess, key: str = KEY) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamhold.cli", *args, "--server", server.url, "--key", key],
        cwd=REPO_ROOT,
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_token_commands_against_a_server(tmp_path: Path) -> None:
    env = {"STREAMHOLD_API_KEYS": KEY, "STREAMHOLD_DATA_DIR": str(tmp_path / "data")}
    with ServerProcess(env=env) as server:
        made = streamhold(
            "token", "create", "--scope", "read,write", "--namespace", NS, "--ttl", "7d", "--label", "worker",
            server=server,
        )
        assert made.returncode == 0, made.stderr
        secret = made.stdout.strip()
        assert secret.startswith("sht_") and "shown this once" in made.stderr
        listed = streamhold("token", "ls", "--json", server=server)
        tokens = json.loads(listed.stdout)
        shown = [(t["scopes"], t["namespaces"], t["label"]) for t in tokens]
        assert shown == [(["read", "write"], [NS], "worker")]
        expires = datetime.fromisoformat(tokens[0]["expires_at"]).timestamp()
        assert 6.9 * 86400 < expires - time.time() < 7.1 * 86400
        assert secret not in listed.stdout and "worker" in streamhold("token", "ls", server=server).stdout
        # The token works as a key for the client commands, and only within its scopes.
        wrote = subprocess.run(
            [sys.executable, "-m", "streamhold.cli", "write", NS, "--server", server.url, "--key", secret],
            input="hello", cwd=REPO_ROOT, env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
            timeout=60,
        )
        assert wrote.returncode == 0, wrote.stderr
        refused = streamhold("ls", server=server, key=secret)
        assert refused.returncode == 1 and "lacks the manage scope" in refused.stderr
        by_token = streamhold("token", "ls", server=server, key=secret)
        assert by_token.returncode == 1 and "needs an API key" in by_token.stderr
        revoked = streamhold("token", "revoke", tokens[0]["id"], server=server)
        assert revoked.returncode == 0 and f"revoked {tokens[0]['id']}" in revoked.stdout
        again = streamhold("token", "revoke", tokens[0]["id"], server=server)
        assert again.returncode == 1 and "no token" in again.stderr
        assert json.loads(streamhold("token", "ls", "--json", server=server).stdout) == []
        bad = streamhold("token", "create", "--scope", "admin", "--namespace", NS, server=server)
        assert bad.returncode == 1 and "unknown scope 'admin'" in bad.stderr


async def test_bad_token_requests_get_a_clear_400(client: AsyncTestClient[Any]) -> None:
    cases = [
        ({"scopes": ["admin"], "namespaces": [NS]}, "unknown scope 'admin'"),
        ({"scopes": [], "namespaces": [NS]}, "scopes must be a non-empty list"),
        ({"scopes": ["read"], "namespaces": []}, "namespaces must list at least one namespace"),
        ({"scopes": ["read"]}, "namespaces must list at least one namespace"),
        ({"scopes": ["read"], "namespaces": [NS], "ttl": -5}, "ttl must be a number of seconds"),
        ({"scopes": ["read"], "namespaces": [NS], "ttl": "1d"}, "ttl must be a number of seconds"),
        ({"scopes": ["read"], "namespaces": [NS], "ttl": True}, "ttl must be a number of seconds"),
        ({"scopes": ["read"], "namespaces": ["a\nb"]}, "is not a namespace"),
        ({"scopes": ["read"], "namespaces": [NS], "owner": "x"}, "unknown fields ['owner']"),
    ]
    for body, message in cases:
        answer = await client.post("/tokens", json=body, headers=bearer(KEY))
        assert answer.status_code == 400, body
        assert message in answer.text, (body, answer.text)
    assert (await client.delete("/tokens/nosuchtoken", headers=bearer(KEY))).status_code == 404
    token = (await mint(client, ["read", "write", "manage"], ["*"]))["token"]
    for call in (client.get("/tokens", headers=bearer(token)), client.get("/tokens")):
        assert (await call).status_code in (401, 403)
    assert (await client.get("/tokens", headers=bearer(token))).json()["error"].startswith(
        "managing tokens needs an API key"
    )


async def test_a_token_is_kept_only_as_a_digest_and_listed_without_it(settings: Settings) -> None:
    app = create_app(dataclasses.replace(settings, api_keys=(KEY,)))
    async with AsyncTestClient(app, base_url=LOOPBACK) as client:
        made = await mint(client, ["read"], [NS], ttl=3600)
        assert set(made) == {"id", "token", "scopes", "namespaces", "expires_at", "label", "created_at"}
        listed = (await client.get("/tokens", headers=bearer(KEY))).json()["tokens"]
        assert [t["id"] for t in listed] == [made["id"]] and "token" not in listed[0]
        store = app.state.store
        rows = await asyncio.to_thread(_token_rows, store)
    secret = made["token"].rsplit("_", 1)[1]
    assert len(rows) == 1 and secret not in repr(rows) and made["token"] not in repr(rows)


def _token_rows(store: Any) -> list[Any]:
    from sqlalchemy import select

    from streamhold.store.schema import tokens

    with store._read_engine.connect() as conn:
        return list(conn.execute(select(tokens)).all())


async def test_a_token_lists_and_counts_only_the_namespaces_it_manages(client: AsyncTestClient[Any]) -> None:
    for namespace in ("chat", "chat", "exports/daily", "exports", "exportsx", "other"):
        await client.post("/stream", json={"name": namespace}, headers=bearer(KEY))
    token = (await mint(client, ["manage"], ["chat", "exports/*"]))["token"]
    page = (await client.post("/stream/list", json={"limit": 2}, headers=bearer(token))).json()
    assert page["total"] == 4 and len(page["streams"]) == 2
    every = (await client.post("/stream/list", json={}, headers=bearer(token))).json()["streams"]
    assert sorted(s["namespace"] for s in every) == ["chat", "chat", "exports", "exports/daily"]
    assert (await client.post("/stream/list", json={}, headers=bearer(KEY))).json()["total"] == 6
    # A prefix covers writes as well: a protocol stream's namespace is its first path segment.
    writer = (await mint(client, ["write"], ["exports/*"]))["token"]
    text = {"content-type": "text/plain", **bearer(writer)}
    assert (await client.put("/v1/stream/exports/a/b", headers=text)).status_code == 201
    refused = await client.put("/v1/stream/chat/a", headers=text)
    assert refused.status_code == 403
    assert refused.json()["error"] == "this token does not cover namespace chat"
    lacking = await client.post("/stream/list", json={}, headers=bearer(writer))
    assert lacking.status_code == 403 and lacking.json()["error"] == "this token lacks the manage scope"


async def test_a_private_stream_tells_nothing_without_a_read_credential(client: AsyncTestClient[Any]) -> None:
    text = {"content-type": "text/plain"}
    path = f"/v1/stream/{NS}/secret"
    created = await client.put(path, headers={**text, "streamhold-visibility": "private", **bearer(KEY)})
    assert created.status_code == 201
    await client.post(path, content=b"the secret", headers={**text, **bearer(KEY)})
    for answer in (
        await client.get(path, params={"offset": "-1"}),
        await client.get(path, params={"offset": "-1", "live": "long-poll"}),
        await client.get(path, params={"offset": "-1", "live": "sse"}),
        await client.head(path),
        await client.get(f"/watch/{NS}/secret"),
    ):
        assert answer.status_code == 401
        assert b"the secret" not in answer.content
        assert not {"stream-next-offset", "stream-total-size", "content-range"} & set(answer.headers)
    reader = (await mint(client, ["read"], [NS]))["token"]
    assert (await client.get(path, params={"offset": "-1"}, headers=bearer(reader))).content == b"the secret"
    assert (await client.get(f"/watch/{NS}/secret", headers=bearer(reader))).status_code == 200
    hidden = {**text, "streamhold-visibility": "hidden", **bearer(KEY)}
    bad = await client.put(f"/v1/stream/{NS}/x", headers=hidden)
    assert bad.status_code == 400 and "Streamhold-Visibility must be public or private" in bad.text
    body = await client.post("/stream", json={"name": NS, "public": "no"}, headers=bearer(KEY))
    assert body.status_code == 400 and "public must be public or private" in body.text


async def test_reads_private_makes_streams_private_unless_they_choose(settings: Settings) -> None:
    app = create_app(dataclasses.replace(settings, api_keys=(KEY,), reads="private"))
    async with AsyncTestClient(app, base_url=LOOPBACK) as client:
        text = {"content-type": "text/plain", **bearer(KEY)}
        await client.put("/v1/stream/chat/default", headers=text)
        await client.put("/v1/stream/chat/open", headers={**text, "streamhold-visibility": "public"})
        assert (await client.head("/v1/stream/chat/default")).status_code == 401
        assert (await client.head("/v1/stream/chat/open")).status_code == 200
    assert Settings.from_env({"STREAMHOLD_READS": "private"}).reads == "private"
    with pytest.raises(ValueError, match="STREAMHOLD_READS must be public or private"):
        Settings.from_env({"STREAMHOLD_READS": "secret"})


async def test_a_keyless_server_still_allows_everything(tmp_path: Path) -> None:
    async with AsyncTestClient(create_app(Settings(data_dir=tmp_path)), base_url=LOOPBACK) as client:
        text = {"content-type": "text/plain"}
        path = "/v1/stream/chat/private"
        private = {**text, "streamhold-visibility": "private"}
        assert (await client.put(path, headers=private)).status_code == 201
        assert (await client.post(path, content=b"x", headers=text)).status_code == 204
        assert (await client.get(path, params={"offset": "-1"})).content == b"x"
        assert (await client.post("/stream/list", json={})).json()["total"] == 1
        made = await client.post("/tokens", json={"scopes": ["read"], "namespaces": [NS]})
        assert made.status_code == 201
        assert (await client.delete(path)).status_code == 204


def test_an_older_database_gains_the_visibility_column(tmp_path: Path) -> None:
    import sqlite3

    database = tmp_path / "streamhold.db"
    asyncio.run(_open_and_close(Settings(data_dir=tmp_path)))
    with sqlite3.connect(database) as conn:
        conn.execute("ALTER TABLE streams DROP COLUMN visibility")
    asyncio.run(_open_and_close(Settings(data_dir=tmp_path)))
    with sqlite3.connect(database) as conn:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(streams)")}
        kept = conn.execute("SELECT visibility FROM streams").fetchall()
    assert "visibility" in columns and kept == [(None,), (None,)]


async def _open_and_close(settings: Settings) -> None:
    from streamhold.store.store import NewStream, Store

    async with Store.open(settings) as store:
        await store.create(NewStream(namespace="chat"))


async def test_the_local_sdk_chooses_a_visibility(settings: Settings) -> None:
    from streamhold.http.auth import ANONYMOUS, may_read
    from streamhold.live import LiveHub
    from streamhold.sdk.local import LocalStreams
    from streamhold.store.store import Store

    async with Store.open(settings) as store, LiveHub.open(store, settings) as hub:
        service = LocalStreams(store, hub, settings)
        hidden = await service.create(NS, content_type="text/plain", public=False)
        shown = await service.create(NS, content_type="text/plain", public=True)
        chosen = await service.create(NS, content_type="text/plain")
        states = [await store.get(s.id) for s in (hidden, shown, chosen)]
        assert [s.visibility for s in states if s is not None] == ["private", "public", None]
        assert [may_read(ANONYMOUS, s, settings) for s in states if s is not None] == [False, True, True]
        with pytest.raises(TypeError, match="public must be True, False or None"):
            await service.create(NS, public="no")  # type: ignore[arg-type]


async def test_forking_a_private_stream_needs_the_read_right(client: AsyncTestClient[Any]) -> None:
    text = {"content-type": "text/plain"}
    source = f"/v1/stream/{NS}/source"
    await client.put(source, headers={**text, "streamhold-visibility": "private", **bearer(KEY)})
    writer = (await mint(client, ["write"], [NS]))["token"]
    fork = {**text, "stream-forked-from": source, **bearer(writer)}
    refused = await client.put(f"/v1/stream/{NS}/fork", headers=fork)
    assert refused.status_code == 403 and refused.json()["error"] == "this token lacks the read scope"
    both = (await mint(client, ["read", "write"], [NS]))["token"]
    forked = await client.put(f"/v1/stream/{NS}/fork", headers={**fork, **bearer(both)})
    assert forked.status_code == 201


async def test_a_burst_of_requests_with_one_token_reads_it_once(settings: Settings) -> None:
    from sqlalchemy import event

    from streamhold.store.store import Store

    async with Store.open(settings) as store:
        _, token = await store.tokens.mint(("write",), (NS,), None, "")
        reads: list[str] = []

        def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if "FROM tokens" in statement:
                reads.append(statement)

        event.listen(store._read_engine, "before_cursor_execute", count)
        found = await asyncio.gather(*(store.tokens.check(token) for _ in range(50)))
        assert all(f is not None for f in found) and len(reads) == 1
        await asyncio.gather(*(store.tokens.check(token) for _ in range(50)))
        assert len(reads) == 1, "within the cache's half second, no read at all"
        await asyncio.sleep(0.6)
        assert await store.tokens.check(token) is not None and len(reads) == 2
        wrong = token[:-1] + ("1" if token.endswith("0") else "0")
        assert await store.tokens.check(wrong) is None, "a right id with a wrong secret is refused"
