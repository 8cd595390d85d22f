"""Expiry: sliding TTLs under writes, names re-created elsewhere, concurrent creates, skewed clocks."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import update

from streamhold import clock
from streamhold.errors import StreamConflictError
from streamhold.main import create_app
from streamhold.models import StreamFilter
from streamhold.settings import Settings
from streamhold.store.schema import StreamRow, tokens
from streamhold.store.store import NewStream, Store
from streamhold.web import session
from tests._cluster import server_env, server_errors
from tests._server import HOST, LOOPBACK, ServerProcess

pytestmark = pytest.mark.timeout(60)

DAY = 86400.0


@pytest.fixture
async def two_apps(settings: Settings) -> AsyncIterator[tuple[AsyncTestClient[Any], AsyncTestClient[Any]]]:
    """Two apps on one database, as two server processes would be (each with its own store and cache)."""
    fast = dataclasses.replace(settings, sweep_interval=0.2)
    async with (
        AsyncTestClient(create_app(fast), base_url=LOOPBACK) as one,
        AsyncTestClient(create_app(fast), base_url=LOOPBACK) as two,
    ):
        yield one, two


@pytest.fixture
def skewed(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Set this process's wall clock `by` seconds away from the true time."""
    real = time.time

    def skew(by: float) -> None:
        monkeypatch.setattr(time, "time", lambda: real() + by)

    return skew


async def test_a_sliding_ttl_stream_being_written_stays_alive(
    two_apps: tuple[AsyncTestClient[Any], AsyncTestClient[Any]],
) -> None:
    client = two_apps[0]
    url = "/v1/stream/slide/live"
    made = await client.put(url, headers={"content-type": "text/plain", "stream-ttl": "1"})
    assert made.status_code == 201
    statuses = []
    for i in range(10):  # 2.5 s of appends, each well within the 1 s TTL of the one before
        await asyncio.sleep(0.25)
        answer = await client.post(url, content=b"%d;" % i, headers={"content-type": "text/plain"})
        statuses.append(answer.status_code)
    assert statuses == [204] * 10
    assert (await client.head(url)).status_code == 200
    assert (await client.get(url, params={"offset": "-1"})).content == b"".join(b"%d;" % i for i in range(10))
    await asyncio.sleep(1.5)  # no writes: now it expires, and the sweeper removes it
    assert (await client.head(url)).status_code == 404
    assert (
        await client.post(url, content=b"late", headers={"content-type": "text/plain"})
    ).status_code == 404


async def test_a_name_recreated_by_another_process_takes_appends_at_once(
    two_apps: tuple[AsyncTestClient[Any], AsyncTestClient[Any]],
) -> None:
    one, two = two_apps
    plain, as_json = {"content-type": "text/plain"}, {"content-type": "application/json"}
    # Deleted and made again with another content type: the first app's cached copy says text/plain.
    assert (await one.put("/v1/stream/again/typed", headers=plain)).status_code == 201
    assert (await one.post("/v1/stream/again/typed", content=b"a", headers=plain)).status_code == 204
    assert (await two.delete("/v1/stream/again/typed")).status_code == 204
    assert (await two.put("/v1/stream/again/typed", headers=as_json)).status_code == 201
    answer = await one.post("/v1/stream/again/typed", content=b'{"n": 1}', headers=as_json)
    assert answer.status_code == 204, answer.text
    # Expired and made again: the first app's cached copy has the old expiry.
    ttl = {**plain, "stream-ttl": "1"}
    assert (await one.put("/v1/stream/again/timed", headers=ttl)).status_code == 201
    assert (await one.post("/v1/stream/again/timed", content=b"a", headers=plain)).status_code == 204
    await asyncio.sleep(1.2)
    assert (await two.put("/v1/stream/again/timed", headers=plain)).status_code == 201
    answer = await one.post("/v1/stream/again/timed", content=b"b", headers=plain)
    assert answer.status_code == 204, answer.text
    read = await two.get("/v1/stream/again/timed", params={"offset": "-1"})
    assert read.content == b"b"


@pytest.mark.parametrize("settings", ["postgres"], indirect=True)
async def test_concurrent_creates_of_one_name_on_postgres(settings: Settings) -> None:
    async with Store.open(settings) as one, Store.open(settings) as two:
        for i in range(30):
            same = NewStream(namespace="race", name=f"race/same-{i}", content_type="text/plain")
            made = await asyncio.gather(one.create(same), two.create(same))
            assert sorted(created for _, created in made) == [False, True]
            assert made[0][0].id == made[1][0].id
            other = dataclasses.replace(same, name=f"race/other-{i}", content_type="application/json")
            results = await asyncio.gather(
                one.create(dataclasses.replace(other, content_type="text/plain")),
                two.create(other),
                return_exceptions=True,
            )
            conflicts = [r for r in results if isinstance(r, StreamConflictError)]
            assert len(conflicts) == 1, results
            assert [r[1] for r in results if isinstance(r, tuple)] == [True]


@pytest.mark.parametrize("settings", ["postgres"], indirect=True)
async def test_a_fast_clock_on_one_postgres_process_neither_refuses_nor_purges(
    settings: Settings, skewed: Any
) -> None:
    async with Store.open(settings) as right:
        state, _ = await right.create(NewStream(namespace="clock", name="clock/live", ttl_seconds=3600))
        await right.append(state.id, b"kept")
        gone, _ = await right.create(NewStream(namespace="clock", name="clock/gone", ttl_seconds=3600))
        with right._write_engine.begin() as conn:  # expired by the database's clock
            table = StreamRow.__table__
            conn.execute(update(table).where(table.c.id == gone.id).values(expires_at=time.time() - 5))
        skewed(DAY)  # the other process's clock runs a day ahead
        async with Store.open(settings) as fast:
            assert await fast.sweep() == 1
            assert await fast.get(gone.id) is None
            found = await fast.resolve("clock/live")
            assert found is not None and not found.expired()
            assert (await fast.append(state.id, b" and written")).tail == len(b"kept and written")
            assert (await fast.list(StreamFilter(namespace="clock")))[0] == 1
        assert await right.get(state.id) is not None


async def test_a_clock_step_on_sqlite_does_not_purge_a_live_stream(tmp_path: Path, skewed: Any) -> None:
    async with Store.open(Settings(data_dir=tmp_path)) as store:
        state, _ = await store.create(NewStream(namespace="step", name="step/live", ttl_seconds=3600))
        for step in (DAY, -DAY, 0.0):
            skewed(step)
            assert await store.sweep() == 0, f"a clock step of {step} s purged a live stream"
            found = await store.resolve("step/live")
            assert found is not None and not found.expired()
            await store.append(state.id, b"x")
        with store._write_engine.begin() as conn:
            table = StreamRow.__table__
            conn.execute(update(table).where(table.c.id == state.id).values(expires_at=1.0))
        assert await store.sweep() == 1


@pytest.mark.parametrize("settings", ["postgres"], indirect=True)
async def test_the_sweep_spares_a_stream_whose_expiry_is_being_slid(settings: Settings) -> None:
    async with Store.open(settings) as store:
        state, _ = await store.create(NewStream(namespace="slid", name="slid/live", ttl_seconds=3600))
        table = StreamRow.__table__
        with store._write_engine.begin() as conn:  # as last committed: just expired
            conn.execute(update(table).where(table.c.id == state.id).values(expires_at=time.time() - 1))
        with psycopg.connect(settings.database_url.replace("+psycopg", "")) as other:
            # Another process's writer slides the expiry: its transaction holds the row, not yet committed.
            other.execute("UPDATE streams SET expires_at = %s WHERE id = %s", (time.time() + 3600, state.id))
            sweep = asyncio.ensure_future(store.sweep())
            await asyncio.sleep(0.5)
            other.commit()
        assert await sweep == 0
        kept = await store.get(state.id)
        assert kept is not None and not kept.expired()


# A server whose wall clock runs a day ahead of the database's, as a badly set machine's would.
FAST_CLOCK = (
    "import runpy, time; real = time.time; time.time = lambda: real() + 86400; "
    "runpy.run_module('streamhold.cli', run_name='__main__')"
)


def fast_clock_command(port: int) -> list[str]:
    return [sys.executable, "-c", FAST_CLOCK, "serve", "--host", HOST, "--port", str(port)]


@pytest.fixture
def two_servers(pg_url: str, tmp_path: Path) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Two server processes on one PostgreSQL database; the second one's clock is a day fast."""
    env = server_env(pg_url, "", tmp_path, sweep_interval=0.2)
    with ServerProcess(env, startup_timeout=30) as right:
        with ServerProcess(env, command=fast_clock_command, startup_timeout=30) as fast:
            yield right, fast
            assert server_errors(right) == [] and server_errors(fast) == []


async def test_a_server_with_a_fast_clock_neither_refuses_nor_purges(
    two_servers: tuple[ServerProcess, ServerProcess],
) -> None:
    right, fast = two_servers
    plain = {"content-type": "text/plain"}
    async with httpx.AsyncClient(timeout=10) as client:
        for name, server in (("by-right", right), ("by-fast", fast)):
            made = await client.put(
                f"{server.url}/v1/stream/clock/{name}", headers={**plain, "stream-ttl": "3600"}
            )
            assert made.status_code == 201
        await asyncio.sleep(1.0)  # both servers sweep several times meanwhile
        for name in ("by-right", "by-fast"):
            for server in (fast, right):
                url = f"{server.url}/v1/stream/clock/{name}"
                assert (await client.post(url, content=b"x", headers=plain)).status_code == 204
                assert (await client.head(url)).status_code == 200
        listed = (await client.post(f"{right.url}/stream/list", json={"name": "clock"})).json()["streams"]
        expiries = [datetime.fromisoformat(s["expires_at"]).timestamp() - time.time() for s in listed]
        assert len(expiries) == 2 and all(3500 < left <= 3600 for left in expiries), expiries


async def test_servers_creating_one_name_at_once_both_succeed(
    two_servers: tuple[ServerProcess, ServerProcess],
) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        for i in range(20):
            urls = [f"{server.url}/v1/stream/race/{i}" for server in two_servers]
            answers = await asyncio.gather(
                *(client.put(url, headers={"content-type": "text/plain"}) for url in urls)
            )
            assert sorted(a.status_code for a in answers) == [200, 201], [a.text for a in answers]


@pytest.mark.parametrize("settings", ["postgres"], indirect=True)
async def test_token_expiry_is_judged_by_the_store_clock(settings: Settings, skewed: Any) -> None:
    async with Store.open(settings) as store:
        _, lasting = await store.tokens.mint(("read",), ("clock",), 3600, "")
        ended, ending = await store.tokens.mint(("read",), ("clock",), 3600, "")
        with store._write_engine.begin() as conn:  # expired by the database's clock
            conn.execute(update(tokens).where(tokens.c.id == ended.id).values(expires_at=clock.now() - 5))
        for step in (DAY, -DAY):
            skewed(step)  # this machine's wall clock is a day off; the database's is right
            assert await store.tokens.check(lasting) is not None, f"a clock {step} s off ended a live token"
            assert await store.tokens.check(ending) is None, f"a clock {step} s off revived an expired token"
            made, _ = await store.tokens.mint(("read",), ("clock",), 3600, "")
            assert made.expires_at is not None and abs(made.expires_at - (clock.now() + 3600)) < 60


@pytest.mark.parametrize("settings", ["postgres"], indirect=True)
async def test_sign_in_sessions_expire_by_the_store_clock(settings: Settings, skewed: Any) -> None:
    keyed = dataclasses.replace(settings, api_keys=("session-key",))
    live_cookie = session.issue("session-key")
    ended_cookie = session.issue("session-key", now=clock.now() - session.SESSION_SECONDS - 5)
    async with Store.open(settings) as store:
        await store.sign_ins.add("live", clock.now() + 3600)
        await store.sign_ins.add("ended", clock.now() - 5)
        for step in (DAY, -DAY):
            skewed(step)  # this machine's wall clock is a day off; the database's is right
            assert session.verify(live_cookie, keyed) is not None, f"a clock {step} s off ended a sign-in"
            assert session.verify(ended_cookie, keyed) is None, f"a clock {step} s off revived a sign-in"
            assert await store.sign_ins.holder("live") == "" and await store.sign_ins.holder("ended") is None
