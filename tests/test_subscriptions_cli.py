"""`streamhold subscriptions ls | rm | rotate-key` against real `streamhold serve` subprocesses, with real
webhook receivers on 127.0.0.1; and what rotation does to the published keys and to signatures."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, func, select
from sqlmodel import SQLModel

from streamhold import RemoteStreams, verify_webhook
from streamhold.store.subscription_tables import signing_keys
from streamhold.subscriptions import keys
from tests._operator import cli
from tests.test_subscriptions import JSON, Receiver, eventually, server

pytestmark = pytest.mark.timeout(240)
KEY = "subs-cli-key"


async def streamhold(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(cli, *args)


async def test_ls_shows_each_subscription_and_rm_deletes_one(tmp_path: Path) -> None:
    async with Receiver(script=[500] * 20) as receiver:
        with server(tmp_path, STREAMHOLD_API_KEYS=KEY) as srv:
            http = httpx.AsyncClient(base_url=srv.url, trust_env=False)
            auth = {"authorization": f"Bearer {KEY}"}
            async with http, RemoteStreams(srv.url, KEY) as client:
                await client.create_subscription("hooks", pattern="orders/*", webhook_url=receiver.url)
                (await http.put("/v1/stream/wakes", headers={**JSON, **auth})).raise_for_status()
                await client.create_subscription(
                    "workers", "pull-wake", streams=["jobs/1"], wake_stream="wakes"
                )
                answer = await http.put("/v1/stream/orders/1", content=b'{"n":1}', headers={**JSON, **auth})
                assert answer.status_code == 201, answer.text

                async def failed_once() -> bool:
                    found = {s["id"]: s for s in await client.list_subscriptions()}
                    return bool(found["hooks"]["failures"] >= 1)

                await eventually(failed_once, within=20)

            table = await streamhold("subscriptions", "ls", "--server", srv.url, "--key", KEY)
            assert table.returncode == 0, table.stderr
            lines = table.stdout.splitlines()
            assert re.split(r"\s{2,}", lines[0]) == [
                "ID",
                "WATCHES",
                "TYPE",
                "STATUS",
                "LAST DELIVERY",
                "FAILURES",
            ]
            hooks = re.split(r"\s{2,}", lines[1])
            assert hooks[:4] == ["hooks", "orders/*", "webhook", "failed"]
            assert hooks[4] in ("just now (failed)",) or hooks[4].endswith("ago (failed)"), hooks
            assert re.fullmatch(r"\d+ \(answered HTTP 500\)", hooks[5]), hooks
            workers = re.split(r"\s{2,}", lines[2])
            assert workers[:4] == ["workers", "jobs/1", "pull-wake", "active"]
            assert workers[4:] == ["never", "0"]

            as_json = await streamhold("subscriptions", "ls", "--json", "--server", srv.url, "--key", KEY)
            records = [json.loads(line) for line in as_json.stdout.splitlines()]
            assert [r["id"] for r in records] == ["hooks", "workers"]
            assert (
                records[0]["webhook_url"] == receiver.url and records[0]["last_error"] == "answered HTTP 500"
            )

            refused = await streamhold("subscriptions", "ls", "--server", srv.url)
            assert refused.returncode == 1 and "API key" in refused.stderr, refused.stderr
            async with httpx.AsyncClient(base_url=srv.url, trust_env=False) as anonymous:
                assert (await anonymous.get("/v1/stream/__ds/subscriptions")).status_code == 401

            removed = await streamhold("subscriptions", "rm", "hooks", "--server", srv.url, "--key", KEY)
            assert (removed.returncode, removed.stdout.strip()) == (0, "deleted hooks"), removed.stderr
            missing = await streamhold("subscriptions", "rm", "hooks", "--server", srv.url, "--key", KEY)
            assert missing.returncode == 1 and "no subscription 'hooks'" in missing.stderr, missing.stderr
            left = await streamhold("subscriptions", "ls", "--json", "--server", srv.url, "--key", KEY)
            assert [json.loads(line)["id"] for line in left.stdout.splitlines()] == ["workers"]


async def test_ls_says_so_when_there_are_none(tmp_path: Path) -> None:
    with server(tmp_path) as srv:
        empty = await streamhold("subscriptions", "ls", "--server", srv.url)
    assert (empty.returncode, empty.stdout, empty.stderr.strip()) == (0, "", "no subscriptions")


async def test_rotation_keeps_old_signatures_verifiable_and_signs_new_ones_with_the_new_key(
    tmp_path: Path,
) -> None:
    async with Receiver() as receiver:
        with server(tmp_path) as srv:
            http = httpx.AsyncClient(base_url=srv.url, trust_env=False)
            async with http, RemoteStreams(srv.url) as client:
                record = await client.create_subscription("rot", pattern="rot/*", webhook_url=receiver.url)
                old_kid = record["webhook"]["signing"]["kid"]
                (await http.put("/v1/stream/rot/a", content=b'{"n":1}', headers=JSON)).raise_for_status()
                await receiver.wait_for(1)

                rotated = await streamhold("subscriptions", "rotate-key", "--server", srv.url)
                assert rotated.returncode == 0, rotated.stderr
                new_kid = rotated.stdout.split()[2].rstrip(";")
                assert new_kid.startswith("ds_") and new_kid != old_kid

                jwks = (await http.get("/v1/stream/__ds/jwks.json")).json()
                assert {k["kid"] for k in jwks["keys"]} == {old_kid, new_kid}
                _, body, headers = receiver.deliveries[0]
                assert f"kid={old_kid}," in headers["webhook-signature"]
                first = verify_webhook(body, headers, jwks)  # signed before the rotation: still good

                # The token given before the rotation still acknowledges the wake.
                done = await http.post(
                    first["callback_url"],
                    json={"done": True},
                    headers={"authorization": f"Bearer {first['callback_token']}"},
                )
                assert done.status_code in (200, 409), done.text  # 409 FENCED if `done` acked it already
                assert (await client.get_subscription("rot") or {})["webhook"]["signing"]["kid"] == new_kid

                (await http.post("/v1/stream/rot/a", content=b'{"n":2}', headers=JSON)).raise_for_status()
                await receiver.wait_for(2)
                _, body, headers = receiver.deliveries[1]
                assert f"kid={new_kid}," in headers["webhook-signature"]
                assert verify_webhook(body, headers, jwks)["subscription_id"] == "rot"

                retired = await streamhold("subscriptions", "rotate-key", "--retire", "--server", srv.url)
                assert retired.returncode == 0, retired.stderr
                assert retired.stdout.strip() == f"retired 1 key(s); signing with {new_kid}"
                after = (await http.get("/v1/stream/__ds/jwks.json")).json()
                assert [k["kid"] for k in after["keys"]] == [new_kid]

        # A restart keeps the key that signs.
        with server(tmp_path) as again:
            jwks = httpx.get(f"{again.url}/v1/stream/__ds/jwks.json", timeout=30).json()  # noqa: ASYNC210
            assert [k["kid"] for k in jwks["keys"]] == [new_kid]


def test_the_previous_key_is_published_for_the_grace_only(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'keys.db'}")
    SQLModel.metadata.create_all(engine, tables=[signing_keys])
    with engine.begin() as conn:
        keys.ensure(conn)  # made now
        now = time.time() + 1
        first = keys.published(conn, now)
        assert len(first) == 1
        new = keys.rotate(conn, now)
        assert [k.kid for k in keys.published(conn, now)] == [new.kid, first[0].kid]
        late = now + keys.KEY_GRACE_S + 1
        assert [k.kid for k in keys.published(conn, late)] == [new.kid]
        newer = keys.rotate(conn, late)  # deletes the key past its grace, keeps the one it replaces
        assert [k.kid for k in keys.published(conn, late)] == [newer.kid, new.kid]
        assert conn.execute(select(func.count()).select_from(signing_keys)).scalar() == 2
        assert keys.retire(conn, late) == [new.kid]
        assert [k.kid for k in keys.published(conn, late)] == [newer.kid]
