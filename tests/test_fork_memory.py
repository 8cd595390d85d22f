"""Reading a few bytes of a fork of a large compressed source fetches a few of its gzip pieces, not all."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from streamhold.settings import Settings
from streamhold.store.store import NewStream, Store

pytestmark = pytest.mark.timeout(120)

MIB = 1024 * 1024
SOURCE_MIB = 24  # 24 gzip pieces: SEEK_STEP is 1 MiB of content


async def test_a_fork_prefix_read_on_postgres_fetches_gzip_pieces_a_few_at_a_time(
    pg_url: str, tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path, database_url=pg_url, public_url="http://sh.test")
    async with Store.open(settings) as store:
        source, _ = await store.create(NewStream(namespace="forks", name="packed"))
        rng = random.Random(7)  # random bytes: the gzip body is as large as the content
        for _ in range(SOURCE_MIB):
            await store.append(source.id, rng.randbytes(MIB))
        await store.append(source.id, b"", close=True, compress=True)
        await store.finish(source.id)
        packed = await store.get(source.id)
        assert packed is not None and packed.compressed
        fork, _ = await store.create(
            NewStream(namespace="forks", name="early", fork_from="packed", fork_offset=10)
        )
        received: list[int] = []

        def count_rows(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            # Rows the database has sent to this process when the statement returns.
            if "gzip_chunks.data" in statement and cursor.pgresult is not None:
                received.append(cursor.pgresult.ntuples)

        event.listen(store._read_engine, "after_cursor_execute", count_rows)
        try:
            assert await store.read(fork.id, 0, 10) == (await store.read(source.id, 0, 10))
        finally:
            event.remove(store._read_engine, "after_cursor_execute", count_rows)
        assert received and max(received) <= 4, f"rows of gzip pieces fetched at once: {received}"
