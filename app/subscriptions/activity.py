"""What each subscription last did, for people: the listing behind `streamhold subscriptions ls` and the
dashboard's panel. Kept apart from the wake state, so a read of it never touches a wake in flight."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, insert, select, update

from ..store.subscription_tables import activity, links, subscriptions
from .model import Config

MAX_ERROR = 300
Row = dict[str, Any]


def record(conn: Connection, subscription_id: str, ok: bool, error: str | None, now: float) -> None:
    """Note one webhook delivery (or a pull-wake claim) and, if it failed, why."""
    values: dict[str, Any] = {"last_delivery_at": now, "last_ok": ok}
    if error is not None:
        values["last_error"] = error[:MAX_ERROR]
    where = activity.c.subscription_id == subscription_id
    found = conn.execute(select(activity.c.failures).where(where)).first()
    if found is None:
        conn.execute(insert(activity).values(subscription_id=subscription_id, failures=int(not ok), **values))
    else:
        conn.execute(update(activity).where(where).values(failures=found[0] + int(not ok), **values))


def listing(conn: Connection, limit: int = 1000) -> list[Row]:
    """Every subscription (by id, at most `limit`), with its configuration, streams and last activity."""
    query = (
        select(subscriptions, activity.c.last_delivery_at, activity.c.last_ok, activity.c.last_error)
        .add_columns(activity.c.failures)
        .select_from(subscriptions.outerjoin(activity, activity.c.subscription_id == subscriptions.c.id))
        .order_by(subscriptions.c.id)
        .limit(limit)
    )
    rows = [dict(r) for r in conn.execute(query).mappings()]
    counts: dict[str, int] = {}
    ids = [r["id"] for r in rows]
    if ids:
        for sid, _path in conn.execute(
            select(links.c.subscription_id, links.c.path).where(links.c.subscription_id.in_(ids))
        ):
            counts[sid] = counts.get(sid, 0) + 1
    result = []
    for row in rows:
        config = Config.from_json(row["config_json"])
        result.append(
            {
                "id": row["id"],
                "type": row["kind"],
                "pattern": config.pattern,
                "streams": list(config.streams),
                "linked_streams": counts.get(row["id"], 0),
                "webhook_url": config.webhook_url,
                "wake_stream": config.wake_stream,
                "description": config.description,
                "status": row["status"],
                "created_at": row["created_at"],
                "wake_in_flight": row["wake_id"] is not None,
                "attempts": row["attempts"],
                "last_delivery_at": row["last_delivery_at"],
                "last_ok": row["last_ok"],
                "last_error": row["last_error"],
                "failures": row["failures"] or 0,
            }
        )
    return result
