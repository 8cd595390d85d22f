"""Share links: test_access.py's matrix, for the principals a share link can make.

Each link (good, good with stop, altered, expired, another stream's, signed before the secret changed, made
for a deleted stream whose name was used again) meets each operation on a public and on a private stream,
and the exact status is asserted, on SQLite and on PostgreSQL. Then making links (who may, bad requests, no
secret), the SDK and the CLI, two processes sharing the secret, and the settings check.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result
from litestar.testing import AsyncTestClient, TestClient

from streamhold import cli, clock, share_cli
from streamhold.errors import SharingUnavailableError
from streamhold.http import share_links
from streamhold.main import create_app
from streamhold.sdk.remote import RemoteStreams, UnauthorizedError
from streamhold.settings import Settings, SettingsError
from tests._server import LOOPBACK
from tests.test_access import KEY, bearer, mint
from tests.test_dashboard import csrf_of

SECRET = "share-secret-for-access-tests"
OLD_SECRET = "the-secret-before-it-was-rotated"
TEXT = {"content-type": "text/plain"}
BODY = b"payload-7f3a"
WHO = ("link", "stop-link", "tampered", "expired", "other", "rotated", "recreated")
READS = ("content", "head-content", "head", "catch-up", "long-poll", "sse", "viewer")
CHANGES = ("stop", "append", "append-api", "delete", "delete-api")


def expected(who: str, op: str, private: bool) -> int:
    """The rule for links, written out: what each link gets for each operation."""
    if who in ("tampered", "expired", "rotated"):
        return 403  # a link that grants nothing is refused, whatever the stream (never taken as anonymous)
    if op in READS:
        return 200 if who in ("link", "stop-link") or not private else 403
    if op == "stop":
        return 202 if who == "stop-link" else 403
    return 403  # a link never writes or deletes


def parts(link: str) -> tuple[str, int]:
    """The stream id and generation a link names."""
    fields = link.split(".")
    return fields[1], int(fields[2])


def signed(secret: str, link: str, expires: float, stop: bool = True) -> str:
    stream_id, generation = parts(link)
    return share_links.sign(secret, share_links.Link(stream_id, generation, int(expires), stop))


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[AsyncTestClient[Any]]:
    app = create_app(dataclasses.replace(settings, api_keys=(KEY,), secret=SECRET))
    async with AsyncTestClient(app, base_url=LOOPBACK) as test_client:
        yield test_client


async def make_stream(client: AsyncTestClient[Any], name: str, private: bool, closed: bool = False) -> None:
    """A stream holding BODY; a closed one, so that reading its content by URL ends."""
    visibility = {"streamhold-visibility": "private" if private else "public"}
    made = await client.put(f"/v1/stream/{name}", headers={**TEXT, **visibility, **bearer(KEY)})
    assert made.status_code == 201, made.text
    close = {"stream-closed": "true"} if closed else {}
    appended = await client.post(f"/v1/stream/{name}", content=BODY, headers={**TEXT, **close, **bearer(KEY)})
    assert appended.status_code == 204


async def share(client: AsyncTestClient[Any], target: str, **body: Any) -> str:
    """A link's text, made with the admin key."""
    made = await client.post(f"/stream/{target}/share", json={"ttl": 3600, **body}, headers=bearer(KEY))
    assert made.status_code == 201, made.text
    return str(made.json()["url"]).split("?share=", 1)[1]


async def link_for(client: AsyncTestClient[Any], who: str, name: str, private: bool) -> str:
    if who == "other":
        other = f"other-{uuid.uuid4().hex[:8]}"
        await make_stream(client, other, private)
        return await share(client, other, stop=True)
    if who == "tampered":  # a read-only link that claims the right to stop
        return (await share(client, name)).replace(".r.", ".s.")
    good = await share(client, name, stop=who != "link")
    if who == "expired":
        return signed(SECRET, good, clock.now() - 1)
    if who == "rotated":
        return signed(OLD_SECRET, good, clock.now() + 3600)
    if who == "recreated":  # the name deleted and made again: the link names the earlier stream
        assert (await client.delete(f"/v1/stream/{name}", headers=bearer(KEY))).status_code == 204
        await make_stream(client, name, private)
    return good


async def test_the_share_link_matrix(client: AsyncTestClient[Any]) -> None:
    for private in (False, True):
        for who in WHO:
            name = f"{who}-{uuid.uuid4().hex[:8]}"
            await make_stream(client, name, private)
            link = await link_for(client, who, name, private)
            q = {"share": link}
            path = f"/v1/stream/{name}"
            at = f"/stream/{parts(await share(client, name))[0]}"
            got = {
                "stop": (await client.post(f"/stream/{name}/stop", params=q)).status_code,
                "append": (await client.post(path, params=q, content=b"x", headers=TEXT)).status_code,
                "append-api": (await client.post(f"{at}/append", params=q, content=b"x")).status_code,
            }
            closed = await client.post(path, headers={"stream-closed": "true", **bearer(KEY)})
            assert closed.status_code == 204  # so that content, SSE and long-poll reads end
            answers = {
                "content": await client.get(at, params=q),
                "head-content": await client.head(at, params=q),
                "head": await client.head(path, params=q),
                "catch-up": await client.get(path, params={**q, "offset": "-1"}),
                "long-poll": await client.get(path, params={**q, "offset": "-1", "live": "long-poll"}),
                "sse": await client.get(path, params={**q, "offset": "-1", "live": "sse"}),
                "viewer": await client.get(f"/watch/{name}", params=q),
            }
            got.update({op: answer.status_code for op, answer in answers.items()})
            got["delete"] = (await client.delete(path, params=q)).status_code
            got["delete-api"] = (await client.delete(at, params=q)).status_code
            want = {op: expected(who, op, private) for op in got}
            assert got == want, (who, "private" if private else "public")
            for op, answer in answers.items():
                if answer.status_code == 403:
                    assert BODY not in answer.content, (who, op)
                    assert "stream-next-offset" not in answer.headers, (who, op)
                elif op not in ("head", "head-content"):
                    assert BODY in answer.content, (who, op)


async def test_a_refused_link_says_why(client: AsyncTestClient[Any]) -> None:
    await make_stream(client, "why", private=True)
    good = await share(client, "why")
    await make_stream(client, "elsewhere", private=True)
    cases = {
        signed(SECRET, good, clock.now() - 1): "this share link has expired: ask for a new one",
        good.replace(".r.", ".s."): "this share link is not valid",
        signed(OLD_SECRET, good, clock.now() + 60): "STREAMHOLD_SECRET has changed",
        "v1.nonsense": "this share link is not valid",
        await share(client, "elsewhere"): "this share link was made for another stream",
    }
    for link, message in cases.items():
        for answer in (
            await client.get("/v1/stream/why", params={"share": link, "offset": "-1"}),
            await client.get("/watch/why", params={"share": link}),
        ):
            assert answer.status_code == 403 and message in answer.text, (link, answer.text)
    writes = await client.post("/v1/stream/why", params={"share": good}, content=b"x", headers=TEXT)
    assert "a share link only reads the stream it was made for" in writes.json()["error"]
    no_stop = await client.post("/stream/why/stop", params={"share": good})
    assert "may not stop it: ask for a link made with stop" in no_stop.json()["error"]
    # A key or token wins over a link: a good key reads even beside an expired link.
    expired = signed(SECRET, good, clock.now() - 1)
    keyed = await client.get("/v1/stream/why", params={"share": expired, "offset": "-1"}, headers=bearer(KEY))
    assert keyed.status_code == 200 and keyed.content == BODY


async def test_who_may_make_a_link(client: AsyncTestClient[Any]) -> None:
    await make_stream(client, "made", private=True, closed=True)
    body = {"ttl": 600, "stop": True}
    scopes = ("read", "write", "manage")
    tokens = {scope: (await mint(client, [scope], ["default"]))["token"] for scope in scopes}
    elsewhere = (await mint(client, ["manage"], ["chat"]))["token"]
    statuses = {
        who: (await client.post("/stream/made/share", json=body, headers=bearer(secret))).status_code
        for who, secret in {"none": None, **tokens, "elsewhere": elsewhere, "admin": KEY}.items()
    }
    assert statuses == {"none": 401, "read": 403, "write": 403, "manage": 201, "elsewhere": 403, "admin": 201}
    link = await share(client, "made", stop=True)
    by_link = await client.post("/stream/made/share", params={"share": link}, json=body)
    assert by_link.status_code == 403, "a link cannot make links"

    made = await client.post("/stream/made/share", json=body, headers=bearer(KEY))
    answer = made.json()
    assert set(answer) == {"url", "content_url", "expires_at", "stop"} and answer["stop"] is True
    assert answer["url"].startswith("http://sh.test/watch/made?share=v1.")
    assert answer["content_url"].startswith("http://sh.test/stream/stream_")
    expires = datetime.fromisoformat(answer["expires_at"].replace("Z", "+00:00")).timestamp()
    assert 599 <= expires - clock.now() <= 601
    content = await client.get(answer["content_url"].removeprefix("http://sh.test"))
    assert content.status_code == 200 and content.content == BODY

    # A signed-in page makes links with its sign-in cookie and CSRF token.
    client.follow_redirects = False
    assert (await client.post("/signin", data={"key": KEY, "next": "/"})).status_code == 303
    try:
        page = {"x-csrf-token": csrf_of((await client.get("/")).text), "origin": LOOPBACK}
        assert (await client.post("/stream/made/share", json=body, headers=page)).status_code == 201
        forged = await client.post("/stream/made/share", json=body, headers={"origin": LOOPBACK})
        assert forged.status_code == 403 and "CSRF" in forged.text
    finally:
        client.cookies.clear()


async def test_bad_link_requests_get_a_clear_answer(client: AsyncTestClient[Any]) -> None:
    await make_stream(client, "bad", private=False)
    cases = [
        ({"ttl": 0}, "ttl must be a number of seconds from 1"),
        ({"ttl": "1h"}, "ttl must be a number of seconds from 1"),
        ({"ttl": 91 * 86400}, "ttl must be a number of seconds from 1"),
        ({"ttl": True}, "ttl must be a number of seconds from 1"),
        ({"ttl": 60, "stop": "yes"}, "stop must be true or false"),
        ({"ttl": 60, "reads": 3}, "unknown fields ['reads']"),
    ]
    for body, message in cases:
        answer = await client.post("/stream/bad/share", json=body, headers=bearer(KEY))
        assert answer.status_code == 400 and message in answer.json()["error"], (body, answer.text)
    missing = await client.post("/stream/nosuchstream/share", json={"ttl": 60}, headers=bearer(KEY))
    assert missing.status_code == 404


async def test_without_a_secret_links_are_refused_with_a_way_out(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path, api_keys=(KEY,)))
    async with AsyncTestClient(app, base_url=LOOPBACK) as client:
        await make_stream(client, "plain", private=True)
        made = await client.post("/stream/plain/share", json={"ttl": 60}, headers=bearer(KEY))
        assert made.status_code == 409 and "need STREAMHOLD_SECRET: set it" in made.json()["error"]
        link = signed(SECRET, "v1.stream_x.1.0.r.x", clock.now() + 60)
        read = await client.get("/v1/stream/plain", params={"share": link, "offset": "-1"})
        assert read.status_code == 403 and "has no STREAMHOLD_SECRET" in read.json()["error"]


async def test_a_keyless_server_ignores_links(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path, secret=SECRET))
    async with AsyncTestClient(app, base_url=LOOPBACK) as client:
        private = {**TEXT, "streamhold-visibility": "private"}
        assert (await client.put("/v1/stream/open", headers=private)).status_code == 201
        assert (await client.post("/v1/stream/open", content=b"x", headers=TEXT)).status_code == 204
        bad = {"share": "v1.altered"}
        assert (await client.get("/v1/stream/open", params={**bad, "offset": "-1"})).content == b"x"
        assert (await client.get("/watch/open", params=bad)).status_code == 200
        made = await client.post("/stream/open/share", json={"ttl": 60})
        assert made.status_code == 201


def test_the_settings_ask_for_a_secret_where_private_reads_need_links() -> None:
    env = {"STREAMHOLD_API_KEYS": KEY, "STREAMHOLD_READS": "private"}
    with pytest.raises(SettingsError, match="STREAMHOLD_READS=private with API keys needs STREAMHOLD_SECRET"):
        Settings.from_env(env)
    with pytest.raises(SettingsError, match="STREAMHOLD_SECRET must be at least 16 characters"):
        Settings.from_env({**env, "STREAMHOLD_SECRET": "short"})
    assert Settings.from_env({**env, "STREAMHOLD_SECRET": SECRET}).secret == SECRET
    assert SECRET not in repr(Settings.from_env({**env, "STREAMHOLD_SECRET": SECRET}))
    assert Settings.from_env({"STREAMHOLD_READS": "private"}).secret == ""  # keyless: nothing to open
    refused = CliRunner().invoke(cli.main, ["serve"], env=env)
    assert refused.exit_code == 1 and "needs STREAMHOLD_SECRET" in refused.output


async def test_two_processes_sharing_the_secret_accept_each_others_links(pg_url: str, tmp_path: Path) -> None:
    def app(secret: str, name: str) -> Any:
        settings = Settings(data_dir=tmp_path / name, database_url=pg_url, api_keys=(KEY,), secret=secret)
        return create_app(settings)

    async with (
        AsyncTestClient(app(SECRET, "one"), base_url=LOOPBACK) as one,
        AsyncTestClient(app(SECRET, "two"), base_url=LOOPBACK) as two,
        AsyncTestClient(app(OLD_SECRET, "rotated"), base_url=LOOPBACK) as rotated,
    ):
        await make_stream(one, "across", private=True)
        link = {"share": await share(one, "across"), "offset": "-1"}
        assert (await two.get("/v1/stream/across", params=link)).content == BODY
        refused = await rotated.get("/v1/stream/across", params=link)
        assert refused.status_code == 403 and "STREAMHOLD_SECRET has changed" in refused.json()["error"]


async def test_the_sdk_makes_links_in_process_and_remotely(settings: Settings) -> None:
    app = create_app(dataclasses.replace(settings, api_keys=(KEY,), secret=SECRET))
    async with AsyncTestClient(app, base_url=LOOPBACK) as client:
        transport = httpx.ASGITransport(app=app)
        await make_stream(client, "sdk", private=True, closed=True)
        stream_id = parts(await share(client, "sdk"))[0]
        local = await app.state.service.share(stream_id, ttl=120, stop=True)
        async with RemoteStreams(LOOPBACK, KEY, transport=transport) as remote:
            made = await remote.share(stream_id, ttl=7200)
        async with RemoteStreams(LOOPBACK, transport=transport) as anonymous:
            with pytest.raises(UnauthorizedError, match="needs an API key or a token"):
                await anonymous.share(stream_id)
        for link, ttl, stop in ((local, 120, True), (made, 7200, False)):
            assert link.stop is stop and abs(link.expires_at.timestamp() - clock.now() - ttl) <= 2
            assert link.url.startswith("http://sh.test/watch/sdk?share=")
            content = await client.get(link.content_url.removeprefix("http://sh.test"))
            assert content.content == BODY
        with pytest.raises(ValueError, match="ttl must be a number of seconds"):
            await app.state.service.share(stream_id, ttl=0)
    bare = create_app(dataclasses.replace(settings, api_keys=(KEY,)))
    async with AsyncTestClient(bare, base_url=LOOPBACK) as client:
        await make_stream(client, "sdk-bare", private=True)
        async with RemoteStreams(LOOPBACK, KEY, transport=httpx.ASGITransport(app=bare)) as remote:
            info = (await remote.list()).streams[0]
            with pytest.raises(SharingUnavailableError, match="STREAMHOLD_SECRET"):
                await remote.share(info.id)
        with pytest.raises(SharingUnavailableError, match="STREAMHOLD_SECRET"):
            await bare.state.service.share(info.id)


def test_the_share_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(data_dir=tmp_path, api_keys=(KEY,), secret=SECRET, public_url="http://sh.test")
    app = create_app(settings)
    # The command's client reaches this in-process app instead of the network.
    remote = functools.partial(RemoteStreams, transport=httpx.ASGITransport(app=app))
    monkeypatch.setattr(share_cli, "RemoteStreams", remote)
    with TestClient(app, base_url=LOOPBACK) as client:
        closed = {**TEXT, **bearer(KEY), "stream-closed": "true"}
        assert client.put("/v1/stream/cli", headers=closed, content=BODY).status_code == 201

        def streamhold(*args: str) -> Result:
            return CliRunner().invoke(cli.main, ["share", *args, "--server", "http://sh.test", "--key", KEY])

        made = streamhold("cli", "--ttl", "1h", "--stop")
        assert made.exit_code == 0, made.output
        viewer, content = made.stdout.split()
        assert viewer.startswith("http://sh.test/watch/cli?share=v1.") and ".s." in viewer
        assert client.get(content.removeprefix("http://sh.test")).content == BODY
        assert client.get(viewer.removeprefix("http://sh.test")).status_code == 200
        as_json = json.loads(streamhold("cli", "--ttl", "30m", "--json").stdout)
        expires = datetime.fromisoformat(as_json["expires_at"].replace("Z", "+00:00")).timestamp()
        assert as_json["stop"] is False and 1790 < expires - time.time() < 1810
        bad = streamhold("cli", "--ttl", "soon")
        assert bad.exit_code == 1 and "--ttl takes seconds or a duration" in bad.output
        refused = CliRunner().invoke(cli.main, ["share", "cli", "--server", "http://sh.test"])
        assert refused.exit_code == 1 and "the server needs an API key" in refused.output


async def test_the_viewer_carries_its_link_on(client: AsyncTestClient[Any]) -> None:
    await make_stream(client, "page", private=True)
    reads, stops = await share(client, "page"), await share(client, "page", stop=True)
    read_page = (await client.get("/watch/page", params={"share": reads})).text
    assert f'href="?download=1&amp;share={reads}"' in read_page
    assert 'id="stop"' not in read_page and 'id="share-ttl"' not in read_page
    stop_page = (await client.get("/watch/page", params={"share": stops})).text
    assert 'id="stop"' in stop_page, "a link made with stop may stop the stream from its page"
    keyed = (await client.get("/watch/page", headers=bearer(KEY))).text
    assert "share=" not in keyed


async def test_a_page_that_may_make_links_offers_a_lifetime(tmp_path: Path) -> None:
    keyless = create_app(Settings(data_dir=tmp_path, secret=SECRET))
    async with AsyncTestClient(keyless, base_url=LOOPBACK) as client:
        for name, visibility in (("hidden", "private"), ("shown", "public")):
            chosen = {**TEXT, "streamhold-visibility": visibility}
            made = await client.put(f"/v1/stream/{name}", headers=chosen)
            assert made.status_code == 201
        hidden = (await client.get("/watch/hidden")).text
        assert 'id="share-ttl"' in hidden and 'value="604800">7 days' in hidden and 'data-csrf="' in hidden
        assert 'id="share-ttl"' not in (await client.get("/watch/shown")).text  # a public URL is enough
    async with AsyncTestClient(create_app(Settings(data_dir=tmp_path)), base_url=LOOPBACK) as client:
        assert 'id="share-ttl"' not in (await client.get("/watch/hidden")).text  # no secret to sign with


async def test_a_live_read_ends_when_its_link_expires(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, api_keys=(KEY,), secret=SECRET, sse_keepalive=0.1)
    async with AsyncTestClient(create_app(settings), base_url=LOOPBACK) as client:
        await make_stream(client, "brief", private=True)  # open: an SSE read would follow it for ever
        good = await share(client, "brief")
        second = math.ceil(clock.now())
        brief, later = (signed(SECRET, good, second + n, stop=False) for n in (1, 2))
        tail = (await client.head("/v1/stream/brief", params={"share": brief})).headers["stream-next-offset"]
        started = time.monotonic()
        waiting = {"share": brief, "offset": tail, "live": "long-poll"}
        polled = await client.get("/v1/stream/brief", params=waiting)
        assert polled.status_code == 204, "the long-poll (20 s otherwise) answered at the link's expiry"
        sse = await client.get("/v1/stream/brief", params={"share": later, "offset": "-1", "live": "sse"})
        assert sse.status_code == 200 and "payload-7f3a" in sse.text
        assert time.monotonic() - started < 6, "the SSE connection ended at the link's expiry"
        again = await client.get("/v1/stream/brief", params={"share": brief, "offset": "-1", "live": "sse"})
        assert again.status_code == 403 and "has expired" in again.json()["error"]
