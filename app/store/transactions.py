"""The store's write transactions besides appends: create (and fork), delete, compact, compress, sweep.

Each runs on the writer's thread inside one transaction and returns its result with the changes that
doorbells announce. Appends are batched by writer.py and written by batches.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import (
    Connection,
    and_,
    bindparam,
    func,
    insert,
    literal,
    literal_column,
    or_,
    select,
    text,
    update,
)
from sqlalchemy import delete as sql_delete

from .. import clock
from ..errors import (
    ContentTypeMismatchError,
    InvalidRequestError,
    StreamConflictError,
    StreamGoneError,
    StreamNotFoundError,
)
from ..models import Change, StreamState, lifecycle, new_stream_id
from . import counts
from .appends import media_type
from .chunk_files import FILE_CHUNK_MIN, ChunkFiles
from .reads import iter_range
from .schema import (
    CHUNK_TARGET,
    DELETED,
    UNCOMPRESSED,
    chunks,
    counters,
    gzip_chunks,
    metadata_pairs,
    producers,
    streams,
)
from .statements import CHUNK_SIZE, STREAM_STATE

GENERATION = "stream_generation"  # the counters row of the last generation a created stream got

# A compressed stream's gzip body has a full flush point (where inflating can begin) every this many plain
# bytes, so that a read from deep inside it inflates at most this much it does not send.
SEEK_STEP = 1024 * 1024
# Compaction merges only chunks smaller than this, so never one held in a chunk file.
SMALL_CHUNK = FILE_CHUNK_MIN
COMPRESS_GRACE = 600.0  # seconds after close by which a compression has surely finished or stopped
SWEEP_BATCH = (
    500  # streams a sweep transaction looks at, of each kind; the sweeper goes on while it finds so many
)
SWEEP_LOCK = 0x53575045  # advisory lock key: one process sweeps at a time
CREATE_LOCK = 0x4E414D45  # advisory lock class for (this, hash of a name): one create of a name at a time
DATABASE_NOW = "extract(epoch from clock_timestamp())"


# Built once: building a statement cost more than running it, measured under concurrent creates.
_INSERT_STREAM = insert(streams)
_INSERT_METADATA = insert(metadata_pairs)
_INSERT_CHUNK = insert(chunks)
_BUMP_GENERATION = update(counters).where(counters.c.name == GENERATION).values(value=counters.c.value + 1)
_GENERATION = select(counters.c.value).where(counters.c.name == GENERATION)
_BY = {
    (column.name, lock): (
        select(*STREAM_STATE).where(column == bindparam("value")).with_for_update()
        if lock
        else select(*STREAM_STATE).where(column == bindparam("value"))
    )
    for column in (streams.c.id, streams.c.name)
    for lock in (False, True)
}


@dataclass
class NewStream:
    """Everything needed to create a stream."""

    namespace: str
    content_type: str = "application/octet-stream"
    name: str | None = None
    json_mode: bool = False
    metadata: dict[str, str] = field(default_factory=dict)
    ttl_seconds: int | None = None
    sliding: bool = False
    expires_at: float | None = None
    closed: bool = False
    initial: bytes = b""
    fork_from: str | None = None
    fork_offset: int | None = None
    visibility: str | None = None  # "public", "private", or None to follow STREAMHOLD_READS
    # Where a fork starts, given its source, a reader of the source's bytes [start, end) in slices and a
    # lookup of streams by id (the sources of the source, whose offsets it shares up to its fork point).
    fork_point: (
        Callable[
            [StreamState, Callable[[int, int], Iterator[bytes]], Callable[[str], StreamState | None]], int
        ]
        | None
    ) = None


def create(
    conn: Connection, new: NewStream, postgres: bool, files: ChunkFiles | None, slot: int
) -> tuple[tuple[StreamState, bool], list[Change]]:
    now = clock.now()
    changes: list[Change] = []
    if new.name is not None:
        if postgres:
            # SELECT ... FOR UPDATE locks no row for a name not yet taken: without this, two processes
            # creating one name both insert it and one fails on the unique name.
            lock_names(conn, [new.name])
        existing = _locked(conn, streams.c.name, new.name, postgres)
        if existing is not None:
            if existing.expired(now):
                changes.append(_retire(conn, existing, postgres, slot))
            elif existing.deleted:
                raise StreamConflictError(
                    "this stream was deleted while forks of it remain; use another name"
                )
            elif same_config(existing, new) and same_fork(conn, existing, new, postgres, files):
                return (existing, False), []
            else:
                raise StreamConflictError("a stream with this name exists with a different configuration")
    stream_id = new_stream_id()
    ttl, sliding, expires_at = new.ttl_seconds, new.sliding, new.expires_at
    content_type = new.content_type
    fork_offset = None
    prefix_source: StreamState | None = None
    if new.fork_from is not None:
        source = _locked(conn, streams.c.name, new.fork_from, postgres)
        if source is None or source.expired(now):
            raise StreamNotFoundError(f"fork source {new.fork_from!r} not found")
        if source.deleted:
            raise StreamConflictError("the fork source was deleted")
        if media_type(content_type) != media_type(source.content_type):
            raise ContentTypeMismatchError("a fork must have its source's content type")
        fork_offset = _fork_point(conn, new, source, files)
        if ttl is None and expires_at is None:
            ttl, sliding, expires_at = source.ttl_seconds, source.sliding, source.expires_at
            if sliding and ttl:
                expires_at = now + ttl
        prefix_source = source
    if ttl and expires_at is None:
        expires_at = now + ttl
    # A fork copies nothing: its bytes below the fork offset are read from its source (iter_range), which
    # outlives its own delete or expiry while a live fork needs it (delete, _retire). Copying, even in
    # slices between other writes, would cost as much again in storage and WAL for every fork.
    tail = fork_offset or 0
    if new.initial:
        conn.execute(_INSERT_CHUNK, {"stream_id": stream_id, "start": tail, "data": new.initial})
        tail += len(new.initial)
    row = stream_row(
        new,
        stream_id,
        now,
        _next_generation(conn),
        tail=tail,
        content_type=content_type,
        ttl=ttl,
        sliding=sliding,
        expires_at=expires_at,
    )
    if prefix_source is not None:
        row["fork_source"], row["fork_offset"] = prefix_source.id, fork_offset
    conn.execute(_INSERT_STREAM, row)
    if new.metadata:
        conn.execute(
            _INSERT_METADATA,
            [{"stream_id": stream_id, "key": k, "value": v} for k, v in new.metadata.items()],
        )
    state = StreamState.from_row(row)
    counts.add_one(conn, postgres, slot, state.namespace, counts.of_stream(state))
    return (state, True), changes


def stream_row(
    new: NewStream,
    stream_id: str,
    now: float,
    generation: int,
    *,
    tail: int,
    content_type: str,
    ttl: int | None,
    sliding: bool,
    expires_at: float | None,
) -> dict[str, Any]:
    """The streams row of a new stream, with what create settled (a fork's come from its source)."""
    return {
        "id": stream_id,
        "name": new.name or stream_id,
        "namespace": new.namespace,
        "content_type": content_type,
        "json_mode": new.json_mode,
        "metadata_json": json.dumps(new.metadata, separators=(",", ":")),
        "created_at": now,
        "updated_at": now,
        "closed_at": now if new.closed else None,
        "tail": tail,
        "stored_bytes": len(new.initial),
        "appends": 1 if new.initial else 0,
        "compact_from": 0,
        "compress": False,
        "compressed": False,
        "ttl_seconds": ttl,
        "sliding": sliding,
        "expires_at": expires_at,
        "last_seq": None,
        "fork_source": None,
        "fork_offset": None,
        "deleted": False,
        "generation": generation,
        "visibility": new.visibility,
    }


def lock_names(conn: Connection, names: list[str]) -> None:
    """PostgreSQL: take the create locks of several names, in the order given."""
    for name in names:
        conn.execute(
            text("SELECT pg_advisory_xact_lock(CAST(:c AS integer), hashtext(:name))"),
            {"c": CREATE_LOCK, "name": name},
        )


def _next_generation(conn: Connection) -> int:
    """A generation higher than any handed out before, in this database, whatever process asks."""
    conn.execute(_BUMP_GENERATION)
    return int(conn.execute(_GENERATION).scalar_one())


def same_fork(
    conn: Connection, existing: StreamState, new: NewStream, postgres: bool, files: ChunkFiles | None
) -> bool:
    if new.fork_from is None:
        return existing.fork_source is None
    source = _locked(conn, streams.c.name, new.fork_from, postgres)
    if source is None or source.id != existing.fork_source:
        return False
    return _fork_point(conn, new, source, files) == existing.fork_offset


def _fork_point(conn: Connection, new: NewStream, source: StreamState, files: ChunkFiles | None) -> int:
    if new.fork_point is None:
        if new.fork_offset is None:
            return source.tail
        if not 0 <= new.fork_offset <= source.tail:
            raise InvalidRequestError(f"a fork offset must be from 0 to the source's tail, {source.tail}")
        return new.fork_offset

    def by_id(stream_id: str) -> StreamState | None:
        row = conn.execute(select(*STREAM_STATE).where(streams.c.id == stream_id)).first()
        return StreamState.from_row(row) if row is not None else None

    return new.fork_point(source, lambda start, end: iter_range(conn, source, start, end, files), by_id)


def delete(conn: Connection, stream_id: str, postgres: bool, slot: int) -> tuple[None, list[Change]]:
    state = _locked(conn, streams.c.id, stream_id, postgres)
    if state is None or state.expired():
        raise StreamNotFoundError("stream not found")
    if state.deleted:
        raise StreamGoneError("stream was deleted")
    counts.add_one(conn, postgres, slot, state.namespace, counts.of_stream(state, -1))
    if _has_forks(conn, stream_id):
        conn.execute(update(streams).where(streams.c.id == stream_id).values(deleted=True))
        return None, [Change(stream_id, state.tail, state.closed, gone=True)]
    changes = [Change(stream_id, state.tail, state.closed, gone=True)]
    _purge(conn, stream_id)
    source_id = state.fork_source
    while source_id is not None:
        source = _locked(conn, streams.c.id, source_id, postgres)
        if source is None or not source.deleted or _has_forks(conn, source_id):
            break
        _purge(conn, source_id)
        changes.append(Change(source_id, source.tail, True, gone=True))  # its chunk file goes too
        source_id = source.fork_source
    return None, changes


def delete_many(
    conn: Connection, stream_ids: list[str], postgres: bool, slot: int
) -> tuple[int, list[Change]]:
    """Delete each of the streams that is still there, in one transaction; returns how many."""
    deleted, changes = 0, []
    for stream_id in sorted(stream_ids):  # the writers' locking order, so processes never deadlock
        try:
            changes += delete(conn, stream_id, postgres, slot)[1]
        except (StreamNotFoundError, StreamGoneError):
            continue
        deleted += 1
    return deleted, changes


def request_stop(conn: Connection, stream_id: str, postgres: bool) -> tuple[StreamState, list[Change]]:
    """Record that the writer was asked to stop (the first request's time is kept) and ring its doorbell.

    A closed stream has nothing to stop: it is returned unchanged, with no doorbell.
    """
    state = _locked(conn, streams.c.id, stream_id, postgres)
    if state is None or not lifecycle(state).readable:
        raise StreamNotFoundError(f"stream {stream_id} not found (it may have expired or been deleted)")
    if state.closed:
        return state, []
    if state.stop_requested_at is None:
        now = clock.now()
        conn.execute(update(streams).where(streams.c.id == stream_id).values(stop_requested_at=now))
        state = replace(state, stop_requested_at=now)
    # Rung again on a repeated request: a writer that missed the first doorbell hears this one.
    return state, [Change(stream_id, -1, False, stop=True)]


def stage_gzip(
    conn: Connection, stream_id: str, pieces: list[GzipPiece], postgres: bool
) -> tuple[bool, list[Change]]:
    """Store pieces of a closed stream's gzip body; readers ignore them until `swap_in_gzip`.

    False (nothing stored) once the stream is gone, compressed or not closed: the compression stops.
    """
    state = _locked(conn, streams.c.id, stream_id, postgres)
    if state is None or state.compressed or not state.closed:
        return False, []
    if pieces and pieces[0].seq == 0:  # pieces left by a compression that was interrupted
        conn.execute(sql_delete(gzip_chunks).where(gzip_chunks.c.stream_id == stream_id))
    for piece in pieces:
        conn.execute(
            insert(gzip_chunks).values(
                stream_id=stream_id, seq=piece.seq, data=piece.data, plain_start=piece.plain_start
            )
        )
    return True, []


def swap_in_gzip(
    conn: Connection, stream_id: str, pieces: int, stored: int, postgres: bool, slot: int
) -> tuple[bool, list[Change]]:
    """Make the staged gzip body the stream's content, if it is whole; True if it did."""
    state = _locked(conn, streams.c.id, stream_id, postgres)
    if state is None or state.compressed or not state.closed:
        return False, []
    staged = conn.execute(
        select(func.count(), func.coalesce(func.sum(func.length(gzip_chunks.c.data)), 0)).where(
            gzip_chunks.c.stream_id == stream_id
        )
    ).one()
    if tuple(staged) != (pieces, stored):  # another compression of it interfered: keep the plain copy
        conn.execute(sql_delete(gzip_chunks).where(gzip_chunks.c.stream_id == stream_id))
        return False, []
    conn.execute(sql_delete(chunks).where(chunks.c.stream_id == stream_id))
    conn.execute(
        update(streams).where(streams.c.id == stream_id).values(compressed=True, stored_bytes=stored)
    )
    if not state.deleted:
        counts.add_one(
            conn, postgres, slot, state.namespace, counts.Delta(stored_bytes=stored - state.stored_bytes)
        )
    return True, []


def sweep(conn: Connection, postgres: bool, slot: int) -> tuple[tuple[int, list[str], bool], list[Change]]:
    """Purge expired streams and deleted sources no fork needs: (how many, streams to compress, more left).

    The streams to compress are closed streams whose compression never finished (the process doing it
    stopped): only the process that holds the sweep lock gets them, so only one redoes each.
    """
    if postgres:
        # Every process sets its clock by the database's at each sweep, whether or not it sweeps.
        now = float(conn.execute(text(f"SELECT {DATABASE_NOW}")).scalar_one())
        clock.set_to(now)
        if not conn.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": SWEEP_LOCK}).scalar():
            return (0, [], False), []
        expiring = streams.c.expires_at <= literal_column(DATABASE_NOW)
    else:
        # The writer's lock (BEGIN IMMEDIATE) is held: no other process slides an expiry meanwhile.
        clock.follow_wall()
        now = clock.now()
        expiring = streams.c.expires_at <= now
    forked = select(1).where(_fork_of(streams.c.id, now)).exists()
    # Two queries, each walking an index (a single OR of them scanned every stream): expired streams by
    # expiry, deleted ones kept for forks through their partial index. At most SWEEP_BATCH of each.
    found = list(
        conn.scalars(
            select(streams.c.id)
            .where(expiring, or_(~forked, streams.c.deleted.is_(False)))
            .order_by(streams.c.expires_at)
            .limit(SWEEP_BATCH)
        )
    )
    found += conn.scalars(select(streams.c.id).where(DELETED, ~forked).limit(SWEEP_BATCH))
    changes = []
    for stream_id in sorted(set(found)):  # the writers' locking order, so processes never deadlock
        # Locked and asked again: a fork of it may have been committed, or its expiry slid, since the
        # query above. A row being written now is skipped and judged by a later sweep.
        state = _locked(conn, streams.c.id, stream_id, postgres, skip_locked=True)
        if state is None:
            continue
        if (state.deleted and not _has_forks(conn, stream_id)) or (not state.deleted and state.expired(now)):
            changes.append(_retire(conn, state, postgres, slot))
    unfinished = conn.scalars(
        select(streams.c.id)
        .where(UNCOMPRESSED, streams.c.deleted.is_(False))
        .where(streams.c.closed_at < now - COMPRESS_GRACE)
        .limit(10)
    ).all()
    return (len(changes), list(unfinished), len(found) >= SWEEP_BATCH), changes


def remove_unused_files(
    conn: Connection, files: ChunkFiles, stream_ids: list[str]
) -> tuple[list[str], list[Change]]:
    """Remove the chunk files of these streams that no chunk refers to; returns those still held.

    In a write transaction, so that no writer (of any process) is between writing a file and committing
    the chunk that refers to it; a file an append is being spooled into is held, and stays for now.
    """
    held = []
    for stream_id in stream_ids:
        used = chunks.c.stream_id == stream_id, chunks.c.file_bytes > 0
        if conn.execute(select(chunks.c.start).where(*used).limit(1)).first() is None:
            try:
                claim = files.claim(stream_id, create=False)
            except FileNotFoundError:
                continue
            if claim is None:
                held.append(stream_id)
                continue
            try:
                files.remove(stream_id)
            finally:
                claim.close()
    return held, []


def _locked(
    conn: Connection, column: Any, value: str, postgres: bool, skip_locked: bool = False
) -> StreamState | None:
    prebuilt = _BY.get((column.name, postgres)) if not skip_locked and column.table is streams else None
    if prebuilt is not None:
        row = conn.execute(prebuilt, {"value": value}).first()
        return StreamState.from_row(row) if row is not None else None
    query = select(*STREAM_STATE).where(column == value)
    if postgres:
        query = query.with_for_update(skip_locked=skip_locked)
    row = conn.execute(query).first()
    return StreamState.from_row(row) if row is not None else None


def same_config(existing: StreamState, new: NewStream) -> bool:
    return (
        media_type(existing.content_type) == media_type(new.content_type)
        and existing.ttl_seconds == new.ttl_seconds
        and (new.ttl_seconds is not None or existing.expires_at == new.expires_at)
        and existing.closed == new.closed
        and existing.visibility == new.visibility
    )


def _fork_of(stream_id_column: Any, now: float) -> Any:
    """A live fork of the stream: an expired fork is never read again, so it holds no source."""
    forks = streams.alias("forks")
    return and_(
        forks.c.fork_source == stream_id_column,
        or_(forks.c.expires_at.is_(None), forks.c.expires_at > now),
    )


def _has_forks(conn: Connection, stream_id: str) -> bool:
    return (
        conn.execute(select(1).where(_fork_of(literal(stream_id), clock.now())).limit(1)).first() is not None
    )


def _retire(conn: Connection, state: StreamState, postgres: bool, slot: int) -> Change:
    """Purge an expired or deleted stream, or keep its bytes under its id for live forks."""
    if not state.deleted:  # a deleted one left the totals when it was deleted
        counts.add_one(conn, postgres, slot, state.namespace, counts.of_stream(state, -1))
    if _has_forks(conn, state.id):
        conn.execute(update(streams).where(streams.c.id == state.id).values(deleted=True, name=state.id))
    else:
        _purge(conn, state.id)
    return Change(state.id, state.tail, True, gone=True)


def _purge(conn: Connection, stream_id: str) -> None:
    for table in (chunks, gzip_chunks, metadata_pairs, producers):
        conn.execute(sql_delete(table).where(table.c.stream_id == stream_id))
    conn.execute(sql_delete(streams).where(streams.c.id == stream_id))


@dataclass
class GzipPiece:
    """A piece of a gzip body; `plain_start` is set when inflating can begin at it (a full flush point)."""

    seq: int
    data: bytes
    plain_start: int | None


# Every close compacts (most closed streams have nothing to merge): its statements are built once.
_COMPACT_FROM = select(streams.c.compact_from, streams.c.tail).where(streams.c.id == bindparam("id"))
_COMPACT_FROM_LOCKED = _COMPACT_FROM.with_for_update()
_CHUNK_SIZES = (
    select(chunks.c.start, CHUNK_SIZE)
    .where(chunks.c.stream_id == bindparam("id"), chunks.c.start >= bindparam("begin"))
    .order_by(chunks.c.start)
)
_SET_COMPACT_FROM = (
    update(streams).where(streams.c.id == bindparam("sid")).values(compact_from=bindparam("new_from"))
)


def compact(conn: Connection, stream_id: str, full: bool, postgres: bool) -> None:
    # Lock the stream so that another process's writer cannot append or compact it meanwhile.
    query = _COMPACT_FROM_LOCKED if postgres else _COMPACT_FROM
    row = conn.execute(query, {"id": stream_id}).first()
    if row is None:
        return
    begin = 0 if full else row.compact_from
    sizes = conn.execute(_CHUNK_SIZES, {"id": stream_id, "begin": begin}).all()
    groups: list[list[int]] = []
    current: list[int] = []
    current_size = 0
    for start, size in sizes:
        if size >= SMALL_CHUNK or current_size + size > CHUNK_TARGET:
            if len(current) > 1:
                groups.append(current)
            current, current_size = [], 0
            if size >= SMALL_CHUNK:
                continue
        current.append(start)
        current_size += size
    if len(current) > 1:
        groups.append(current)
    for group in groups:
        rows = conn.execute(
            select(chunks.c.data)
            .where(chunks.c.stream_id == stream_id, chunks.c.start >= group[0], chunks.c.start <= group[-1])
            .order_by(chunks.c.start)
        ).all()
        merged = b"".join(r.data for r in rows)
        conn.execute(
            sql_delete(chunks).where(
                chunks.c.stream_id == stream_id, chunks.c.start >= group[0], chunks.c.start <= group[-1]
            )
        )
        conn.execute(insert(chunks).values(stream_id=stream_id, start=group[0], data=merged))
    if sizes:  # later compactions start where these chunks end; bytes still pending are not in a chunk
        last_start, last_size = sizes[-1]
        conn.execute(_SET_COMPACT_FROM, {"sid": stream_id, "new_from": last_start + last_size})
