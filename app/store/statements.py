"""The store's hot statements: built with SQLAlchemy Core, compiled once per database, run on the driver.

Executing through SQLAlchemy's Connection costs about 50 µs a statement and building one about 150 µs,
against about 10 µs for the driver itself; appends and reads run several statements each.
"""

from __future__ import annotations

import threading
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Engine,
    Float,
    LargeBinary,
    String,
    any_,
    bindparam,
    case,
    cast,
    column,
    func,
    insert,
    literal,
    literal_column,
    select,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSON
from sqlalchemy.sql import ClauseElement, ColumnElement
from sqlalchemy.sql.compiler import SQLCompiler

from ..models import StreamState
from . import counts
from .schema import chunks, producers, streams

# A stream's record without its pending bytes, which only reads of content and the writer need.
STREAM_COLUMNS = [c.name for c in streams.columns if c.name != "pending"]
STREAM_STATE = [streams.c[name] for name in STREAM_COLUMNS]
PENDING_START = streams.c.tail - func.length(streams.c.pending)


def after_pending(data: Any) -> Any:
    """The stream's pending bytes followed by `data`, as bytes (SQLite's || alone would give text)."""
    return cast(streams.c.pending.concat(cast(data, LargeBinary)), LargeBinary)


# A chunk's length, whether its bytes are in the row or in a chunk file.
CHUNK_SIZE = func.length(chunks.c.data) + chunks.c.file_bytes

# The rows (start, data, file bytes) covering bytes [lo, hi) of stream `id`, in order: its chunks from the
# last one starting at or before lo (unless that one ends before lo), then the bytes pending in its record.
CHUNK_RANGE = union_all(
    select(chunks.c.start, chunks.c.data, chunks.c.file_bytes).where(
        chunks.c.stream_id == bindparam("id"),
        chunks.c.start < bindparam("hi"),
        chunks.c.start
        >= select(func.coalesce(func.max(chunks.c.start), 0))
        .where(chunks.c.stream_id == bindparam("id"), chunks.c.start <= bindparam("lo"))
        .scalar_subquery(),
        chunks.c.start + CHUNK_SIZE > bindparam("lo"),
    ),
    select(
        PENDING_START.label("start"),
        streams.c.pending.label("data"),
        cast(literal(0), BigInteger).label("file_bytes"),
    ).where(
        streams.c.id == bindparam("id"),
        func.length(streams.c.pending) > 0,
        PENDING_START < bindparam("hi"),
    ),
).order_by("start")


class Prepared:
    """One statement compiled for one dialect; `args` turns named values into what the driver takes."""

    def __init__(self, statement: ClauseElement, engine: Engine) -> None:
        compiled = statement.compile(dialect=engine.dialect)
        if not isinstance(compiled, SQLCompiler):  # DDL compiles otherwise; every statement here is DML
            raise TypeError(f"not a statement that takes parameters: {statement}")
        self.sql = str(compiled)
        self._order = compiled.positiontup if engine.dialect.positional else None
        # Literals in the statement (such as a COALESCE default) are parameters too.
        self._fixed = {k: v for k, v in compiled.params.items() if v is not None}

    def args(self, values: dict[str, Any]) -> tuple[Any, ...] | dict[str, Any]:
        if self._order is not None:
            return tuple(values[n] if n in values else self._fixed[n] for n in self._order)
        return {**self._fixed, **values} if self._fixed else values


class Statements:
    """Every hot statement of one database."""

    def __init__(self, engine: Engine, postgres: bool) -> None:
        stream_by_id = select(*STREAM_STATE).where(streams.c.id == bindparam("id"))
        self.stream_by_id = Prepared(stream_by_id, engine)
        # The writer's view: the record, and how many bytes wait in it.
        locked = select(*STREAM_STATE, func.length(streams.c.pending)).where(streams.c.id == bindparam("id"))
        self.stream_by_id_locked = Prepared(locked.with_for_update() if postgres else locked, engine)
        # PostgreSQL: the records of a batch's streams in one round trip, locked in the order of their ids
        # (the rows are sorted before they are locked), so that writers of several processes never deadlock.
        writers_view = _locked_by_ids(*STREAM_STATE, func.length(streams.c.pending))
        self.streams_by_ids_locked = Prepared(writers_view, engine) if postgres else None
        # PostgreSQL: the same locks alone, for a batch that writes without reading (batches.py), so that it
        # takes them in the same order as every other batch.
        self.lock_streams = Prepared(_locked_by_ids(streams.c.id), engine) if postgres else None
        self.stream_by_name = Prepared(
            select(*STREAM_STATE).where(streams.c.name == bindparam("name")), engine
        )
        self.chunk_range = Prepared(CHUNK_RANGE, engine)
        self.producer = Prepared(
            select(producers.c.epoch, producers.c.seq).where(
                producers.c.stream_id == bindparam("stream_id"),
                producers.c.producer_id == bindparam("producer_id"),
            ),
            engine,
        )
        self.insert_chunk = Prepared(
            insert(chunks).values(
                stream_id=bindparam("stream_id"),
                start=bindparam("start"),
                data=bindparam("data"),
                file_bytes=bindparam("file_bytes"),
            ),
            engine,
        )
        # A chunk made of the bytes pending in the stream's record and the batch's own (`data`).
        self.flush_pending = Prepared(
            insert(chunks).from_select(
                ["stream_id", "start", "data"],
                select(
                    streams.c.id,
                    cast(bindparam("start"), BigInteger),
                    after_pending(bindparam("data")),
                ).where(streams.c.id == bindparam("stream_id")),
            ),
            engine,
        )
        record: dict[str, ColumnElement[Any]] = {
            "tail": bindparam("tail"),
            "stored_bytes": bindparam("stored_bytes"),
            "appends": bindparam("appends"),
            "closed_at": bindparam("closed_at"),
            "last_seq": bindparam("last_seq"),
            "compress": bindparam("compress"),
            "updated_at": bindparam("updated_at"),
        }
        by_id = update(streams).where(streams.c.id == bindparam("_id"))
        # The three ways a batch leaves a stream's pending bytes: as they were, longer, or made a chunk.
        self.update_stream = Prepared(by_id.values(record), engine)
        self.update_stream_pending = Prepared(
            by_id.values({**record, "pending": after_pending(bindparam("data"))}), engine
        )
        self.update_stream_flushed = Prepared(by_id.values({**record, "pending": b""}), engine)
        # PostgreSQL: those three for all of a batch's streams in one statement, with its counters.
        self.update_streams = Prepared(_update_streams(), engine) if postgres else None
        # Apart, as it is indexed: SQLite rewrites a column's index entries whenever an UPDATE sets it.
        self.update_expiry = Prepared(by_id.values(expires_at=bindparam("expires_at")), engine)
        self.insert_producer = Prepared(
            insert(producers).values(
                stream_id=bindparam("stream_id"),
                producer_id=bindparam("producer_id"),
                epoch=bindparam("epoch"),
                seq=bindparam("seq"),
            ),
            engine,
        )
        self.count_namespace = Prepared(counts.upsert(postgres), engine)
        self.update_producer = Prepared(
            update(producers)
            .where(
                producers.c.stream_id == bindparam("stream_id"),
                producers.c.producer_id == bindparam("producer_id"),
            )
            .values(epoch=bindparam("epoch"), seq=bindparam("seq")),
            engine,
        )


UPDATED_FIELDS = ("tail", "stored_bytes", "appends", "closed_at", "last_seq", "compress", "updated_at")
# The fields of update_streams' rows: what an append changes, its bytes (base64), whether they were made a
# chunk, and the row version (xmin) the batch expects to find, if it did not read the row.
UPDATE_COLUMNS = {
    "id": String,
    "tail": BigInteger,
    "stored_bytes": BigInteger,
    "appends": BigInteger,
    "closed_at": Float,
    "last_seq": String,
    "compress": Boolean,
    "updated_at": Float,
    "data": String,
    "flushed": Boolean,
    "xmin": String,
}
XMIN = cast(literal_column("streams.xmin"), String)


def _update_streams() -> Any:
    """The batch's stream records from the JSON array `rows`, and its namespace counters (counts.py), in one
    statement: the driver sends one string rather than an array per column (dumping ten arrays took 6% of
    the server's CPU under small appends), and the server runs one statement rather than two.

    A row given with an `xmin` is written only if it is still that version; unless every row given (`given`)
    is written, the statement fails (schema.ALL_ROWS_FUNCTION), and the transaction with it. It answers with
    the ids and new versions of the rows written.
    """
    rows = (
        func.json_to_recordset(bindparam("rows", type_=JSON))
        .table_valued(*[column(name, kind) for name, kind in UPDATE_COLUMNS.items()])
        .render_derived(name="v", with_types=True)
    )
    data = func.decode(rows.c.data, literal("base64"), type_=LargeBinary)
    pending = case((rows.c.flushed, literal(b"", LargeBinary)), else_=after_pending(data))
    written = (
        update(streams)
        .where(streams.c.id == rows.c.id, rows.c.xmin.is_(None) | (XMIN == rows.c.xmin))
        .values({**{name: rows.c[name] for name in UPDATED_FIELDS}, "pending": pending})
        .returning(streams.c.id, XMIN.label("xmin"))
        .cte("written")
    )
    return select(
        func.array_agg(written.c.id),
        func.array_agg(written.c.xmin),
        func.streamhold_all_rows(func.count(), bindparam("given", type_=BigInteger)),
    ).add_cte(counts.upsert_json().cte("counted"))


def _locked_by_ids(*columns: Any) -> Any:
    """PostgreSQL: `columns` of the streams whose ids are in the array `ids`, locked in their ids' order."""
    by_ids = streams.c.id == any_(bindparam("ids", type_=ARRAY(String)))
    return select(*columns).where(by_ids).order_by(streams.c.id).with_for_update()


def state_from_tuple(row: tuple[Any, ...]) -> StreamState:
    """A StreamState from a driver row of `SELECT * FROM streams`."""
    return StreamState.from_row(dict(zip(STREAM_COLUMNS, row, strict=True)))


class DriverConnections:
    """One long-lived driver connection per thread, outside any transaction unless the caller opens one."""

    def __init__(self, engine: Engine, postgres: bool) -> None:
        self._engine = engine
        self._postgres = postgres
        self._local = threading.local()
        self._opened: list[Any] = []
        self._lock = threading.Lock()

    def get(self) -> Any:
        pooled = getattr(self._local, "pooled", None)
        if pooled is None:
            pooled = self._engine.raw_connection()
            driver = pooled.driver_connection
            if self._postgres and driver is not None:
                driver.autocommit = True
            self._local.pooled = pooled
            with self._lock:
                self._opened.append(pooled)
        return pooled.driver_connection

    def discard(self) -> None:
        """Drop this thread's connection (after an error), so the next call opens a fresh one."""
        pooled = getattr(self._local, "pooled", None)
        self._local.pooled = None
        if pooled is not None:
            with self._lock:
                if pooled in self._opened:
                    self._opened.remove(pooled)
            try:
                pooled.invalidate()
            except Exception:  # the connection is already broken; nothing more to release
                pass

    def close(self) -> None:
        with self._lock:
            opened, self._opened = self._opened, []
        for pooled in opened:
            pooled.close()
