"""Listings of live streams: a filtered, sorted page of them, and their totals (for the API and dashboard)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, false, func, or_, select, true

from .. import clock
from ..errors import InvalidRequestError
from ..models import StreamFilter, StreamState
from .schema import metadata_pairs, streams
from .statements import STREAM_STATE

SORTS = {
    "created": "created_at",
    "size": "tail",
    "namespace": "namespace",
    "name": "name",
    "updated": "updated_at",
}


def page(
    engine: Engine, where: StreamFilter, sort: str, direction: str, limit: int, offset: int
) -> tuple[int, list[StreamState]]:
    """The number of live streams matching `where`, and one page of them in the order asked."""
    conditions = filter_conditions(where, clock.now())
    column = streams.c[SORTS[sort]]
    order = [column.desc() if direction == "desc" else column.asc(), streams.c.id.desc()]
    with engine.connect() as conn:
        total = conn.execute(select(func.count()).select_from(streams).where(*conditions)).scalar_one()
        rows = conn.execute(
            select(*STREAM_STATE).where(*conditions).order_by(*order).limit(limit).offset(offset)
        )
        return total, [StreamState.from_row(r) for r in rows]


def summary(engine: Engine, where: StreamFilter) -> dict[str, Any]:
    """Totals (streams, open streams, bytes) and per-namespace counts of the live streams matching `where`."""
    conditions = filter_conditions(where, clock.now())
    with engine.connect() as conn:
        totals = conn.execute(
            select(
                func.count(),
                func.coalesce(func.sum(streams.c.stored_bytes), 0),
                func.coalesce(func.sum(streams.c.tail), 0),
                func.count(streams.c.closed_at),
            ).where(*conditions)
        ).one()
        by_namespace = conn.execute(
            select(streams.c.namespace, func.count(), func.coalesce(func.sum(streams.c.stored_bytes), 0))
            .where(*conditions)
            .group_by(streams.c.namespace)
            .order_by(streams.c.namespace)
        ).all()
    return {
        "streams": totals[0],
        "stored_bytes": int(totals[1]),
        "content_bytes": int(totals[2]),
        "open": totals[0] - totals[3],
        "namespaces": [
            {"namespace": n, "streams": c, "stored_bytes": int(b)} for n, c, b in by_namespace
        ],
    }


def filter_conditions(where: StreamFilter, now: float) -> list[Any]:
    """The WHERE conditions of live streams matching `where`; InvalidRequestError for an unknown state."""
    conditions: list[Any] = [
        streams.c.deleted.is_(False),
        or_(streams.c.expires_at.is_(None), streams.c.expires_at > now),
    ]
    if where.namespace:
        conditions.append(streams.c.namespace == where.namespace)
    if where.namespaces is not None:
        conditions.append(or_(false(), *(_within(pattern) for pattern in where.namespaces)))
    if where.id_prefix:
        escaped = where.id_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        conditions.append(
            or_(
                streams.c.id.like(escaped + "%", escape="\\"), streams.c.name.like(escaped + "%", escape="\\")
            )
        )
    for key, value in where.metadata:
        conditions.append(
            streams.c.id.in_(
                select(metadata_pairs.c.stream_id).where(
                    metadata_pairs.c.key == key, metadata_pairs.c.value == value
                )
            )
        )
    if where.state == "open":
        conditions.append(streams.c.closed_at.is_(None))
    elif where.state == "closed":
        conditions.append(streams.c.closed_at.is_not(None))
    elif where.state == "expiring":
        conditions.append(streams.c.expires_at <= now + 86400)
    elif where.state:
        raise InvalidRequestError(f"state must be open, closed or expiring, got {where.state!r}")
    return conditions


def _within(pattern: str) -> Any:
    """The condition of a namespace pattern: `*` is every namespace, `exports/*` is exports and below."""
    if pattern == "*":
        return true()
    if pattern.endswith("/*"):
        # Not LIKE: SQLite's LIKE ignores ASCII case, so `exports/*` would reach `Exports/secret`.
        below = pattern[:-1]
        column = streams.c.namespace
        return or_(column == pattern[:-2], func.substr(column, 1, len(below)) == below)
    return streams.c.namespace == pattern
