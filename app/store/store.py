"""The store's face: one object the surfaces and the SDK use to create, append, read, list and delete.

Reads are `Reader`'s (reads.py), on a small thread pool; every write goes through the one group-committing
`Writer` (writer.py), as a batch of appends or as a transaction of transactions.py. Listings are in
listing.py. Besides, the store keeps a cache of names for writes, compacts streams that gathered many small
chunks, compresses closed streams and removes chunk files no chunk refers to any more.
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import functools
import logging
import os
import time
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, inspect, text, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import SQLModel

from .. import clock
from ..errors import StorageFullError, StreamNotFoundError
from ..models import LRU, AppendResult, Change, Producer, StreamFilter, StreamState
from ..settings import Settings
from . import chunk_files, counts, listing, schema, transactions
from .appends import AppendOp
from .chunk_files import ChunkFiles, Spool
from .disk import DiskSpace
from .engines import make_engines
from .reads import Reader
from .schema import CHUNK_TARGET, streams
from .sign_ins import SignIns
from .tokens import Tokens
from .transactions import NewStream
from .writer import Writer

log = logging.getLogger("streamhold.store")

TRIM_RETRY_S = 1.0  # a closed stream's file held by a spooled body is trimmed again this much later
COMPACT_AFTER = 64  # small chunks added to a stream (each at least batches.PENDING_LIMIT bytes)
NAME_CACHE = 10000
SWEEP_ROUNDS = 100  # sweep transactions one sweep runs at most; the next sweep goes on from there
SCHEMA_LOCK = 0x5354524D  # advisory lock key while several processes create the schema


class Store(Reader):
    """The stream store: reads run on a small thread pool, writes go through one group-committing writer."""

    def __init__(self, settings: Settings) -> None:
        postgres = not settings.is_sqlite
        write_engine, read_engine = make_engines(settings)
        database = "" if postgres else write_engine.url.database or ""
        super().__init__(read_engine, postgres, ChunkFiles.beside(database))
        self.settings = settings
        self._write_engine = write_engine
        # Per-stream caches are bounded and forget the least recently used stream first.
        self._names: LRU[str, StreamState] = LRU(NAME_CACHE)
        self._ids: dict[str, str] = {}  # the ids of the names cached, and no others
        self._listeners: list[Callable[[list[Change]], None]] = []
        self._small_chunks: LRU[str, int] = LRU(NAME_CACHE)
        # Streams closed with at most one chunk and no compression: their finish has nothing to do unless
        # they have a chunk file (most closed streams, and every one the Python API writes a little to).
        self._settled: LRU[str, bool] = LRU(NAME_CACHE)
        self._compressing: dict[str, asyncio.Future[None]] = {}
        self._followups: set[asyncio.Task[Any]] = set()
        self._removals: dict[str, asyncio.TimerHandle] = {}
        self._recent_files: list[str] = []
        self._sweep_lock = -1  # the descriptor of the SQLite sweep lock file, once held
        self._closing = False
        self.writer = Writer(self._write_engine, self.postgres, self._changed, self.statements, self.files)
        self.writer.after_close = self._after_close
        folder = Path(database).parent if self.files is not None else None
        self.space = DiskSpace(folder, settings.min_free_bytes, database, lambda: self.writer.commits)
        self.writer.space = self.space
        self.tokens = Tokens(self.writer, read_engine)
        self.sign_ins = SignIns(self.writer, read_engine)
        # This store's rows of the namespace counters (counts.py), and rows of its own for each connection
        # committing appends (PostgreSQL keeps two batches in flight: neither waits on the other's rows).
        self.counter_slot = counts.new_slot()
        for lane in self.writer.append_lanes():
            lane.counter_slot = self.counter_slot if lane is self.writer else counts.new_slot()

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: Settings) -> AsyncIterator[Store]:
        """Open the store (creating its schema) for the life of the block."""
        store = cls(settings)
        await asyncio.get_running_loop().run_in_executor(store._readers, store._create_schema)
        store.writer.start()
        for stream_id in store._recent_files:  # a read may still be using them: removed after the grace
            store._remove_file_later(stream_id)
        try:
            yield store
        finally:
            await store.close()

    async def close(self) -> None:
        self._closing = True
        for handle in self._removals.values():  # what they would remove goes at the next start
            handle.cancel()
        if self._followups:
            await asyncio.gather(*self._followups, return_exceptions=True)
        await self.writer.stop()
        self._readers.shutdown(wait=True)
        if self._sweep_lock >= 0:
            os.close(self._sweep_lock)
            self._sweep_lock = -1
        self._driver.close()
        self.space.close()
        self._write_engine.dispose()
        self._read_engine.dispose()

    def _create_schema(self) -> None:
        with self._write_engine.begin() as conn:
            if self.postgres:
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": SCHEMA_LOCK})
            counts_created = not inspect(conn).has_table(schema.namespace_counts.name)
            SQLModel.metadata.create_all(conn)
            schema.upgrade(conn, self.postgres, counts_created)
            if self.postgres:
                clock.set_to(float(conn.execute(text(f"SELECT {transactions.DATABASE_NOW}")).scalar_one()))
            else:
                clock.set_to(time.time())
            counter = {"name": transactions.GENERATION, "value": 0}
            # Another process may be starting too: the first to insert the counter wins.
            if self.postgres:
                conn.execute(
                    postgresql_insert(transactions.counters).values(counter).on_conflict_do_nothing()
                )
            else:
                conn.execute(sqlite_insert(transactions.counters).values(counter).on_conflict_do_nothing())
            if self.files is not None:  # left by a process that stopped before removing them
                old, self._recent_files = self.files.stream_ids()
                transactions.remove_unused_files(conn, self.files, old)

    def subscribe(self, listener: Callable[[list[Change]], None]) -> None:
        """Call `listener` with the changes of every committed write."""
        self._listeners.append(listener)

    def _changed(self, changes: list[Change]) -> None:
        for change in changes:
            self._refresh_cached(change)
            if change.gone:
                self._small_chunks.pop(change.stream_id, None)
                self._remove_file_later(change.stream_id)
            if not change.gone and not change.closed and 0 < change.added_chunk < transactions.SMALL_CHUNK:
                # A stream forgotten here starts counting afresh: it is compacted a little later.
                count = (self._small_chunks.get(change.stream_id) or 0) + 1
                self._small_chunks.put(change.stream_id, count)
                if count >= COMPACT_AFTER:
                    self._small_chunks.put(change.stream_id, 0)
                    self._follow_up(self.compact(change.stream_id))
        for listener in self._listeners:
            listener(changes)

    def _after_close(self, stream_id: str, compress: bool, one_chunk: bool) -> None:
        self._small_chunks.pop(stream_id, None)
        if one_chunk and not compress:
            self._settled.put(stream_id, True)

    def _follow_up(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._followups.add(task)
        task.add_done_callback(self._follow_up_done)
        return task

    def _remove_file_later(self, stream_id: str) -> None:
        """Remove a stream's chunk file once no chunk refers to it and reads that may have begun are over."""
        if self.files is None or stream_id in self._removals or self._closing:
            return

        files = self.files

        async def remove() -> None:
            unused = functools.partial(transactions.remove_unused_files, files=files, stream_ids=[stream_id])
            if await self.writer.call(unused):  # an append arriving into it holds it: try again later
                self._remove_file_later(stream_id)

        def due() -> None:
            self._removals.pop(stream_id, None)
            self._follow_up(remove())

        self._removals[stream_id] = asyncio.get_running_loop().call_later(chunk_files.REMOVE_GRACE, due)

    def _follow_up_done(self, task: asyncio.Task[Any]) -> None:
        self._followups.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Compaction, compression and chunk-file removal only rearrange stored bytes: the content is
            # unaffected.
            log.error("background compaction, compression or file removal failed", exc_info=task.exception())

    async def resolve(self, name: str, fresh: bool = False) -> StreamState | None:
        """The stream named `name` for a write: cached, since the writer checks its state again anyway.

        A cached copy that looks expired or deleted is read again: a refusal is never taken from the cache.
        """
        cached = None if fresh else self._names.get(name)
        if cached is not None and not cached.expired() and not cached.deleted:
            return cached
        state = await self.get_by_name(name)
        if state is not None and not state.expired() and not state.deleted:
            was = self._names.pop(name)
            if was is not None:
                self._ids.pop(was.id, None)
            evicted = self._names.put(name, state)
            if evicted is not None:
                self._ids.pop(evicted[1].id, None)
            self._ids[state.id] = name
        elif name in self._names:
            was = self._names.pop(name)
            if was is not None:
                self._ids.pop(was.id, None)
        return state

    def _refresh_cached(self, change: Change) -> None:
        name = self._ids.get(change.stream_id)
        if name is None:
            return
        if change.gone:
            self._ids.pop(change.stream_id, None)
            self._names.pop(name, None)
            return
        cached = self._names.get(name)
        # Writers need only the stream's fixed facts and whether it closed; its tail may lag behind.
        if cached is not None and change.closed and not cached.closed:
            self._names.put(name, dataclasses.replace(cached, tail=change.tail, closed_at=time.time()))

    async def list(
        self,
        where: StreamFilter,
        *,
        sort: str = "created",
        direction: str = "desc",
        limit: int = 100,
        offset: int = 0,
    ) -> tuple[int, list[StreamState]]:
        """The total number of live streams matching `where`, and one page of them."""
        found = await self.listing(where, sort=sort, direction=direction, limit=limit, offset=offset)
        return found.total, found.streams

    async def listing(
        self,
        where: StreamFilter,
        *,
        sort: str = "created",
        direction: str = "desc",
        limit: int = 100,
        offset: int = 0,
        cursor: str | None = None,
    ) -> listing.Listing:
        """One page of the live streams matching `where`: after `offset` of them, or from `cursor` (a
        listing's next or previous cursor) and `offset` more; with their total and the pages' cursors."""
        start = listing.check(sort, direction, limit, offset, cursor)
        return await self._read(listing.page, self._read_engine, where, sort, direction, limit, offset, start)

    async def summary(self, where: StreamFilter | None = None) -> dict[str, Any]:
        """Totals (streams, open streams, bytes) and per-namespace counts for live streams in `where`'s
        namespaces (its other filters do not apply), from the namespace counters."""
        return await self._read(listing.summary, self._read_engine, where or StreamFilter())

    async def facets(self, where: StreamFilter) -> builtins.list[tuple[str, int]]:
        """How many live streams match `where` in each namespace."""
        return await self._read(listing.facets, self._read_engine, where)

    async def reset_counters(self) -> None:
        """Count the namespace counters afresh from the streams (after rows were written by hand)."""

        def recount(conn: Connection) -> tuple[None, builtins.list[Change]]:
            schema.recount(conn)
            return None, []

        await self.writer.call(recount)

    # --- writes ----------------------------------------------------------------------------------

    def append_nowait(
        self,
        stream_id: str,
        data: bytes,
        *,
        content_type: str | None = None,
        seq: str | None = None,
        producer: Producer | None = None,
        close: bool = False,
        compress: bool = False,
        spool: Spool | None = None,
    ) -> asyncio.Future[AppendResult]:
        """Queue an append now (so call order is commit order); the future resolves once it is committed.

        A spool holding `data` passes to the writer, which closes it. Refused while storage is short.
        """
        future: asyncio.Future[AppendResult] = self.writer.new_future()
        if data and self.space.short(len(data)):
            if spool is not None:
                spool.close()
            future.set_exception(self.space.refuse())
            return future
        op = AppendOp(stream_id, data, future, content_type, seq, producer, close, compress, spool)
        self.writer.submit(op)
        return future

    async def spool(self, stream_id: str, length: int) -> Spool | None:
        """A place at the end of the stream's file for a body of `length` bytes that is about to arrive.

        The body is then written to the file while it arrives and the commit only syncs it. None when the
        store keeps no files, or another writer holds the stream's file: the body then waits in memory.
        """
        if self.files is None or not self.files.can_spool() or self.space.short():
            return None
        try:
            claim = self.files.claim(stream_id)
        except OSError:  # such as a full disk, which the append itself then meets and reports
            log.warning("could not open %s for an append", self.files.path(stream_id), exc_info=True)
            return None
        if claim is None:
            return None
        try:
            # Read only once the claim is held: no writer can then put bytes past the tail this finds.
            state = await self.get(stream_id)
            if state is not None and state.closed_at is None and not state.deleted:
                claim.grow(state.tail, state.tail + length)
                return Spool(claim, state.tail, length)
        except OSError:
            log.warning("could not make room for an append in %s", self.files.path(stream_id), exc_info=True)
        except BaseException:
            claim.close()
            raise
        try:
            if claim.created:  # for a stream that cannot take the append: leave no file behind
                self.files.remove(stream_id)
        finally:
            claim.close()
        return None

    def join_close(self, stream_id: str, compress: bool) -> asyncio.Future[AppendResult] | None:
        """Make the last queued write to the stream close it too (one commit); its future, or None."""
        return self.writer.join_close(stream_id, compress)

    def write_nowait(self, stream_id: str, data: bytes) -> asyncio.Future[AppendResult]:
        """Queue a plain write, joined to the previous queued write to the same stream when it can be.

        Consecutive writes then commit as one append, in order; each future still resolves only once
        committed, with the joined append's result. Fit for the API's writes, which report no offsets;
        not for HTTP appends, which must report their own.
        """
        joined = None if self.space.short() else self.writer.join_last(stream_id, data)
        return joined or self.append_nowait(stream_id, data)

    async def append(self, stream_id: str, data: bytes, **options: Any) -> AppendResult:
        """Append (and optionally close); returns after the commit. Closing coalesces chunks afterwards."""
        result = await self.append_nowait(stream_id, data, **options)
        if options.get("close") and not result.duplicate:
            self._follow_up(self.finish(stream_id))
        return result

    async def finish(self, stream_id: str) -> None:
        """Coalesce a closed stream's chunks and compress it if that was asked for.

        Short of space, the stream stays as it is: closed and readable; the sweep compresses it later.
        """
        if self._settled.pop(stream_id) and (self.files is None or not self.files.path(stream_id).exists()):
            return
        try:
            await self.compact(stream_id, full=True)
        except StorageFullError:
            log.warning("no space to coalesce the chunks of closed stream %s", stream_id)
        state = await self._trim(stream_id)
        if state is None or not state.compress or state.compressed or self.space.short():
            return
        running = self._compressing.get(stream_id)
        if running is None:  # one compression of a stream at a time; a second finish waits for it
            running = self._compressing[stream_id] = asyncio.ensure_future(self._compress(state))
            running.add_done_callback(lambda done: self._compression_done(stream_id, done))
        try:
            await asyncio.shield(running)
        except StorageFullError:
            log.warning("no space to compress closed stream %s; the sweep tries again", stream_id)

    async def _trim(self, stream_id: str) -> StreamState | None:
        """Give back the file space past a closed stream's tail; returns the stream as found.

        A body spooled into the file while the close committed holds the file, and may write past the tail
        until it lets go: the trim then waits for that, and tries again.
        """
        state = await self.get(stream_id)
        files = self.files
        if state is None or not state.closed or files is None:
            return state
        if not await self._read(files.trim_unheld, stream_id, state.tail):

            def retry() -> None:
                if not self._closing:
                    self._follow_up(self._trim(stream_id))

            asyncio.get_running_loop().call_later(TRIM_RETRY_S, retry)
        return state

    def _compression_done(self, stream_id: str, done: asyncio.Future[None]) -> None:
        self._compressing.pop(stream_id, None)
        if not done.cancelled():
            done.exception()  # marked as seen: the finish() calls awaiting it have raised it already

    async def _compress(self, state: StreamState) -> None:
        """Gzip a closed stream without holding up other writes.

        The content is read and deflated outside any write transaction (deflate on a worker thread), its
        pieces are stored in small transactions of their own, and one short transaction swaps them in.
        """
        postgres, slot = self.postgres, self.counter_slot
        deflater = zlib.compressobj(6, zlib.DEFLATED, 31)
        staged: list[transactions.GzipPiece] = []
        seq = stored = position = piece_start = staged_from = 0
        buffer = bytearray()

        async def cut(plain_start: int, final: bool) -> bool:
            nonlocal seq, stored, buffer, staged_from
            # A full flush makes the next piece inflatable on its own: a seek point.
            buffer += deflater.flush() if final else deflater.flush(zlib.Z_FULL_FLUSH)
            staged.append(transactions.GzipPiece(seq, bytes(buffer), plain_start))
            seq, stored, buffer = seq + 1, stored + len(buffer), bytearray()
            if final or stored - staged_from >= CHUNK_TARGET:
                if not await self._stage(state.id, staged):
                    return False
                staged.clear()
                staged_from = stored
            return True

        try:
            async for piece in self.iter_content(state):
                view = memoryview(piece)
                while view:
                    part = view[: transactions.SEEK_STEP - (position - piece_start)]
                    buffer += await asyncio.to_thread(deflater.compress, part)
                    view, position = view[len(part) :], position + len(part)
                    if position - piece_start == transactions.SEEK_STEP:
                        if not await cut(piece_start, final=False):
                            return
                        piece_start = position
        except StreamNotFoundError:  # deleted meanwhile: nothing left to compress
            return
        if not await cut(piece_start, final=True):
            return
        swapped = await self.writer.call(
            lambda conn: transactions.swap_in_gzip(conn, state.id, seq, stored, postgres, slot)
        )
        if swapped:
            self._remove_file_later(state.id)

    async def _stage(self, stream_id: str, pieces: builtins.list[transactions.GzipPiece]) -> bool:
        postgres = self.postgres
        batch = builtins.list(pieces)
        staged: bool = await self.writer.call(
            lambda conn: transactions.stage_gzip(conn, stream_id, batch, postgres)
        )
        return staged

    async def create(self, new: NewStream) -> tuple[StreamState, bool]:
        """Create a stream; returns (state, created). The same name with the same settings is no error."""
        if self.space.short():
            raise self.space.refuse()
        # Concurrent creates share a commit (each in a savepoint of its own), as concurrent appends do.
        postgres, files, slot = self.postgres, self.files, self.counter_slot
        return await self.writer.call(
            lambda conn: transactions.create(conn, new, postgres, files, slot),
            group=True,
            key=new.name or "",
            new=new if new.fork_from is None else None,
        )

    async def delete(self, stream_id: str) -> None:
        """Delete a stream and reclaim its storage (soft-delete while forks of it remain)."""
        postgres, slot = self.postgres, self.counter_slot
        delete = self.space.freeing(lambda conn: transactions.delete(conn, stream_id, postgres, slot))
        await self.writer.call(delete)
        self.space.recheck()

    async def request_stop(self, stream_id: str) -> StreamState:
        """Ask a stream's writer to stop, on every process; a closed stream is returned as it is."""
        return await self.writer.call(lambda conn: transactions.request_stop(conn, stream_id, self.postgres))

    async def delete_matching(self, where: StreamFilter) -> int:
        """Delete every live stream matching `where`; returns how many."""
        deleted = 0
        while True:
            _, page = await self.list(where, limit=500)
            if not page:
                self.space.recheck()
                return deleted
            ids = [state.id for state in page]
            deleted += await self.writer.call(
                self.space.freeing(
                    functools.partial(
                        transactions.delete_many,
                        stream_ids=ids,
                        postgres=self.postgres,
                        slot=self.counter_slot,
                    )
                )
            )
            if any(s.deleted for s in page):
                return deleted

    async def touch(self, state: StreamState) -> None:
        """Slide a sliding TTL forward on a read; writes at most once per tenth of the TTL."""
        ttl, expires_at = state.ttl_seconds, state.expires_at
        if not state.sliding or not ttl or expires_at is None:
            return
        now = clock.now()
        if now + ttl - expires_at < ttl / 10:
            return

        def slide(conn: Connection) -> tuple[None, list[Change]]:
            conn.execute(
                update(streams)
                .where(streams.c.id == state.id, streams.c.expires_at > now)
                .values(expires_at=now + ttl)
            )
            return None, []

        await self.writer.call(slide)

    def _holds_sweep_lock(self) -> bool:
        """Whether this process redoes stale compressions: on SQLite, the one holding the sweep lock file.

        PostgreSQL's sweep takes an advisory lock; SQLite processes share a lock file beside the database.
        """
        if self.files is None or self._sweep_lock >= 0:
            return True
        self._sweep_lock = chunk_files.try_lock(f"{self._write_engine.url.database}-sweep")
        return self._sweep_lock >= 0

    async def compact(self, stream_id: str, full: bool = False) -> None:
        """Merge small chunks into larger ones so that reads need few rows; the content is unchanged."""
        if self.space.short():  # it writes a copy before it frees the original: not out of the reserve
            return

        def merge(conn: Connection) -> tuple[None, list[Change]]:
            transactions.compact(conn, stream_id, full, self.postgres)
            return None, []

        # Grouped: every close compacts, and closes come as many at once as creates do.
        await self.writer.call(merge, group=True)

    async def sweep(self) -> int:
        """Delete expired streams and collect deleted sources with no forks left; returns how many.

        Closed streams whose compression never finished are handed to `finish` again, in the background.
        """
        postgres, slot = self.postgres, self.counter_slot
        swept = 0
        # In transactions of a bounded size, so that other writes go on between them.
        for _ in range(SWEEP_ROUNDS):
            found, unfinished, more = await self.writer.call(
                self.space.freeing(lambda conn: transactions.sweep(conn, postgres, slot))
            )
            swept += found
            if not more:
                break
        await self.writer.call(lambda conn: (counts.fold(conn, postgres), []))
        if unfinished and not self._holds_sweep_lock():
            unfinished = []
        for stream_id in unfinished:
            self._follow_up(self.finish(stream_id))
        return swept
