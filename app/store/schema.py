"""The database tables: SQLModel classes, the Core tables statements are built on, and schema upgrades."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Index,
    LargeBinary,
    Select,
    Table,
    func,
    inspect,
    select,
    text,
)
from sqlmodel import Field, SQLModel

from ..models import MAX_NAME_LENGTH, MAX_NAMESPACE_LENGTH

# PostgreSQL fills the streams table's pages only this full, leaving room for the new row version that each
# append's UPDATE writes beside the old one (a HOT update), which then updates none of the table's ten
# indexes. Measured (16 writers of 64-byte appends): at 100, 14% of updates were not HOT; at 70, under 1%,
# and 20% less database CPU an append.
STREAMS_FILLFACTOR = 70


class StreamRow(SQLModel, table=True):
    """One stream, whatever surface created it."""

    __tablename__ = "streams"
    __table_args__ = {"postgresql_with": {"fillfactor": STREAMS_FILLFACTOR}}

    id: str = Field(primary_key=True, max_length=64)
    name: str = Field(max_length=MAX_NAME_LENGTH, unique=True)
    namespace: str = Field(max_length=MAX_NAMESPACE_LENGTH)
    content_type: str = Field(max_length=255)
    json_mode: bool = False
    metadata_json: str = "{}"
    created_at: float
    updated_at: float
    closed_at: float | None = None
    tail: int = Field(default=0, sa_type=BigInteger)
    stored_bytes: int = Field(default=0, sa_type=BigInteger)  # not indexed: every append changes it
    appends: int = Field(default=0, sa_type=BigInteger)
    compact_from: int = Field(default=0, sa_type=BigInteger)
    compress: bool = False
    compressed: bool = False
    ttl_seconds: int | None = Field(default=None, sa_type=BigInteger)
    sliding: bool = False
    expires_at: float | None = Field(default=None, index=True)
    last_seq: str | None = None
    fork_source: str | None = Field(default=None, max_length=64, index=True)
    fork_offset: int | None = Field(default=None, sa_type=BigInteger)
    deleted: bool = False
    # The stream's last bytes, [tail - len(pending), tail), until they fill a chunk (batches.PENDING_LIMIT):
    # a small append then rewrites only this row, instead of adding a chunk and an index entry as well.
    pending: bytes = Field(default=b"", sa_column=Column(LargeBinary, nullable=False, default=b""))
    # Which incarnation of its name this stream is: the first field of its offsets, so that an offset of a
    # deleted stream is never read inside a later one of the same name. 0 for streams made before it existed.
    generation: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))
    # When someone asked the writer to stop (POST /stream/{id}/stop); the writer decides when it does.
    stop_requested_at: float | None = None
    # "public" or "private" when chosen at create; None follows STREAMHOLD_READS (and streams made before).
    visibility: str | None = Field(default=None, max_length=16)


class CounterRow(SQLModel, table=True):
    """A counter that only goes up, such as the last stream generation handed out."""

    __tablename__ = "counters"

    name: str = Field(primary_key=True, max_length=64)
    value: int = Field(default=0, sa_type=BigInteger)


class NamespaceCountRow(SQLModel, table=True):
    """Running totals of one namespace's streams (not deleted; expired ones until the sweep removes them).

    Each store process adds its changes to rows of its own `slot`, in the transactions that make them, so
    that processes never wait for each other's counters; the sweep folds rows into slot 0. A namespace's
    totals are the sums over its slots.
    """

    __tablename__ = "namespace_counts"

    namespace: str = Field(primary_key=True, max_length=MAX_NAMESPACE_LENGTH)
    slot: int = Field(primary_key=True, sa_type=BigInteger)
    streams: int = Field(default=0, sa_type=BigInteger)
    open: int = Field(default=0, sa_type=BigInteger)
    stored_bytes: int = Field(default=0, sa_type=BigInteger)
    content_bytes: int = Field(default=0, sa_type=BigInteger)


class ChunkRow(SQLModel, table=True):
    """A run of a stream's bytes starting at byte offset `start`."""

    __tablename__ = "chunks"

    stream_id: str = Field(primary_key=True, max_length=64)
    start: int = Field(primary_key=True, sa_type=BigInteger)
    data: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    # A large chunk of an embedded store keeps its bytes in the stream's chunk file (store/chunk_files.py),
    # at offset `start`: then `data` is empty and this is their length.
    file_bytes: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))


class GzipChunkRow(SQLModel, table=True):
    """A piece of a compressed stream's gzip body, in order of `seq`."""

    __tablename__ = "gzip_chunks"

    stream_id: str = Field(primary_key=True, max_length=64)
    seq: int = Field(primary_key=True)
    data: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    # The offset in the plain content where this piece's deflate data begins after a full flush, so that
    # inflating can start here; None in bodies written without flush points, which inflate from the start.
    plain_start: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))


class MetadataRow(SQLModel, table=True):
    """One metadata pair of a stream, kept apart so filters use an index."""

    __tablename__ = "stream_metadata"
    __table_args__ = (Index("ix_stream_metadata_pair", "key", "value"),)

    stream_id: str = Field(primary_key=True, max_length=64)
    key: str = Field(primary_key=True, max_length=255)
    value: str = Field(max_length=1024)


class ProducerRow(SQLModel, table=True):
    """The idempotent-producer state of one producer on one stream."""

    __tablename__ = "producers"

    stream_id: str = Field(primary_key=True, max_length=64)
    producer_id: str = Field(primary_key=True, max_length=255)
    epoch: int = Field(sa_type=BigInteger)
    seq: int = Field(sa_type=BigInteger)


class SessionRow(SQLModel, table=True):
    """A signed-in dashboard session, so that signing out ends it on every process."""

    __tablename__ = "sessions"

    id_hash: str = Field(primary_key=True, max_length=64)  # sha256 of the id in the cookie
    expires_at: float = Field(index=True)
    # The scoped token it was signed in with (re-checked on every request); None for an API key.
    token_id: str | None = Field(default=None, max_length=32)


class TokenRow(SQLModel, table=True):
    """A scoped token: what it may do where, and a digest of its secret (the secret itself is never kept)."""

    __tablename__ = "tokens"

    id: str = Field(primary_key=True, max_length=32)
    secret_hash: str = Field(max_length=64)  # sha256 hex of the token's secret part
    scopes: str = Field(max_length=64)  # comma-separated: read, write, manage
    namespaces_json: str = "[]"
    label: str = Field(default="", max_length=255)
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None


def table_of(row: type[SQLModel]) -> Table:
    """The Core table of a row class (SQLModel declares `__table__` only at run time)."""
    return SQLModel.metadata.tables[str(row.__tablename__)]


streams = table_of(StreamRow)
namespace_counts = table_of(NamespaceCountRow)
counters = table_of(CounterRow)
chunks = table_of(ChunkRow)
gzip_chunks = table_of(GzipChunkRow)
metadata_pairs = table_of(MetadataRow)
producers = table_of(ProducerRow)
sessions = table_of(SessionRow)
tokens = table_of(TokenRow)

# The listings' indexes, each chosen from the query plans of the dashboard's filters and sorts (README,
# "A million streams"): every sort walks an index in its order with the id as tie-breaker, so that a page
# after a cursor starts where the index says. Size and updated have none: every append changes them.
# Conditions of the sweep's partial indexes: the sweep's queries name them just so, and find few rows.
DELETED = streams.c.deleted.is_(True)
UNCOMPRESSED = streams.c.compress.is_(True) & streams.c.compressed.is_(False)
STREAM_INDEXES = (
    Index("ix_streams_created_id", streams.c.created_at, streams.c.id),
    Index("ix_streams_namespace_created_id", streams.c.namespace, streams.c.created_at, streams.c.id),
    # No partial index of open streams for `state=open`, which walks the created index instead: it cost
    # every create and close a page more, and a create on a nearly full disk must fit in what a delete frees.
    # The sweep's: deleted streams kept for their forks, and closed streams whose compression never ended.
    Index("ix_streams_deleted", streams.c.id, sqlite_where=DELETED, postgresql_where=DELETED),
    Index(
        "ix_streams_uncompressed",
        streams.c.closed_at,
        sqlite_where=UNCOMPRESSED,
        postgresql_where=UNCOMPRESSED,
    ),
)
# PostgreSQL's: its collation keeps LIKE 'prefix%' (the prefix filter) from the plain indexes of the id and
# the name; pattern operators serve it. SQLite's filter is a range of those plain indexes (listing.py).
PATTERN_INDEXES = tuple(
    Index(f"ix_streams_{name}_pattern", streams.c[name], postgresql_ops={name: "varchar_pattern_ops"}).ddl_if(
        dialect="postgresql"
    )
    for name in ("id", "name")
)
# Indexes of earlier versions that those above make redundant (their columns lead one of them).
OLD_STREAM_INDEXES = ("ix_streams_namespace", "ix_streams_created_at")


# PostgreSQL: fails the statement (and so its transaction) unless it wrote every row it was given. A batch of
# appends that writes stream rows as this process last left them, without reading them first, checks with it
# that none has changed since (statements.py, update_streams); SQLSTATE 40001 says to read them and retry.
ALL_ROWS_FUNCTION = """
CREATE OR REPLACE FUNCTION streamhold_all_rows(written bigint, given bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
BEGIN
    IF written <> given THEN
        RAISE EXCEPTION '% of % stream rows changed since this process wrote them', given - written, given
            USING ERRCODE = '40001';
    END IF;
    RETURN written;
END
$$
"""

# Chunks are written, merged (compaction) and read back at most about this large.
CHUNK_TARGET = 1024 * 1024


def upgrade(conn: Connection, postgres: bool, counts_created: bool) -> None:
    """Bring a database made by an earlier version up to this schema (create_all adds only new tables).

    `counts_created`: the namespace counters' table is new, so they are counted once from the streams.
    """
    found = inspect(conn)
    indexes = {i["name"] for i in found.get_indexes("streams")}
    for index in STREAM_INDEXES + (PATTERN_INDEXES if postgres else ()):
        if index.name not in indexes:
            index.create(conn)
    for name in OLD_STREAM_INDEXES:
        if name in indexes:
            conn.execute(text(f"DROP INDEX {name}"))
    if counts_created:
        recount(conn)
    if postgres:
        conn.execute(text(ALL_ROWS_FUNCTION))
        options = conn.execute(text("SELECT reloptions FROM pg_class WHERE oid = 'streams'::regclass"))
        if f"fillfactor={STREAMS_FILLFACTOR}" not in (options.scalar() or []):
            conn.execute(text(f"ALTER TABLE streams SET (fillfactor = {STREAMS_FILLFACTOR})"))
    if "pending" not in {c["name"] for c in found.get_columns("streams")}:
        empty = "''::bytea" if postgres else "x''"
        kind = "BYTEA" if postgres else "BLOB"
        conn.execute(text(f"ALTER TABLE streams ADD COLUMN pending {kind} NOT NULL DEFAULT {empty}"))
    if "ix_streams_stored_bytes" in {i["name"] for i in found.get_indexes("streams")}:
        conn.execute(text("DROP INDEX ix_streams_stored_bytes"))
    if "file_bytes" not in {c["name"] for c in found.get_columns("chunks")}:
        conn.execute(text("ALTER TABLE chunks ADD COLUMN file_bytes BIGINT NOT NULL DEFAULT 0"))
    if "plain_start" not in {c["name"] for c in found.get_columns("gzip_chunks")}:
        conn.execute(text("ALTER TABLE gzip_chunks ADD COLUMN plain_start BIGINT"))
    if "generation" not in {c["name"] for c in found.get_columns("streams")}:
        conn.execute(text("ALTER TABLE streams ADD COLUMN generation BIGINT NOT NULL DEFAULT 0"))
    if "stop_requested_at" not in {c["name"] for c in found.get_columns("streams")}:
        kind = "DOUBLE PRECISION" if postgres else "FLOAT"
        conn.execute(text(f"ALTER TABLE streams ADD COLUMN stop_requested_at {kind}"))
    if "visibility" not in {c["name"] for c in found.get_columns("streams")}:
        conn.execute(text("ALTER TABLE streams ADD COLUMN visibility VARCHAR(16)"))
    if "token_id" not in {c["name"] for c in found.get_columns("sessions")}:
        conn.execute(text("ALTER TABLE sessions ADD COLUMN token_id VARCHAR(32)"))


def namespace_totals() -> Select[Any]:
    """Each namespace's streams, open streams, stored and content bytes, counted from the streams themselves
    (not deleted): what the namespace counters hold. Callers add conditions (expiry) as they need."""
    return (
        select(
            streams.c.namespace,
            func.count(),
            func.count() - func.count(streams.c.closed_at),
            func.coalesce(func.sum(streams.c.stored_bytes), 0),
            func.coalesce(func.sum(streams.c.tail), 0),
        )
        .where(streams.c.deleted.is_(False))
        .group_by(streams.c.namespace)
    )


def recount(conn: Connection) -> None:
    """Set the namespace counters from the streams themselves (a new table, or a repair)."""
    conn.execute(namespace_counts.delete())
    totals = namespace_totals()
    rows = [
        {"namespace": n, "slot": 0, "streams": c, "open": o, "stored_bytes": s, "content_bytes": t}
        for n, c, o, s, t in conn.execute(totals)
    ]
    if rows:
        conn.execute(namespace_counts.insert(), rows)
