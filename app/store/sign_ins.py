"""The dashboard's sign-ins as the database keeps them: a digest of each cookie's random id, when it ends,
and the token it was made with (none for an API key), so that a sign-out anywhere ends it everywhere."""

from __future__ import annotations

import asyncio

from sqlalchemy import Connection, Engine, select

from .. import clock
from ..models import Change
from .schema import sessions
from .writer import Writer


class SignIns:
    """Records sign-ins through the writer and reads them fresh (never cached: a sign-out counts at once)."""

    def __init__(self, writer: Writer, read_engine: Engine) -> None:
        self._writer = writer
        self._read_engine = read_engine

    async def add(self, id_hash: str, expires_at: float, token_id: str | None = None) -> None:
        """Record a sign-in, with the token it used if any (and forget the expired ones)."""

        def add(conn: Connection) -> tuple[None, list[Change]]:
            conn.execute(sessions.delete().where(sessions.c.expires_at <= clock.now()))
            conn.execute(sessions.insert().values(id_hash=id_hash, expires_at=expires_at, token_id=token_id))
            return None, []

        await self._writer.call(add)

    async def holder(self, id_hash: str) -> str | None:
        """Who a recorded, unexpired sign-in is: a token id, "" for an API key, None for no one."""

        def read() -> str | None:
            with self._read_engine.connect() as conn:
                found = conn.execute(
                    select(sessions.c.token_id).where(
                        sessions.c.id_hash == id_hash, sessions.c.expires_at > clock.now()
                    )
                ).first()
            return None if found is None else found[0] or ""

        return await asyncio.to_thread(read)

    async def end(self, id_hash: str) -> None:
        await self._writer.call(
            lambda conn: (conn.execute(sessions.delete().where(sessions.c.id_hash == id_hash)), [])
        )
