"""A content type that lists several types is judged by every one of them, as browsers may pick any."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from streamhold.http.headers import is_active
from streamhold.main import create_app
from streamhold.settings import Settings

pytestmark = pytest.mark.timeout(60)

ORIGIN = "http://127.0.0.1:8000"
LISTS = [
    "text/plain, text/html",
    "text/plain,text/html;charset=utf-8",
    "text/plain;,text/html",
    "a/b,image/svg+xml",
]


@pytest.mark.parametrize("content_type", LISTS)
def test_a_list_with_an_active_type_is_active(content_type: str) -> None:
    assert is_active(content_type)


async def test_a_stream_typed_with_a_list_naming_html_is_an_attachment(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, long_poll_timeout=0.2, public_url=ORIGIN)
    async with AsyncTestClient[Any](create_app(settings), base_url=ORIGIN) as client:
        headers = {"content-type": "text/plain, text/html", "stream-closed": "true"}
        made = await client.put("/v1/stream/listed", content=b"<script>alert(1)</script>", headers=headers)
        assert made.status_code == 201, made.text
        read = await client.get(ORIGIN + "/v1/stream/listed?offset=-1")
        assert read.status_code == 200
        assert read.headers.get("content-disposition", "").startswith("attachment"), dict(read.headers)
