"""The read path: bytes [start, end) of a stream from its chunks, its gzip body or its fork's sources.

`Reader` runs reads for the store on a small thread pool (or inline, where SQLite answers from its cache)
over one driver connection per thread; the functions below it read inside a caller's connection, so that
a write transaction (a fork's creation) can read too.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, func, select, text

from ..errors import StreamNotFoundError
from ..models import StreamState, offset_belongs
from .chunk_files import ChunkFiles
from .schema import CHUNK_TARGET, gzip_chunks, streams
from .statements import CHUNK_RANGE, STREAM_STATE, DriverConnections, Prepared, Statements, state_from_tuple

READ_SLICE = 4 * 1024 * 1024
# A read of a gzip body fetches its pieces this many at most, and no more bytes than this unless one piece is.
GZIP_BATCH_ROWS = 64
GZIP_BATCH_BYTES = 256 * 1024
SHORT_READS = 3  # a read that comes back short looks at the stream again this many times
# Inflating yields at most this much at once, whatever the compression ratio.
INFLATE_SLICE = 64 * 1024
GZIP_ROWS_AT_ONCE = 4  # gzip pieces fetched at a time by a read inside a transaction

T = TypeVar("T")


class Reader:
    """The store's reads: never a write, never a byte past the committed tail."""

    def __init__(self, engine: Engine, postgres: bool, files: ChunkFiles | None) -> None:
        self.postgres = postgres
        self.files = files
        self._read_engine = engine
        self._readers = ThreadPoolExecutor(8, thread_name_prefix="streamhold-read")
        self.statements = Statements(engine, postgres)
        self._driver = DriverConnections(engine, postgres)
        self._inline_reads = not postgres

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._readers, fn, *args)

    async def ping(self) -> None:
        """Raise if the database does not answer."""
        await self._read(self._ping_sync)

    def _ping_sync(self) -> None:
        with self._read_engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    async def _hot_read(self, fn: Callable[..., T], *args: Any) -> T:
        # SQLite answers these single-statement reads from its cache in microseconds and WAL readers never
        # wait for the writer, so a thread hop would cost more than the query; PostgreSQL goes over a socket.
        if self._inline_reads:
            return fn(*args)
        return await self._read(fn, *args)

    async def get(self, stream_id: str) -> StreamState | None:
        """The stream with this id, expired or not, or None."""
        return await self._hot_read(self._get_sync, self.statements.stream_by_id, {"id": stream_id})

    async def get_by_name(self, name: str) -> StreamState | None:
        """The stream with this protocol name, expired or not, or None."""
        return await self._hot_read(self._get_sync, self.statements.stream_by_name, {"name": name})

    def _get_sync(self, statement: Prepared, values: dict[str, Any]) -> StreamState | None:
        row = self._driver_query(statement, values, one=True)
        return state_from_tuple(row) if row is not None else None

    def _driver_query(self, statement: Prepared, values: dict[str, Any], one: bool = False) -> Any:
        """Run a hot read on this thread's driver connection, reconnecting once if it broke."""
        for attempt in (1, 2):
            conn = self._driver.get()
            try:
                cursor = conn.execute(statement.sql, statement.args(values))
                return cursor.fetchone() if one else cursor.fetchall()
            except Exception:
                self._driver.discard()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def read(self, stream_id: str, start: int, end: int) -> bytes:
        """The uncompressed bytes [start, end) of a stream; `end` must not pass its committed tail.

        All of them, or StreamNotFoundError if the stream was deleted meanwhile: never fewer.
        """
        if end <= start:
            return b""
        data = await self._hot_read(self._read_sync, stream_id, start, end)
        if data is None:  # inflating a compressed source may take a while: not on the event loop
            data = await self._read(self._read_forked, stream_id, start, end)
        if len(data) == end - start:
            return data
        # Short: the stream was compressed (its chunks replaced) or deleted since the caller read its state.
        state = await self._still_there(stream_id)
        return b"".join([piece async for piece in self.iter_content(state, start, end)])

    async def offset_belongs(self, state: StreamState, generation: int, position: int) -> bool:
        """Whether an offset of `generation` may be read from `position` in this stream (see models)."""
        if generation == state.generation:
            return True

        def by_id(stream_id: str) -> StreamState | None:
            return self._get_sync(self.statements.stream_by_id, {"id": stream_id})

        return await self._read(offset_belongs, state, generation, position, by_id)

    async def _still_there(self, stream_id: str) -> StreamState:
        """The stream's state now, for a read that came back short; raises if it was deleted."""
        state = await self.get(stream_id)
        if state is None or state.deleted:
            raise StreamNotFoundError("the stream was deleted while it was being read")
        return state

    def _read_sync(self, stream_id: str, start: int, end: int) -> bytes | None:
        rows = self._driver_query(self.statements.chunk_range, {"id": stream_id, "lo": start, "hi": end})
        if not rows or rows[0][0] > start:  # no chunk of its own holds `start`: it may be in a fork's source
            return None
        return slice_rows(rows, stream_id, start, end, self.files)

    def _read_forked(self, stream_id: str, start: int, end: int) -> bytes:
        """Read [start, end) of a stream and of the sources it forked from, in one snapshot."""
        with self._read_engine.connect() as conn:
            if self.postgres:  # so that a source compressed or deleted meanwhile is seen whole or not at all
                conn = conn.execution_options(isolation_level="REPEATABLE READ")
            row = conn.execute(select(*STREAM_STATE).where(streams.c.id == stream_id)).first()
            if row is None:
                return b""
            return b"".join(iter_range(conn, StreamState.from_row(row), start, end, self.files))

    async def iter_content(
        self, state: StreamState, start: int = 0, end: int | None = None, slice_size: int = READ_SLICE
    ) -> AsyncIterator[bytes]:
        """The uncompressed content [start, end) in slices, whether it is stored compressed or not.

        All of it, even if the stream is compressed meanwhile; StreamNotFoundError if it is deleted.
        """
        end = state.tail if end is None else min(end, state.tail)
        position = start
        for _ in range(SHORT_READS):
            parts = [(state, position, end)]
            if state.fork_source is not None and not state.compressed and position < (state.fork_offset or 0):
                # Read each source's part in one pass: a compressed one is then inflated once, not per slice.
                parts = await self._read(self._fork_parts, state, position, end)
            for owner, _, hi in parts:
                if owner.compressed:
                    async for piece in self._iter_decompressed(owner.id, position, hi):
                        position += len(piece)
                        yield piece
                while position < hi and not owner.compressed:
                    want = min(hi, position + slice_size)
                    got = await self._hot_read(self._read_sync, owner.id, position, want)
                    if got is None or len(got) < want - position:
                        break
                    position = want
                    yield got
                if position < hi:
                    break
            if position >= end:
                return
            state = await self._still_there(state.id)
        raise StreamNotFoundError("the stream kept changing while it was being read; read it again")

    def _fork_parts(self, state: StreamState, start: int, end: int) -> list[tuple[StreamState, int, int]]:
        with self._read_engine.connect() as conn:
            return fork_parts(conn, state, start, end)

    async def iter_gzip(self, stream_id: str, seq: int = 0) -> AsyncIterator[bytes]:
        """The stored gzip body of a compressed stream, from its piece `seq` on."""
        while True:
            rows = await self._read(self._gzip_rows, stream_id, seq)
            if not rows:
                return
            for _, data in rows:
                yield data
            seq = rows[-1][0]
            seq += 1

    def _gzip_rows(self, stream_id: str, seq: int) -> list[tuple[int, bytes]]:
        """The next pieces from `seq`: as many as fit in GZIP_BATCH_BYTES, at least one."""
        after = gzip_chunks.c.stream_id == stream_id, gzip_chunks.c.seq >= seq
        with self._read_engine.connect() as conn:
            sizes = conn.execute(
                select(gzip_chunks.c.seq, func.length(gzip_chunks.c.data))
                .where(*after)
                .order_by(gzip_chunks.c.seq)
                .limit(GZIP_BATCH_ROWS)
            ).all()
            if not sizes:
                return []
            last, total = sizes[0][0], 0
            for row_seq, size in sizes:
                if total and total + size > GZIP_BATCH_BYTES:
                    break
                last, total = row_seq, total + size
            query = select(gzip_chunks.c.seq, gzip_chunks.c.data).where(*after, gzip_chunks.c.seq <= last)
            return [(r.seq, bytes(r.data)) for r in conn.execute(query.order_by(gzip_chunks.c.seq))]

    def _seek_point(self, stream_id: str, start: int) -> tuple[int, int]:
        with self._read_engine.connect() as conn:
            return seek_point(conn, stream_id, start)

    async def _iter_decompressed(self, stream_id: str, start: int, end: int) -> AsyncIterator[bytes]:
        seq, position = await self._read(self._seek_point, stream_id, start)
        wanted = RangeInflater(start, end, position, raw=seq > 0)
        async for packed in self.iter_gzip(stream_id, seq):
            for piece in wanted.feed(packed):
                if piece:
                    yield piece
                # Each slice costs a fraction of a millisecond; other requests run between them.
                await asyncio.sleep(0)
            if wanted.done:
                return


def read_range(conn: Connection, stream_id: str, start: int, end: int, files: ChunkFiles | None) -> bytes:
    rows = conn.execute(CHUNK_RANGE, {"id": stream_id, "lo": start, "hi": end})
    return slice_rows(rows, stream_id, start, end, files)


def slice_rows(rows: Any, stream_id: str, start: int, end: int, files: ChunkFiles | None) -> bytes:
    """The bytes [start, end) out of the (start, data, file bytes) rows of CHUNK_RANGE that cover them."""
    pieces: list[bytes | memoryview] = []
    run_lo = run_hi = -1  # consecutive bytes in the chunk file, read at once
    for row_start, data, file_bytes in rows:
        lo, hi = max(start, row_start), min(end, row_start + (file_bytes or len(data)))
        if file_bytes and lo == run_hi:
            run_hi = hi
            continue
        if run_hi > run_lo:
            pieces.append(_read_file(files, stream_id, run_lo, run_hi))
            run_lo = run_hi = -1
        if file_bytes:
            run_lo, run_hi = lo, hi
        else:
            pieces.append(memoryview(data)[lo - row_start : hi - row_start])
    if run_hi > run_lo:
        pieces.append(_read_file(files, stream_id, run_lo, run_hi))
    if len(pieces) == 1 and isinstance(pieces[0], bytes):
        return pieces[0]
    return b"".join(pieces)


def _read_file(files: ChunkFiles | None, stream_id: str, lo: int, hi: int) -> bytes:
    if files is None:
        raise OSError(f"stream {stream_id} has chunks in files, but this store keeps no chunk files")
    return files.read(stream_id, lo, hi - lo)


class RangeInflater:
    """The bytes [start, end) of a compressed stream's content, inflated a bounded slice at a time.

    It begins at the gzip body's start, or at a seek point: a piece starting after a full flush, whose
    deflate data stands alone (raw, no header), `position` plain bytes into the content.
    """

    def __init__(self, start: int, end: int, position: int = 0, raw: bool = False) -> None:
        self._inflater = zlib.decompressobj(-15 if raw else 31)
        self._start = start
        self._end = end
        self._position = position

    @property
    def done(self) -> bool:
        return self._position >= self._end or self._inflater.eof

    def feed(self, packed: bytes) -> Iterator[bytes]:
        """The wanted parts of what the next piece inflates to, each at most INFLATE_SLICE; some empty.

        Every slice is yielded, wanted or not, so that a caller can let others run between slices.
        """
        data = packed
        while not self.done:
            out = self._inflater.decompress(data, INFLATE_SLICE)
            data = self._inflater.unconsumed_tail
            if not out and not data:
                return
            yield self._wanted(out)

    def _wanted(self, data: bytes) -> bytes:
        lo, hi = max(self._start - self._position, 0), min(self._end - self._position, len(data))
        self._position += len(data)
        return data[lo:hi] if lo < hi else b""


def seek_point(conn: Connection, stream_id: str, start: int) -> tuple[int, int]:
    """The (seq, plain offset) of the last gzip piece at which inflating can begin, at or before `start`."""
    row = conn.execute(
        select(gzip_chunks.c.seq, gzip_chunks.c.plain_start)
        .where(
            gzip_chunks.c.stream_id == stream_id,
            gzip_chunks.c.plain_start.is_not(None),
            gzip_chunks.c.plain_start <= start,
        )
        .order_by(gzip_chunks.c.seq.desc())
        .limit(1)
    ).first()
    return (row.seq, row.plain_start) if row is not None else (0, 0)


def iter_range(
    conn: Connection, state: StreamState, start: int, end: int, files: ChunkFiles | None
) -> Iterator[bytes]:
    """Read [start, end) of a stream inside the caller's transaction, in slices.

    A fork's bytes below its fork offset are its source's, up a chain of forks; it ends short if it cannot
    read them.
    """
    for owner, lo, hi in fork_parts(conn, state, start, end):
        position = lo
        for piece in _iter_own(conn, owner, lo, hi, files):
            position += len(piece)
            yield piece
        if position < hi:
            return


def fork_parts(
    conn: Connection, state: StreamState, start: int, end: int
) -> list[tuple[StreamState, int, int]]:
    """Which stream of a fork chain holds which part of [start, end), in order."""
    parts: list[tuple[StreamState, int, int]] = []
    # A compressed fork's gzip body holds all of its content, from offset 0.
    while state.fork_source is not None and not state.compressed and start < (state.fork_offset or 0):
        if end > (state.fork_offset or 0):
            parts.append((state, state.fork_offset or 0, end))
            end = state.fork_offset or 0
        row = conn.execute(select(*STREAM_STATE).where(streams.c.id == state.fork_source)).first()
        if row is None:  # gone: a fork made when forks copied their prefix still has its own copy
            break
        state = StreamState.from_row(row)
    parts.append((state, start, end))
    return parts[::-1]


def _iter_own(
    conn: Connection, state: StreamState, start: int, end: int, files: ChunkFiles | None
) -> Iterator[bytes]:
    if state.compressed:
        seq, position = seek_point(conn, state.id, start)
        wanted = RangeInflater(start, end, position, raw=seq > 0)
        # A few pieces at a time: a client-side cursor would fetch the whole gzip body past `seq` at once.
        rows = conn.execute(
            select(gzip_chunks.c.data)
            .where(gzip_chunks.c.stream_id == state.id, gzip_chunks.c.seq >= seq)
            .order_by(gzip_chunks.c.seq)
            .execution_options(yield_per=GZIP_ROWS_AT_ONCE)
        )
        with rows:
            for (packed,) in rows:
                for piece in wanted.feed(packed):
                    if piece:
                        yield piece
                if wanted.done:
                    return
        return
    position = start
    while position < end:
        piece = read_range(conn, state.id, position, min(end, position + CHUNK_TARGET), files)
        if not piece:
            return
        position += len(piece)
        yield piece
