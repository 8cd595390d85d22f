"""Embedding streams in other sites' pages: the client module's URLs and caching, the viewer's embed mode
and who may frame it, and STREAMHOLD_EMBED_ORIGINS."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from litestar.testing import AsyncTestClient

from streamhold.cli import main
from streamhold.main import create_app
from streamhold.settings import Settings, SettingsError
from streamhold.web.client import MODULE, VERSION
from tests._server import LOOPBACK

pytestmark = pytest.mark.timeout(60)

Client = AsyncTestClient[Any]
BLOG = "https://blog.example.org"


async def _client(settings: Settings) -> AsyncIterator[Client]:
    async with AsyncTestClient(create_app(settings), base_url=LOOPBACK) as client:
        headers = {"content-type": "text/markdown"}
        await client.put("/v1/stream/e/doc.md", content=b"# Hello\n", headers=headers)
        yield client


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[Client]:
    async for client in _client(Settings(data_dir=tmp_path)):
        yield client


@pytest.fixture
async def embedding(tmp_path: Path) -> AsyncIterator[Client]:
    async for client in _client(Settings(data_dir=tmp_path, embed_origins=(BLOG, "http://127.0.0.1:8123"))):
        yield client


def test_the_version_is_the_package_version() -> None:
    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    match = re.search(r'^version = "([^"]+)"', text, re.M)
    assert match is not None
    assert VERSION == match.group(1)


async def test_versioned_module_is_cached_for_good_and_readable_cross_origin(client: Client) -> None:
    response = await client.get(f"/static/streamhold-{VERSION}.js", headers={"origin": BLOG})
    assert response.status_code == 200
    assert response.content == MODULE.read_bytes()
    assert response.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert response.headers["content-type"].startswith("text/javascript")
    assert response.headers["access-control-allow-origin"] == "*"
    assert response.headers["cross-origin-resource-policy"] == "cross-origin"
    assert response.headers["x-content-type-options"] == "nosniff"
    etag = response.headers["etag"]
    again = await client.get(f"/static/streamhold-{VERSION}.js", headers={"if-none-match": etag})
    assert again.status_code == 304


async def test_stable_alias_has_a_short_cache(client: Client) -> None:
    response = await client.get("/static/streamhold.js")
    assert response.status_code == 200
    assert response.content == MODULE.read_bytes()
    assert response.headers["cache-control"] == "public, max-age=300"
    assert response.headers["access-control-allow-origin"] == "*"


async def test_another_version_is_not_served_as_this_one(client: Client) -> None:
    response = await client.get("/static/streamhold-0.0.0-not-this.js")
    assert response.status_code == 404


async def test_module_exports_the_api_and_defines_the_element() -> None:
    source = MODULE.read_text()
    for name in ("async function follow", "function createRenderer", "class StreamholdStream"):
        assert f"export {name}" in source
    assert 'customElements.define("streamhold-stream"' in source
    code = re.sub(r"/\*.*?\*/", "", source, flags=re.S)
    assert "innerHTML" not in code and "insertAdjacentHTML" not in code and "eval(" not in code
    assert not re.search(r"^\s*import ", source, re.M), "the module has no dependencies"


async def test_the_viewer_renders_and_follows_with_the_module(client: Client) -> None:
    page = (await client.get("/watch/e/doc.md")).text
    assert '<script type="module" src="/static/watch.js"></script>' in page
    watch = (await client.get("/static/watch.js")).text
    assert 'import { createRenderer, follow } from "./streamhold.js";' in watch
    assert (await client.get("/static/watch-render.js")).status_code == 404


async def test_embed_mode_has_no_chrome(client: Client) -> None:
    full = (await client.get("/watch/e/doc.md")).text
    embed = (await client.get("/watch/e/doc.md?embed=1")).text
    assert 'class="topbar"' in full and 'class="topbar"' not in embed
    assert 'id="copy-link"' in full and 'id="copy-link"' not in embed
    assert 'class="watch-meta"' in full and 'class="watch-meta"' not in embed
    assert 'id="watch"' in embed and "# Hello" in embed
    assert '<body class="embed">' in embed


async def test_nobody_may_frame_the_embed_by_default(client: Client) -> None:
    response = await client.get("/watch/e/doc.md?embed=1")
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert response.headers["x-frame-options"] == "DENY"


async def test_listed_origins_may_frame_the_embed_only(embedding: Client) -> None:
    response = await embedding.get("/watch/e/doc.md?embed=1")
    csp = response.headers["content-security-policy"]
    assert f"frame-ancestors {BLOG} http://127.0.0.1:8123" in csp
    assert "'none'" not in csp.split("frame-ancestors", 1)[1]
    assert "x-frame-options" not in response.headers
    assert "script-src 'self'" in csp
    gone = await embedding.get("/watch/e/missing?embed=1")
    assert gone.status_code == 404 and f"frame-ancestors {BLOG}" in gone.headers["content-security-policy"]
    # The full viewer and the other pages stay unframeable.
    for path in ("/watch/e/doc.md", "/"):
        page = await embedding.get(path)
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"], path
        assert page.headers["x-frame-options"] == "DENY", path


def test_embed_origins_are_read_and_checked_at_start() -> None:
    settings = Settings.from_env(
        {
            "STREAMHOLD_EMBED_ORIGINS": " https://Blog.example.org/ ,http://127.0.0.1:8123,https://*.example.net"
        }
    )
    assert settings.embed_origins == (BLOG, "http://127.0.0.1:8123", "https://*.example.net")
    assert Settings.from_env({}).embed_origins == ()
    bad_values = ("blog.example.org", "https://blog.example.org/path", "https://a.org; script-src *", "*")
    for bad in (*bad_values, "'self'", "javascript:alert(1)", "https://a.org https://b.org"):
        with pytest.raises(SettingsError, match="STREAMHOLD_EMBED_ORIGINS: .* is not an origin"):
            Settings.from_env({"STREAMHOLD_EMBED_ORIGINS": bad})


def test_serve_stops_at_start_on_a_malformed_embed_origin(tmp_path: Path) -> None:
    env = {
        "STREAMHOLD_DATA_DIR": str(tmp_path),
        "STREAMHOLD_EMBED_ORIGINS": "https://ok.example.org,blog.example.org/x",
    }
    result = CliRunner(env=env).invoke(main, ["serve", "--port", "1"])
    assert result.exit_code == 1
    assert "STREAMHOLD_EMBED_ORIGINS: 'blog.example.org/x' is not an origin" in result.output
    assert not (tmp_path / "streamhold.db").exists()


async def test_a_protocol_head_names_the_streams_id_for_stop(client: Client) -> None:
    response = await client.head("/v1/stream/e/doc.md", headers={"origin": BLOG})
    stream_id = response.headers["streamhold-stream-id"]
    assert re.fullmatch(r"stream_[0-9a-f]{32}", stream_id)
    assert "streamhold-stream-id" in response.headers["access-control-expose-headers"]
    assert (await client.post(f"/stream/{stream_id}/stop")).json()["id"] == stream_id


async def test_a_content_url_read_in_protocol_terms_goes_to_the_protocol_url(client: Client) -> None:
    """follow() and the element take a /stream/{id} URL: its protocol reads are sent on, query kept."""
    head = await client.head("/v1/stream/e/doc.md")
    stream_id = head.headers["streamhold-stream-id"]
    for query in (
        "offset=-1&share=abc",
        "share=abc&offset=" + head.headers["stream-next-offset"] + "&live=sse",
    ):
        response = await client.get(f"/stream/{stream_id}?{query}", follow_redirects=False)
        assert response.status_code == 307, response.text
        assert response.headers["location"] == f"/v1/stream/e/doc.md?{query}"
        assert response.headers["access-control-allow-origin"] == "*"
    # The content URL's own reads are unchanged.
    assert (await client.get(f"/stream/{stream_id}?offset=2&follow=false")).text == "Hello\n"


async def test_a_private_streams_content_url_does_not_redirect_without_a_read_right(tmp_path: Path) -> None:
    key = {"authorization": "Bearer embed-key"}
    settings = Settings(data_dir=tmp_path, api_keys=("embed-key",), reads="private")
    async with AsyncTestClient(create_app(settings), base_url=LOOPBACK) as client:
        await client.put("/v1/stream/secret/doc", content=b"x", headers={"content-type": "text/plain", **key})
        stream_id = (await client.head("/v1/stream/secret/doc", headers=key)).headers["streamhold-stream-id"]
        refused = await client.get(f"/stream/{stream_id}?offset=-1", follow_redirects=False)
        assert refused.status_code == 401 and "location" not in refused.headers
        assert "streamhold-stream-id" not in (await client.head("/v1/stream/secret/doc")).headers
        sent = await client.get(f"/stream/{stream_id}?offset=-1", headers=key, follow_redirects=False)
        assert sent.status_code == 307 and sent.headers["location"] == "/v1/stream/secret/doc?offset=-1"
