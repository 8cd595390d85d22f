"""Several `streamhold serve` processes on one PostgreSQL database, doorbells through Redis or Postgres.

Every test here runs real processes against real servers: a throwaway redis-server, and fresh databases
on the PostgreSQL of the `pg_server` fixture. Delivery latencies are printed (see them with
`pytest -s` or `-rP`); only generous bounds are asserted, since CI machines are shared.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
from litestar.channels.backends.psycopg import PsycoPgChannelsBackend
from litestar.channels.backends.redis import RedisChannelsPubSubBackend

from streamhold.live import MAX_MESSAGE, encode_doorbells, make_backend
from streamhold.models import Change
from streamhold.settings import Settings
from streamhold.store.store import NewStream, Store
from streamhold.store.transactions import SWEEP_LOCK
from tests._cluster import (
    Channels,
    Received,
    SdkWriter,
    check_received,
    cluster,
    fresh_database,
    latencies,
    live_readers,
    metric,
    offset_number,
    open_channels,
    percentile,
    read_long_poll,
    read_sse,
    record,
    scrape,
    server_env,
    server_errors,
    wait_for_readers,
    wait_for_status,
)
from tests._server import ServerProcess, free_port

pytestmark = pytest.mark.timeout(120)

TEXT = {"content-type": "text/plain"}
RECORDS = 100
GAP = 0.01
PROMPT = 2.0  # "promptly": far below the 30 s timeouts of `live`, far above a healthy delivery


@dataclass
class Live:
    """Two servers, A and B, on one database and one channels backend."""

    channels: Channels
    env: dict[str, str]
    a: ServerProcess
    b: ServerProcess

    @property
    def database_url(self) -> str:
        return self.env["STREAMHOLD_DATABASE_URL"]


@pytest.fixture(scope="module", params=["redis", "postgres"])
def live(
    request: pytest.FixtureRequest, pg_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Live]:
    """Timeouts are 30 s, so any delivery within seconds was a doorbell's doing."""
    with open_channels(request.param, pg_server) as channels, fresh_database(pg_server) as url:
        folder = tmp_path_factory.mktemp(request.param)
        env = server_env(url, channels.url, folder, long_poll_timeout=30, sse_keepalive=30)
        with cluster(env) as (a, b):
            yield Live(channels, env, a, b)
            for server in (a, b):
                assert not server_errors(server), server.log_tail()


async def append(
    client: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str] | None = None
) -> int:
    response = await client.post(url, content=body, headers={**TEXT, **(headers or {})})
    assert response.status_code in (200, 204), f"{response.status_code} {response.text}"
    return offset_number(response.headers["stream-next-offset"])


async def close(client: httpx.AsyncClient, url: str) -> None:
    response = await client.post(url, headers={"stream-closed": "true"})
    assert response.status_code == 204, response.text


async def catch_up(client: httpx.AsyncClient, url: str) -> bytes:
    response = await client.get(url, params={"offset": "-1"})
    assert response.status_code == 200, response.text
    return response.content


async def subscribers_reach(channels: Channels, count: int, within: float = 10.0) -> int:
    """The backend's subscriber count once it reaches `count` (or when time is up)."""
    deadline = time.monotonic() + within
    seen = channels.subscribers()
    while seen < count and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        seen = channels.subscribers()
    return seen


def report(label: str, values: list[float]) -> str:
    line = (
        f"{label}: p50 {percentile(values, 0.5) * 1000:.1f} ms, p99 {percentile(values, 0.99) * 1000:.1f} ms,"
        f" max {max(values) * 1000:.1f} ms over {len(values)} deliveries"
    )
    print(line)
    return line


# --- backend selection -----------------------------------------------------------------------------


def test_channels_url_selects_the_backend() -> None:
    assert make_backend("") is None
    assert make_backend("memory://") is None
    assert isinstance(make_backend("redis://127.0.0.1:1/0"), RedisChannelsPubSubBackend)
    assert isinstance(make_backend("postgresql://postgres@127.0.0.1:1/x"), PsycoPgChannelsBackend)
    with pytest.raises(ValueError, match="STREAMHOLD_CHANNELS_URL"):
        make_backend("amqp://127.0.0.1")


def test_doorbell_messages_fit_a_postgres_notify() -> None:
    changes = [Change(f"stream_{i:026d}", i * 1000, i % 2 == 0, i % 7 == 0) for i in range(2000)]
    messages = encode_doorbells("1234-abcdef12", changes)
    assert len(messages) > 1 and all(len(m) <= MAX_MESSAGE for m in messages)
    carried = [Change(*item) for m in messages for item in json.loads(m)["c"]]
    assert carried == changes


# --- delivery across processes ---------------------------------------------------------------------


async def test_every_byte_reaches_readers_on_the_other_process(live: Live) -> None:
    """Writers on A (HTTP) and in a script (Python API); SSE and long-poll readers on B get all, in order."""
    channels, env, a, b = live.channels, live.env, live.a, live.b
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=50)) as client:
        name = f"scale/http-{uuid.uuid4().hex[:8]}"
        assert (await client.put(f"{a.url}/v1/stream/{name}", headers=TEXT)).status_code == 201
        before = await scrape(client, a), await scrape(client, b)
        sdk = SdkWriter(env, RECORDS, GAP)
        tasks: dict[tuple[str, str, int], asyncio.Task[Received]] = {}
        try:
            paths = {"http": f"/v1/stream/{name}", "sdk": f"/v1/stream/{sdk.stream_id}"}
            baseline = await live_readers(client, b)
            for source, path in paths.items():
                for i in range(3):
                    tasks[source, "sse", i] = asyncio.create_task(read_sse(client, b.url + path))
                for i in range(2):
                    poll = read_long_poll(client, b.url + path)
                    tasks[source, "long-poll", i] = asyncio.create_task(poll)
            await wait_for_readers(client, b, baseline, sse=6, long_poll=4)
            # One subscription per process (A, B and the script), however many readers there are.
            assert await subscribers_reach(channels, 3) == 3

            sdk.go()
            sent, acknowledged = [], {}
            for seq in range(RECORDS):
                body = record("http", seq)
                await append(client, a.url + paths["http"], body)
                acknowledged[seq] = time.time()
                sent.append(body)
                await asyncio.sleep(GAP)
            await close(client, a.url + paths["http"])
            await sdk.finish()
            async with asyncio.timeout(30):
                results = {key: await task for key, task in tasks.items()}
        finally:
            sdk.kill()
            for task in tasks.values():
                task.cancel()

        expected = {"http": b"".join(sent), "sdk": await catch_up(client, a.url + paths["sdk"])}
        assert [int(m) for m in re.findall(rb"sdk:(\d+):", expected["sdk"])] == list(range(RECORDS))
        for (source, _, _), received in results.items():
            check_received(received, expected[source])

        by_path: dict[tuple[str, str], list[float]] = {}
        for (source, kind, _), received in results.items():
            by_path.setdefault((source, kind), []).extend(latencies(received))
            if source == "http":
                by_path.setdefault(("http ack", kind), []).extend(latencies(received, acknowledged))
        for (source, kind), values in sorted(by_path.items()):
            since = "http append's acknowledgement" if source == "http ack" else f"{source} write call"
            report(f"[{channels.kind}] {kind} reader on B, from the {since}", values)
            assert percentile(values, 0.99) < PROMPT and max(values) < 5.0, "readers waited for timeouts"

        after = await scrape(client, a), await scrape(client, b)

        def grew(server: int, name: str) -> float:
            return metric(after[server], name) - metric(before[server], name)

        assert grew(0, "streamhold_doorbells_sent_total") > 0
        assert grew(1, "streamhold_doorbells_received_total") > 0
        assert grew(0, "streamhold_appends_total") == RECORDS
        assert grew(1, "streamhold_appends_total") == 0
        assert grew(0, "streamhold_appended_bytes_total") == len(expected["http"])


# --- writes through both processes ----------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(pg_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """Two servers whose database is also their channels backend; short timeouts, a sweep every 0.2 s."""
    with open_channels("postgres", pg_server) as channels:
        url = channels.url
        folder = tmp_path_factory.mktemp("shared")
        env = server_env(url, url, folder, sweep_interval=0.2, long_poll_timeout=2, sse_keepalive=2)
        with cluster(env) as (a, b):
            yield Live(channels, env, a, b)
            for server in (a, b):
                assert not server_errors(server), server.log_tail()


async def test_concurrent_appends_through_both_processes_stay_whole(
    shared: Live,
) -> None:
    a, b = shared.a, shared.b
    path = f"/v1/stream/interleave/{uuid.uuid4().hex[:8]}"
    rng = random.Random(7)
    async with httpx.AsyncClient(timeout=30) as client:
        assert (await client.put(a.url + path, headers=TEXT)).status_code == 201

        async def writer(server: ServerProcess, tag: str) -> list[tuple[bytes, int]]:
            acknowledged = []
            for seq in range(60):
                body = f"<{tag}:{seq:03d}:{'x' * rng.randrange(0, 400)}>".encode()
                acknowledged.append((body, await append(client, server.url + path, body)))
            return acknowledged

        writers = await asyncio.gather(writer(a, "a0"), writer(a, "a1"), writer(b, "b0"), writer(b, "b1"))
        content = await catch_up(client, a.url + path)
        assert await catch_up(client, b.url + path) == content

    pieces = re.findall(rb"<[ab][01]:\d{3}:x*>", content)
    assert b"".join(pieces) == content, "an append was torn or mixed with another"
    ends, position = {}, 0
    for piece in pieces:
        position += len(piece)
        ends[piece] = position
    assert len(ends) == len(pieces) == 240, "an append is missing or duplicated"
    for acknowledged in writers:
        offsets = [offset for _, offset in acknowledged]
        assert offsets == sorted(set(offsets)), "one writer's offsets went backwards"
        assert all(ends[body] == offset for body, offset in acknowledged), "an acknowledged offset is wrong"


async def test_producer_and_stream_seq_rules_hold_across_processes(
    shared: Live,
) -> None:
    a, b = shared.a, shared.b
    path = f"/v1/stream/producers/{uuid.uuid4().hex[:8]}"

    def producer(pid: str, epoch: int, seq: int) -> dict[str, str]:
        return {**TEXT, "producer-id": pid, "producer-epoch": str(epoch), "producer-seq": str(seq)}

    async with httpx.AsyncClient(timeout=30) as client:

        async def post(server: ServerProcess, body: bytes, headers: dict[str, str]) -> httpx.Response:
            return await client.post(server.url + path, content=body, headers={**TEXT, **headers})

        assert (await client.put(a.url + path, headers=TEXT)).status_code == 201
        assert (await post(a, b"p0", producer("p", 0, 0))).status_code == 200
        # The producer's retry reaches the other process: still a duplicate.
        assert (await post(b, b"p0", producer("p", 0, 0))).status_code == 204
        assert (await post(b, b"p1", producer("p", 0, 1))).status_code == 200
        assert (await post(a, b"p1", producer("p", 0, 1))).status_code == 204
        gap = await post(a, b"p3", producer("p", 0, 3))
        assert gap.status_code == 409 and gap.headers["producer-expected-seq"] == "2"
        assert (await post(b, b"q0", producer("p", 1, 0))).status_code == 200
        stale = await post(a, b"old", producer("p", 0, 2))
        assert stale.status_code == 403 and stale.headers["producer-epoch"] == "1"

        assert (await post(a, b"s5", {"stream-seq": "0005"})).status_code == 204
        assert (await post(b, b"again", {"stream-seq": "0005"})).status_code == 409
        assert (await post(b, b"older", {"stream-seq": "0004"})).status_code == 409
        assert (await post(b, b"s6", {"stream-seq": "0006"})).status_code == 204

        # The same producer request sent to both processes at once: one append, one duplicate, every time.
        for seq in range(10):
            body = f"r{seq}".encode()
            headers = producer("r", 0, seq)
            both = await asyncio.gather(post(a, body, headers), post(b, body, headers))
            assert sorted(r.status_code for r in both) == [200, 204], [r.text for r in both]

        expected = b"p0p1q0s5s6" + b"".join(f"r{seq}".encode() for seq in range(10))
        assert await catch_up(client, a.url + path) == expected
        assert await catch_up(client, b.url + path) == expected


# --- lost doorbells and backend outages -----------------------------------------------------------


async def test_a_missed_doorbell_delays_readers_only_until_their_timeout(shared: Live) -> None:
    """The writer's process cannot publish at all: readers elsewhere still get the data at their timeout."""
    env, b = shared.env, shared.b
    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    sdk = SdkWriter({**env, "STREAMHOLD_CHANNELS_URL": unreachable}, 1, 0)
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            url = f"{b.url}/v1/stream/{sdk.stream_id}"
            baseline = await live_readers(client, b)
            sse = asyncio.create_task(read_sse(client, url))
            poll = asyncio.create_task(read_long_poll(client, url))
            await wait_for_readers(client, b, baseline, sse=1, long_poll=1)
            doorbells = metric(await scrape(client, b), "streamhold_doorbells_received_total")
            sdk.go()
            written = time.time()
            log = await sdk.finish()
            async with asyncio.timeout(10):
                received = [await sse, await poll]
            assert metric(await scrape(client, b), "streamhold_doorbells_received_total") == doorbells
    finally:
        sdk.kill()
    assert "could not publish a doorbell" in log
    timeouts = {
        "sse": float(env["STREAMHOLD_SSE_KEEPALIVE"]),
        "long-poll": float(env["STREAMHOLD_LONG_POLL_TIMEOUT"]),
    }
    for reader in received:
        assert re.fullmatch(rb"sdk:00000:\d+\.\d+;", bytes(reader.data)), reader.data
        waited = reader.arrivals[0][0] - written
        timeout = timeouts[reader.kind]
        print(f"{reader.kind} reader got silent-writer data after {waited:.2f} s (timeout {timeout} s)")
        assert waited < timeout + 1.5


async def test_readers_recover_when_the_channels_backend_comes_back(live: Live) -> None:
    """Kill Redis (or close the Postgres channels database), then bring it back: doorbells flow again."""
    channels, a, b = live.channels, live.a, live.b
    async with httpx.AsyncClient(timeout=60) as client:
        path = f"/v1/stream/restart/{uuid.uuid4().hex[:8]}"
        assert (await client.put(a.url + path, headers=TEXT)).status_code == 201
        readers = [Received("sse"), Received("long-poll")]
        baseline = await live_readers(client, b)
        tasks = [
            asyncio.create_task(read_sse(client, b.url + path, readers[0])),
            asyncio.create_task(read_long_poll(client, b.url + path, readers[1])),
        ]
        sent: list[bytes] = []

        async def deliver(seq: int, within: float) -> float:
            """Append through A; seconds until both readers on B have it."""
            body = record("restart", seq)
            written = time.monotonic()
            await append(client, a.url + path, body)
            sent.append(body)
            expected = b"".join(sent)
            while time.monotonic() - written < within:
                if all(bytes(r.data) == expected for r in readers):
                    return time.monotonic() - written
                await asyncio.sleep(0.005)
            got = [bytes(r.data) for r in readers]
            raise AssertionError(f"record {seq} not on B within {within} s: {got}")

        try:
            await wait_for_readers(client, b, baseline, sse=1, long_poll=1)
            before = [await deliver(seq, PROMPT) for seq in range(3)]

            channels.cut()
            await wait_for_status(client, f"{b.url}/readyz", 503, within=10)
            await wait_for_status(client, f"{a.url}/readyz", 503, within=10)
            # While unsubscribed, readers re-read the store on every retry: late, but not lost.
            during = [await deliver(seq, 10.0) for seq in range(3, 5)]

            channels.restore()
            back_b, _ = await wait_for_status(client, f"{b.url}/readyz", 200, within=15)
            await wait_for_status(client, f"{a.url}/readyz", 200, within=15)
            after = []
            for seq in range(5, 15):
                after.append(await deliver(seq, PROMPT))
                await asyncio.sleep(0.05)
            await close(client, a.url + path)
            async with asyncio.timeout(10):
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
        on_b = await scrape(client, b)
    for reader in readers:
        check_received(reader, b"".join(sent))
    assert metric(on_b, "streamhold_channels_resubscribed_total") >= 1
    report(f"[{channels.kind}] before the outage", before)
    report(f"[{channels.kind}] during the outage (no doorbells)", during)
    report(f"[{channels.kind}] after the backend came back (B ready again {back_b:.2f} s after)", after)
    assert max(after) < PROMPT


# --- the TTL sweep -------------------------------------------------------------------------------


async def test_the_sweep_lock_admits_one_process_at_a_time(pg_url: str, tmp_path: Path) -> None:
    """Two stores (as two processes would) sweep the same 150 expired streams at once: one does it all."""
    settings = Settings(data_dir=tmp_path, database_url=pg_url)
    async with Store.open(settings) as one, Store.open(settings) as two:
        past = time.time() - 5
        expired = NewStream(namespace="sweep", expires_at=past, initial=b"x" * 10)
        await asyncio.gather(*(one.create(expired) for _ in range(150)))
        counts = await asyncio.gather(one.sweep(), two.sweep())
        assert sorted(counts) == [0, 150]
        assert await asyncio.gather(one.sweep(), two.sweep()) == [0, 0]


AUDIT = f"""
CREATE TABLE IF NOT EXISTS sweep_audit (stream_id text, backend int, xid bigint, locked boolean);
CREATE OR REPLACE FUNCTION audit_stream_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO sweep_audit VALUES (OLD.id, pg_backend_pid(), txid_current(), EXISTS (
        SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted
        AND classid = 0 AND objid = {SWEEP_LOCK} AND objsubid = 1));
    RETURN OLD;
END $$;
DROP TRIGGER IF EXISTS audit_stream_delete ON streams;
CREATE TRIGGER audit_stream_delete AFTER DELETE ON streams
    FOR EACH ROW EXECUTE FUNCTION audit_stream_delete();
"""


async def test_expired_streams_are_swept_once_and_gone_everywhere(
    shared: Live,
) -> None:
    """Both processes sweep every 0.2 s: each expired stream is deleted once, under the sweep lock."""
    a, b, database_url = shared.a, shared.b, shared.database_url
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(AUDIT)  # type: ignore[arg-type]
    tag = uuid.uuid4().hex[:8]
    async with httpx.AsyncClient(timeout=30) as client:
        expiring = []
        for i in range(12):
            path = f"/v1/stream/sweep-{tag}/{i}"
            response = await client.put((a, b)[i % 2].url + path, headers={**TEXT, "stream-ttl": "1"})
            assert response.status_code == 201
            expiring.append(path)
        created = time.monotonic()
        keep = f"/v1/stream/sweep-{tag}/keep"
        assert (await client.put(a.url + keep, headers=TEXT)).status_code == 201
        with psycopg.connect(database_url, autocommit=True) as conn:
            ids = {
                row[0]
                for row in conn.execute(
                    "SELECT id FROM streams WHERE name LIKE %s AND name NOT LIKE %s",
                    (f"sweep-{tag}/%", "%/keep"),
                )
            }
        assert len(ids) == 12
        for path in expiring:
            assert (await client.head(b.url + path)).status_code == 200  # HEAD does not slide the TTL

        await asyncio.sleep(max(0.0, created + 1.1 - time.monotonic()))
        for path in expiring:
            for server in (a, b):
                assert (await client.head(server.url + path)).status_code == 404
                assert (await client.get(server.url + path)).status_code == 404
                assert (await client.post(server.url + path, content=b"x", headers=TEXT)).status_code == 404

        audit: list[tuple[str, int, int, bool]] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with psycopg.connect(database_url, autocommit=True) as conn:
                audit = [
                    tuple(row)  # type: ignore[misc]
                    for row in conn.execute(
                        "SELECT stream_id, backend, xid, locked FROM sweep_audit WHERE stream_id = ANY(%s)",
                        (list(ids),),
                    )
                ]
            if {row[0] for row in audit} == ids:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"expired streams not swept within 10 s: {len(audit)} of 12")
        assert (await client.head(a.url + keep)).status_code == 200
        assert (await client.head(b.url + keep)).status_code == 200

    assert sorted(row[0] for row in audit) == sorted(ids), "a stream was deleted twice"
    assert all(row[3] for row in audit), "a stream was swept without the sweep lock held"
    sessions = {row[1] for row in audit}
    transactions = {(row[1], row[2]) for row in audit}
    print(f"12 expired streams swept in {len(transactions)} transaction(s) by {len(sessions)} session(s)")
