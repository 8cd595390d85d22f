"""Large chunks of an embedded (SQLite) store, held in one sparse file per stream beside the database.

A 1 MiB append written into SQLite goes through the WAL page by page and is copied again by the
checkpoint; written to a file it costs one write and one sync, about a third of the time, measured. The
chunk's row stays in the database with the bytes' length, and is committed only after the file is synced,
so a committed row always finds its bytes. A stream's bytes sit at their own offsets in its file, so a
chunk needs no file position of its own, and bytes written by a batch that then failed are overwritten by
the next append at that offset, never read.

A writer holds a lock on the file from its write until its COMMIT, so that an append whose body is being
written into the file as it arrives (a `Spool`) never overwrites bytes another writer is committing.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
import time
from collections.abc import Iterable
from pathlib import Path

# Appends at least this large go to a file; smaller ones stay in the database, where compaction merges them.
FILE_CHUNK_MIN = 64 * 1024
# A file no chunk refers to any more is removed only after this many seconds, so that a read that found its
# chunk row just before the stream was deleted or compressed still finds the bytes.
REMOVE_GRACE = 10.0
# Files grow ahead of their writes by their size again, up to this much: syncing a write into blocks
# allocated earlier took 0.7 to 0.9 ms a MiB, measured, against up to 4.5 ms for a write that extends a file.
MAX_GROWTH = 16 * 1024 * 1024
SUFFIX = ".chunks"
# Past this many file names synced, a process forgets them and syncs the directory again for each.
MAX_NAMED = 100_000
# A spool starts the disk writing each time this much of a body has arrived, so that little is left to sync.
WRITEBACK_STEP = 256 * 1024

# Linux's open file description locks: held by one open file, not by the process, so a process's reads,
# which open and close the file, never drop them, and two stores in one process exclude each other too.
_OFD_SETLK: int | None = getattr(fcntl, "F_OFD_SETLK", None)
_WHOLE_FILE = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
_libc = ctypes.CDLL(None, use_errno=True) if _OFD_SETLK is not None else None
_sync_file_range = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
SYNC_FILE_RANGE_WRITE = 2


def make_directory(path: Path) -> None:
    """Create `path` and its missing parents, each name synced into its parent so that a crash keeps it."""
    missing: list[Path] = []
    at = path
    while not at.is_dir() and at.parent != at:
        missing.append(at)
        at = at.parent
    for directory in reversed(missing):
        directory.mkdir(exist_ok=True)  # another process may make it too; syncing it again is harmless
        sync_path(directory.parent)


def sync_path(path: Path) -> None:
    """Sync a file; or a directory, so the names in it are durable (apart from the data of its files)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def try_lock(path: str) -> int:
    """The descriptor of an exclusive lock on the file at `path` (made if need be), or -1 if another holds it.

    The lock lasts until the descriptor is closed, or the process ends.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # another process holds it, until it stops
        os.close(fd)
        return -1
    return fd


class Claim:
    """A stream's chunk file, open and locked against other writers until closed."""

    def __init__(self, stream_id: str, fd: int, created: bool) -> None:
        self.stream_id = stream_id
        self.fd = fd
        self.created = created  # this claim made the file

    def grow(self, offset: int, end: int) -> None:
        """Allocate blocks for bytes [offset, end) and beyond, ahead of the writes that will fill them.

        Not below `offset`: a stream's first bytes may be in the database, and the file keeps a hole there.
        """
        size = os.fstat(self.fd).st_size
        if end > size:
            start = max(size, offset)
            os.posix_fallocate(self.fd, start, end + min(end, MAX_GROWTH) - start)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, offset)
            view, offset = view[written:], offset + written

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


class Spool:
    """An append's body, written into its stream's file at the stream's tail as it arrives.

    The claim keeps every other writer out of the file until the append commits, and the tail was read
    after the claim was taken, so the body overwrites nothing committed. If the append does not commit at
    that tail after all, the writer writes it again where it goes; the spooled bytes lie beyond the tail.
    """

    def __init__(self, claim: Claim, offset: int, length: int) -> None:
        self.claim = claim
        self.offset = offset
        self.length = length
        self.written = 0
        self.broken = False
        self.released = False
        self._flushed = 0

    def add(self, piece: bytes) -> None:
        """Write the next piece of the body, and start the disk on what has come so far."""
        if self.broken or self.written + len(piece) > self.length:
            self.broken = True
            return
        try:
            self.claim.write(self.offset + self.written, piece)
        except OSError:
            self.broken = True  # the writer writes the whole body again, and reports what that finds
            return
        self.written += len(piece)
        unflushed = self.written - self._flushed
        if _sync_file_range is not None and unflushed >= WRITEBACK_STEP:
            _sync_file_range(self.claim.fd, self.offset + self._flushed, unflushed, SYNC_FILE_RANGE_WRITE)
            self._flushed = self.written

    def holds(self, data: bytes | bytearray, offset: int) -> bool:
        """Whether these bytes are already in the file at `offset`, written by this spool."""
        return not self.broken and offset == self.offset and self.written == self.length == len(data)

    def release(self) -> None:
        """Give up the file before the body is whole; the append then goes to the writer without a spool."""
        self.released = self.broken = True
        self.claim.close()

    def close(self) -> None:
        self.claim.close()


class ChunkFiles:
    """The chunk files of one database: write and sync them before a commit, read them, remove them."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        make_directory(directory)
        # Streams whose file names are durable: a commit of this process that refers to the file has
        # succeeded since the directory was synced. Whoever created a file, possibly another process or a
        # spool that then failed, the first commit here that refers to it syncs the directory.
        self._named: set[str] = set()
        self._naming: list[str] = []

    @classmethod
    def beside(cls, database: str) -> ChunkFiles | None:
        """The chunk files of the SQLite database at `database`, or None for an in-memory database."""
        if not database or database == ":memory:" or database.startswith("file:"):
            return None
        return cls(Path(database + "-chunks"))

    def path(self, stream_id: str) -> Path:
        if not stream_id or not stream_id.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"not a stream id: {stream_id!r}")
        return self.directory / (stream_id + SUFFIX)

    def claim(self, stream_id: str, create: bool = True) -> Claim | None:
        """The stream's file, opened (created if need be) and locked; None while another writer holds it.

        Without `create`, a missing file raises FileNotFoundError.
        """
        path = self.path(stream_id)
        while True:
            created = False
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                if not create:
                    raise
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                created = True
            if _OFD_SETLK is None:
                return Claim(stream_id, fd, created)
            try:
                fcntl.fcntl(fd, _OFD_SETLK, _WHOLE_FILE)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    return None
                raise
            if os.fstat(fd).st_nlink:
                return Claim(stream_id, fd, created)
            os.close(fd)  # removed between the open and the lock: bytes written to it would be lost

    @staticmethod
    def can_spool() -> bool:
        """Whether bodies may be written ahead of their commit: only where other writers can be locked out."""
        return _OFD_SETLK is not None

    def write(self, pieces: Iterable[tuple[Claim, int, bytes | bytearray | None]]) -> None:
        """Write each (claimed file, offset, bytes) and sync it, before the commit; None: already written."""
        self._naming = []
        for claim, offset, data in pieces:
            if data is not None:
                claim.grow(offset, offset + len(data))
                claim.write(offset, data)
            os.fdatasync(claim.fd)
            if claim.created or claim.stream_id not in self._named:
                self._naming.append(claim.stream_id)
        if self._naming:  # a file's name must be durable too
            sync_path(self.directory)

    def committed(self) -> None:
        """The commit after the last `write` succeeded: the names it synced stay durable."""
        if len(self._named) > MAX_NAMED:
            self._named.clear()
        self._named.update(self._naming)
        self._naming = []

    def read(self, stream_id: str, offset: int, length: int) -> bytes:
        """Bytes [offset, offset + length) of a stream's file, all of them or an error."""
        with open(self.path(stream_id), "rb", buffering=0) as file:
            data = os.pread(file.fileno(), length, offset)
            while len(data) < length:
                more = os.pread(file.fileno(), length - len(data), offset + len(data))
                if not more:
                    raise OSError(f"chunk file of stream {stream_id} ends before byte {offset + length}")
                data += more
        return data

    def trim(self, stream_id: str, tail: int) -> None:
        """Give back the space a closed stream's file took ahead of its bytes."""
        path = self.path(stream_id)
        try:
            if path.stat().st_size > tail:
                os.truncate(path, tail)
        except FileNotFoundError:
            pass

    def trim_unheld(self, stream_id: str, tail: int) -> bool:
        """Trim a stream's file to its tail unless a writer holds the file; whether it was not held."""
        try:
            claim = self.claim(stream_id, create=False)
        except FileNotFoundError:
            return True
        if claim is None:
            return False
        try:
            self.trim(stream_id, tail)
        finally:
            claim.close()
        return True

    def remove(self, stream_id: str) -> None:
        try:
            self.path(stream_id).unlink()
        except FileNotFoundError:
            pass

    def stream_ids(self) -> tuple[list[str], list[str]]:
        """The streams that have a file: (last written before the grace, written within it)."""
        limit = time.time() - REMOVE_GRACE
        old: list[str] = []
        recent: list[str] = []
        for entry in os.scandir(self.directory):
            if entry.name.endswith(SUFFIX):
                (old if entry.stat().st_mtime < limit else recent).append(entry.name[: -len(SUFFIX)])
        return old, recent
