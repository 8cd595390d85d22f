"""Database engines: PostgreSQL by URL, or SQLite tuned for durable group commits (WAL, full sync)."""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event

from ..settings import Settings
from .chunk_files import make_directory

WAL_SWITCH_SECONDS = 10.0  # how long a new file may stay locked by other processes opening it too


def make_engines(settings: Settings) -> tuple[Engine, Engine]:
    url = settings.sqlalchemy_url
    if not settings.is_sqlite:
        engine = create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)
        return engine, engine
    make_directory(settings.data_dir)
    # Two writer connections, used by the one writer thread in turn: its appends and its other operations.
    writer = create_engine(url, connect_args={"check_same_thread": False}, pool_size=2, max_overflow=0)
    reader = create_engine(url, connect_args={"check_same_thread": False}, pool_size=8, max_overflow=8)
    for engine, begin in ((writer, "BEGIN IMMEDIATE"), (reader, "BEGIN")):
        _sqlite_pragmas(engine, begin)
    return writer, reader


def _sqlite_pragmas(engine: Engine, begin: str) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control from the driver so BEGIN IMMEDIATE and read snapshots are ours.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA busy_timeout=10000")
        # 16 KiB pages: a MiB-sized chunk spans a quarter of the pages, and small commits stay small.
        # (Only a new database takes it; an existing one keeps its page size.)
        cursor.execute("PRAGMA page_size=16384")
        _use_wal(cursor)
        cursor.execute("PRAGMA synchronous=FULL")
        # No memory map: every page a scan touched stayed in the process's resident memory (up to the map's
        # 256 MiB with a big database), where reads through the page cache hold a few MiB per connection.
        # Large appends live in chunk files, so what SQLite reads is small rows.
        cursor.execute("PRAGMA mmap_size=0")
        # Checkpoint the WAL at 16,384 pages (256 MiB of 16 KiB pages) rather than 1,000: large appends then
        # commit at disk speed. The writer also checkpoints it whenever it has been idle for a moment.
        cursor.execute("PRAGMA wal_autocheckpoint=16384")
        cursor.execute("PRAGMA journal_size_limit=67108864")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql(begin)


def _use_wal(cursor: sqlite3.Cursor) -> None:
    # Turning a new file to WAL needs its exclusive lock, and SQLite answers "database is locked" at once,
    # without waiting, when another process is opening the same new file: try again until it is done.
    deadline = time.monotonic() + WAL_SWITCH_SECONDS
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
        time.sleep(0.01)
