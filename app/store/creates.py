"""Plain creates (no fork) in one transaction on the writer's driver connection, with few statements.

A batch of creates looks up each name, then takes the generations of all the streams it makes in one
UPDATE ... RETURNING and inserts their rows with one statement per table. Executed through SQLAlchemy's
Connection with a counter UPDATE and SELECT each, creates cost about three times as much, measured. A
create that meets an expired stream of its name is left to the full create (transactions.create).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, bindparam, insert, update

from .. import clock
from ..errors import StreamConflictError
from ..models import StreamState, new_stream_id
from . import counts
from .schema import counters, metadata_pairs, streams
from .statements import Prepared, Statements, state_from_tuple
from .transactions import GENERATION, NewStream, same_config, stream_row

CONFLICT = "a stream with this name exists with a different configuration"


class Expired(Exception):
    """A create met an expired stream of its name, which the full create retires first."""


class CreateStatements:
    """The statements of a batch of creates, compiled once per database."""

    def __init__(self, engine: Engine) -> None:
        # The columns a new stream's row sets (the others keep their defaults), and its pending bytes.
        blank = NewStream(namespace="")
        row = stream_row(blank, "", 0.0, 0, tail=0, content_type="", ttl=None, sliding=False, expires_at=None)
        columns: dict[str, Any] = {name: bindparam(name) for name in [*row, "pending"]}
        self.insert_stream = Prepared(insert(streams).values(columns), engine)
        self.insert_metadata = Prepared(
            insert(metadata_pairs).values(
                stream_id=bindparam("stream_id"), key=bindparam("key"), value=bindparam("value")
            ),
            engine,
        )
        self.take_generations = Prepared(
            update(counters)
            .where(counters.c.name == GENERATION)
            .values(value=counters.c.value + bindparam("n"))
            .returning(counters.c.value),
            engine,
        )


def create_batch(
    cursor: Any, sql: Statements, own: CreateStatements, news: list[NewStream], slot: int
) -> list[tuple[bool, Any]]:
    """Create `news` in the open transaction of `cursor`: each (True, (state, created)) or (False, error).

    Raises Expired, before writing anything, when one meets an expired stream of its name.
    """
    now = clock.now()
    outcomes: list[tuple[bool, Any]] = []
    rows: list[dict[str, Any]] = []
    asked: list[NewStream] = []  # the create of each row
    made: dict[str, int] = {}  # names this batch creates: the index of their row
    repeats: list[tuple[int, int]] = []  # a create of a name made earlier in the batch, and that row
    for new in news:
        name = new.name
        if name is not None:
            if name in made:
                repeats.append((len(outcomes), made[name]))
                outcomes.append((False, None))  # settled once that row is complete
                continue
            cursor.execute(sql.stream_by_name.sql, sql.stream_by_name.args({"name": name}))
            found = cursor.fetchone()
            if found is not None:
                outcomes.append(_existing(state_from_tuple(found), new, now))
                continue
            made[name] = len(rows)
        ttl, expires_at = new.ttl_seconds, new.expires_at
        if ttl and expires_at is None:
            expires_at = now + ttl
        row = stream_row(
            new,
            new_stream_id(),
            now,
            0,
            tail=len(new.initial),
            content_type=new.content_type,
            ttl=ttl,
            sliding=new.sliding,
            expires_at=expires_at,
        )
        outcomes.append((True, len(rows)))
        rows.append(row)
        asked.append(new)
    if not rows:
        return outcomes
    cursor.execute(own.take_generations.sql, own.take_generations.args({"n": len(rows)}))
    first = int(cursor.fetchone()[0]) - len(rows) + 1
    for i, row in enumerate(rows):
        row["generation"] = first + i
    states = [StreamState.from_row(row) for row in rows]
    for i, (ok, value) in enumerate(outcomes):
        if ok and isinstance(value, int):
            outcomes[i] = (True, (states[value], True))
    for i, j in repeats:
        outcomes[i] = _existing(states[j], news[i], now)
    inserts = [own.insert_stream.args({**row, "pending": b""}) for row in rows]
    cursor.executemany(own.insert_stream.sql, inserts)
    chunks = [
        sql.insert_chunk.args({"stream_id": row["id"], "start": 0, "data": new.initial, "file_bytes": 0})
        for row, new in zip(rows, asked, strict=True)
        if new.initial
    ]
    if chunks:
        cursor.executemany(sql.insert_chunk.sql, chunks)
    pairs = [
        own.insert_metadata.args({"stream_id": row["id"], "key": key, "value": value})
        for row, new in zip(rows, asked, strict=True)
        for key, value in new.metadata.items()
    ]
    if pairs:
        cursor.executemany(own.insert_metadata.sql, pairs)
    if counted := counts.rows(slot, counts.of_streams(states)):  # the namespace counters, in this commit
        cursor.executemany(sql.count_namespace.sql, [sql.count_namespace.args(d) for d in counted])
    return outcomes


def _existing(existing: StreamState, new: NewStream, now: float) -> tuple[bool, Any]:
    """The outcome of a create of a name that is taken (as transactions.create decides it)."""
    if existing.expired(now):
        raise Expired(existing.name)
    if existing.deleted:
        gone = "this stream was deleted while forks of it remain; use another name"
        return False, StreamConflictError(gone)
    if same_config(existing, new) and existing.fork_source is None:
        return True, (existing, False)
    return False, StreamConflictError(CONFLICT)
