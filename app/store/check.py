"""The integrity check of an embedded (SQLite) store: every row's bytes where it says, nothing left over.

Read-only (one read snapshot of the database, files opened for reading), so it may run beside a serving
process. It checks that each stream's chunks cover its content without gap or overlap up to its pending
bytes and tail, that the bytes of chunks kept in files are there and readable, that a compressed stream's
gzip pieces inflate, in order, to its length (with flush points where they say), and it lists stray chunk
files, which no row refers to. Repair removes strays only, each under the lock writers take on it.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import time
import zlib
from collections.abc import Iterable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from .backup import open_chunk_files
from .chunk_files import REMOVE_GRACE, SUFFIX, ChunkFiles

READ_SIZE = 1024 * 1024
INFLATE_SLICE = 256 * 1024
STREAMS = "SELECT id, tail, length(pending), compressed, fork_source, fork_offset FROM streams"
CHUNKS = "SELECT stream_id, start, length(data), file_bytes FROM chunks ORDER BY stream_id, start"
GZIP = "SELECT stream_id, seq, data, plain_start FROM gzip_chunks ORDER BY stream_id, seq"
USES_FILE = "SELECT 1 FROM chunks WHERE stream_id = ? AND file_bytes > 0 LIMIT 1"


@dataclass(frozen=True)
class Stream:
    id: str
    tail: int
    pending: int
    compressed: bool
    fork_offset: int | None


@dataclass
class Report:
    """What a check found: one line per problem, the stray files, and what a repair removed."""

    streams: int = 0
    chunk_files: int = 0
    problems: list[str] = field(default_factory=list)
    strays: list[Path] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and len(self.removed) == len(self.strays)


def check(database: Path, repair: bool = False) -> Report:
    """Check the store whose database is `database`; with `repair`, remove its stray chunk files."""
    report = Report()
    if not database.is_file():
        report.problems.append(f"{database}: no database here (point --data-dir at the data directory)")
        return report
    chunks_dir = Path(str(database) + "-chunks")
    # Opened before the snapshot, as a backup does: a stream deleted meanwhile keeps its bytes for the check.
    opened = open_chunk_files(chunks_dir)
    try:
        _check_database(database, chunks_dir, opened, repair, report)
    finally:
        for fd in opened.values():
            os.close(fd)
    return report


def _check_database(
    database: Path, chunks_dir: Path, opened: dict[str, int], repair: bool, report: Report
) -> None:
    uri = database.resolve().as_uri() + "?mode=ro"
    with closing(sqlite3.connect(uri, uri=True, timeout=30, isolation_level=None)) as conn:
        found = [row[0] for row in conn.execute("PRAGMA quick_check")]
        if found != ["ok"]:
            report.problems += [f"{database}: {line}" for line in found[:20]]
        conn.execute("BEGIN")  # one snapshot for every query below
        streams = {
            row[0]: Stream(row[0], int(row[1]), int(row[2] or 0), bool(row[3]), _fork_offset(row[4], row[5]))
            for row in conn.execute(STREAMS)
        }
        report.streams = len(streams)
        in_files = _check_chunks(conn, streams, chunks_dir, opened, report)
        _check_gzip(conn, streams, report)
        conn.execute("COMMIT")
        unused_at = time.monotonic()  # every file the snapshot did not refer to was unused by now
        _find_strays(conn, chunks_dir, in_files, repair, report, unused_at)


def _fork_offset(source: str | None, offset: int | None) -> int | None:
    return int(offset) if source is not None and offset else None


def _check_chunks(
    conn: sqlite3.Connection,
    streams: dict[str, Stream],
    chunks_dir: Path,
    opened: dict[str, int],
    report: Report,
) -> set[str]:
    """Check every stream's chunk rows; returns the streams that keep bytes in a chunk file."""
    in_files: set[str] = set()
    seen: set[str] = set()
    problems = report.problems
    for stream_id, rows in itertools.groupby(conn.execute(CHUNKS), key=lambda row: str(row[0])):
        seen.add(stream_id)
        stream = streams.get(stream_id)
        if stream is None:
            problems.append(f"stream {stream_id}: chunk rows of a stream that has no stream row")
            continue
        if stream.compressed:
            problems.append(f"stream {stream_id}: compressed, yet plain chunk rows are left beside its gzip")
            continue
        end: int | None = None
        ranges: list[tuple[int, int]] = []
        for _, start, data_length, file_bytes in rows:
            if data_length and file_bytes:
                problems.append(f"stream {stream_id}: chunk at {start} has bytes in the database and a file")
            if end is None:
                if start not in (0, stream.fork_offset):
                    problems.append(f"stream {stream_id}: first chunk starts at {start}, not at its start")
            elif start != end:
                kind = "a gap" if start > end else "an overlap"
                problems.append(f"stream {stream_id}: {kind} between bytes {end} and {start}")
            if file_bytes:
                ranges.append((start, start + file_bytes))
            end = start + (file_bytes or data_length)
        if end is not None and end != stream.tail - stream.pending:
            problems.append(
                f"stream {stream_id}: chunks end at byte {end}, but its tail is {stream.tail} "
                f"with {stream.pending} bytes pending"
            )
        if ranges:
            in_files.add(stream_id)
            _check_file(chunks_dir / (stream_id + SUFFIX), stream_id, ranges, opened.get(stream_id), report)
    for stream in streams.values():
        base = stream.fork_offset or 0
        if stream.id not in seen and not stream.compressed and stream.tail - stream.pending not in (0, base):
            problems.append(
                f"stream {stream.id}: no chunks, yet its tail is {stream.tail}, {stream.pending} pending"
            )
    return in_files


def _check_file(
    path: Path, stream_id: str, ranges: Iterable[tuple[int, int]], fd: int | None, report: Report
) -> None:
    """Read every byte range of a chunk file that rows refer to (bounded reads); one line if one fails."""
    report.chunk_files += 1
    own = fd is None
    try:
        fd = os.open(path, os.O_RDONLY) if fd is None else fd
    except FileNotFoundError:
        report.problems.append(f"stream {stream_id}: chunk file {path} is missing")
        return
    try:
        size = os.fstat(fd).st_size
        for lo, hi in ranges:
            if size < hi:
                report.problems.append(
                    f"stream {stream_id}: chunk file {path} is {size} bytes long, but a chunk needs "
                    f"bytes {lo} to {hi}"
                )
                return
            at = lo
            while at < hi:
                data = os.pread(fd, min(READ_SIZE, hi - at), at)
                if not data:
                    report.problems.append(f"stream {stream_id}: chunk file {path} ends at byte {at}")
                    return
                at += len(data)
    except OSError as exc:
        report.problems.append(f"stream {stream_id}: chunk file {path} cannot be read: {exc.strerror}")
    finally:
        if own:
            os.close(fd)


def _check_gzip(conn: sqlite3.Connection, streams: dict[str, Stream], report: Report) -> None:
    """Inflate every compressed stream's gzip body, bounded, and compare it with the stream's length."""
    bodies: set[str] = set()
    for stream_id, rows in itertools.groupby(conn.execute(GZIP), key=lambda row: str(row[0])):
        stream = streams.get(stream_id)
        if stream is None or not stream.compressed:
            continue  # pieces of a compression under way, or left by one: readers ignore them
        bodies.add(stream_id)
        problem = _inflate(stream, ((int(seq), bytes(data), start) for _, seq, data, start in rows))
        if problem:
            report.problems.append(f"stream {stream_id}: {problem}")
    for stream in streams.values():
        if stream.compressed and stream.id not in bodies:
            report.problems.append(f"stream {stream.id}: compressed, but it has no gzip body")


def _inflate(stream: Stream, pieces: Iterable[tuple[int, bytes, int | None]]) -> str | None:
    inflater = zlib.decompressobj(31)
    plain = 0
    expected_seq = 0
    for seq, data, plain_start in pieces:
        if seq != expected_seq:
            return f"gzip piece {expected_seq} is missing"
        expected_seq += 1
        if plain_start is not None and plain_start != plain:
            return f"gzip piece {seq} says it begins at byte {plain_start}, but it begins at {plain}"
        if inflater.eof:
            return f"gzip piece {seq} lies past the end of the gzip body"
        try:
            while data:
                out = inflater.decompress(data, INFLATE_SLICE)
                plain += len(out)
                data = inflater.unconsumed_tail
            while not inflater.eof and (out := inflater.decompress(b"", INFLATE_SLICE)):
                plain += len(out)
        except zlib.error as exc:
            return f"gzip piece {seq} does not inflate ({exc})"
        if plain > stream.tail:
            return f"gzip body inflates past the stream's length {stream.tail}"
    if not inflater.eof:
        return "gzip body ends before its end (a piece is missing or cut short)"
    if plain != stream.tail:
        return f"gzip body inflates to {plain} bytes, but the stream holds {stream.tail}"
    return None


def _find_strays(
    conn: sqlite3.Connection,
    chunks_dir: Path,
    in_files: set[str],
    repair: bool,
    report: Report,
    unused_at: float,
) -> None:
    """Chunk files no row refers to; a file written in the last moments may be an append not yet committed."""
    if not chunks_dir.is_dir():
        return
    settled = time.time() - REMOVE_GRACE
    strays = sorted(
        Path(entry.path)
        for entry in os.scandir(chunks_dir)
        if entry.name.endswith(SUFFIX)
        and entry.name[: -len(SUFFIX)] not in in_files
        and entry.stat().st_mtime < settled
    )
    report.strays = strays
    if not strays or not repair:
        return
    # A file's age says when it was written, not when its stream stopped referring to it (a compress or
    # delete a moment ago): wait the grace from when it was seen unused, as the server does, so that a read
    # that found its row just before is over.
    time.sleep(max(0.0, unused_at + REMOVE_GRACE - time.monotonic()))
    files = ChunkFiles(chunks_dir)
    for path in strays:
        stream_id = path.name[: -len(SUFFIX)]
        try:
            claim = files.claim(stream_id, create=False)
        except FileNotFoundError:  # removed meanwhile
            report.removed.append(path)
            continue
        except ValueError:  # not named as a stream's file: left for a person to look at
            continue
        if claim is None:  # a writer holds it: an append is on its way into it
            continue
        try:
            # Asked again under the writers' lock: a commit that refers to the file is seen now.
            if conn.execute(USES_FILE, (stream_id,)).fetchone() is None:
                files.remove(stream_id)
                report.removed.append(path)
        finally:
            claim.close()
