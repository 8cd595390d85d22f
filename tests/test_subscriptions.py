"""Subscriptions end to end: real `streamhold serve` subprocesses, real webhook receivers on 127.0.0.1.

Every receiver listens on loopback; the URLs that must be refused are refused before any connection, so
no test here ever connects anywhere else.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from aiohttp import web

from streamhold import RemoteStreams, SubscriptionRequestError, WebhookVerificationError, verify_webhook
from streamhold.subscriptions.signing import SigningKey, TokenError
from streamhold.subscriptions.urls import webhook_url_problem
from tests._server import HOST, ServerProcess

pytestmark = pytest.mark.timeout(240)

START_S = 60.0  # a loaded test machine can take a while to start a server
JSON = {"content-type": "application/json"}
UNSAFE = [
    "http://10.0.0.1/hook",
    "http://169.254.169.254/latest/meta-data",
    "http://192.168.1.1/hook",
    "http://[::1]:9/hook",  # loopback, refused without STREAMHOLD_WEBHOOK_ALLOW_LOOPBACK
    "https://example.com/hook",  # a name: never resolved, so never allowed
    "http://[fe80::1]/hook",
    "http://224.0.0.1/hook",
]


class Receiver:
    """A webhook receiver on 127.0.0.1 that records each delivery and answers as its script says.

    Each entry of `script` answers one delivery: a JSON value (sent with 200), an int (that status), or
    "hang" (no answer until the test ends). Once the script is used up, it answers {"done": true}.
    """

    def __init__(self, script: list[Any] | None = None) -> None:
        self.script = list(script or [])
        self.deliveries: list[tuple[float, bytes, dict[str, str]]] = []
        self.release = asyncio.Event()
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/webhook"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.deliveries.append((time.monotonic(), body, dict(request.headers)))
        answer = self.script.pop(0) if self.script else {"done": True}
        if answer == "hang":
            try:
                await asyncio.wait_for(self.release.wait(), 60)
            except TimeoutError:
                pass
            return web.json_response({})
        if isinstance(answer, int):
            return web.Response(status=answer, text="not now")
        return web.json_response(answer)

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/webhook", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, HOST, 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        assert self._runner is not None
        await self._runner.cleanup()

    async def wait_for(self, count: int, within: float = 20.0) -> list[dict[str, Any]]:
        """The payloads of the first `count` deliveries, once that many have arrived."""
        deadline = time.monotonic() + within
        while len(self.deliveries) < count:
            assert time.monotonic() < deadline, (
                f"{len(self.deliveries)} of {count} webhooks within {within} s"
            )
            await asyncio.sleep(0.02)
        return [json.loads(body) for _, body, _ in self.deliveries[:count]]


def server(data_dir: Path, **env: str) -> ServerProcess:
    base = {"STREAMHOLD_DATA_DIR": str(data_dir), "STREAMHOLD_WEBHOOK_ALLOW_LOOPBACK": "true"}
    return ServerProcess(env={**base, **env}, startup_timeout=START_S)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
        yield client


async def eventually(check: Any, within: float = 10.0) -> Any:
    """Poll an async check until it returns something truthy; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def acked(client: RemoteStreams, subscription_id: str, path: str) -> str:
    record = await client.get_subscription(subscription_id)
    assert record is not None
    return next(s["acked_offset"] for s in record["streams"] if s["path"] == path)


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


# --- URL safety ----------------------------------------------------------------------------------


@pytest.mark.parametrize("url", UNSAFE)
def test_unsafe_urls_are_judged_from_the_string_alone(url: str) -> None:
    assert webhook_url_problem(url, allow_loopback=False) is not None


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/hook", "http://[::1]:9/hook"])
def test_loopback_needs_the_switch(url: str) -> None:
    assert webhook_url_problem(url, allow_loopback=False) is not None
    assert webhook_url_problem(url, allow_loopback=True) is None


@pytest.mark.parametrize(
    "url",
    [
        "http://8.8.8.8/h",
        "ftp://8.8.8.8/h",
        "http://100.64.0.1/h",
        "http://[::ffff:10.0.0.1]/h",
        "https://user:pw@8.8.8.8/h",
        "https://0.0.0.0/h",
        "https://localhost/h",
    ],
)
def test_more_refusals(url: str) -> None:
    assert webhook_url_problem(url, allow_loopback=True) is not None


def test_a_public_address_over_https_is_allowed() -> None:
    assert webhook_url_problem("https://203.0.113.7/hook", allow_loopback=False) is not None  # TEST-NET
    assert webhook_url_problem("https://8.8.8.8/hook", allow_loopback=False) is None


async def test_unsafe_webhooks_are_refused_at_create_without_a_connection(tmp_path: Path) -> None:
    async with Receiver() as receiver:
        with ServerProcess(env={"STREAMHOLD_DATA_DIR": str(tmp_path)}, startup_timeout=START_S) as srv:
            async with RemoteStreams(srv.url) as client:
                for i, url in enumerate([*UNSAFE, receiver.url]):
                    with pytest.raises(SubscriptionRequestError) as refused:
                        await client.create_subscription(f"unsafe-{i}", pattern="events/*", webhook_url=url)
                    assert (refused.value.status, refused.value.code) == (400, "WEBHOOK_URL_REJECTED"), url
                    assert await client.get_subscription(f"unsafe-{i}") is None
        assert receiver.deliveries == []


# --- deliveries ----------------------------------------------------------------------------------


async def test_signed_webhook_then_fenced_callback_then_synchronous_done(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    async with Receiver(script=[{}]) as receiver:
        with server(tmp_path) as srv:
            async with RemoteStreams(srv.url) as client:
                await http.put(f"{srv.url}/v1/stream/orders/old", content=b'{"n":0}', headers=JSON)
                record = await client.create_subscription(
                    "orders", pattern="orders/*", webhook_url=receiver.url
                )
                assert [s["path"] for s in record["streams"]] == ["orders/old"]  # linked at its tail
                assert record["webhook"]["signing"]["kid"].startswith("ds_")
                jwks = (await http.get(record["webhook"]["signing"]["jwks_url"])).json()

                put = await http.put(f"{srv.url}/v1/stream/orders/1", content=b'{"n":1}', headers=JSON)
                [wake] = await receiver.wait_for(1)
                _, body, headers = receiver.deliveries[0]
                assert verify_webhook(body, headers, jwks) == wake
                tampered = body.replace(b'"generation":1', b'"generation":2')
                with pytest.raises(ValueError):
                    verify_webhook(tampered, headers, jwks)
                assert wake["generation"] == 1
                assert wake["callback_url"] == f"{srv.url}/v1/stream/__ds/subscriptions/orders/callback"
                streams = {s["path"]: s for s in wake["streams"]}
                assert streams["orders/1"]["has_pending"] and streams["orders/1"]["acked_offset"] == "-1"
                assert not streams["orders/old"]["has_pending"]  # history is not replayed
                tail = put.headers["stream-next-offset"]
                assert streams["orders/1"]["tail_offset"] == tail

                ack = {
                    "wake_id": wake["wake_id"],
                    "generation": 1,
                    "acks": [{"stream": "orders/1", "offset": tail}],
                    "done": True,
                }
                auth = {"authorization": f"Bearer {wake['callback_token']}"}
                first = await http.post(wake["callback_url"], json=ack, headers=auth)
                assert (first.status_code, first.json()) == (200, {"ok": True, "next_wake": False})
                again = await http.post(wake["callback_url"], json=ack, headers=auth)
                assert (again.status_code, again.json()["error"]["code"]) == (409, "FENCED")
                forged = await http.post(
                    wake["callback_url"], json=ack, headers={"authorization": "Bearer x.y"}
                )
                assert (forged.status_code, forged.json()["error"]["code"]) == (401, "TOKEN_INVALID")
                assert await acked(client, "orders", "orders/1") == tail

                # Now the receiver answers {"done": true}: the wake's snapshot is acknowledged at once.
                more = await http.post(f"{srv.url}/v1/stream/orders/1", content=b'{"n":2}', headers=JSON)
                second = (await receiver.wait_for(2))[1]
                assert second["generation"] == 2
                new_tail = more.headers["stream-next-offset"]

                async def moved() -> bool:
                    return await acked(client, "orders", "orders/1") == new_tail

                await eventually(moved)
                await client.delete_subscription("orders")
                assert await client.get_subscription("orders") is None
                gone = await http.post(wake["callback_url"], json=ack, headers=auth)
                assert gone.status_code == 404


async def test_failures_are_retried_with_backoff_and_never_slow_appends(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    async with Receiver(script=["hang", 500]) as receiver:
        with server(tmp_path, STREAMHOLD_WEBHOOK_TIMEOUT="1") as srv:
            async with RemoteStreams(srv.url) as client:
                await client.create_subscription("slow", pattern="jobs/*", webhook_url=receiver.url)
                await http.put(f"{srv.url}/v1/stream/jobs/a", content=b'{"n":0}', headers=JSON)
                await receiver.wait_for(1)
                # The receiver is hanging on the delivery: appends go on at their own pace.
                slowest = 0.0
                for n in range(20):
                    started = time.monotonic()
                    answer = await http.post(
                        f"{srv.url}/v1/stream/jobs/a", content=b'{"n":%d}' % n, headers=JSON
                    )
                    assert answer.status_code == 204
                    slowest = max(slowest, time.monotonic() - started)
                assert slowest < 0.5, f"an append took {slowest:.3f} s while a webhook hung"

                async def failed() -> bool:
                    record = await client.get_subscription("slow")
                    return record is not None and record["status"] == "failed"

                await eventually(failed)
                payloads = await receiver.wait_for(3, within=30)
                assert len({p["wake_id"] for p in payloads}) == 1  # the same wake, delivered again
                times = [at for at, _, _ in receiver.deliveries[:3]]
                # 1 s timeout, then about 1 s and 2 s of back-off (20% jitter).
                assert times[1] - times[0] >= 1.0 + 0.8 - 0.2
                assert times[2] - times[1] >= 1.6 - 0.2
                tail = (await http.head(f"{srv.url}/v1/stream/jobs/a")).headers["stream-next-offset"]

                async def caught_up() -> bool:
                    record = await client.get_subscription("slow")
                    assert record is not None
                    return record["status"] == "active" and record["streams"][0]["acked_offset"] >= tail

                await eventually(caught_up, within=20)
                text = (await http.get(f"{srv.url}/metrics")).text
                assert metric(text, "streamhold_webhook_failures_total") >= 2
                assert metric(text, "streamhold_webhook_retries_total") >= 2
                assert metric(text, "streamhold_webhook_deliveries_total") >= 3


async def test_a_restart_keeps_subscriptions_cursors_and_the_key(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    async with Receiver() as receiver:
        with server(tmp_path) as srv:
            async with RemoteStreams(srv.url) as client:
                await client.create_subscription(
                    "keep", streams=["logs/a"], webhook_url=receiver.url, description="kept"
                )
                jwks = (await http.get(f"{srv.url}/v1/stream/__ds/jwks.json")).json()
                await http.put(f"{srv.url}/v1/stream/logs/a", content=b'{"n":1}', headers=JSON)
                await receiver.wait_for(1)
                before = await client.get_subscription("keep")
            srv.restart()
            async with RemoteStreams(srv.url) as client:
                after = await client.get_subscription("keep")
                assert after is not None and before is not None
                assert after["streams"] == before["streams"]
                assert after["description"] == "kept"
                assert (await http.get(f"{srv.url}/v1/stream/__ds/jwks.json")).json() == jwks
                await http.post(f"{srv.url}/v1/stream/logs/a", content=b'{"n":2}', headers=JSON)
                second = (await receiver.wait_for(2))[1]
                _, body, headers = receiver.deliveries[1]
                assert verify_webhook(body, headers, jwks) == second  # signed with the kept key
                assert second["generation"] == 2


def _holder_of(port: int, processes: list[ServerProcess]) -> ServerProcess | None:
    for process in processes:
        proc = psutil.Process(process.pid)
        connections = (
            proc.net_connections(kind="tcp") if hasattr(proc, "net_connections") else proc.connections()
        )
        if any(c.raddr and c.raddr.port == port for c in connections):
            return process
    return None


async def test_a_killed_deliverer_is_taken_over_by_another_process(
    pg_url: str, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    env = {"STREAMHOLD_DATABASE_URL": pg_url, "STREAMHOLD_WEBHOOK_TIMEOUT": "4"}
    async with Receiver(script=["hang"]) as receiver:
        with server(tmp_path / "a", **env) as one, server(tmp_path / "b", **env) as two:
            async with RemoteStreams(one.url) as client:
                await client.create_subscription(
                    "shared", pattern="tasks/*", webhook_url=receiver.url, lease_ttl_ms=60_000
                )
            put = await http.put(f"{one.url}/v1/stream/tasks/1", content=b'{"n":1}', headers=JSON)
            [first] = await receiver.wait_for(1)
            deliverer = _holder_of(receiver.port, [one, two])
            assert deliverer is not None, "no server holds the webhook connection"
            os.kill(deliverer.pid, signal.SIGKILL)
            survivor = two if deliverer is one else one
            # The hold lapses (timeout + grace) and the other process sends the same wake again.
            second = (await receiver.wait_for(2, within=30))[1]
            assert (second["wake_id"], second["generation"]) == (first["wake_id"], first["generation"])
            async with RemoteStreams(survivor.url) as client:

                async def acknowledged() -> bool:
                    return await acked(client, "shared", "tasks/1") == put.headers["stream-next-offset"]

                await eventually(acknowledged)
            text = (await http.get(f"{survivor.url}/metrics")).text
            assert metric(text, "streamhold_subscription_lease_takeovers_total") == 1
            assert len(receiver.deliveries) == 2


async def test_pull_wake_claims_are_leased_and_fenced(tmp_path: Path, http: httpx.AsyncClient) -> None:
    with server(tmp_path) as srv:
        base = f"{srv.url}/v1/stream/__ds/subscriptions/pool"
        await http.put(f"{srv.url}/v1/stream/wake/pool", content=b"[]", headers=JSON)
        async with RemoteStreams(srv.url) as client:
            # `**` matches the wake stream too; its own wake events must never wake it.
            await client.create_subscription(
                "pool", "pull-wake", pattern="**", wake_stream="wake/pool", lease_ttl_ms=1000
            )
            put = await http.put(f"{srv.url}/v1/stream/work/1", content=b'{"n":1}', headers=JSON)
            tail = put.headers["stream-next-offset"]

            async def events() -> list[dict[str, Any]]:
                return list((await http.get(f"{srv.url}/v1/stream/wake/pool")).json())

            [event] = await eventually(events)
            assert (event["subscription_id"], event["stream"], event["generation"]) == ("pool", "work/1", 1)
            first = (await http.post(f"{base}/claim", json={"worker": "w1"})).json()
            assert first["generation"] == 1
            assert [s["path"] for s in first["streams"] if s["has_pending"]] == ["work/1"]
            busy = await http.post(f"{base}/claim", json={"worker": "w2"})
            assert busy.status_code == 409
            assert busy.json() == {
                "error": {"code": "ALREADY_CLAIMED", "current_holder": "w1", "generation": 1}
            }

            async def claimed_again() -> dict[str, Any] | None:
                answer = await http.post(f"{base}/claim", json={"worker": "w2"})
                return answer.json() if answer.status_code == 200 else None

            second = await eventually(claimed_again)  # w1's lease ran out, and the work is still pending
            assert second["generation"] == 2
            ack = {
                "wake_id": first["wake_id"],
                "generation": 1,
                "acks": [{"stream": "work/1", "offset": tail}],
            }
            stale = await http.post(
                f"{base}/ack", json=ack, headers={"authorization": f"Bearer {first['token']}"}
            )
            assert (stale.status_code, stale.json()["error"]["code"]) == (409, "FENCED")
            assert await acked(client, "pool", "work/1") == "-1"  # the stale worker moved nothing

            auth = {"authorization": f"Bearer {second['token']}"}
            ack = {**ack, "wake_id": second["wake_id"], "generation": 2, "done": True}
            done = await http.post(f"{base}/ack", json=ack, headers=auth)
            assert (done.status_code, done.json()) == (200, {"ok": True, "next_wake": False})
            assert await acked(client, "pool", "work/1") == tail
            idle = await http.post(f"{base}/claim", json={"worker": "w3"})
            assert idle.json()["error"]["code"] == "NO_PENDING_WORK"
            release = await http.post(f"{base}/release", json=ack, headers=auth)
            assert (release.status_code, release.json()["error"]["code"]) == (409, "FENCED")
            assert [e["generation"] for e in await events()] == [1, 2]  # one event per wake, none for itself


async def test_a_wake_in_flight_survives_kill_9_and_is_delivered_after_restart(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    async with Receiver(script=["hang"]) as receiver:
        with server(tmp_path, STREAMHOLD_WEBHOOK_TIMEOUT="2") as srv:
            async with RemoteStreams(srv.url) as client:
                await client.create_subscription("crash", pattern="jobs/*", webhook_url=receiver.url)
            put = await http.put(f"{srv.url}/v1/stream/jobs/1", content=b'{"n":1}', headers=JSON)
            [first] = await receiver.wait_for(1)
            srv.kill()  # SIGKILL in the middle of the delivery
            srv.start()
            second = (await receiver.wait_for(2, within=40))[1]
            assert (second["wake_id"], second["generation"]) == (first["wake_id"], first["generation"])
            async with RemoteStreams(srv.url) as client:

                async def acknowledged() -> bool:
                    return await acked(client, "crash", "jobs/1") == put.headers["stream-next-offset"]

                await eventually(acknowledged)


def test_verify_webhook_checks_key_age_and_bytes() -> None:
    key = SigningKey.generate()
    body = json.dumps({"subscription_id": "s", "note": "grüße ✓"}, ensure_ascii=False).encode()
    now = time.time()
    headers = {"Webhook-Signature": key.signature_header(body, now)}
    assert verify_webhook(body, headers, key.jwks())["note"] == "grüße ✓"
    assert key.kid.startswith("ds_") and "=" not in headers["Webhook-Signature"].split("ed25519=")[1]
    with pytest.raises(WebhookVerificationError):
        verify_webhook(body + b" ", headers, key.jwks())
    with pytest.raises(WebhookVerificationError):
        verify_webhook(body, headers, SigningKey.generate().jwks())  # another server's key
    with pytest.raises(WebhookVerificationError):
        verify_webhook(body, headers, key.jwks(), now=now + 301)  # too old to replay
    with pytest.raises(WebhookVerificationError):
        verify_webhook(body, {}, key.jwks())


def test_tokens_are_bound_to_their_subscription_and_expire() -> None:
    key = SigningKey.generate()
    token = key.mint_token("a", 7, now=1000.0)
    assert key.token_generation(token, "a", now=1000.0) == 7
    for other, at, code in (("b", 1000.0, "TOKEN_INVALID"), ("a", 1000.0 + 3601, "TOKEN_EXPIRED")):
        with pytest.raises(TokenError) as refused:
            key.token_generation(token, other, now=at)
        assert refused.value.code == code
    assert SigningKey.from_raw(key.raw()).kid == key.kid  # the kept key is the same key
    with pytest.raises(TokenError):
        SigningKey.generate().token_generation(token, "a", now=1000.0)
