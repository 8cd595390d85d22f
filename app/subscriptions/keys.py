"""The signing keys kept in the database: the newest signs; the one before stays published for a grace.

Rotation adds a key; from then on every process signs with it (each reloads the keys at its sweeps), while
the previous key stays in the JWKS for KEY_GRACE_S so that a delivery signed just before still verifies.
Retiring drops every key but the newest at once. Callback tokens made with any published key stay valid.
"""

from __future__ import annotations

from sqlalchemy import Connection, delete, insert, select

from .. import clock
from ..store.subscription_tables import signing_keys
from .signing import SigningKey

KEY_GRACE_S = 24 * 3600.0


def published(conn: Connection, now: float) -> list[SigningKey]:
    """The keys to publish, newest (the signing key) first; keys past their grace are dropped."""
    query = select(signing_keys.c.private_key, signing_keys.c.created_at).order_by(
        signing_keys.c.created_at.desc(), signing_keys.c.kid
    )
    rows: list[tuple[bytes, float]] = [(r[0], r[1]) for r in conn.execute(query)]
    kept = [raw for raw, _ in rows[:1]]
    for (raw, _created), (_newer, newer_created) in zip(rows[1:], rows, strict=False):
        if newer_created + KEY_GRACE_S > now:  # superseded less than a grace ago
            kept.append(raw)
    return [SigningKey.from_raw(raw) for raw in kept]


def ensure(conn: Connection) -> None:
    if conn.execute(select(signing_keys.c.kid).limit(1)).first() is None:
        _add(conn, SigningKey.generate(), clock.now())


def rotate(conn: Connection, now: float) -> SigningKey:
    """Make a new signing key; keys already past their grace are deleted."""
    current = published(conn, now)
    newest = conn.execute(
        select(signing_keys.c.created_at).order_by(signing_keys.c.created_at.desc())
    ).first()
    # Strictly newer than every kept key, even if the clock has not moved since the last rotation.
    when = max(now, (newest[0] + 1e-3) if newest else now)
    key = SigningKey.generate()
    _add(conn, key, when)
    keep = [k.kid for k in current] + [key.kid]
    conn.execute(delete(signing_keys).where(signing_keys.c.kid.not_in(keep)))
    return key


def retire(conn: Connection, now: float) -> list[str]:
    """Stop publishing every key but the newest; returns the kids retired."""
    newest = published(conn, now)[0]
    old = [k for k in conn.execute(select(signing_keys.c.kid)).scalars() if k != newest.kid]
    conn.execute(delete(signing_keys).where(signing_keys.c.kid != newest.kid))
    return old


def _add(conn: Connection, key: SigningKey, now: float) -> None:
    conn.execute(insert(signing_keys).values(kid=key.kid, private_key=key.raw(), created_at=now))
