"""A full disk: its errors told apart from other failures, and a reserve of free space kept for deletes.

A write that fails because storage is full becomes a StorageFullError (507), never a server error. While free
space on the database's filesystem is below the reserve, appends and creates are refused before they write,
so that deletes and the WAL checkpoint, which need a little space themselves, still work and free space.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Connection

from ..errors import StorageFullError

log = logging.getLogger("streamhold.disk")
T = TypeVar("T")

MIB = 1024 * 1024
SQLITE_FULL = 13
SQLITE_IOERR_SHMSIZE = 10 | (19 << 8)  # the WAL index could not be extended: no room for it
POSTGRES_DISK_FULL = "53100"
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# The reserve when none is configured: this much, but at most a twentieth of a small filesystem.
DEFAULT_RESERVE = 64 * MIB
DEFAULT_SHARE = 20
# Free space is read at most this often while there is plenty (appends are hot), and at every write once
# less than NEAR is left above the reserve: a commit writes several pages to the WAL for each chunk it adds,
# so a burst of appends can take far more than its own bytes within one interval.
CHECK_EVERY_S = 0.2
NEAR = 32 * MIB
# The least a write is counted as taking: a commit writes at least a page or two to the WAL.
MIN_WRITE = 32 * 1024
# A write that found the disk full counts as "full" for readiness until a later commit succeeds, this much
# more space is free than when it failed, or this long has passed without another such failure.
SPACE_BACK = 1 * MIB
REMEMBER_S = 30.0


def is_storage_full(exc: BaseException) -> bool:
    """Whether `exc` (or the driver error it wraps) says that the disk or quota is full."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        error = todo.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, StorageFullError):
            return True
        if isinstance(error, OSError) and error.errno in FULL_ERRNOS:
            return True
        if isinstance(error, sqlite3.Error):
            code = getattr(error, "sqlite_errorcode", None)
            if code is not None and (code & 0xFF == SQLITE_FULL or code == SQLITE_IOERR_SHMSIZE):
                return True
            if "database or disk is full" in str(error):
                return True
        if POSTGRES_DISK_FULL in (getattr(error, "sqlstate", None), getattr(error, "pgcode", None)):
            return True
        todo += [getattr(error, "orig", None), error.__cause__]
    return False


class DiskSpace:
    """Free space under the database, read now and then, and the store's record of refused writes.

    `folder` None (PostgreSQL, an in-memory database): no reserve, only the classification of errors.
    Free space counts the database's own free pages, which a delete returns without shrinking the file.
    """

    def __init__(
        self,
        folder: Path | None = None,
        reserve: int | None = None,
        database: str = "",
        commits: Callable[[], int] = lambda: 0,
    ) -> None:
        self.folder = folder
        self.reserve = 0 if folder is None else (reserve if reserve is not None else DEFAULT_RESERVE)
        self._database = database
        self._pages: sqlite3.Connection | None = None
        self._commits = commits
        self.refusals = 0  # writes refused because storage is full, by the reserve or by the disk
        self.free: int | None = None
        self._short = False
        self._next_check = 0.0
        self._taken = 0  # bytes of the writes let through since free space was last read
        self._full_at = 0.0  # when a write last found the disk full (monotonic), 0 when it has not
        self._full_free = 0
        self._full_commits = -1
        self._automatic = reserve is None

    def short(self, size: int = 0) -> bool:
        """Whether free space is below the reserve, so a write of `size` bytes must be refused. Cheap.

        A write is refused if it would leave less than the reserve; between two readings of free space, the
        writes let through count as taken already.
        """
        if not self.reserve:
            return False
        now = time.monotonic()
        if now >= self._next_check:
            self._measure(now)
        if self._short or self.free is None:
            return self._short
        need = max(size, MIN_WRITE)
        if self.free - self._taken - need < self.reserve:
            return True
        self._taken += need
        return False

    def measured_free(self) -> int:
        """Free space as last read (read now if due); -1 where none is measured (PostgreSQL)."""
        if self.folder is None:
            return -1
        now = time.monotonic()
        if now >= self._next_check:
            self._measure(now)
        return -1 if self.free is None else self.free

    def recheck(self) -> None:
        """Read free space again at the next check (space was just freed)."""
        self._next_check = 0.0

    def refuse(self) -> StorageFullError:
        """The error for a write refused by the reserve, counted."""
        self.refusals += 1
        return StorageFullError(
            f"the server's storage is nearly full ({_mib(self.free or 0)} free, below the reserve of "
            f"{_mib(self.reserve)} kept for deletes) and nothing was stored; delete streams or free space "
            "on its disk, then retry"
        )

    def classify(self, exc: Exception, ops: int = 1) -> Exception:
        """`exc`, or a StorageFullError in its place if the disk is full (counted `ops` times, remembered)."""
        if isinstance(exc, StorageFullError) or not is_storage_full(exc):
            return exc
        self.refusals += ops
        now = time.monotonic()
        if not self._full_at or now - self._full_at >= REMEMBER_S:
            log.warning("storage is full: writes are refused until space is freed (%s)", exc)
        self._full_at = now
        self._full_commits = self._commits()
        if self.folder is not None:
            self._measure(now)
        self._full_free = self.free or 0
        error = StorageFullError()
        error.__cause__ = exc
        return error

    def problem(self) -> str | None:
        """Why storage counts as full now, for readiness and the dashboard; None while it does not."""
        now = time.monotonic()
        if self.folder is not None and now >= self._next_check:
            self._measure(now)
        free = self.free
        if self.reserve and self._short:
            return (
                f"storage nearly full: {_mib(free or 0)} free, below the reserve of {_mib(self.reserve)}; "
                "appends and creates are refused until streams are deleted or space is freed"
            )
        if not self._full_at or now - self._full_at >= REMEMBER_S or self._commits() != self._full_commits:
            return None
        if free is not None and free >= self._full_free + SPACE_BACK:
            return None
        return "storage full: the last write found no space on the disk; delete streams or free space"

    def freeing(self, fn: Callable[[Connection], T]) -> Callable[[Connection], T]:
        """`fn`, a write that deletes, made to free SQLite pages without zeroing them while storage is short.

        SQLite may be built to zero what a delete frees (SECURE_DELETE, as Debian builds it): every freed page
        is then written to the WAL, and deleting a large stream on a full disk would need as much space as it
        frees. Zeroed or not, freed pages are never read again; they are overwritten when reused.
        """
        if not self._database or self.problem() is None:
            return fn

        def run(conn: Connection) -> T:
            was = conn.exec_driver_sql("PRAGMA secure_delete").scalar()
            conn.exec_driver_sql("PRAGMA secure_delete=FAST")
            try:
                return fn(conn)
            finally:
                with contextlib.suppress(Exception):
                    conn.exec_driver_sql(f"PRAGMA secure_delete={int(was or 0)}")

        return run

    def close(self) -> None:
        if self._pages is not None:
            self._pages.close()
            self._pages = None

    def _measure(self, now: float) -> None:
        self._taken = 0
        assert self.folder is not None
        try:
            stats = os.statvfs(self.folder)
        except OSError:
            self.free, self._short, self._next_check = None, False, now + CHECK_EVERY_S
            return
        if self._automatic:
            self.reserve = min(DEFAULT_RESERVE, stats.f_blocks * stats.f_frsize // DEFAULT_SHARE)
        self.free = stats.f_bavail * stats.f_frsize + self._database_room()
        self._short = self.free - MIN_WRITE < self.reserve
        self._next_check = now + (CHECK_EVERY_S if self.free - self.reserve >= NEAR else 0.0)

    def _database_room(self) -> int:
        """Bytes the database has free inside its files, less those its next checkpoint will take.

        A delete puts its pages on the database's free list, where writes take them first, without the file
        shrinking. Pages still only in the WAL are copied into the database file by the checkpoint, which
        grows the file to hold them: that space is spoken for, or the WAL could never start over.
        """
        if not self._database:
            return 0
        try:
            if self._pages is None:
                self._pages = sqlite3.connect(self._database, check_same_thread=False, timeout=0)
            # One read transaction, so the three figures come from one snapshot of the database.
            free, count, size = self._pages.execute(
                "SELECT * FROM pragma_freelist_count, pragma_page_count, pragma_page_size"
            ).fetchone()
            on_disk = os.stat(self._database).st_size
        except (sqlite3.Error, OSError):
            with contextlib.suppress(sqlite3.Error):
                if self._pages is not None:
                    self._pages.close()
            self._pages = None
            return 0
        return int(free) * int(size) - max(0, int(count) * int(size) - on_disk)


def _mib(size: int) -> str:
    return f"{max(size, 0) / MIB:.1f} MiB"  # free space less what the checkpoint needs may fall below 0
