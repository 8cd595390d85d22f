"""Subscription management: create (with backfill at each stream's tail), delete, link and unlink streams.

Each function is one transaction, run by the store's writer.
"""

from __future__ import annotations

from sqlalchemy import Connection, and_, delete, insert, or_, select, update

from ..models import format_offset
from ..store.schema import streams
from ..store.subscription_tables import activity, links, subscriptions
from .model import ZERO_OFFSET, Config, SubscriptionError, not_found
from .state import Row, links_of, load, tails


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


# --- management ----------------------------------------------------------------------------------


def create(
    conn: Connection, subscription_id: str, config: Config, origin: str, now: float
) -> tuple[Row, bool]:
    row = load(conn, subscription_id)
    if row is not None:
        if row["config_hash"] != config.digest():
            raise SubscriptionError(
                "SUBSCRIPTION_ALREADY_EXISTS",
                f"subscription {subscription_id!r} exists with another configuration; delete it first",
            )
        return row, False
    row = {
        "id": subscription_id,
        "kind": config.kind,
        "config_json": config.to_json(),
        "config_hash": config.digest(),
        "origin": origin,
        "created_at": now,
    }
    conn.execute(insert(subscriptions).values(**row))
    found: dict[str, Row] = {}
    for path, offset in _current_or_zero(conn, list(config.streams), now).items():
        found[path] = {"path": path, "explicit": True, "glob": False, "acked_offset": offset}
    if config.pattern is not None:
        prefix = config.literal_prefix()
        query = select(streams.c.name, streams.c.tail, streams.c.generation).where(
            streams.c.deleted.is_(False), or_(streams.c.expires_at.is_(None), streams.c.expires_at > now)
        )
        if prefix:
            query = query.where(streams.c.name.like(_escape_like(prefix) + "%", escape="\\"))
        for name, tail, generation in conn.execute(query):
            if config.matches(name) and name != config.wake_stream:  # at its tail: history is not replayed
                link = found.setdefault(
                    name,
                    {"path": name, "explicit": False, "acked_offset": format_offset(tail, generation or 0)},
                )
                link["glob"] = True
    for link in found.values():
        conn.execute(insert(links).values(subscription_id=subscription_id, **link))
    return load(conn, subscription_id) or row, True


def _current_or_zero(conn: Connection, paths: list[str], now: float) -> dict[str, str]:
    current = tails(conn, paths, now)
    return {path: current.get(path, ZERO_OFFSET) for path in paths}


def remove(conn: Connection, subscription_id: str) -> None:
    conn.execute(delete(links).where(links.c.subscription_id == subscription_id))
    conn.execute(delete(subscriptions).where(subscriptions.c.id == subscription_id))
    conn.execute(delete(activity).where(activity.c.subscription_id == subscription_id))


def add_streams(conn: Connection, subscription_id: str, paths: list[str], now: float) -> None:
    if load(conn, subscription_id) is None:
        raise not_found(subscription_id)
    existing = {link["path"] for link in links_of(conn, subscription_id)}
    for path, offset in _current_or_zero(conn, sorted(set(paths)), now).items():
        if path in existing:
            conn.execute(
                update(links)
                .where(links.c.subscription_id == subscription_id, links.c.path == path)
                .values(explicit=True)
            )
        else:
            conn.execute(
                insert(links).values(
                    subscription_id=subscription_id, path=path, explicit=True, glob=False, acked_offset=offset
                )
            )


def remove_stream(conn: Connection, subscription_id: str, path: str) -> None:
    row = load(conn, subscription_id)
    if row is None:
        raise not_found(subscription_id)
    where = and_(links.c.subscription_id == subscription_id, links.c.path == path)
    link = conn.execute(select(links).where(where)).mappings().first()
    if link is None:
        return
    if link["glob"] or Config.from_json(row["config_json"]).matches(path):
        conn.execute(update(links).where(where).values(explicit=False, glob=True))
    else:
        conn.execute(delete(links).where(where))
