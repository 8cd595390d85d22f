"""Sign-in, sign-out and demo forms whose bytes are not the text they claim to be get a 4xx, not a 500."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from streamhold.main import create_app
from streamhold.settings import Settings
from streamhold.web import session

pytestmark = pytest.mark.timeout(60)

KEY = "key-for-form-tests-9c2a"
ORIGIN = "http://127.0.0.1:8000"
BAD_MULTIPART = b'--b\r\nContent-Disposition: form-data; name="next"\r\n\r\n/\xe3\x80\x80\xff\r\n--b--\r\n'


@pytest.mark.parametrize(
    ("path", "keys"),
    [("/signin", (KEY,)), ("/signin", ()), ("/signout", (KEY,)), ("/signout", ()), ("/demo", (KEY,))],
)
async def test_a_form_that_is_not_utf8_gets_a_4xx(tmp_path: Path, keys: tuple[str, ...], path: str) -> None:
    settings = Settings(data_dir=tmp_path, long_poll_timeout=0.2, public_url=ORIGIN, api_keys=keys)
    async with AsyncTestClient[Any](create_app(settings), base_url=ORIGIN) as client:
        client.follow_redirects = False
        if keys:
            signed = await client.post("/signin", data={"key": KEY, "next": "/"})
            assert signed.status_code == 303, signed.text
        response = await client.post(
            path, content=BAD_MULTIPART, headers={"content-type": "multipart/form-data; boundary=b"}
        )
        assert 400 <= response.status_code < 500, (path, response.status_code, response.text)


@pytest.mark.parametrize("next_url", ["/\ud800", "/a\udfff/b", "/\u3000/evil.example", "/\u2028x"])
def test_safe_next_refuses_what_cannot_travel_in_a_location_header(next_url: str) -> None:
    assert session.safe_next(next_url) == "/"
