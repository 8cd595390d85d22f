"""Attacks on the browser-facing surfaces: stream content run as the dashboard's origin, open redirects,
metadata shown to strangers, DNS rebinding and cross-site writes, sessions that outlive sign-out, and ids
that give away their neighbours."""

from __future__ import annotations

import dataclasses
import html
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from streamhold.http.headers import PAGE_CSP, answers_to, is_active
from streamhold.main import create_app
from streamhold.models import new_stream_id
from streamhold.settings import Settings, SettingsError
from streamhold.web import session

pytestmark = pytest.mark.timeout(60)

Client = AsyncTestClient[Any]
KEY = "key-for-security-tests-5e1d"
PAGE = b"<script>fetch('/').then(r => r.text()).then(t => document.title = t)</script>"
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(document.domain)"/>'
ORIGIN = "http://127.0.0.1:8000"


@pytest.fixture
def local(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, long_poll_timeout=0.2, public_url=ORIGIN)


@asynccontextmanager
async def serve(settings: Settings, base_url: str = ORIGIN) -> AsyncIterator[Client]:
    async with AsyncTestClient(create_app(settings), base_url=base_url) as client:
        client.follow_redirects = False
        yield client


def bearer(key: str = KEY) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


# --- stream content never runs as the app's origin ------------------------------------------------


def assert_sandboxed(response: Any, spelling: str) -> None:
    headers = response.headers
    assert "sandbox" in headers.get("content-security-policy", ""), (spelling, dict(headers))
    assert headers.get("x-content-type-options") == "nosniff", spelling
    kind = headers.get("content-type", "").split(";")[0].strip().lower()
    if kind in ("text/html", "image/svg+xml"):
        assert headers.get("content-disposition", "").startswith("attachment"), (spelling, dict(headers))


async def _html_streams(client: Client, headers: dict[str, str] | None = None) -> tuple[str, str]:
    """A closed text/html protocol stream `evil/page` and an SVG service stream; the latter's id."""
    headers = headers or {}
    created = await client.put(
        "/v1/stream/evil/page",
        content=PAGE,
        headers={**headers, "content-type": "text/html", "stream-closed": "true"},
    )
    assert created.status_code == 201, created.text
    made = await client.post(
        "/stream", json={"name": "evil", "headers": {"content-type": "image/svg+xml"}}, headers=headers
    )
    assert made.status_code == 200, made.text
    stream_id = made.json()["id"]
    assert (await client.post(f"/stream/{stream_id}/append", content=SVG, headers=headers)).status_code == 204
    assert (await client.post(f"/stream/{stream_id}/complete", headers=headers)).status_code == 204
    return "evil/page", stream_id


PROTOCOL_SPELLINGS = [
    "/v1/stream/{name}",
    "/v1/%73tream/{name}",
    "/%761/stream/{name}",
    "/%76%31/%73%74%72%65%61%6d/{name}",
    "//v1/stream/{name}",
    "/v1//stream/{name}",
    "//v1//stream/{name}",
    "/%2Fv1/stream/{name}",
    "/v1%2Fstream/{name}",
    "/v1/stream/%65vil/page",
]
CONTENT_SPELLINGS = [
    "/stream/{id}",
    "//stream/{id}",
    "/%73tream/{id}",
    "///stream/{id}",
    "/%2Fstream/{id}",
    "/%2fstream/{id}",
    "/stream/{id}/",
    "/%73%74%72%65%61%6d/{id}",
]


async def test_stream_content_is_sandboxed_however_its_path_is_spelled(local: Settings) -> None:
    async with serve(local) as client:
        name, stream_id = await _html_streams(client)
        served = 0
        for template in PROTOCOL_SPELLINGS:
            path = ORIGIN + template.format(name=name)
            for query in ("?offset=-1", "?offset=-1&live=long-poll", "?offset=-1&live=sse"):
                response = await client.get(path + query)
                assert_sandboxed(response, path + query)
                served += response.status_code == 200 and PAGE in response.content
            assert_sandboxed(await client.head(path), path)
        for template in CONTENT_SPELLINGS:
            path = ORIGIN + template.format(id=stream_id)
            for method in ("GET", "HEAD"):
                response = await client.request(method, path)
                assert_sandboxed(response, f"{method} {path}")
                served += response.status_code == 200 and SVG in response.content
        root = await client.get(f"/{stream_id}", follow_redirects=True)
        assert_sandboxed(root, "root redirect")
        download = await client.get(f"/watch/{name}?download=1")
        assert_sandboxed(download, "viewer download")
        assert served >= 10, "most spellings reach the content, so each of them must carry the headers"


async def test_protocol_writes_answer_with_the_security_and_cors_headers(local: Settings) -> None:
    """Creates and appends are served past the framework's middleware: they add its headers themselves."""
    html = {"content-type": "text/html"}
    async with serve(local) as client:
        answers = [
            await client.put("/v1/stream/w/page", headers=html),  # 201
            await client.put("/v1/stream/w/page", headers=html),  # 200: the same again
            await client.put("/v1/stream/w/page", headers={"content-type": "text/plain"}),  # 409
            await client.put("/v1/stream/w/bad", headers={**html, "stream-ttl": "soon"}),  # 400
            await client.put("/v1/stream/", headers=html),  # 400: no name
            await client.post("/v1/stream/w/page", content=PAGE, headers=html),  # 204
        ]
        assert [a.status_code for a in answers] == [201, 200, 409, 400, 400, 204]
        for answer in answers:
            assert_sandboxed(answer, str(answer.request.url))
            assert answer.headers.get("access-control-allow-origin") == "*"
            assert "stream-next-offset" in answer.headers.get("access-control-expose-headers", "")
        assert answers[0].headers["content-disposition"].startswith("attachment")
        assert answers[0].headers["location"] == f"{ORIGIN}/v1/stream/w/page"
        assert answers[0].headers["content-length"] == "0"


async def test_active_types_are_attachments_and_passive_ones_stay_inline(local: Settings) -> None:
    async with serve(local) as client:
        for content_type in (
            "text/html",
            "text/html; charset=utf-8",
            "application/xhtml+xml",
            "text/xml",
            "application/xml",
            "image/svg+xml",
            "application/rss+xml",
            "TEXT/HTML",
        ):
            assert is_active(content_type), content_type
        for content_type in ("text/plain", "application/json", "text/csv", "image/png", "text/markdown"):
            assert not is_active(content_type), content_type
        await client.put("/v1/stream/plain", content=b"hi", headers={"content-type": "text/plain"})
        plain = await client.get("/v1/stream/plain?offset=-1")
        assert "content-disposition" not in plain.headers and plain.content == b"hi"
        assert "sandbox" in plain.headers["content-security-policy"]


async def test_opting_in_serves_active_types_inline_only_from_the_content_origin(local: Settings) -> None:
    content = dataclasses.replace(local, content_origin="http://content.127.0.0.1.nip.test:8000")
    async with serve(content, base_url="http://content.127.0.0.1.nip.test:8000") as client:
        # The content origin serves stream bytes and nothing else.
        assert (await client.get("/")).status_code == 404
        assert (await client.get("/watch/evil/page")).status_code == 404
        assert (await client.post("/stream", json={"name": "x"})).status_code == 404
        assert (await client.put("/v1/stream/x", headers={"content-type": "text/plain"})).status_code == 404
        assert (await client.post("/signin", data={"key": KEY})).status_code == 404
    async with serve(content) as app_origin:
        name, stream_id = await _html_streams(app_origin)
        page = (await app_origin.get(f"/watch/{name}")).text
        assert "http://content.127.0.0.1.nip.test:8000/v1/stream/evil/page" in page
        assert_sandboxed(await app_origin.get(f"/v1/stream/{name}?offset=-1"), "app origin")
    async with serve(content, base_url="http://content.127.0.0.1.nip.test:8000") as client:
        inline = await client.get(f"/v1/stream/{name}?offset=-1")
        assert inline.status_code == 200 and inline.content == PAGE
        assert "content-disposition" not in inline.headers
        assert "sandbox" in inline.headers["content-security-policy"]
        assert inline.headers["x-content-type-options"] == "nosniff"
        svg = await client.get(f"/stream/{stream_id}")
        assert svg.status_code == 200 and "content-disposition" not in svg.headers


# --- sign-in never sends the browser elsewhere ------------------------------------------------------


NEXT_ATTACKS = [
    "%2F%09%2Fevil.example%2Fphish",
    "/%0a/evil.example",
    "/%0d/evil.example",
    "%2F%5Cevil.example",
    "/\\evil.example",
    "//evil.example",
    "///evil.example",
    "https://evil.example/",
    "javascript:alert(1)",
    "/%E3%80%80/evil.example",
    "%E3%80%80//evil.example",
    "/%00/evil.example",
    "%20//evil.example",
    "/%C2%A0/evil.example",
    "/%ef%bc%8fevil.example",
]


def _is_safe(location: str) -> bool:
    return (
        location.startswith("/")
        and not re.match(r"^/[/\\\s\x00-\x1f]", location)
        and all(0x21 <= ord(c) < 0x7F for c in location)
    )


@pytest.mark.parametrize("attack", NEXT_ATTACKS)
async def test_sign_in_returns_only_to_a_path_on_this_server(local: Settings, attack: str) -> None:
    keyed = dataclasses.replace(local, api_keys=(KEY,))
    async with serve(keyed) as client:
        form = await client.get(f"/signin?next={attack}")
        assert form.status_code == 200, form.text
        done = await client.post("/signin?x=1", data={"key": KEY, "next": form_next(form.text)})
        assert done.status_code == 303 and _is_safe(done.headers["location"]), done.headers["location"]
        # Signed in, the form redirects at once.
        again = await client.get(f"/signin?next={attack}")
        assert again.status_code == 303 and _is_safe(again.headers["location"]), again.headers["location"]
    keyless = await _keyless_signin(local, attack)
    assert keyless.status_code == 303 and _is_safe(keyless.headers["location"]), keyless.headers["location"]


def form_next(page: str) -> str:
    match = re.search(r'name="next" value="([^"]*)"', page)
    assert match, "the sign-in form has no next field"
    return html.unescape(match.group(1))


async def _keyless_signin(settings: Settings, attack: str) -> Any:
    async with serve(settings) as client:
        return await client.get(f"/signin?next={attack}")


def test_safe_next_keeps_local_paths_and_queries() -> None:
    assert session.safe_next("/?namespace=x&meta=a%3Db") == "/?namespace=x&meta=a%3Db"
    assert session.safe_next("/watch/a/b") == "/watch/a/b"
    assert session.safe_next("") == "/"


# --- the viewer shows metadata only to those the API shows it to ----------------------------------


async def test_the_public_viewer_hides_metadata_from_strangers(local: Settings) -> None:
    keyed = dataclasses.replace(local, api_keys=(KEY,))
    async with serve(keyed) as client:
        made = await client.post(
            "/stream",
            json={"name": "private", "metadata": {"customer_email": "ceo@example.com", "plan": "gold"}},
            headers=bearer(),
        )
        watch = made.json()["viewer_url"]
        stranger = await client.get(watch)
        assert stranger.status_code == 200
        assert "ceo@example.com" not in stranger.text and "customer_email" not in stranger.text
        signed = await client.post("/signin", data={"key": KEY, "next": "/"})
        assert signed.status_code == 303
        operator = await client.get(watch)
        assert "ceo@example.com" in operator.text and "customer_email" in operator.text
    async with serve(local) as keyless:
        made = await keyless.post("/stream", json={"name": "open", "metadata": {"plan": "gold-plan"}})
        shown = await keyless.get(made.json()["viewer_url"])
        assert "gold-plan" in shown.text


# --- a keyless server answers only to its own names, and takes writes only from its own pages ---------


async def test_a_keyless_server_refuses_other_host_names(local: Settings) -> None:
    async with serve(local, base_url="http://rebound.evil.example:8000") as client:
        for method, path in (("GET", "/"), ("GET", "/v1/stream/x?offset=-1"), ("POST", "/stream/list")):
            response = await client.request(method, path)
            assert response.status_code == 421, (method, path, response.status_code)
            assert "host" in response.text.lower()
    for host in ("::1", "[::1]:8000", "127.0.0.2", "app.localhost", "LOCALHOST:80"):
        assert answers_to(host, frozenset()), host
    for base in ("http://127.0.0.1:8000", "http://localhost:8000", ORIGIN):
        async with serve(local, base_url=base) as client:
            assert (await client.get("/healthz")).status_code == 200, base
            assert (await client.get("/")).status_code == 200, base
    public = dataclasses.replace(local, public_url="https://streams.example.org")
    async with serve(public, base_url="https://streams.example.org") as client:
        assert (await client.get("/")).status_code == 200
    keyed = dataclasses.replace(local, api_keys=(KEY,))
    async with serve(keyed, base_url="http://anything.example") as client:
        assert (await client.get("/healthz")).status_code == 200, "keyed servers are reached by any name"


async def test_a_keyless_server_takes_cross_site_writes_only_from_configured_origins(local: Settings) -> None:
    evil = {"origin": "https://evil.example"}
    async with serve(local) as client:
        await client.put("/v1/stream/shared", content=b"x", headers={"content-type": "text/plain"})
        read = await client.get("/v1/stream/shared?offset=-1", headers=evil)
        assert read.headers["access-control-allow-origin"] == "*", "reads stay open"
        preflight = await client.options(
            "/v1/stream/shared",
            headers={**evil, "access-control-request-method": "POST"},
        )
        assert "access-control-allow-origin" not in preflight.headers
        write = await client.post(
            "/v1/stream/shared", content=b"y", headers={**evil, "content-type": "text/plain"}
        )
        assert write.status_code == 403 and "STREAMHOLD_CORS_ORIGINS" in write.text
        listed = await client.post("/stream/list", json={}, headers=evil)
        assert listed.status_code == 403
        made = await client.post("/stream", json={"name": "x"}, headers=evil)
        assert made.status_code == 403
        assert (await client.get("/v1/stream/shared?offset=-1")).content == b"x"
    allowed = dataclasses.replace(local, cors_origins=("https://app.example",))
    async with serve(allowed) as client:
        friend = {"origin": "https://app.example"}
        await client.put("/v1/stream/shared", content=b"x", headers={"content-type": "text/plain"})
        preflight = await client.options(
            "/v1/stream/shared", headers={**friend, "access-control-request-method": "POST"}
        )
        assert preflight.headers["access-control-allow-origin"] in ("*", "https://app.example")
        write = await client.post(
            "/v1/stream/shared", content=b"y", headers={**friend, "content-type": "text/plain"}
        )
        assert write.status_code == 204
        assert write.headers["access-control-allow-origin"] in ("*", "https://app.example")
        refused = await client.post(
            "/v1/stream/shared", content=b"z", headers={**evil, "content-type": "text/plain"}
        )
        assert refused.status_code == 403
    keyed = dataclasses.replace(local, api_keys=(KEY,))
    async with serve(keyed) as client:
        await client.put("/v1/stream/k", headers={**bearer(), "content-type": "text/plain"})
        write = await client.post(
            "/v1/stream/k", content=b"y", headers={**evil, **bearer(), "content-type": "text/plain"}
        )
        assert write.status_code == 204, "a keyed write needs the key, so any origin may send it"


async def test_the_dashboard_origin_check_compares_the_scheme(local: Settings) -> None:
    keyed = dataclasses.replace(local, api_keys=(KEY,), public_url="https://streams.example.org")
    async with serve(keyed, base_url="https://streams.example.org") as client:
        downgraded = await client.post(
            "/signin", data={"key": KEY}, headers={"origin": "http://streams.example.org"}
        )
        assert downgraded.status_code == 403
        same = await client.post(
            "/signin", data={"key": KEY}, headers={"origin": "https://streams.example.org"}
        )
        assert same.status_code == 303


# --- signing out ends the session everywhere --------------------------------------------------------


async def test_signing_out_revokes_the_session_cookie(local: Settings) -> None:
    keyed = dataclasses.replace(local, api_keys=(KEY,))
    async with serve(keyed) as client, serve(keyed) as other_process:
        assert (await client.post("/signin", data={"key": KEY, "next": "/"})).status_code == 303
        stolen = client.cookies.get(session.COOKIE)
        assert stolen
        page = await client.get("/")
        assert page.status_code == 200
        other_process.cookies.set(session.COOKIE, stolen)
        assert (await other_process.get("/")).status_code == 200
        token = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
        assert token, "the page carries its CSRF token"
        assert (await client.post("/signout", data={"csrf": token.group(1)})).status_code == 303
        client.cookies.set(session.COOKIE, stolen)
        assert (await client.get("/")).status_code == 303, "the old cookie no longer signs in"
        assert (await other_process.get("/")).status_code == 303, "nor on another process"


# --- ids give nothing away ------------------------------------------------------------------------


def test_ids_made_in_one_millisecond_are_not_neighbours() -> None:
    ids = [int(new_stream_id().removeprefix("stream_"), 16) for _ in range(3000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    for before, after in zip(ids, ids[1:], strict=False):
        # At least 64 random bits: the low 64 bits of ids made one after another share no pattern.
        assert (after - before) > 2**32, "an id is its neighbour plus a small step"
    low = [value & (2**62 - 1) for value in ids]
    assert len({value >> 52 for value in low}) > 900, "the low bits are random, not a counter"


def test_a_real_server_sandboxes_every_spelling_on_the_wire(tmp_path: Path) -> None:
    """The same attack through uvicorn, with the path bytes exactly as an attacker's link sends them."""
    import http.client

    from tests._server import ServerProcess

    with ServerProcess(env={"STREAMHOLD_DATA_DIR": str(tmp_path)}) as server:
        host, port = server.url.removeprefix("http://").split(":")

        def request(method: str, path: str, body: bytes = b"", **headers: str) -> http.client.HTTPResponse:
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            conn.close()
            return response

        made = request(
            "PUT", "/v1/stream/evil/page", PAGE, **{"content-type": "text/html", "stream-closed": "true"}
        )
        assert made.status == 201
        served = 0
        for path in (
            "/v1/%73tream/evil/page?offset=-1",
            "//v1/stream/evil/page?offset=-1",
            "/%761/stream/evil/page",
        ):
            response = request("GET", path)
            served += response.status == 200
            assert "sandbox" in (response.getheader("content-security-policy") or ""), path
            assert response.getheader("x-content-type-options") == "nosniff", path
            if response.status == 200:
                assert (response.getheader("content-disposition") or "").startswith("attachment"), path
        assert served >= 2, "the spellings reach the content, so they must carry the headers"
        rebound = request("GET", "/v1/stream/evil/page?offset=-1", host=f"evil.example:{port}")
        assert rebound.status == 421


def test_the_content_origin_and_cors_origins_are_read_and_checked() -> None:
    env = {
        "STREAMHOLD_PUBLIC_URL": "https://streams.example.org",
        "STREAMHOLD_CONTENT_ORIGIN": "https://content.example.org/",
        "STREAMHOLD_CORS_ORIGINS": "https://app.example, https://other.example/",
    }
    read = Settings.from_env(env)
    assert read.content_origin == "https://content.example.org"
    assert read.cors_origins == ("https://app.example", "https://other.example")
    for wrong in ("content.example.org", "https://streams.example.org"):
        with pytest.raises(SettingsError, match="STREAMHOLD_CONTENT_ORIGIN"):
            Settings.from_env({**env, "STREAMHOLD_CONTENT_ORIGIN": wrong})


async def test_every_page_carries_the_page_policy_and_cannot_be_framed(tmp_path: Path) -> None:
    keyed = Settings(data_dir=tmp_path, api_keys=(KEY,), public_url=ORIGIN)
    async with serve(keyed) as client:
        await client.put("/v1/stream/framed", headers={"authorization": f"Bearer {KEY}"})
        signin = await client.get("/signin")
        reload = await client.get("/", headers={"sec-fetch-site": "cross-site"}, follow_redirects=False)
        cookie = await client.post("/signin", data={"key": KEY, "next": "/"}, follow_redirects=False)
        assert cookie.status_code == 303
        dashboard = await client.get("/")
        viewer = await client.get("/watch/framed")
    for name, page in [("signin", signin), ("reload", reload), ("dashboard", dashboard), ("viewer", viewer)]:
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html"), name
        assert page.headers["content-security-policy"] == PAGE_CSP, name
        assert page.headers["x-frame-options"] == "DENY", name
        assert page.headers["x-content-type-options"] == "nosniff", name


def test_only_the_headers_module_names_security_headers() -> None:
    """CSP, nosniff, frame options and CORS are set in http/headers.py only (reading a request's is fine)."""
    app_dir = Path(__file__).resolve().parent.parent / "app"
    spelled = re.compile(
        r"content-security-policy|x-content-type-options|x-frame-options|access-control-(?!request-)",
        re.IGNORECASE,
    )
    strays = [
        f"{path.relative_to(app_dir)}:{number}"
        for path in sorted(app_dir.rglob("*.py"))
        if path.relative_to(app_dir).as_posix() != "http/headers.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if spelled.search(line)
    ]
    assert strays == []
