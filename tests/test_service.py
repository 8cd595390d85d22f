"""The Agentuity-compatible stream service (/stream/...) and the remote Python SDK that speaks it.

Requests and closed-stream reads run in-process on SQLite and PostgreSQL; live tails, cut connections and
the remote SDK's sender run against a real `streamhold serve` subprocess.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import gzip
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar.testing import AsyncTestClient

from streamhold.errors import StreamNotFoundError
from streamhold.main import create_app
from streamhold.sdk.context import create_agent_context
from streamhold.sdk.remote import RemoteStreams, ServerUnavailableError
from streamhold.settings import Settings
from tests._server import ServerProcess, free_port

pytestmark = pytest.mark.timeout(60)

LIMIT = 4096
ROWS = b"".join(b"%d,user%d@example.com\n" % (i, i) for i in range(400))

# A keyless server answers only to loopback names (DNS rebinding): tests reach it by one.
LOOPBACK = "http://127.0.0.1"


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[AsyncTestClient[Any]]:
    async with AsyncTestClient(
        create_app(dataclasses.replace(settings, max_append_bytes=LIMIT)), base_url=LOOPBACK
    ) as client:
        yield client


@pytest.fixture
async def sqlite_client(tmp_path: Path) -> AsyncIterator[AsyncTestClient[Any]]:
    """For checks that never reach the database's differences: input validation."""
    settings = Settings(data_dir=tmp_path, max_append_bytes=LIMIT, public_url="http://sh.test")
    async with AsyncTestClient(create_app(settings), base_url=LOOPBACK) as client:
        yield client


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {
        "STREAMHOLD_DATA_DIR": str(tmp_path_factory.mktemp("service-data")),
        "STREAMHOLD_LONG_POLL_TIMEOUT": "1",
    }
    with ServerProcess(env=env) as process:
        yield process


async def create(
    client: AsyncTestClient[Any] | httpx.AsyncClient, namespace: str = "export", **body: Any
) -> str:
    response = await client.post("/stream", json={"name": namespace, **body})
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


async def finished(
    client: AsyncTestClient[Any], content: bytes, content_type: str = "text/csv", compress: bool = False
) -> str:
    """A closed stream holding `content`, appended in pieces under the append limit."""
    stream_id = await create(client, headers={"content-type": content_type})
    for start in range(0, len(content), LIMIT):
        assert (
            await client.post(f"/stream/{stream_id}/append", content=content[start : start + LIMIT])
        ).status_code == 204
    headers = {"x-compress": "gzip"} if compress else {}
    assert (await client.post(f"/stream/{stream_id}/complete", headers=headers)).status_code == 204
    return stream_id


async def raw_get(client: AsyncTestClient[Any], path: str, **headers: str) -> tuple[httpx.Response, bytes]:
    """A GET whose body is returned as sent, without httpx undoing Content-Encoding."""
    async with client.stream("GET", path, headers=headers) as response:
        return response, b"".join([piece async for piece in response.aiter_raw()])


def near(moment: str | None, seconds: float) -> bool:
    assert moment is not None
    delta = datetime.fromisoformat(moment) - datetime.now(UTC) - timedelta(seconds=seconds)
    return abs(delta) < timedelta(minutes=1)


# --- management ----------------------------------------------------------------------------------


async def test_create_answers_the_id_and_the_record(client: AsyncTestClient[Any]) -> None:
    response = await client.post(
        "/stream",
        json={
            "name": "export",
            "metadata": {"user_id": "u1", "n": 5, "ok": True},
            "headers": {"Content-Type": "text/csv"},
        },
    )
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    record = response.json()
    stream_id = record["id"]
    assert stream_id.startswith("stream_") and len(stream_id) == 39
    assert record["url"] == f"http://sh.test/stream/{stream_id}" == response.headers["location"]
    assert record["name"] == record["namespace"] == "export" and record["protocol_name"] == stream_id
    assert record["metadata"] == {"user_id": "u1", "n": "5", "ok": "true"}
    assert record["content_type"] == "text/csv" and record["size_bytes"] == 0 and record["completed"] is False
    assert record["viewer_url"] == f"http://sh.test/watch/{stream_id}"
    assert response.headers["stream-max-append-bytes"] == str(LIMIT)
    info = await client.post(f"/stream/{stream_id}/info", json={})
    assert info.status_code == 200 and info.json() == record


async def test_ttl_omitted_never_and_clamped(client: AsyncTestClient[Any]) -> None:
    async def expires(**ttl: Any) -> str | None:
        stream_id = await create(client, **ttl)
        return (await client.post(f"/stream/{stream_id}/info")).json()["expires_at"]

    assert near(await expires(), 30 * 86400)
    assert await expires(ttl=0) is None and await expires(ttl=None) is None
    assert near(await expires(ttl=5), 60) and near(await expires(ttl=3600), 3600)
    assert near(await expires(ttl=10**12), 90 * 86400)
    for bad in (-1, "1h", True):
        response = await client.post("/stream", json={"name": "t", "ttl": bad})
        assert response.status_code == 400 and "ttl must be a number of seconds" in response.json()["error"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, 'the namespace ("name" in a /stream body) must be a string of 1 to 254 characters'),
        ({"name": ""}, "1 to 254 characters"),
        ({"name": "n" * 255}, "1 to 254 characters"),
        ({"name": "a", "metadata": {"k": {"nested": 1}}}, "metadata must be an object of strings"),
        ({"name": "a", "metadata": ["k"]}, "metadata must be an object"),
        ({"name": "a", "headers": "text/plain"}, "headers must be an object"),
        ({"name": "a", "headers": {"content-type": ""}}, "must be a MIME type"),
    ],
)
async def test_create_rejects_bad_input_and_says_what_to_send(
    sqlite_client: AsyncTestClient[Any], body: dict[str, Any], message: str
) -> None:
    response = await sqlite_client.post("/stream", json=body)
    assert response.status_code == 400 and message in response.json()["error"]


async def test_create_needs_a_json_object(sqlite_client: AsyncTestClient[Any]) -> None:
    for content in (b"not json", b"[1]"):
        response = await sqlite_client.post("/stream", content=content)
        assert response.status_code == 400
        assert response.json() == {"error": 'the body must be a JSON object, such as {"name": "export"}'}


async def test_list_filters_pages_and_sorts(client: AsyncTestClient[Any]) -> None:
    ids = []
    for i in range(5):
        stream_id = await create(client, "reports", metadata={"user_id": f"u{i % 2}"})
        await client.post(f"/stream/{stream_id}/append", content=b"x" * (5 - i))
        ids.append(stream_id)
    await create(client, "other", metadata={"user_id": "u0"})

    page = (await client.post("/stream/list", json={"name": "reports", "limit": 2})).json()
    assert (
        page["success"] is True
        and page["total"] == 5
        and [s["id"] for s in page["streams"]] == ids[:2:-1][:2]
    )
    rest = (await client.post("/stream/list", json={"namespace": "reports", "limit": 10, "offset": 2})).json()
    assert [s["id"] for s in rest["streams"]] == ids[2::-1]
    mine = (await client.post("/stream/list", json={"name": "reports", "metadata": {"user_id": "u0"}})).json()
    assert mine["total"] == 3 and {s["id"] for s in mine["streams"]} == {ids[0], ids[2], ids[4]}
    smallest = (
        await client.post("/stream/list", json={"name": "reports", "sort": "size", "direction": "asc"})
    ).json()
    assert [s["size_bytes"] for s in smallest["streams"]] == [1, 2, 3, 4, 5]
    assert (await client.post("/stream/list")).json()["total"] == 6
    assert (await client.post("/stream/list", json={"sort": "lastUsed"})).status_code == 200
    for body, message in (
        ({"sort": "count"}, "sort must be one of created, updated, lastUsed"),
        ({"limit": 0}, "limit must be a whole number from 1 to 1000"),
        ({"limit": 1001}, "limit must be a whole number from 1 to 1000"),
        ({"offset": -1}, "offset must be a whole number from 0 to"),
        ({"direction": "up"}, "direction must be asc or desc"),
        ({"sort": ["size"]}, "sort must be one of"),
        ({"limit": 2.5}, "limit must be a whole number"),
        ({"limit": "10"}, "limit must be a whole number"),
    ):
        response = await client.post("/stream/list", json=body)
        assert response.status_code == 400 and message in response.json()["error"], body
    infinite = await client.post("/stream/list", content=b'{"offset": Infinity}')
    assert infinite.status_code == 400 and "offset must be a whole number" in infinite.json()["error"]


async def test_delete_makes_every_route_answer_404(client: AsyncTestClient[Any]) -> None:
    stream_id = await finished(client, b"gone soon")
    assert (await client.delete(f"/stream/{stream_id}")).status_code == 204
    for method, path in (
        ("POST", f"/stream/{stream_id}/info"),
        ("GET", f"/stream/{stream_id}"),
        ("HEAD", f"/stream/{stream_id}"),
        ("POST", f"/stream/{stream_id}/append"),
        ("POST", f"/stream/{stream_id}/complete"),
        ("DELETE", f"/stream/{stream_id}"),
    ):
        response = await client.request(method, path, content=b"x" if method == "POST" else None)
        assert response.status_code == 404, (method, path)
        if method != "HEAD":
            assert response.json() == {
                "error": f"stream {stream_id} not found (it may have expired or been deleted)"
            }


# --- writes --------------------------------------------------------------------------------------


async def test_append_and_complete_answer_204_and_keep_order(client: AsyncTestClient[Any]) -> None:
    stream_id = await create(client, headers={"content-type": "text/plain"})
    for word in (b"one ", b"two ", b"", b"three"):
        response = await client.post(f"/stream/{stream_id}/append", content=word)
        assert (response.status_code, response.content) == (204, b"")
    for _ in range(2):  # complete is idempotent
        response = await client.post(f"/stream/{stream_id}/complete")
        assert (response.status_code, response.content) == (204, b"")
    read = await client.get(f"/stream/{stream_id}")
    assert read.content == b"one two three"
    assert read.headers["content-type"] == "text/plain", "the stream's own type, exactly: no charset added"
    record = (await client.post(f"/stream/{stream_id}/info")).json()
    assert record["completed"] is True and record["size_bytes"] == 13 and record["closed_at"] is not None


async def test_append_errors_say_what_went_wrong(client: AsyncTestClient[Any]) -> None:
    missing = await client.post("/stream/stream_00000000000000000000000000000000/append", content=b"x")
    assert missing.status_code == 404 and "not found" in missing.json()["error"]
    stream_id = await create(client)
    too_big = await client.post(f"/stream/{stream_id}/append", content=b"x" * (LIMIT + 1))
    assert too_big.status_code == 413 and f"at most {LIMIT} bytes" in too_big.json()["error"]
    bad_compress = await client.post(f"/stream/{stream_id}/complete", headers={"x-compress": "br"})
    assert bad_compress.status_code == 400 and "X-Compress must be gzip" in bad_compress.json()["error"]
    await client.post(f"/stream/{stream_id}/complete")
    late = await client.post(f"/stream/{stream_id}/append", content=b"late")
    assert late.status_code == 409
    assert late.json() == {"error": f"stream {stream_id} is complete; create a new stream to write more"}
    assert (await client.get(f"/stream/{stream_id}")).content == b""


async def test_put_uploads_a_whole_body_in_bounded_appends(client: AsyncTestClient[Any]) -> None:
    stream_id = await create(client, headers={"content-type": "text/csv"})
    response = await client.put(f"/stream/{stream_id}", content=ROWS)
    assert response.status_code == 204
    assert (await client.get(f"/stream/{stream_id}")).content == ROWS
    store = client.app.state.store
    state = await store.get(stream_id)
    assert state.closed and state.appends == -(-len(ROWS) // LIMIT), "appends of at most the append limit"
    again = await client.put(f"/stream/{stream_id}", content=b"more")
    assert again.status_code == 409


async def test_put_takes_a_gzipped_body_and_keeps_it_compressed(client: AsyncTestClient[Any]) -> None:
    stream_id = await create(client, headers={"content-type": "text/csv"})
    packed = gzip.compress(ROWS)
    response = await client.put(f"/stream/{stream_id}", content=packed, headers={"content-encoding": "gzip"})
    assert response.status_code == 204
    record = (await client.post(f"/stream/{stream_id}/info")).json()
    assert record["compressed"] is True and record["size_bytes"] == len(ROWS)
    assert (await client.get(f"/stream/{stream_id}", headers={"accept-encoding": "identity"})).content == ROWS
    broken_id = await create(client)
    broken = await client.put(
        f"/stream/{broken_id}", content=packed[:-20], headers={"content-encoding": "gzip"}
    )
    assert broken.status_code == 400 and "gzip body ended early" in broken.json()["error"]


async def test_put_takes_every_member_of_a_multi_member_gzip_body(client: AsyncTestClient[Any]) -> None:
    # `gzip -c a b` and parallel compressors write one gzip member after another: all of it is the body.
    stream_id = await create(client, headers={"content-type": "text/csv"})
    packed = gzip.compress(ROWS[:1000]) + gzip.compress(ROWS[1000:])
    response = await client.put(f"/stream/{stream_id}", content=packed, headers={"content-encoding": "gzip"})
    assert response.status_code == 204
    assert (await client.get(f"/stream/{stream_id}", headers={"accept-encoding": "identity"})).content == ROWS
    trailing_id = await create(client)
    trailing = await client.put(
        f"/stream/{trailing_id}", content=packed + b"not gzip", headers={"content-encoding": "gzip"}
    )
    assert trailing.status_code == 400, trailing.text


async def test_root_paths_are_the_same_api(client: AsyncTestClient[Any]) -> None:
    created = await client.post("/", json={"name": "rooted", "headers": {"content-type": "text/plain"}})
    stream_id = created.json()["id"]
    assert (await client.post(f"/{stream_id}/append", content=b"at the root")).status_code == 204
    assert (await client.post(f"/{stream_id}/complete")).status_code == 204
    moved = await client.get(f"/{stream_id}", params={"follow": "false"}, follow_redirects=False)
    assert moved.status_code == 308 and moved.headers["location"] == f"/stream/{stream_id}?follow=false"
    assert (await client.head(f"/{stream_id}", follow_redirects=False)).status_code == 308
    assert (await client.get(f"/{stream_id}", follow_redirects=True)).content == b"at the root"
    assert (await client.post(f"/{stream_id}/info", json={})).json()["size_bytes"] == 11
    assert (await client.post("/list", json={"name": "rooted"})).json()["total"] == 1
    assert (await client.delete(f"/{stream_id}")).status_code == 204


async def test_protocol_and_service_see_the_same_streams(client: AsyncTestClient[Any]) -> None:
    stream_id = await create(client, headers={"content-type": "text/plain"})
    await client.post(f"/stream/{stream_id}/append", content=b"via the service")
    by_protocol = await client.get(f"/v1/stream/{stream_id}", params={"offset": "-1"})
    assert by_protocol.content == b"via the service"
    await client.put("/v1/stream/logs/app", headers={"content-type": "application/json"})
    listed = (await client.post("/stream/list", json={"name": "logs"})).json()["streams"]
    assert [s["protocol_name"] for s in listed] == ["logs/app"]
    json_id = listed[0]["id"]
    assert (await client.post(f"/stream/{json_id}/append", content=b'{"level":"info"}')).status_code == 204
    not_json = await client.post(f"/stream/{json_id}/append", content=b"plain text")
    assert not_json.status_code == 400 and "not valid JSON" in not_json.json()["error"]
    assert (await client.get("/v1/stream/logs/app", params={"offset": "-1"})).json() == [{"level": "info"}]


# --- reading closed streams ----------------------------------------------------------------------


async def test_compressed_stream_is_gzip_for_those_who_take_it(client: AsyncTestClient[Any]) -> None:
    stream_id = await finished(client, ROWS, compress=True)
    stored = (await client.post(f"/stream/{stream_id}/info")).json()["stored_bytes"]
    response, body = await raw_get(client, f"/stream/{stream_id}", **{"accept-encoding": "gzip, deflate"})
    assert response.headers["content-encoding"] == "gzip" and response.headers["vary"] == "accept-encoding"
    assert int(response.headers["content-length"]) == len(body) == stored < len(ROWS) / 3
    assert gzip.decompress(body) == ROWS
    for accept in ("identity", "gzip;q=0, identity", "br"):
        response, body = await raw_get(client, f"/stream/{stream_id}", **{"accept-encoding": accept})
        assert "content-encoding" not in response.headers and body == ROWS, accept
        assert response.headers["content-type"] == "text/csv"


async def test_range_requests_on_a_closed_stream(client: AsyncTestClient[Any]) -> None:
    stream_id = await finished(client, b"0123456789")
    path, plain = f"/stream/{stream_id}", {"accept-encoding": "identity"}
    cases = {
        "bytes=2-5": (b"2345", "bytes 2-5/10"),
        "bytes=7-": (b"789", "bytes 7-9/10"),
        "bytes=-3": (b"789", "bytes 7-9/10"),
        "bytes=8-100": (b"89", "bytes 8-9/10"),
    }
    for spec, (content, content_range) in cases.items():
        response = await client.get(path, headers={**plain, "range": spec})
        assert response.status_code == 206 and response.content == content, spec
        assert response.headers["content-range"] == content_range
        assert response.headers["content-length"] == str(len(content))
    for spec in ("bytes=10-", "bytes=-0"):
        response = await client.get(path, headers={**plain, "range": spec})
        assert response.status_code == 416 and response.headers["content-range"] == "bytes */10", spec
    for spec in ("bytes=1-2,4-5", "items=1-2", "bytes=5-2"):
        response = await client.get(path, headers={**plain, "range": spec})
        assert response.status_code == 200 and response.content == b"0123456789", spec
    etag = (await client.get(path, headers=plain)).headers["etag"]
    matching = await client.get(path, headers={**plain, "range": "bytes=0-0", "if-range": etag})
    stale = await client.get(path, headers={**plain, "range": "bytes=0-0", "if-range": '"old"'})
    assert (matching.status_code, matching.content, stale.status_code) == (206, b"0", 200)


async def test_range_on_a_compressed_stream_counts_gzip_bytes(client: AsyncTestClient[Any]) -> None:
    stream_id = await finished(client, ROWS, compress=True)
    _, whole = await raw_get(client, f"/stream/{stream_id}", **{"accept-encoding": "gzip"})
    response, head = await raw_get(
        client, f"/stream/{stream_id}", **{"accept-encoding": "gzip", "range": "bytes=0-99"}
    )
    assert response.status_code == 206 and response.headers["content-range"] == f"bytes 0-99/{len(whole)}"
    assert head == whole[:100]
    response, tail = await raw_get(
        client, f"/stream/{stream_id}", **{"accept-encoding": "gzip", "range": "bytes=-50"}
    )
    assert tail == whole[-50:]
    assert zlib.decompressobj(31).decompress(whole[:100] + whole[100:]) == ROWS


async def test_conditional_requests(client: AsyncTestClient[Any]) -> None:
    stream_id = await finished(client, ROWS, compress=True)
    path = f"/stream/{stream_id}"
    plain = await client.get(path, headers={"accept-encoding": "identity"})
    zipped = await client.get(path, headers={"accept-encoding": "gzip"})
    etag, modified = plain.headers["etag"], plain.headers["last-modified"]
    assert etag != zipped.headers["etag"], "each representation has its own validator"
    for headers in (
        {"if-none-match": etag},
        {"if-none-match": f'"other", W/{etag}'},
        {"if-none-match": "*"},
        {"if-modified-since": modified},
        {"if-modified-since": email.utils.formatdate(time.time() + 60, usegmt=True)},
    ):
        response = await client.get(path, headers={"accept-encoding": "identity", **headers})
        assert response.status_code == 304 and response.content == b"", headers
        assert response.headers["etag"] == etag
    earlier = email.utils.formatdate(time.time() - 3600, usegmt=True)
    for headers in ({"if-none-match": zipped.headers["etag"]}, {"if-modified-since": earlier}):
        response = await client.get(path, headers={"accept-encoding": "identity", **headers})
        assert response.status_code == 200 and response.content == ROWS, headers
    mismatch_wins = await client.get(
        path,
        headers={"accept-encoding": "identity", "if-none-match": '"other"', "if-modified-since": modified},
    )
    assert mismatch_wins.status_code == 200, "If-None-Match decides when both are sent"


async def test_head_answers_what_get_would(client: AsyncTestClient[Any]) -> None:
    stream_id = await finished(client, ROWS)
    head = await client.head(f"/stream/{stream_id}")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(ROWS)) and head.headers["content-type"] == "text/csv"
    assert head.headers["stream-closed"] == "true" and head.headers["accept-ranges"] == "bytes"
    open_id = await create(client, headers={"content-type": "text/plain"})
    open_head = await client.head(f"/stream/{open_id}")
    assert open_head.status_code == 200 and "content-length" not in open_head.headers
    assert "stream-closed" not in open_head.headers and open_head.headers["cache-control"] == "no-store"
    missing = await client.head("/stream/stream_00000000000000000000000000000000")
    assert missing.status_code == 404


async def test_snapshot_and_offset_reads(client: AsyncTestClient[Any]) -> None:
    stream_id = await create(client, headers={"content-type": "text/plain"})
    await client.post(f"/stream/{stream_id}/append", content=b"hello world")
    snapshot = await client.get(f"/stream/{stream_id}", params={"follow": "false"})
    assert snapshot.content == b"hello world" and snapshot.headers["content-length"] == "11"
    later = await client.get(f"/stream/{stream_id}", params={"follow": "false", "offset": 6})
    assert later.content == b"world"
    await client.post(f"/stream/{stream_id}/complete", headers={"x-compress": "gzip"})
    resumed = await client.get(
        f"/stream/{stream_id}", params={"offset": 6}, headers={"accept-encoding": "gzip"}
    )
    assert resumed.content == b"world" and "content-encoding" not in resumed.headers, (
        "offsets count plain bytes"
    )
    past = await client.get(f"/stream/{stream_id}", params={"offset": 12})
    assert past.status_code == 416 and "past the end (11 bytes)" in past.json()["error"]
    for params in ({"offset": "1.5"}, {"follow": "maybe"}):
        assert (await client.get(f"/stream/{stream_id}", params=params)).status_code == 400
    # An offset in the protocol's terms is a protocol read: sent on to the stream's protocol URL.
    protocol = await client.get(f"/stream/{stream_id}", params={"offset": "-1"}, follow_redirects=False)
    assert protocol.status_code == 307 and protocol.headers["location"] == f"/v1/stream/{stream_id}?offset=-1"


# --- live tails, against a real server -----------------------------------------------------------


async def test_get_replays_then_tails_until_complete(server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        stream_id = await create(http, headers={"content-type": "text/plain"})
        await http.post(f"/stream/{stream_id}/append", content=b"first ")
        received: list[tuple[float, bytes]] = []

        async def read() -> httpx.Response:
            async with http.stream("GET", f"/stream/{stream_id}") as response:
                async for piece in response.aiter_bytes():
                    received.append((time.monotonic(), piece))
                return response

        reader = asyncio.create_task(read())
        await asyncio.sleep(0.5)
        assert b"".join(p for _, p in received) == b"first ", "what exists is sent at once"
        for word in (b"second ", b"third"):
            await http.post(f"/stream/{stream_id}/append", content=word)
            await asyncio.sleep(0.3)
        assert b"".join(p for _, p in received) == b"first second third", "appends arrive while it is open"
        assert not reader.done()
        await http.post(f"/stream/{stream_id}/complete", headers={"x-compress": "gzip"})
        response = await asyncio.wait_for(reader, 10)
    assert response.headers["content-type"] == "text/plain" and "content-length" not in response.headers
    assert b"".join(p for _, p in received) == b"first second third"


async def test_put_streams_a_large_body_from_a_real_client(server: ServerProcess) -> None:
    block = bytes(range(256)) * 4096

    async def body() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield block

    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        stream_id = await create(http)
        assert (await http.put(f"/stream/{stream_id}", content=body())).status_code == 204
        response = await http.get(f"/stream/{stream_id}")
    assert response.headers["stream-closed"] == "true" and response.content == block * 3


async def test_a_tail_is_cut_not_ended_when_the_stream_is_deleted(server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        stream_id = await create(http)
        await http.post(f"/stream/{stream_id}/append", content=b"partial")
        async with http.stream("GET", f"/stream/{stream_id}") as response:
            pieces = response.aiter_bytes()
            assert await anext(pieces) == b"partial"
            await http.delete(f"/stream/{stream_id}")
            with pytest.raises(httpx.RemoteProtocolError):
                async for _ in pieces:
                    pass


async def test_a_tail_is_cut_when_the_server_stops(tmp_path: Path) -> None:
    with ServerProcess(env={"STREAMHOLD_DATA_DIR": str(tmp_path)}) as own:
        async with httpx.AsyncClient(base_url=own.url, timeout=10) as http:
            stream_id = await create(http)
            await http.post(f"/stream/{stream_id}/append", content=b"partial")
            async with http.stream("GET", f"/stream/{stream_id}") as response:
                pieces = response.aiter_bytes()
                assert await anext(pieces) == b"partial"
                started = time.monotonic()
                await asyncio.to_thread(own.stop)
                with pytest.raises(httpx.RemoteProtocolError):
                    async for _ in pieces:
                        pass
        assert time.monotonic() - started < 5, "an open tail must not hold up shutdown"


# --- the remote SDK's own behaviour --------------------------------------------------------------


class CountingTransport(httpx.AsyncHTTPTransport):
    """A real transport that counts the requests it sends, by method and path suffix."""

    def __init__(self) -> None:
        super().__init__()
        self.appends = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/append"):
            self.appends += 1
        return await super().handle_async_request(request)


async def test_remote_writes_go_in_call_order_and_queued_ones_share_a_request(server: ServerProcess) -> None:
    transport = CountingTransport()
    async with RemoteStreams(server.url, transport=transport) as streams:
        stream = await streams.create("tokens", content_type="text/plain")
        for i in range(300):
            stream.write(f"{i} ")
        await stream.close()
        content = b"".join([piece async for piece in streams.download(stream.id)])
    assert content == "".join(f"{i} " for i in range(300)).encode()
    assert 1 <= transport.appends < 30, "queued writes are coalesced into a few appends"


async def test_remote_write_failure_fails_every_write_queued_behind_it(server: ServerProcess) -> None:
    async with RemoteStreams(server.url) as streams:
        stream = await streams.create("doomed")
        await stream.write("kept")
        await streams.delete(stream.id)
        writes = [stream.write(f"w{i}") for i in range(5)]
        outcomes = await asyncio.gather(*writes, return_exceptions=True)
        assert all(isinstance(outcome, StreamNotFoundError) for outcome in outcomes)
        with pytest.raises(StreamNotFoundError):
            stream.write("after the failure")
        with pytest.raises(StreamNotFoundError):
            await stream.close()


async def test_remote_reports_an_unreachable_server() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    async with RemoteStreams(url, timeout=2) as streams:
        with pytest.raises(ServerUnavailableError, match=f"cannot reach the server at {url}"):
            await streams.create("nowhere")
        with pytest.raises(ServerUnavailableError, match="could not resume within 1 s"):
            async for _ in streams.read("stream_00000000000000000000000000000000", resume_for=1):
                pass


async def test_agent_context_goes_remote_when_given_a_server(
    server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STREAMHOLD_URL", server.url)
    async with create_agent_context() as ctx:
        assert isinstance(ctx.stream, RemoteStreams)
        stream = await ctx.stream.create("agent", content_type="text/plain")
        ctx.wait_until(stream.write("written in the background"))
    async with RemoteStreams(server.url) as streams:
        content = b"".join([piece async for piece in streams.read(stream.id, follow=False)])
    assert content == b"written in the background"
