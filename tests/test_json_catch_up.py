"""A JSON catch-up whose first message is over the response limit reads on only to that message's end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from streamhold.main import create_app
from streamhold.protocol.wire import JSON_CATCHUP_LIMIT
from streamhold.settings import Settings

pytestmark = pytest.mark.timeout(60)

ORIGIN = "http://127.0.0.1:8000"
MIB = 1024 * 1024


async def test_a_large_first_message_does_not_read_the_rest_of_the_stream(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, long_poll_timeout=0.2, public_url=ORIGIN, max_append_bytes=6 * MIB)
    app = create_app(settings)
    async with AsyncTestClient[Any](app, base_url=ORIGIN) as client:
        json_type = {"content-type": "application/json"}
        assert (await client.put("/v1/stream/big", headers=json_type)).status_code == 201
        large = ["x" * (JSON_CATCHUP_LIMIT + 1000)]
        assert (await client.post("/v1/stream/big", headers=json_type, json=large)).status_code == 204
        after = [{"n": i, "pad": "y" * 1000} for i in range(12000)]
        for start in range(0, len(after), 1000):
            posted = await client.post("/v1/stream/big", headers=json_type, json=after[start : start + 1000])
            assert posted.status_code == 204, posted.text
        store = app.state.store
        asked: list[int] = []
        read = store.read

        async def counted(stream_id: str, start: int, end: int) -> bytes:
            asked.append(end - start)
            return await read(stream_id, start, end)

        store.read = counted
        first = await client.get("/v1/stream/big", params={"offset": "-1"})
        assert first.status_code == 200 and json.loads(first.content) == large
        assert sum(asked) <= 2 * JSON_CATCHUP_LIMIT, f"read {asked} bytes for one message"
