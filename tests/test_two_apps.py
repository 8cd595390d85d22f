"""Two apps in one process share nothing a reader leaves behind: each owns its caches through its hub."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from litestar.testing import AsyncTestClient

from streamhold.live import LiveHub
from streamhold.main import create_app
from streamhold.settings import Settings
from tests._server import LOOPBACK


async def test_two_apps_in_one_process_keep_their_read_caches_apart(tmp_path: Path) -> None:
    apps = [
        create_app(Settings(data_dir=tmp_path / name, long_poll_timeout=0.5, public_url="http://sh.test"))
        for name in ("one", "two")
    ]
    async with (
        AsyncTestClient(apps[0], base_url=LOOPBACK) as one,
        AsyncTestClient(apps[1], base_url=LOOPBACK) as two,
    ):
        for client, body in ((one, b"first app"), (two, b"second app")):
            created = await client.put("/v1/stream/same/name", headers={"content-type": "text/plain"})
            assert created.status_code == 201, created.text
            appended = await client.post(
                "/v1/stream/same/name",
                content=body,
                headers={"content-type": "text/plain", "stream-closed": "true"},
            )
            assert appended.status_code == 204, appended.text
        hubs: list[LiveHub] = [one.app.state.hub, two.app.state.hub]
        assert hubs[0] is not hubs[1]
        assert hubs[0].sse_blocks is not hubs[1].sse_blocks
        assert hubs[0].advanced_states is not hubs[1].advanced_states

        # The same name, the same offsets, the same closed state: only the app tells the reads apart.
        params: dict[str, Any] = {"offset": "-1", "live": "sse"}
        first = await one.get("/v1/stream/same/name", params=params)
        assert "data:first app" in first.text and first.text.count("event: data") == 1
        assert len(hubs[0].sse_blocks) == 1
        assert len(hubs[1].sse_blocks) == 0, "the second app holds a block the first app encoded"
        second = await two.get("/v1/stream/same/name", params=params)
        assert "data:second app" in second.text and "first app" not in second.text
        assert len(hubs[0].sse_blocks) == len(hubs[1].sse_blocks) == 1
