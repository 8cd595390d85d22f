"""Subscription state in the database: each function is one transaction, run by the store's writer.

Every change to a subscription first locks its row (`FOR UPDATE` on PostgreSQL; SQLite has one writer at
a time), so processes sharing the database never issue two wakes for one subscription, and fencing is
judged against what is committed, never against a copy in memory.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, and_, insert, or_, select, update

from ..models import format_offset
from ..store.schema import streams
from ..store.subscription_tables import links, subscriptions
from .model import UNSEEN, Config, SubscriptionError, invalid, not_found

Row = dict[str, Any]


@dataclass
class Effects:
    """What a transaction leaves to do once committed: wake events to append, webhooks now due."""

    wake_events: list[tuple[str, bytes]] = field(default_factory=list)
    deliveries_due: bool = False
    next_wake: bool = False


@dataclass(frozen=True)
class Delivery:
    """A webhook to send for the wake in flight, held by this process until `until`."""

    subscription_id: str
    wake_id: str
    generation: int
    url: str
    origin: str
    streams: list[dict[str, Any]]
    attempts: int
    took_over: bool


def tails(conn: Connection, names: list[str], now: float) -> dict[str, str]:
    """The current tail offset of each live stream among `names`."""
    if not names:
        return {}
    rows = conn.execute(
        select(streams.c.name, streams.c.tail, streams.c.generation).where(
            streams.c.name.in_(names),
            streams.c.deleted.is_(False),
            or_(streams.c.expires_at.is_(None), streams.c.expires_at > now),
        )
    )
    return {name: format_offset(tail, generation or 0) for name, tail, generation in rows}


def any_subscriptions(conn: Connection) -> bool:
    return conn.execute(select(subscriptions.c.id).limit(1)).first() is not None


def load(conn: Connection, subscription_id: str, lock: bool = True) -> Row | None:
    query = select(subscriptions).where(subscriptions.c.id == subscription_id)
    row = conn.execute(query.with_for_update() if lock else query).mappings().first()
    return dict(row) if row is not None else None


def links_of(conn: Connection, subscription_id: str) -> list[Row]:
    query = select(links).where(links.c.subscription_id == subscription_id).order_by(links.c.path)
    return [dict(r) for r in conn.execute(query).mappings()]


def _save(conn: Connection, row: Row, **values: Any) -> None:
    row.update(values)
    conn.execute(update(subscriptions).where(subscriptions.c.id == row["id"]).values(**values))


def _set_acked(conn: Connection, subscription_id: str, path: str, offset: str) -> None:
    where = and_(links.c.subscription_id == subscription_id, links.c.path == path)
    conn.execute(update(links).where(where).values(acked_offset=offset))


def link_view(link: Row) -> dict[str, Any]:
    return {
        "path": link["path"],
        "link_type": "explicit" if link["explicit"] else "glob",
        "acked_offset": link["acked_offset"],
    }


def _pending(cursors: list[Row], current: dict[str, str]) -> bool:
    return any(current.get(c["path"], c["acked_offset"]) > c["acked_offset"] for c in cursors)


def _clear_wake(conn: Connection, row: Row) -> None:
    _save(
        conn,
        row,
        wake_id=None,
        snapshot_json=None,
        trigger=None,
        holder=None,
        lease_until=None,
        deliver_due=False,
        deliverer=None,
        deliver_until=None,
    )


def _wake(conn: Connection, row: Row, now: float, effects: Effects, trigger: str | None = None) -> bool:
    """Issue a wake if the subscription is idle and has work pending; returns whether it did."""
    if row["wake_id"] is not None or row["holder"] is not None:
        return False
    cursors = links_of(conn, row["id"])
    current = tails(conn, [c["path"] for c in cursors], now)
    if not _pending(cursors, current):
        return False
    if trigger is None or current.get(trigger, "") <= _acked(cursors, trigger):
        trigger = next(
            c["path"] for c in cursors if current.get(c["path"], c["acked_offset"]) > c["acked_offset"]
        )
    config = Config.from_json(row["config_json"])
    generation = row["generation"] + 1
    values: dict[str, Any] = {
        "generation": generation,
        "wake_id": "w_" + secrets.token_hex(12),
        "snapshot_json": json.dumps(current, sort_keys=True),
        "trigger": trigger,
    }
    if row["kind"] == "webhook":
        values["lease_until"] = now + config.lease_ttl_ms / 1000
        values["deliver_due"] = True
        values["deliverer"] = values["deliver_until"] = None
        # A retry already scheduled keeps its back-off; a healthy receiver hears at once.
        if row["status"] != "failed" or row["next_attempt_at"] is None:
            values["next_attempt_at"] = now
        effects.deliveries_due = True
    else:
        event = {
            "type": "wake",
            "subscription_id": row["id"],
            "stream": trigger,
            "generation": generation,
            "ts": int(now * 1000),
        }
        assert config.wake_stream is not None
        effects.wake_events.append((config.wake_stream, json.dumps(event, separators=(",", ":")).encode()))
    _save(conn, row, **values)
    return True


def _acked(cursors: list[Row], path: str) -> str:
    return next((c["acked_offset"] for c in cursors if c["path"] == path), "")


def _expire(conn: Connection, row: Row, now: float, effects: Effects) -> None:
    """End a wake whose lease has run out, and wake again if work is still pending."""
    if row["lease_until"] is not None and row["lease_until"] <= now:
        _clear_wake(conn, row)
        _wake(conn, row, now, effects)


def fresh(conn: Connection, subscription_id: str, now: float, effects: Effects) -> Row:
    """The subscription, locked, with an expired lease already ended; raises when there is none."""
    row = load(conn, subscription_id)
    if row is None:
        raise not_found(subscription_id)
    _expire(conn, row, now, effects)
    return row


# --- appends, leases, reconciliation -------------------------------------------------------------


def on_appends(conn: Connection, appended: list[str], now: float) -> Effects:
    """Link streams that first match a pattern, then wake the idle subscriptions with work pending.

    Each concerned subscription is locked before its links are read or added, in id order, so that two
    processes handling appends to the same new stream neither link it twice nor deadlock.
    """
    effects = Effects()
    rows = conn.execute(
        select(subscriptions.c.id, subscriptions.c.config_json).order_by(subscriptions.c.id)
    ).all()
    if not rows:
        return effects
    linked: set[tuple[str, str]] = set(
        conn.execute(select(links.c.subscription_id, links.c.path).where(links.c.path.in_(appended))).tuples()
    )
    for sid, config_json in rows:
        config = Config.from_json(config_json)
        # A wake event never wakes its own subscription.
        candidates = [p for p in appended if p != config.wake_stream]
        if not any((sid, p) in linked or config.matches(p) for p in candidates):
            continue
        row = load(conn, sid)
        if row is None:
            continue
        have = set(
            conn.execute(
                select(links.c.path).where(links.c.subscription_id == sid, links.c.path.in_(candidates))
            ).scalars()
        )
        touched = [p for p in candidates if p in have]
        for path in candidates:
            if path not in have and config.matches(path):
                conn.execute(
                    insert(links).values(
                        subscription_id=sid, path=path, glob=True, explicit=False, acked_offset=UNSEEN
                    )
                )
                touched.append(path)
        if touched:
            _expire(conn, row, now, effects)
            _wake(conn, row, now, effects, trigger=touched[0])
    return effects


def sweep(conn: Connection, now: float, after: str | None, limit: int = 100) -> tuple[Effects, str | None]:
    """End expired leases; with `after` given, also wake idle subscriptions whose streams moved on while no
    hook ran (a crash between commit and hook), `limit` of them per call in id order from `after`.

    Returns the effects and where the next call's look at idle subscriptions goes on from.
    """
    effects = Effects()
    expired = (
        conn.execute(
            select(subscriptions.c.id)
            .where(subscriptions.c.lease_until <= now)
            .order_by(subscriptions.c.id)
            .limit(limit)
        )
        .scalars()
        .all()
    )
    for sid in expired:
        row = load(conn, sid)
        if row is not None:
            _expire(conn, row, now, effects)
    if after is None:
        return effects, None
    idle = (
        conn.execute(
            select(subscriptions.c.id)
            .where(
                subscriptions.c.wake_id.is_(None),
                subscriptions.c.holder.is_(None),
                subscriptions.c.id > after,
            )
            .order_by(subscriptions.c.id)
            .limit(limit)
        )
        .scalars()
        .all()
    )
    for sid in idle:
        cursors = links_of(conn, sid)
        if _pending(cursors, tails(conn, [c["path"] for c in cursors], now)):
            row = load(conn, sid)  # locked only when there is work to wake it for
            if row is not None:
                _wake(conn, row, now, effects)
    return effects, (idle[-1] if len(idle) == limit else "")


# --- webhook deliveries --------------------------------------------------------------------------


def wake_streams(conn: Connection, row: Row, now: float) -> list[dict[str, Any]]:
    """Every linked stream with its cursor and the tail the wake's snapshot holds for it."""
    snapshot: dict[str, str] = json.loads(row["snapshot_json"] or "{}")
    cursors = links_of(conn, row["id"])
    current = tails(conn, [c["path"] for c in cursors if c["path"] not in snapshot], now)
    result = []
    for cursor in cursors:
        tail = snapshot.get(cursor["path"]) or current.get(cursor["path"]) or cursor["acked_offset"]
        result.append(
            {**link_view(cursor), "tail_offset": tail, "has_pending": tail > cursor["acked_offset"]}
        )
    return result


def take_deliveries(conn: Connection, me: str, now: float, hold: float, limit: int) -> list[Delivery]:
    """Hold up to `limit` due webhook deliveries for this process; a lapsed holder's are taken over."""
    if limit <= 0:
        return []
    due = (
        select(subscriptions)
        .where(
            subscriptions.c.deliver_due.is_(True),
            subscriptions.c.next_attempt_at <= now,
            or_(subscriptions.c.deliverer.is_(None), subscriptions.c.deliver_until <= now),
        )
        .order_by(subscriptions.c.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    taken = []
    for found in conn.execute(due).mappings().all():
        row = dict(found)
        took_over = row["deliverer"] is not None and row["deliverer"] != me
        _save(conn, row, deliverer=me, deliver_until=now + hold)
        config = Config.from_json(row["config_json"])
        assert config.webhook_url is not None
        taken.append(
            Delivery(
                row["id"],
                row["wake_id"],
                row["generation"],
                config.webhook_url,
                row["origin"],
                wake_streams(conn, row, now),
                row["attempts"],
                took_over,
            )
        )
    return taken


def delivered(
    conn: Connection, delivery: Delivery, me: str, ok: bool, done: bool, retry_in: float, now: float
) -> Effects:
    """Record a delivery's outcome; `done` from the receiver acknowledges the wake's snapshot."""
    effects = Effects()
    row = load(conn, delivery.subscription_id)
    if row is None or row["wake_id"] != delivery.wake_id or row["deliverer"] != me:
        return effects  # the wake ended meanwhile, or another process took the delivery over
    if not ok:
        _save(
            conn,
            row,
            status="failed",
            attempts=row["attempts"] + 1,
            next_attempt_at=now + retry_in,
            deliverer=None,
            deliver_until=None,
        )
        return effects
    _save(conn, row, status="active", attempts=0, deliver_due=False, deliverer=None, deliver_until=None)
    if done:
        snapshot: dict[str, str] = json.loads(row["snapshot_json"] or "{}")
        for cursor in links_of(conn, row["id"]):
            tail = snapshot.get(cursor["path"])
            if tail is not None and tail > cursor["acked_offset"]:  # compared here: SQL collations differ
                _set_acked(conn, row["id"], cursor["path"], tail)
        _clear_wake(conn, row)
        _wake(conn, row, now, effects)
    return effects


# --- callbacks, claims, acks, releases -----------------------------------------------------------


def fence(row: Row, token_generation: int, body: dict[str, Any]) -> None:
    """Refuse (409 FENCED) unless token and body name the wake in flight."""
    current = row["generation"]
    if (
        row["wake_id"] is None
        or token_generation != current
        or body.get("generation") != current
        or (body.get("wake_id") != row["wake_id"])
    ):
        raise SubscriptionError("FENCED", "this wake is over or superseded; wait for the next one")


def acknowledge(conn: Connection, row: Row, body: dict[str, Any], now: float, effects: Effects) -> None:
    """Apply a callback's or ack's acks (all checked first), extend the lease, end the wake on `done`."""
    acks = body.get("acks", [])
    if not isinstance(acks, list):
        raise invalid('acks must be an array of {"stream": path, "offset": offset}')
    cursors = {c["path"]: c for c in links_of(conn, row["id"])}
    current = tails(conn, list(cursors), now)
    checked: list[tuple[str, str]] = []
    for ack in acks:
        path = ack.get("stream", ack.get("path")) if isinstance(ack, dict) else None
        offset = ack.get("offset") if isinstance(ack, dict) else None
        if not isinstance(path, str) or not isinstance(offset, str):
            raise invalid('each ack must be {"stream": path, "offset": offset}')
        cursor = cursors.get(path)
        if cursor is None or offset == UNSEEN or offset < cursor["acked_offset"]:
            raise SubscriptionError("INVALID_OFFSET", f"{offset!r} is not an offset {path!r} can be acked at")
        if offset > (current.get(path) or str(cursor["acked_offset"])):
            raise SubscriptionError("INVALID_OFFSET", f"{offset!r} is beyond the tail of {path!r}")
        checked.append((path, offset))
    for path, offset in checked:
        _set_acked(conn, row["id"], path, offset)
    config = Config.from_json(row["config_json"])
    if body.get("done") is True:
        _clear_wake(conn, row)
        effects.next_wake = _wake(conn, row, now, effects)
    else:
        _save(conn, row, lease_until=now + config.lease_ttl_ms / 1000)


def claim(conn: Connection, subscription_id: str, worker: str, now: float, effects: Effects) -> Row:
    row = fresh(conn, subscription_id, now, effects)
    if row["kind"] != "pull-wake":
        raise invalid("only a pull-wake subscription is claimed; a webhook subscription is called")
    if row["holder"] is not None:
        raise SubscriptionError(
            "ALREADY_CLAIMED",
            f"{row['holder']} holds this subscription",
            body={
                "error": {
                    "code": "ALREADY_CLAIMED",
                    "current_holder": row["holder"],
                    "generation": row["generation"],
                }
            },
        )
    if row["wake_id"] is None and not _wake(conn, row, now, effects):
        raise SubscriptionError("NO_PENDING_WORK", "no stream of this subscription has unacknowledged data")
    config = Config.from_json(row["config_json"])
    _save(conn, row, holder=worker, lease_until=now + config.lease_ttl_ms / 1000)
    return row


def release(conn: Connection, row: Row, now: float, effects: Effects) -> None:
    _clear_wake(conn, row)
    _wake(conn, row, now, effects)
