"""Who may manage subscriptions: an admin key any; a manage token only those whose streams it covers."""

from __future__ import annotations

from pathlib import Path

from litestar.testing import AsyncTestClient

from streamhold import Settings, create_app
from streamhold.protocol.subscriptions import reach
from streamhold.subscriptions.model import Config
from tests._server import LOOPBACK

KEY = "admin-key-for-subscription-rights"
ADMIN = {"authorization": f"Bearer {KEY}"}
BASE = "/v1/stream/__ds/subscriptions"


def _config(pattern: str | None = None, streams: list[str] | None = None, wake: str = "wake/w") -> Config:
    body: dict[str, object] = {"type": "pull-wake", "wake_stream": wake}
    if pattern is not None:
        body["pattern"] = pattern
    if streams is not None:
        body["streams"] = streams
    return Config.parse(body)


def test_reach_names_every_namespace_a_subscription_can_touch() -> None:
    assert reach(_config("chat/*")) == {"chat", "wake"}
    assert reach(_config("chat/**", ["orders/1"], wake="chat/wakes")) == {"chat", "orders"}
    assert reach(_config("one-segment")) == {"default", "wake"}
    assert reach(_config("*")) == {"default", "wake"}  # `*` is one segment: names without a slash
    for anywhere in ("**", "*/x", "c*/x", "[ab]/x"):
        assert reach(_config(anywhere)) is None, anywhere


async def test_tokens_manage_only_the_subscriptions_they_cover(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path, api_keys=(KEY,)))
    async with AsyncTestClient(app, base_url=LOOPBACK) as client:

        async def token(scopes: list[str], namespaces: list[str]) -> dict[str, str]:
            body = {"scopes": scopes, "namespaces": namespaces}
            minted = await client.post("/tokens", json=body, headers=ADMIN)
            assert minted.status_code == 201, minted.text
            return {"authorization": f"Bearer {minted.json()['token']}"}

        chat = await token(["manage"], ["chat"])
        everywhere = await token(["manage"], ["*"])
        writer = await token(["write"], ["chat"])
        mine = {"type": "pull-wake", "pattern": "chat/*", "wake_stream": "chat/wakes"}

        assert (await client.put(f"{BASE}/a", json=mine)).status_code == 401
        lacking = await client.put(f"{BASE}/a", json=mine, headers=writer)
        assert lacking.status_code == 403 and "manage scope" in lacking.text
        assert (await client.put(f"{BASE}/a", json=mine, headers=chat)).status_code == 201
        assert (await client.get(f"{BASE}/a", headers=chat)).status_code == 200

        # A wake stream, a pattern or an added stream in another namespace is out of its reach.
        elsewhere = await client.put(f"{BASE}/b", json={**mine, "wake_stream": "ops/wakes"}, headers=chat)
        assert elsewhere.status_code == 403 and "namespace ops" in elsewhere.text
        added = await client.post(f"{BASE}/a/streams", json={"streams": ["ops/x"]}, headers=chat)
        assert added.status_code == 403 and "namespace ops" in added.text
        wide = {**mine, "pattern": "**"}
        refused = await client.put(f"{BASE}/c", json=wide, headers=chat)
        assert refused.status_code == 403 and "any namespace" in refused.text
        assert (await client.put(f"{BASE}/c", json=wide, headers=everywhere)).status_code == 201

        # Nor may it read, change or delete a subscription that reaches further than it does.
        assert (await client.get(f"{BASE}/c", headers=chat)).status_code == 403
        assert (await client.delete(f"{BASE}/c", headers=chat)).status_code == 403
        assert (await client.put(f"{BASE}/c", json=mine, headers=chat)).status_code == 403
        assert (await client.delete(f"{BASE}/c", headers=ADMIN)).status_code == 204
        assert (await client.delete(f"{BASE}/a", headers=chat)).status_code == 204
