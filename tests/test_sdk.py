"""The Python stream API's contract: the same tests for every implementation of StreamService."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from streamhold.errors import PayloadTooLargeError, StreamClosedError, StreamNotFoundError
from streamhold.live import LiveHub
from streamhold.sdk.base import StreamService
from streamhold.sdk.local import LocalStreams
from streamhold.settings import Settings
from streamhold.store.store import Store

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=["local", "remote"])
async def streams(request: pytest.FixtureRequest, settings: Settings) -> AsyncIterator[StreamService]:
    """The stream API in-process (over SQLite and PostgreSQL), and over HTTP from a real server subprocess."""
    if request.param == "remote":
        from streamhold.sdk.remote import RemoteStreams
        from tests._server import ServerProcess

        if settings.database_url:
            # A server start costs seconds; the store behind it is already covered by the local runs.
            pytest.skip("the remote SDK runs against a server on SQLite only")
        env = {
            "STREAMHOLD_DATA_DIR": str(settings.data_dir),
            "STREAMHOLD_LONG_POLL_TIMEOUT": str(settings.long_poll_timeout),
            "STREAMHOLD_MAX_APPEND_BYTES": str(settings.max_append_bytes),
        }
        with ServerProcess(env=env) as server:
            async with RemoteStreams(server.url) as remote:
                yield remote
        return
    async with Store.open(settings) as store, LiveHub.open(store, settings) as hub:
        yield LocalStreams(store, hub, settings)


async def read_all(streams: StreamService, stream_id: str) -> bytes:
    return b"".join([chunk async for chunk in streams.download(stream_id)])


async def test_create_write_close(streams: StreamService) -> None:
    stream = await streams.create("export", content_type="text/csv", metadata={"user_id": "u1"})
    assert stream.id.startswith("stream_") and len(stream.id) == 39
    assert stream.url.endswith(f"/stream/{stream.id}") and stream.viewer_url.endswith(f"/watch/{stream.id}")
    await stream.write("Name,Email\n")
    await stream.write(b"a,a@example.com\n")
    await stream.write(bytearray(b"b,"))
    await stream.write(memoryview(b"b@example.com\n"))
    assert stream.bytes_written == 43 and not stream.compressed
    await stream.close()
    await stream.close()  # idempotent
    with pytest.raises(StreamClosedError):
        await stream.write("late")
    assert await read_all(streams, stream.id) == b"Name,Email\na,a@example.com\nb,b@example.com\n"
    info = await streams.get(stream.id)
    assert (info.namespace, info.metadata, info.content_type, info.size_bytes) == (
        "export",
        {"user_id": "u1"},
        "text/csv",
        43,
    )
    assert info.closed_at is not None and info.created_at <= info.closed_at


async def test_objects_are_written_as_compact_json(streams: StreamService) -> None:
    async with await streams.create("audit", content_type="application/json") as stream:
        await stream.write({"event": "start", "n": [1, 2]})
        await stream.write(["é", None, True])
        await stream.write(42)
    assert await read_all(streams, stream.id) == '{"event":"start","n":[1,2]}["é",null,true]42'.encode()
    with pytest.raises(TypeError):
        (await streams.create("audit")).write({1, 2})


async def test_unawaited_writes_apply_in_call_order(streams: StreamService) -> None:
    stream = await streams.create("tokens", content_type="text/plain")
    for i in range(500):
        stream.write(f"{i} ")
    await stream.close()
    assert await read_all(streams, stream.id) == "".join(f"{i} " for i in range(500)).encode()


async def test_validation_errors_are_clear(streams: StreamService) -> None:
    with pytest.raises(ValueError, match="namespace"):
        await streams.create("")
    with pytest.raises(ValueError, match="namespace"):
        await streams.create("n" * 255)
    with pytest.raises(ValueError, match="metadata"):
        await streams.create("ok", metadata={"n": 1})  # type: ignore[dict-item]
    for ttl in (-1, float("nan"), "60"):
        with pytest.raises(ValueError, match="ttl must be a number of seconds"):
            await streams.create("ok", ttl=ttl)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="limit"):
        await streams.list(limit=0)
    with pytest.raises(ValueError, match="limit"):
        await streams.list(limit=1001)
    with pytest.raises(StreamNotFoundError):
        await streams.get("stream_00000000000000000000000000000000")
    with pytest.raises(StreamNotFoundError):
        await streams.delete("stream_00000000000000000000000000000000")


async def test_write_over_the_limit_is_refused_and_changes_nothing(
    streams: StreamService, settings: Settings
) -> None:
    stream = await streams.create("big")
    await stream.write(b"ok")
    with pytest.raises(PayloadTooLargeError):
        await stream.write(b"x" * (settings.max_append_bytes + 1))
    await stream.close()
    assert await read_all(streams, stream.id) == b"ok"


async def test_ttl_semantics(streams: StreamService) -> None:
    now = datetime.now(UTC)
    default = await streams.get((await streams.create("t")).id)
    assert default.expires_at is not None and abs(default.expires_at - now - timedelta(days=30)) < timedelta(
        minutes=1
    )
    for never in (None, 0):
        info = await streams.get((await streams.create("t", ttl=never)).id)
        assert info.expires_at is None
    short = await streams.get((await streams.create("t", ttl=5)).id)
    assert short.expires_at is not None and abs(short.expires_at - now - timedelta(seconds=60)) < timedelta(
        seconds=30
    )
    long = await streams.get((await streams.create("t", ttl=10**9)).id)
    assert long.expires_at is not None and abs(long.expires_at - now - timedelta(days=90)) < timedelta(
        minutes=1
    )


async def test_compress_at_close(streams: StreamService) -> None:
    rows = "".join(f"{i},user{i}@example.com\n" for i in range(5000))
    stream = await streams.create("export", content_type="text/csv", compress=True)
    assert stream.compressed
    await stream.write(rows)
    await stream.close()
    assert await read_all(streams, stream.id) == rows.encode()
    info = await streams.get(stream.id)
    assert info.compressed and info.size_bytes == len(rows) and info.stored_bytes < len(rows) / 3
    assert gzip.compress(rows.encode())[:2] == b"\x1f\x8b"


async def test_list_by_namespace_and_metadata_with_paging(streams: StreamService) -> None:
    for i in range(7):
        await streams.create("reports" if i < 5 else "other", metadata={"user_id": f"u{i % 2}"})
    page = await streams.list(namespace="reports", limit=2)
    assert page.total == 5 and len(page.streams) == 2
    rest = await streams.list(namespace="reports", limit=10, offset=2)
    assert len(rest.streams) == 3 and not {s.id for s in rest.streams} & {s.id for s in page.streams}
    mine = await streams.list(namespace="reports", metadata={"user_id": "u0"})
    assert mine.total == 3 and all(s.metadata == {"user_id": "u0"} for s in mine.streams)
    oldest = await streams.list(namespace="reports", direction="asc", limit=1)
    newest = await streams.list(namespace="reports", direction="desc", limit=1)
    assert oldest.streams[0].created_at <= newest.streams[0].created_at


async def test_download_tails_an_open_stream_until_closed(streams: StreamService) -> None:
    stream = await streams.create("live", content_type="text/plain")
    await stream.write("first ")
    received: list[bytes] = []

    async def reader() -> None:
        async for chunk in streams.download(stream.id):
            received.append(chunk)

    task = asyncio.create_task(reader())
    await asyncio.sleep(0.2)
    for word in ("second ", "third"):
        await stream.write(word)
        await asyncio.sleep(0.1)
    await stream.close()
    await asyncio.wait_for(task, 10)
    assert b"".join(received) == b"first second third"
    assert len(received) >= 2, "new bytes arrive as they are committed"


async def test_delete_makes_it_gone(streams: StreamService) -> None:
    stream = await streams.create("tmp")
    await stream.write("x")
    await streams.delete(stream.id)
    with pytest.raises(StreamNotFoundError):
        await streams.get(stream.id)
    with pytest.raises(StreamNotFoundError):
        await read_all(streams, stream.id)
