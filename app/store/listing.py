"""Listings of live streams: a filtered, sorted page of them (by cursor or offset), and their totals.

A page walks an index in the order asked, with the stream id as tie-breaker, and starts after (or before)
the keys an opaque cursor carries, so every page costs the same however deep it is. An offset is walked from
whichever end of the listing is nearer, so the last page is as cheap as the first. Totals come from the
namespace counters (counts.py) when the filter is by namespace and state only; other filters count their
matches through an index.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, false, func, or_, select, true, tuple_

from .. import clock
from ..errors import InvalidRequestError
from ..models import StreamFilter, StreamState
from . import counts
from .schema import metadata_pairs, streams
from .statements import STREAM_STATE

# Each sort's keys, the id last as tie-breaker (a name is unique already); each leads an index but size and
# updated, which every append changes (schema.STREAM_INDEXES).
SORTS: dict[str, tuple[str, ...]] = {
    "created": ("created_at", "id"),
    "size": ("tail", "id"),
    "namespace": ("namespace", "created_at", "id"),
    "name": ("name",),
    "updated": ("updated_at", "id"),
}
_KINDS = {"created_at": float, "updated_at": float, "tail": int, "id": str, "name": str, "namespace": str}
MAX_CURSOR = 4096


@dataclass(frozen=True)
class Cursor:
    """Where a page starts: just after (or, `before`, just before) the row with these sort keys."""

    sort: str
    direction: str
    keys: tuple[Any, ...]
    before: bool = False

    def encode(self) -> str:
        raw = json.dumps(
            [self.sort, self.direction, list(self.keys), int(self.before)], separators=(",", ":")
        )
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str, sort: str, direction: str) -> Cursor:
        """The cursor a page link carries; InvalidRequestError if it is not one, or is of another sort."""
        problem = "the cursor is not one this server gave (take it from a listing's next or previous link)"
        if not isinstance(text, str) or len(text) > MAX_CURSOR:
            raise InvalidRequestError(problem)
        try:
            raw = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
            got_sort, got_direction, keys, before = raw
        except (ValueError, TypeError):
            raise InvalidRequestError(problem) from None
        if got_sort != sort or got_direction != direction:
            raise InvalidRequestError(
                f"the cursor belongs to a listing of another sort or direction, not {sort} {direction}: "
                "ask for the first page again without it"
            )
        columns = SORTS[sort]
        if not isinstance(keys, list) or len(keys) != len(columns) or before not in (0, 1):
            raise InvalidRequestError(problem)
        for name, value in zip(columns, keys, strict=True):
            kind = _KINDS[name]
            ok = isinstance(value, kind) or (kind is float and isinstance(value, int))
            if isinstance(value, bool) or not ok:
                raise InvalidRequestError(problem)
        return cls(sort, direction, tuple(keys), bool(before))

    @classmethod
    def of(cls, state: StreamState, sort: str, direction: str, before: bool = False) -> Cursor:
        return cls(sort, direction, tuple(getattr(state, column) for column in SORTS[sort]), before)


@dataclass(frozen=True)
class Listing:
    """One page of a listing, the number of streams the filter matches, and the cursors of its neighbours."""

    total: int
    streams: list[StreamState]
    next: str | None = None  # the page after this one, None at the end
    previous: str | None = None  # the page before this one, None at the start


def check(sort: str, direction: str, limit: int, offset: int, cursor: str | None) -> Cursor | None:
    """The listing's cursor, once its sort, direction, limit and offset are found good (else a 400)."""
    if sort not in SORTS:
        raise InvalidRequestError(f"sort must be one of {', '.join(SORTS)}, got {sort!r}")
    if direction not in ("asc", "desc"):
        raise InvalidRequestError(f"direction must be asc or desc, got {direction!r}")
    if not 1 <= limit <= 1000:
        raise InvalidRequestError(f"limit must be between 1 and 1000, got {limit}")
    if offset < 0:
        raise InvalidRequestError(f"offset must be 0 or more, got {offset}")
    return Cursor.decode(cursor, sort, direction) if cursor else None


def page(
    engine: Engine,
    where: StreamFilter,
    sort: str,
    direction: str,
    limit: int,
    offset: int,
    cursor: Cursor | None = None,
) -> Listing:
    """The number of live streams matching `where`, and one page of them in the order asked."""
    now = clock.now()
    conditions = filter_conditions(where, now, engine.dialect.name == "postgresql")
    descending = direction == "desc"
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":  # one snapshot for the total and the page (SQLite's BEGIN is)
            conn.execution_options(isolation_level="REPEATABLE READ")
        total = _total(conn, where, conditions, now)
        if cursor is not None:
            found = _walk(conn, conditions, sort, descending != cursor.before, cursor.keys, limit + 1, offset)
            more = len(found) > limit
            found = found[:limit]
            if cursor.before:
                found.reverse()
            after_more, before_more = (True, more) if cursor.before else (more, True)
        elif offset > total // 2 and offset < total:
            # Nearer the end: walk back from it, so the last page costs what the first does.
            end = total - offset
            first = max(0, end - limit)
            found = _walk(conn, conditions, sort, not descending, None, end - first, first)
            found.reverse()
            after_more, before_more = first > 0, True
        else:
            found = _walk(conn, conditions, sort, descending, None, limit + 1, offset)
            after_more, before_more = len(found) > limit, offset > 0
            found = found[:limit]
    states = [StreamState.from_row(r) for r in found]
    return Listing(
        total,
        states,
        Cursor.of(states[-1], sort, direction).encode() if states and after_more else None,
        Cursor.of(states[0], sort, direction, before=True).encode() if states and before_more else None,
    )


def _walk(
    conn: Connection,
    conditions: list[Any],
    sort: str,
    descending: bool,
    after: tuple[Any, ...] | None,
    limit: int,
    offset: int,
) -> list[Any]:
    """Rows in the sort's order, descending or not, from just after the keys `after` if given."""
    columns = [streams.c[name] for name in SORTS[sort]]
    where = list(conditions)
    if after is not None:
        keys = tuple_(*columns) if len(columns) > 1 else columns[0]
        values = tuple_(*after) if len(columns) > 1 else after[0]
        where.append(keys < values if descending else keys > values)
    order = [c.desc() if descending else c.asc() for c in columns]
    query = select(*STREAM_STATE).where(*where).order_by(*order).limit(limit)
    if offset:
        query = query.offset(offset)
    return list(conn.execute(query))


def countable(where: StreamFilter) -> bool:
    """Whether the namespace counters answer the filter's totals: a filter by namespace and state only."""
    return not where.metadata and not where.id_prefix and where.state in (None, "open", "closed")


def _total(conn: Connection, where: StreamFilter, conditions: list[Any], now: float) -> int:
    if countable(where):
        found = counts.summed(counts.totals(conn, now, lambda column: namespace_conditions(where, column)))
        if where.state == "open":
            return found.open
        if where.state == "closed":
            return found.streams - found.open
        return found.streams
    return int(conn.execute(select(func.count()).select_from(streams).where(*conditions)).scalar_one())


def summary(engine: Engine, where: StreamFilter) -> dict[str, Any]:
    """Totals (streams, open streams, bytes) and per-namespace counts of the live streams in `where`'s
    namespaces, from the counters: its other filters are not for totals (see `facets`)."""
    with engine.connect() as conn:
        per = counts.totals(conn, clock.now(), lambda column: namespace_conditions(where, column))
    total = counts.summed(per)
    return {
        "streams": total.streams,
        "stored_bytes": total.stored_bytes,
        "content_bytes": total.content_bytes,
        "open": total.open,
        "namespaces": [
            {"namespace": n, "streams": t.streams, "stored_bytes": t.stored_bytes} for n, t in per.items()
        ],
    }


def facets(engine: Engine, where: StreamFilter) -> list[tuple[str, int]]:
    """How many live streams match `where` in each namespace (from the counters when they can tell)."""
    now = clock.now()
    with engine.connect() as conn:
        if countable(where):
            per = counts.totals(conn, now, lambda column: namespace_conditions(where, column))
            if where.state == "open":
                return [(n, t.open) for n, t in per.items() if t.open]
            if where.state == "closed":
                return [(n, t.streams - t.open) for n, t in per.items() if t.streams - t.open]
            return [(n, t.streams) for n, t in per.items()]
        found = conn.execute(
            select(streams.c.namespace, func.count())
            .where(*filter_conditions(where, now, engine.dialect.name == "postgresql"))
            .group_by(streams.c.namespace)
            .order_by(streams.c.namespace)
        )
        return [(n, int(c)) for n, c in found]


def namespace_conditions(where: StreamFilter, column: Any) -> list[Any]:
    """The conditions on a namespace column of the namespaces `where` is kept within."""
    conditions: list[Any] = []
    if where.namespace:
        conditions.append(column == where.namespace)
    if where.namespaces is not None:
        conditions.append(or_(false(), *(_within(column, pattern) for pattern in where.namespaces)))
    return conditions


def filter_conditions(where: StreamFilter, now: float, postgres: bool = False) -> list[Any]:
    """The WHERE conditions of live streams matching `where`; InvalidRequestError for an unknown state."""
    conditions: list[Any] = [
        streams.c.deleted.is_(False),
        _not_expired(now, postgres),
        *namespace_conditions(where, streams.c.namespace),
    ]
    if where.id_prefix:
        prefix = where.id_prefix
        conditions.append(
            or_(_prefixed(streams.c.id, prefix, postgres), _prefixed(streams.c.name, prefix, postgres))
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


def _not_expired(now: float, postgres: bool) -> Any:
    """Streams without an expiry or expiring after `now`.

    SQLite, sorting by size or updated (no index gives those orders), would take this condition as two
    searches of the expiry index and gather the row ids of every stream they find before the scan: 24 MiB of
    them at 1,000,000 streams, kept by the reading thread afterwards. Through coalesce it takes no index, and
    the scan checks each row as it goes.
    """
    if postgres:
        return or_(streams.c.expires_at.is_(None), streams.c.expires_at > now)
    return func.coalesce(streams.c.expires_at, math.inf) > now


def _prefixed(column: Any, prefix: str, postgres: bool) -> Any:
    """`column` starts with `prefix`, case-sensitively on both databases.

    SQLite cannot serve LIKE (case-insensitive there) from an index: it gets the range [prefix, prefix + the
    highest character) too, which its binary collation keeps exact. PostgreSQL's collation may not.
    """
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    like = column.like(escaped + "%", escape="\\")
    return like if postgres else (column >= prefix) & (column < prefix + "\U0010ffff") & like


def _within(column: Any, pattern: str) -> Any:
    """The condition of a namespace pattern: `*` is every namespace, `exports/*` is exports and below."""
    if pattern == "*":
        return true()
    if pattern.endswith("/*"):
        # Not LIKE: SQLite's LIKE ignores ASCII case, so `exports/*` would reach `Exports/secret`.
        below = pattern[:-1]
        return or_(column == pattern[:-2], func.substr(column, 1, len(below)) == below)
    return column == pattern
