"""Scoped tokens in the store, so every process shares them, with a per-process cache of under a second.

A token is `sht_<id>_<secret>`: the id finds its row, and only a sha256 digest of the secret is kept, compared
in constant time. Revoking one writes `revoked_at`; every process reads a token again at most `CACHE_SECONDS`
after it last did, so a revocation counts everywhere within a second while an append in the common case
costs no extra database round trip.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, select, update

from .. import clock
from ..models import Change
from .schema import tokens
from .writer import Writer

CACHE_SECONDS = 0.5  # well under a second, so that a request's own latency still leaves room
CACHE_LIMIT = 10_000  # ids remembered (found or not) before the cache starts afresh
PREFIX = "sht_"


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """A token as stored: everything but its secret."""

    id: str
    scopes: tuple[str, ...]
    namespaces: tuple[str, ...]
    label: str
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    secret_hash: str = ""

    def alive(self, now: float | None = None) -> bool:
        """Neither revoked nor expired, by the store's clock (the one stream expiry is judged by)."""
        moment = clock.now() if now is None else now
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > moment)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _record(row: Any) -> TokenRecord:
    get = row._mapping.__getitem__
    return TokenRecord(
        id=get("id"),
        scopes=tuple(s for s in str(get("scopes")).split(",") if s),
        namespaces=tuple(json.loads(get("namespaces_json") or "[]")),
        label=get("label") or "",
        created_at=get("created_at"),
        expires_at=get("expires_at"),
        revoked_at=get("revoked_at"),
        secret_hash=get("secret_hash"),
    )


def split_token(presented: str) -> tuple[str, str] | None:
    """The (id, secret) of a token's text, or None when it is not shaped like one."""
    if not presented.startswith(PREFIX):
        return None
    token_id, sep, secret = presented[len(PREFIX) :].partition("_")
    if not sep or not token_id or not secret or len(token_id) > 32 or len(secret) > 128:
        return None
    return token_id, secret


class Tokens:
    """Mint, list, revoke and look up tokens; lookups are cached per process for `CACHE_SECONDS`."""

    def __init__(self, writer: Writer, read_engine: Engine) -> None:
        self._writer = writer
        self._read_engine = read_engine
        self._cache: dict[str, tuple[float, TokenRecord | None]] = {}
        self._reading: dict[str, asyncio.Future[TokenRecord | None]] = {}

    async def mint(
        self, scopes: tuple[str, ...], namespaces: tuple[str, ...], ttl: float | None, label: str
    ) -> tuple[TokenRecord, str]:
        """A new token and its text (shown once: only a digest of its secret is stored)."""
        token_id, secret = secrets.token_hex(8), secrets.token_hex(32)
        now = clock.now()
        expires_at = now + ttl if ttl else None
        row: dict[str, Any] = {
            "id": token_id,
            "secret_hash": _digest(secret),
            "scopes": ",".join(scopes),
            "namespaces_json": json.dumps(list(namespaces)),
            "label": label,
            "created_at": now,
            "expires_at": expires_at,
            "revoked_at": None,
        }

        def add(conn: Connection) -> tuple[None, list[Change]]:
            conn.execute(tokens.insert().values(row))
            return None, []

        await self._writer.call(add)
        record = TokenRecord(token_id, scopes, namespaces, label, now, expires_at, None)
        return record, f"{PREFIX}{token_id}_{secret}"

    async def list(self) -> list[TokenRecord]:
        """Every token not revoked, newest first (expired ones too, until revoked)."""

        def read() -> list[TokenRecord]:
            with self._read_engine.connect() as conn:
                rows = conn.execute(
                    select(tokens).where(tokens.c.revoked_at.is_(None)).order_by(tokens.c.created_at.desc())
                )
                return [_record(r) for r in rows]

        return await asyncio.to_thread(read)

    async def revoke(self, token_id: str) -> bool:
        """Revoke a token; False when there is no such live token."""
        now = clock.now()

        def mark(conn: Connection) -> tuple[bool, list[Change]]:
            done = conn.execute(
                update(tokens)
                .where(tokens.c.id == token_id, tokens.c.revoked_at.is_(None))
                .values(revoked_at=now)
            )
            return done.rowcount > 0, []

        revoked: bool = await self._writer.call(mark)
        self._cache.pop(token_id, None)
        return revoked

    async def find(self, token_id: str) -> TokenRecord | None:
        """The stored token of this id, at most `CACHE_SECONDS` old."""
        now = time.monotonic()
        cached = self._cache.get(token_id)
        if cached is not None and now - cached[0] < CACHE_SECONDS:
            return cached[1]

        pending = self._reading.get(token_id)
        if pending is None:  # one read per token at a time: a burst of requests shares it
            pending = self._reading[token_id] = asyncio.ensure_future(self._read(token_id, now))
            pending.add_done_callback(lambda _: self._reading.pop(token_id, None))
        return await asyncio.shield(pending)

    async def _read(self, token_id: str, now: float) -> TokenRecord | None:
        def read() -> TokenRecord | None:
            with self._read_engine.connect() as conn:
                row = conn.execute(select(tokens).where(tokens.c.id == token_id)).first()
                return _record(row) if row is not None else None

        record = await asyncio.to_thread(read)
        if len(self._cache) >= CACHE_LIMIT:
            self._cache.clear()
        self._cache[token_id] = (now, record)
        return record

    async def check(self, presented: str) -> TokenRecord | None:
        """The live token `presented` stands for, or None (unknown, wrong secret, revoked or expired)."""
        parts = split_token(presented)
        if parts is None:
            return None
        record = await self.find(parts[0])
        if record is None:
            return None
        if not hmac.compare_digest(_digest(parts[1]), record.secret_hash):
            return None
        return record if record.alive() else None
