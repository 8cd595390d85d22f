"""One batch of appends in one transaction, on the writer's long-lived driver connection.

The streams' records are read (or taken from the row cache, on SQLite), the append rules (appends.py)
applied to each append in memory, and what the batch leaves written: bytes kept pending in the record,
chunks made of them, large chunks in chunk files synced before the COMMIT, producers' states. The writer
(writer.py) decides which appends make a batch and where its COMMIT runs.
"""

from __future__ import annotations

import base64
import contextlib
import json
import select
import time
from collections.abc import Callable
from typing import Any

import psycopg
from sqlalchemy import Engine

from .. import clock
from ..errors import StreamError
from ..models import LRU, Change
from . import counts
from .appends import AppendOp, Pending, Record, apply_append
from .chunk_files import FILE_CHUNK_MIN, ChunkFiles, Claim, Spool
from .known_rows import KnownRow, KnownRows
from .statements import STREAM_COLUMNS, UPDATED_FIELDS, Prepared, Statements, state_from_tuple

# Enough for the records of 10,000 streams written at once; past it, the least recently written go.
MAX_CACHED_ROWS = 16384
WAL_FRAME_HEADER = 24
# Small appends collect in the stream's record (its `pending` bytes) until they make a chunk this large. A
# commit of small appends then writes a few pages of the streams table, rather than also a chunk row and
# an index entry per stream, scattered over as many pages: measured, 2 to 3 times fewer pages a commit.
PENDING_LIMIT = 2048


class AppendBatches:
    """The writer's connection and what it knows between batches: its row cache, chunk files and counts."""

    def __init__(
        self,
        engine: Engine,
        postgres: bool,
        statements: Statements,
        files: ChunkFiles | None = None,
        known: KnownRows | None = None,
    ) -> None:
        self._engine = engine
        self._files = files
        # The batch's large appends, written to chunk files (and synced) just before its COMMIT; None for
        # bytes a spool wrote. The claims keep other writers out of the files until the COMMIT is done.
        self._file_writes: list[tuple[Claim, int, bytes | bytearray | None]] = []
        self._claims: list[Claim] = []
        self.spooled = 0  # appends whose body was already in its file when the batch came to write it
        self._statements = statements
        self._driver: Any = None
        self._pooled: Any = None
        self._postgres = postgres
        self.appends = 0
        self.bytes_appended = 0
        self._uncommitted = [0, 0]  # appends and bytes of the batch being written, counted once committed
        self.commits = 0
        self.counter_slot = 0  # the store's rows of the namespace counters (counts.py)
        # Told of each stream a batch closes: its id, whether it is to be compressed, and whether it had no
        # chunk before this batch (so it has at most one that compaction could merge: nothing to merge).
        self.after_close: Callable[[str, bool, bool], None] | None = None
        # SQLite only: stream rows (and their pending byte counts) as this connection's last commit left
        # them. They stay valid while no other connection commits, which `PRAGMA data_version` tells, so a
        # batch skips re-reading them.
        self._rows: LRU[str, Record] = LRU(MAX_CACHED_ROWS)
        self._written: dict[str, Record] = {}
        # PostgreSQL: the rows this process last read or wrote (known_rows.py). A row read as it was is not
        # decoded again; a batch of rows this process wrote last is not read at all.
        self._known = known if known is not None else KnownRows(MAX_CACHED_ROWS if postgres else 0)
        self._read_rows: dict[str, tuple[Any, ...]] = {}  # the batch's rows as read
        self._written_rows: dict[str, tuple[Any, ...]] = {}  # and as it leaves them
        self._expected: dict[str, str] = {}  # the versions of rows a batch writes without reading them
        self._updating: Any = None  # the cursor of the batch's update_streams, whose answer is read last
        self.unread_batches = 0  # batches that wrote without reading, and those that found a row changed
        self.changed_rows = 0
        self._data_version = -1
        self._commit_sent = False
        self._wal_path = "" if postgres else f"{engine.url.database}-wal"
        self.checkpoint_bytes = 0
        # How long COMMITs take: rises at once with a slow one, falls back by a tenth of the gap a commit.
        self.commit_seconds = 0.0

    def _run_appends(self, ops: list[AppendOp]) -> tuple[list[tuple[bool, Any]], list[Change]]:
        for attempt in (1, 2):
            try:
                if self._postgres:
                    return self._pipelined(ops)
                return self._append_transaction(ops)
            except Exception:
                # Once COMMIT has been sent the batch may have been committed: doing it again would
                # append twice, so only a failure before that is retried (on a new connection).
                forgot = self._forget_broken_connection()
                if attempt == 2 or not forgot or self._commit_sent:
                    raise
        raise AssertionError("unreachable")

    def _pipelined(self, ops: list[AppendOp]) -> tuple[list[tuple[bool, Any]], list[Change]]:
        """PostgreSQL: the batch in pipeline mode, where statements go out without waiting for each other's
        answers: one round trip if this process wrote the batch's streams last, and two otherwise (the
        reads, then the writes), not one per statement.

        A batch of plain appends to streams this process wrote last applies them to the records it kept and
        writes the rows only if they are still as it left them, failing as a whole if one is not: it then
        reads them and runs again. Measured (16 writers of 64-byte appends, two runs each, side by side):
        5% less server CPU and 7% less database CPU an append than reading every batch's rows, and 8% more
        appends/s.
        """
        if not any(op.producer is not None for op in ops):
            known = self._known.written({op.stream_id for op in ops})
            if known is not None:
                try:
                    return self._in_pipeline(ops, known)
                except _Unconfirmed:
                    pass
                except psycopg.Error:
                    # The server refused it, so none of it committed: most likely a row changed since this
                    # process wrote it (schema.ALL_ROWS_FUNCTION), or another process made a chunk at the
                    # offset it knew. Read the rows and run it again, unless the outcome is not known.
                    if self._commit_sent:
                        raise
                    self.changed_rows += 1
        return self._in_pipeline(ops, None)

    def _in_pipeline(
        self, ops: list[AppendOp], known: dict[str, KnownRow] | None
    ) -> tuple[list[tuple[bool, Any]], list[Change]]:
        """One batch in one pipeline: reading its rows unless they are `known`.

        The statements between the pipeline's start and its Sync, sent as it ends, are one transaction,
        which the server commits on that Sync (the connection is in autocommit mode, so the driver adds no
        BEGIN of its own). Measured against an explicit BEGIN and COMMIT (16 writers of 64-byte appends,
        side by side): two statements fewer a batch, 6% less server CPU and 9% less database CPU an append.
        """
        conn = self._driver_connection() if known is None else self._live_connection()
        self._commit_sent = False
        try:
            with conn.pipeline():
                try:
                    done = self._append_transaction(ops, known=known)
                except BaseException as exc:
                    ours = getattr(exc, "sqlstate", None) is None and not (conn.closed or conn.broken)
                    if ours and not isinstance(exc, _Unconfirmed):  # which comes before anything is written
                        self._abandon(conn)
                    raise
                self._commit_sent = True
        except BaseException as exc:
            # An error the server answered with means nothing committed: a statement that fails skips the
            # rest, and the Sync then ends the failed transaction. The batch may then be split and retried.
            # A lost connection leaves it unknown, unless it was closed before the Sync went out.
            if getattr(exc, "sqlstate", None) is not None and not (conn.closed or conn.broken):
                self._commit_sent = False
                # The server skipped the statements behind the failed one, and the driver may take one it
                # sent to be prepared for prepared: later batches would name a statement that does not
                # exist. A new connection starts without any.
                self._abandon(conn)
            raise
        finally:
            self._expected.clear()
        self.unread_batches += known is not None
        self._committed()
        self._count_commit()
        return done

    def _live_connection(self) -> Any:
        """The connection, replaced first if the server has ended it while it was idle.

        A batch that reads first finds a lost connection before anything of it commits, and may then run
        again on a new one; a batch that only writes would find it only at its end, not knowing whether it
        committed. A server that ends a connection says so first, and says nothing unasked to an idle one
        otherwise (it listens for no notifications), so an idle connection with something to read is replaced
        rather than trusted: the check costs one system call.
        """
        conn = self._driver_connection()
        if select.select([conn.pgconn.socket], [], [], 0)[0]:
            self._abandon(conn)
            conn = self._driver_connection()
        return conn

    def _abandon(self, conn: Any) -> None:
        """Replace a connection that is not to be used again, as that of a failed batch, with a new one.

        A batch that failed on this side has not had its transaction aborted by the server, and the Sync
        that ends the pipeline would commit whatever part of it went out: closing the connection first makes
        the server roll it back. The batch is not retried, as for any failure that is not a lost connection,
        but its streams may be, apart (Writer._may_retry), on the new connection."""
        conn.close()
        self._forget_broken_connection()
        with contextlib.suppress(Exception):  # the database is down: the next batch tries again
            self._driver_connection()

    def _forget_broken_connection(self) -> bool:
        """Drop a PostgreSQL connection that has closed or broken, so that the next batch opens a new one."""
        driver = self._driver
        if not self._postgres or driver is None or not (driver.closed or driver.broken):
            return False
        if self._pooled is not None:
            self._pooled.invalidate()
        self._driver = self._pooled = None
        return True

    def _driver_connection(self) -> Any:
        if self._driver is None:
            self._pooled = self._engine.raw_connection()
            self._driver = self._pooled.driver_connection
            if self._postgres:
                self._driver.autocommit = True  # the pipeline's Sync ends each batch's transaction
            if not self._postgres:
                # Never wait for a lock on the event loop: a busy database sends the batch to the thread.
                self._driver.execute("PRAGMA busy_timeout=0")
                pages = self._driver.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
                page_size = self._driver.execute("PRAGMA page_size").fetchone()[0]
                self.checkpoint_bytes = pages * (page_size + WAL_FRAME_HEADER) if pages > 0 else 0
        return self._driver

    def _commit(self, cursor: Any) -> None:
        """Sync the batch's chunk files, then commit the rows that refer to them."""
        files = self._files if self._file_writes else None
        if files is not None:
            files.write(self._file_writes)
        self._commit_sent = True
        started = time.perf_counter()
        cursor.execute("COMMIT")
        took = time.perf_counter() - started
        if files is not None:
            files.committed()
        self.commit_seconds = max(took, self.commit_seconds + (took - self.commit_seconds) / 10)

    def _count_commit(self) -> None:
        self.commits += 1
        self.appends += self._uncommitted[0]
        self.bytes_appended += self._uncommitted[1]
        self._uncommitted = [0, 0]

    def _release_claims(self) -> None:
        for claim in self._claims:
            claim.close()
        self._claims.clear()

    def _cached_rows(self, cursor: Any) -> LRU[str, Record]:
        """The row cache, emptied first if another connection has committed since this one last did."""
        if self._postgres:
            return self._rows  # always empty: another process may commit at any time
        cursor.execute("PRAGMA data_version")
        version = cursor.fetchone()[0]
        if version != self._data_version:
            self._rows.clear()
            self._data_version = version
        self._written.clear()
        return self._rows

    def _committed(self) -> None:
        if self._postgres:
            versions: dict[str, str] = {}
            if self._updating is not None:  # the ids and versions of the rows update_streams wrote
                ids, xmins, _ = self._updating.fetchone()
                versions = dict(zip(ids, xmins, strict=True))
                self._updating.close()
                self._updating = None
            for stream_id, record in self._written.items():
                row = self._written_rows[stream_id]
                self._known.put(stream_id, KnownRow(row, record, versions.get(stream_id)))
        else:
            for stream_id, record in self._written.items():
                self._rows.put(stream_id, record)
        self._written.clear()
        self._written_rows.clear()

    def _append_transaction(
        self, ops: list[AppendOp], cursor: Any = None, known: dict[str, KnownRow] | None = None
    ) -> tuple[list[tuple[bool, Any]], list[Change]]:
        now = clock.now()
        conn = self._driver_connection()
        began = cursor is not None
        cursor = cursor if began else conn.cursor()
        self._commit_sent = False
        self._file_writes.clear()
        self._uncommitted = [0, 0]
        self._written.clear()
        self._written_rows.clear()
        self._updating = None
        try:
            if not self._postgres and not began:
                cursor.execute("PRAGMA busy_timeout=10000")
                cursor.execute("BEGIN IMMEDIATE")
            pending: dict[str, Pending] = {}
            keys = {(op.stream_id, op.producer.id) for op in ops if op.producer is not None}
            if known is None:
                records, states = self._read_records(conn, cursor, sorted({op.stream_id for op in ops}), keys)
            else:
                # Locked first, in the order every batch locks them: the batch's statements then wait for no
                # other batch that waits for them (a deadlock otherwise, as two processes make chunks).
                assert self._statements.lock_streams is not None
                lock = self._statements.lock_streams
                cursor.execute(lock.sql, lock.args({"ids": sorted(known)}))
                records, states = {stream_id: k.record for stream_id, k in known.items()}, {}
                self._read_rows = {stream_id: k.row for stream_id, k in known.items()}
                self._expected = {stream_id: k.xmin for stream_id, k in known.items() if k.xmin is not None}
            for stream_id, record in records.items():
                pending[stream_id] = Pending(
                    record,
                    record.tail,
                    record.closed_at,
                    record.last_seq,
                    record.expires_at,
                    record.compress,
                )
            stored = set(states)  # the producers with a row already, before the batch adds its own
            outcomes: list[tuple[bool, Any]] = []
            for op in ops:
                try:
                    outcomes.append((True, apply_append(pending.get(op.stream_id), op, states, now)))
                except StreamError as exc:
                    outcomes.append((False, exc))
            confirmed = all(ok for ok, _ in outcomes) and all(p.changed for p in pending.values())
            if known is not None and not confirmed:
                raise _Unconfirmed  # decided on records not read: read them, and decide again
            changes = self._write(cursor, pending, states, stored, now)
            if began:
                return outcomes, changes  # the caller commits
            if not self._postgres:  # else the pipeline's end commits (_pipelined)
                self._commit(cursor)
                self._committed()
        except BaseException:
            self._rows.clear()
            if began:
                raise
            if not self._postgres:  # else the pipeline's end rolls it back (_pipelined)
                with contextlib.suppress(Exception):  # the connection failed; the caller decides what next
                    cursor.execute("ROLLBACK")
            raise
        finally:
            if not began:
                if not self._postgres:
                    with contextlib.suppress(Exception):
                        cursor.execute("PRAGMA busy_timeout=0")
                cursor.close()
                self._release_claims()
        if not self._postgres:  # else once the pipeline has ended (_pipelined)
            self._count_commit()
        return outcomes, changes

    def _read_records(
        self, conn: Any, cursor: Any, stream_ids: list[str], keys: set[tuple[str, str]]
    ) -> tuple[dict[str, Record], dict[tuple[str, str], list[int]]]:
        """The batch's stream records (locked, in the order of their ids) and its producers' states."""
        sql = self._statements
        records: dict[str, Record] = {}
        found: list[tuple[tuple[str, str], Any]] = []
        if self._postgres:
            assert sql.streams_by_ids_locked is not None
            query = sql.streams_by_ids_locked
            cursor.execute(query.sql, query.args({"ids": stream_ids}))
            # Sent in the same round trip (pipeline mode): each producer's state, on a cursor of its own.
            asked = []
            for key in keys:
                producer_cursor = conn.cursor()
                values = {"stream_id": key[0], "producer_id": key[1]}
                producer_cursor.execute(sql.producer.sql, sql.producer.args(values))
                asked.append((key, producer_cursor))
            self._read_rows = {row[0]: row for row in cursor.fetchall()}
            for stream_id, row in self._read_rows.items():
                records[stream_id] = self._decode(row)
            for key, producer_cursor in asked:
                found.append((key, producer_cursor.fetchone()))
                producer_cursor.close()
        else:
            cached = self._cached_rows(cursor)
            for stream_id in stream_ids:
                record = cached.get(stream_id)
                if record is None:
                    query = sql.stream_by_id_locked
                    cursor.execute(query.sql, query.args({"id": stream_id}))
                    row = cursor.fetchone()
                    record = Record.read(state_from_tuple(row[:-1]), row[-1]) if row else None
                if record is not None:
                    records[stream_id] = record
            for key in keys:
                values = {"stream_id": key[0], "producer_id": key[1]}
                cursor.execute(sql.producer.sql, sql.producer.args(values))
                found.append((key, cursor.fetchone()))
        states = {key: [row[0], row[1]] for key, row in found if row is not None}
        return records, states

    def _decode(self, row: tuple[Any, ...]) -> Record:
        """PostgreSQL: the record of a row read, reused while the row reads as this process last saw it."""
        known = self._known.get(row[0])
        if known is None or known.row != row:
            known = KnownRow(row, Record.read(state_from_tuple(row[:-1]), row[-1]), None)
            self._known.put(row[0], known)
        return known.record

    def _write(
        self,
        cursor: Any,
        pending: dict[str, Pending],
        states: dict[tuple[str, str], list[int]],
        known: set[tuple[str, str]],
        now: float,
    ) -> list[Change]:
        sql = self._statements
        new_chunks = []
        flushes = []
        updates: dict[Prepared, list[Any]] = {}
        changes = []
        deltas: dict[str, counts.Delta] = {}
        for stream_id, p in pending.items():
            if not p.changed:
                continue
            data = b"".join(p.parts)
            was = p.record
            delta = deltas.setdefault(was.facts.namespace, counts.Delta())
            delta.stored_bytes += len(data)
            delta.content_bytes += p.tail - was.tail
            delta.open -= p.closed_at is not None and was.closed_at is None
            stored_bytes, appends = was.stored_bytes + len(data), was.appends + p.appends
            values = {
                "_id": stream_id,
                "tail": p.tail,
                "stored_bytes": stored_bytes,
                "appends": appends,
                "closed_at": p.closed_at,
                "last_seq": p.last_seq,
                "compress": p.compress,
                "updated_at": now,
            }
            # Bytes stay pending while they are few and the stream open; a chunk takes them otherwise.
            waiting = was.waiting + len(data)
            added = 0
            if waiting < PENDING_LIMIT and p.closed_at is None:
                update = sql.update_stream
                if data:
                    update = sql.update_stream_pending
                    values["data"] = data
            else:
                update = sql.update_stream_flushed if was.waiting else sql.update_stream
                claim = self._claim(stream_id, p.spool) if len(data) >= FILE_CHUNK_MIN else None
                in_file = claim is not None
                if was.waiting:
                    start = was.tail - was.waiting
                    joined = b"" if in_file else data
                    flushes.append(
                        sql.flush_pending.args({"stream_id": stream_id, "start": start, "data": joined})
                    )
                    added = was.waiting + len(joined)
                if claim is not None:
                    spooled = p.spool is not None and len(p.parts) == 1 and p.spool.holds(data, was.tail)
                    self.spooled += spooled
                    self._file_writes.append((claim, was.tail, None if spooled else data))
                    chunk = {"stream_id": stream_id, "start": was.tail, "data": b"", "file_bytes": len(data)}
                    new_chunks.append(sql.insert_chunk.args(chunk))
                elif data and not was.waiting:
                    chunk = {"stream_id": stream_id, "start": was.tail, "data": data, "file_bytes": 0}
                    new_chunks.append(sql.insert_chunk.args(chunk))
                    added = len(data)
                waiting = 0
            if data:
                self._uncommitted[0] += p.appends
                self._uncommitted[1] += len(data)
            updates.setdefault(update, []).append(update.args(values))
            if p.expires_at != was.expires_at:
                expiry = {"_id": stream_id, "expires_at": p.expires_at}
                updates.setdefault(sql.update_expiry, []).append(sql.update_expiry.args(expiry))
            # The record as this commit leaves it.
            written = Record(
                was.facts,
                waiting,
                p.tail,
                stored_bytes,
                appends,
                p.closed_at,
                p.last_seq,
                p.expires_at,
                p.compress,
            )
            self._written[stream_id] = written
            if self._postgres:
                self._written_rows[stream_id] = _row_after(self._read_rows[stream_id], written, now)
            changes.append(Change(stream_id, p.tail, p.closed_at is not None, added_chunk=added))
            if p.closed_at is not None and was.closed_at is None and self.after_close is not None:
                self.after_close(stream_id, p.compress, was.stored_bytes == was.waiting)
        if new_chunks:
            cursor.executemany(sql.insert_chunk.sql, new_chunks)
        if flushes:  # before the updates that empty the pending bytes they take
            cursor.executemany(sql.flush_pending.sql, flushes)
        if self._postgres:
            self._update_streams(cursor, updates, deltas)
        for update, rows in updates.items():
            cursor.executemany(update.sql, rows)
        if not self._postgres and (counted := counts.rows(self.counter_slot, deltas)):
            cursor.executemany(sql.count_namespace.sql, [sql.count_namespace.args(d) for d in counted])
        for (stream_id, producer_id), (epoch, seq) in states.items():
            statement = sql.update_producer if (stream_id, producer_id) in known else sql.insert_producer
            values = {"stream_id": stream_id, "producer_id": producer_id, "epoch": epoch, "seq": seq}
            cursor.execute(statement.sql, statement.args(values))
        return changes

    def _update_streams(
        self, cursor: Any, updates: dict[Prepared, list[Any]], deltas: dict[str, counts.Delta]
    ) -> None:
        """PostgreSQL: take the updates of stream records out of `updates` and run them as one statement,
        which adds `deltas` to the namespace counters too.

        One statement for the batch rather than one per stream: the server plans and runs it once, and the
        driver sends one message rather than one for each.
        """
        sql = self._statements
        assert sql.update_streams is not None
        rows = [
            {
                "id": row["_id"],
                **{name: row[name] for name in UPDATED_FIELDS},
                "data": base64.b64encode(row.get("data", b"")).decode("ascii"),
                "flushed": update is sql.update_stream_flushed,
                "xmin": self._expected.get(row["_id"]),
            }
            for update in (sql.update_stream, sql.update_stream_pending, sql.update_stream_flushed)
            for row in updates.pop(update, [])
        ]
        if not rows:
            return
        values = {
            "rows": json.dumps(rows),
            "given": len(rows),
            "counts": counts.json_rows(deltas),
            "slot": self.counter_slot,
        }
        self._updating = self._driver_connection().cursor()
        self._updating.execute(sql.update_streams.sql, sql.update_streams.args(values))

    def _claim(self, stream_id: str, spool: Spool | None) -> Claim | None:
        """The stream's file for this batch's bytes, or None to keep them in the database.

        A spool of this batch brings its claim. Another writer's claim (a spool still receiving its body,
        or a store in another process) means the file is busy: the bytes then go into the database, which
        every reader handles the same, rather than waiting for the other writer while holding the database.
        """
        if self._files is None:
            return None
        if spool is not None:
            return spool.claim
        claim = self._files.claim(stream_id)
        if claim is not None:
            self._claims.append(claim)
        return claim


_ROW_INDEX = {name: i for i, name in enumerate(STREAM_COLUMNS)}


def _row_after(row: tuple[Any, ...], record: Record, updated_at: float) -> tuple[Any, ...]:
    """A stream's row (as `_read_records` reads it) once a batch has written `record` to it."""
    after = list(row)
    for name, value in (
        ("tail", record.tail),
        ("stored_bytes", record.stored_bytes),
        ("appends", record.appends),
        ("closed_at", record.closed_at),
        ("last_seq", record.last_seq),
        ("expires_at", record.expires_at),
        ("compress", record.compress),
        ("updated_at", updated_at),
    ):
        after[_ROW_INDEX[name]] = value
    after[-1] = record.waiting
    return tuple(after)


class _Unconfirmed(Exception):
    """A batch decided on records it did not read would fail an append or leave a stream unwritten: the
    update that confirms those records were current would not cover it. Raised before anything is written."""
