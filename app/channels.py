"""The channels backends that carry doorbells between processes: Redis, PostgreSQL, or none (in-process)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any

from litestar.channels.backends.base import ChannelsBackend
from litestar.channels.backends.psycopg import PsycoPgChannelsBackend
from psycopg import AsyncConnection

PUBLISH_TIMEOUT = 5.0


class PostgresDoorbells(PsycoPgChannelsBackend):
    """Litestar's LISTEN/NOTIFY backend, publishing over one kept-open connection.

    The upstream backend connects anew for every message, which costs the server a backend process each time.
    """

    def __init__(self, pg_dsn: str) -> None:
        super().__init__(pg_dsn)
        self._publisher: AsyncConnection[Any] | None = None
        self._publish_lock = asyncio.Lock()

    async def publish(self, data: bytes, channels: Iterable[str]) -> None:
        async with self._publish_lock:
            conn = self._publisher
            if conn is None or conn.closed:
                conn = await AsyncConnection.connect(self._pg_dsn, autocommit=True, connect_timeout=5)
                self._publisher = conn
            try:
                for channel in channels:
                    await conn.execute("SELECT pg_notify(%s, %s)", (channel, data.decode()))
            except BaseException:
                self._publisher = None
                with contextlib.suppress(Exception):
                    await conn.close()
                raise

    async def on_shutdown(self) -> None:
        try:
            await super().on_shutdown()
        finally:
            async with self._publish_lock:
                if self._publisher is not None:
                    with contextlib.suppress(Exception):
                        await self._publisher.close()
                    self._publisher = None


def make_backend(url: str) -> ChannelsBackend | None:
    """The channels backend for STREAMHOLD_CHANNELS_URL; None means in-process only."""
    if not url or url == "memory://":
        return None
    if url.startswith(("redis://", "rediss://", "unix://")):
        from litestar.channels.backends.redis import RedisChannelsPubSubBackend
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # No silent reconnects: the hub must see a dropped subscription, to wake readers once it is back.
        client = Redis.from_url(
            url,
            socket_connect_timeout=5,
            socket_timeout=PUBLISH_TIMEOUT,
            health_check_interval=10,
            retry=Retry(NoBackoff(), 0),
            client_name="streamhold-doorbells",
        )
        return RedisChannelsPubSubBackend(redis=client)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresDoorbells(pg_dsn=url)
    raise ValueError(
        "STREAMHOLD_CHANNELS_URL must be redis://, rediss://, unix://, postgresql:// or empty, "
        f"got {url.split(':')[0]}:..."
    )
