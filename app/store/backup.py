"""Backups of an embedded (SQLite) store, taken while it serves, and their restore.

A backup is a folder: the database copied through SQLite's online backup API (one step, so one read
snapshot, while writers go on), the chunk files cut to the byte ranges that snapshot's rows refer to, a
`manifest.json` (sizes and sha256 of every file) and `SHA256SUMS` (for `sha256sum -c`). Committed bytes of
a chunk file are never rewritten, so copying a range after the snapshot copies what the snapshot meant; a
file whose stream is deleted meanwhile is opened before the snapshot, and an open file outlives its name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import closing, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from .chunk_files import SUFFIX, sync_path

FORMAT = "streamhold-backup"
VERSION = 1
DATABASE = "streamhold.db"
CHUNKS = DATABASE + "-chunks"
MANIFEST = "manifest.json"
SUMS = "SHA256SUMS"
COPY_SIZE = 1024 * 1024
# The chunk rows kept in files, by stream and start: their (start, length) ranges.
FILE_RANGES = "SELECT stream_id, start, file_bytes FROM chunks WHERE file_bytes > 0 ORDER BY stream_id, start"


class BackupError(Exception):
    """A backup or restore that cannot be made; the message says why and what to do."""


@dataclass(frozen=True)
class Entry:
    """One file of a backup, by its path inside the backup folder."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    created_at: str
    streams: int
    files: tuple[Entry, ...]

    def to_json(self) -> dict[str, object]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "created_at": self.created_at,
            "streams": self.streams,
            "files": [{"path": e.path, "size": e.size, "sha256": e.sha256} for e in self.files],
        }


def database_path(sqlalchemy_url: str) -> Path:
    """The file of a `sqlite:///` URL; BackupError for PostgreSQL, which has its own tools."""
    if not sqlalchemy_url.startswith("sqlite:///"):
        raise BackupError(
            "this store is on PostgreSQL: back it up with pg_dump (for example "
            "`pg_dump -Fc -f streamhold.dump $STREAMHOLD_DATABASE_URL`) and restore it with pg_restore"
        )
    return Path(sqlalchemy_url.removeprefix("sqlite:///"))


def file_ranges(conn: sqlite3.Connection) -> dict[str, list[tuple[int, int]]]:
    """Per stream, the merged byte ranges [lo, hi) of its chunk file that the database's rows refer to."""
    ranges: dict[str, list[tuple[int, int]]] = {}
    for stream_id, start, length in conn.execute(FILE_RANGES):
        runs = ranges.setdefault(stream_id, [])
        if runs and runs[-1][1] == start:
            runs[-1] = (runs[-1][0], start + length)
        else:
            runs.append((start, start + length))
    return ranges


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(COPY_SIZE), b""):
            digest.update(block)
    return digest.hexdigest()


def backup(database: Path, dest: Path) -> Manifest:
    """Write a consistent backup of the store whose database is `database` into the new folder `dest`."""
    if not database.is_file():
        raise BackupError(f"no database at {database}: point --data-dir at the server's data directory")
    home = database.resolve().parent
    if dest.resolve() == home or home in dest.resolve().parents:
        raise BackupError(
            f"{dest} is inside the data directory {home}: a backup there is lost with the store (and in its "
            "chunk folder it breaks the store); back up into a folder elsewhere"
        )
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BackupError(f"{dest} exists and is not an empty folder: back up into a new folder")
    staging = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        manifest = _write(database, staging)
        if dest.exists():
            dest.rmdir()
        staging.rename(dest)
        sync_path(dest.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _write(database: Path, staging: Path) -> Manifest:
    chunks_dir = Path(str(database) + "-chunks")
    # Opened before the snapshot: a stream deleted or compressed after it loses its file's name, not its data.
    opened = open_chunk_files(chunks_dir)
    try:
        copy = staging / DATABASE
        source_conn, target_conn = sqlite3.connect(database, timeout=30), sqlite3.connect(copy)
        with closing(source_conn) as source, closing(target_conn) as target:
            source.backup(target)  # pages=-1: one step, one read transaction, a consistent snapshot
            target.execute("PRAGMA journal_mode=DELETE")  # a single file; the server turns WAL on again
            ranges = file_ranges(target)
            streams = int(target.execute("SELECT count(*) FROM streams").fetchone()[0])
        for stream_id in ranges:
            if stream_id not in opened:  # created after the listing: its name stays for the removal grace
                opened[stream_id] = _open(chunks_dir / (stream_id + SUFFIX))
        if ranges:
            (staging / CHUNKS).mkdir()
        for stream_id, runs in ranges.items():
            _copy_ranges(opened[stream_id], staging / CHUNKS / (stream_id + SUFFIX), runs, stream_id)
    finally:
        for fd in opened.values():
            os.close(fd)
    entries = tuple(_entry(staging, path) for path in _files(staging))
    manifest = Manifest(datetime.now(UTC).isoformat(timespec="seconds"), streams, entries)
    (staging / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    sums = [*entries, _entry(staging, MANIFEST)]
    (staging / SUMS).write_text("".join(f"{e.sha256}  {e.path}\n" for e in sums))
    for name in (MANIFEST, SUMS):
        sync_path(staging / name)
    if ranges:
        sync_path(staging / CHUNKS)
    sync_path(staging)
    return manifest


def open_chunk_files(chunks_dir: Path) -> dict[str, int]:
    """Every chunk file in the folder, opened for reading, by stream id: its bytes outlive a removal."""
    opened: dict[str, int] = {}
    if not chunks_dir.is_dir():
        return opened
    for entry in os.scandir(chunks_dir):
        if entry.name.endswith(SUFFIX):
            with suppress(FileNotFoundError):  # removed meanwhile: no snapshot taken after now refers to it
                opened[entry.name[: -len(SUFFIX)]] = os.open(entry.path, os.O_RDONLY)
    return opened


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise BackupError(f"chunk file {path} is missing: run `streamhold check` on this store") from None


def _copy_ranges(fd: int, path: Path, runs: list[tuple[int, int]], stream_id: str) -> None:
    """Copy the byte ranges `runs` of a chunk file into a sparse file of the same layout, and sync it."""
    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for lo, hi in runs:
            at = lo
            while at < hi:
                data = os.pread(fd, min(COPY_SIZE, hi - at), at)
                if not data:
                    raise BackupError(
                        f"chunk file of stream {stream_id} ends at byte {at}, before {hi} that the database "
                        "refers to: run `streamhold check` on this store"
                    )
                os.pwrite(out, data, at)
                at += len(data)
        os.ftruncate(out, runs[-1][1])
        os.fsync(out)
    finally:
        os.close(out)


def _files(root: Path) -> Iterator[str]:
    yield DATABASE
    if (root / CHUNKS).is_dir():
        for name in sorted(os.listdir(root / CHUNKS)):
            yield f"{CHUNKS}/{name}"


def _entry(root: Path, name: str) -> Entry:
    path = root / name
    return Entry(name, path.stat().st_size, sha256_of(path))


# --- restore ------------------------------------------------------------------------------------


def verify(source: Path) -> Manifest:
    """Check a backup folder against its checksums; BackupError naming the first file that differs."""
    sums_path, manifest_path = source / SUMS, source / MANIFEST
    if not sums_path.is_file() or not manifest_path.is_file():
        raise BackupError(f"{source} is not a Streamhold backup: it has no {MANIFEST} and {SUMS}")
    sums: dict[str, str] = {}
    for line in sums_path.read_text().splitlines():
        digest, _, name = line.partition("  ")
        if not name:
            raise BackupError(f"{SUMS} of {source} has a line that is not `<sha256>  <file>`: {line[:80]!r}")
        sums[name] = digest
    if sums.get(MANIFEST) != sha256_of(manifest_path):
        raise BackupError(f"{MANIFEST} of {source} does not match its checksum: the backup was altered")
    try:
        raw = json.loads(manifest_path.read_text())
        if raw.get("format") != FORMAT or raw.get("version") != VERSION:
            raise BackupError(f"{source} is a backup of another format or version than this Streamhold reads")
        entries = tuple(Entry(str(f["path"]), int(f["size"]), str(f["sha256"])) for f in raw["files"])
        manifest = Manifest(str(raw["created_at"]), int(raw["streams"]), entries)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise BackupError(f"{MANIFEST} of {source} cannot be read: the backup is damaged") from None
    names = [e.path for e in entries]
    if DATABASE not in names or len(set(names)) != len(names):
        raise BackupError(f"{MANIFEST} of {source} does not list the database once: the backup is damaged")
    for entry in entries:
        _check_name(entry.path)
        path = source / entry.path
        if not path.is_file():
            raise BackupError(f"{entry.path} is missing from the backup {source}")
        if sums.get(entry.path) != entry.sha256:
            raise BackupError(f"{entry.path}: {MANIFEST} and {SUMS} disagree; the backup was altered")
        if path.stat().st_size != entry.size or sha256_of(path) != entry.sha256:
            raise BackupError(f"{entry.path} does not match its checksum: the backup is damaged or altered")
    return manifest


def _check_name(name: str) -> None:
    """Only the database and chunk files by their own names: a manifest may not write elsewhere."""
    folder, _, base = name.rpartition("/")
    stem = base.removesuffix(SUFFIX)
    ok = name == DATABASE or (
        folder == CHUNKS and base.endswith(SUFFIX) and stem.replace("-", "").replace("_", "").isalnum()
    )
    if not ok:
        raise BackupError(f"the backup's manifest lists {name!r}, which is not a file of a Streamhold store")


def restore(source: Path, data_dir: Path) -> Manifest:
    """Verify the backup in `source` and copy it into the empty (or new) data directory `data_dir`."""
    if data_dir.exists() and (not data_dir.is_dir() or any(data_dir.iterdir())):
        raise BackupError(
            f"{data_dir} is not empty: restore into a new or empty data directory, "
            "then point STREAMHOLD_DATA_DIR at it"
        )
    manifest = verify(source)
    created = not data_dir.exists()
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        for entry in manifest.files:
            target = data_dir / entry.path
            target.parent.mkdir(exist_ok=True)
            _copy_checked(source / entry.path, target, entry)
        _check_covered(data_dir)
        if (data_dir / CHUNKS).is_dir():
            sync_path(data_dir / CHUNKS)
        sync_path(data_dir)
    except BaseException:
        if created:
            shutil.rmtree(data_dir, ignore_errors=True)
        else:
            for child in list(data_dir.iterdir()):
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise
    return manifest


def _check_covered(data_dir: Path) -> None:
    """Every byte range the restored rows keep in chunk files is there: checksums that agree prove no more."""
    uri = (data_dir / DATABASE).resolve().as_uri() + "?mode=ro"
    try:
        with closing(sqlite3.connect(uri, uri=True)) as conn:
            ranges = file_ranges(conn)
    except sqlite3.Error as exc:
        raise BackupError(f"the backup's database cannot be read ({exc}): the backup is damaged") from None
    for stream_id, runs in ranges.items():
        path = data_dir / CHUNKS / (stream_id + SUFFIX)
        size = path.stat().st_size if path.is_file() else -1
        if size < runs[-1][1]:
            held = "is missing" if size < 0 else f"holds {size} bytes"
            raise BackupError(
                f"the backup's chunk file of stream {stream_id} {held}, but its database refers to bytes "
                f"up to {runs[-1][1]}: the backup is damaged; restore another one"
            )


def _copy_checked(source: Path, target: Path, entry: Entry) -> None:
    """Copy a file, holes kept, hashing what is copied: a backup changed since `verify` is refused."""
    digest = hashlib.sha256()
    size = 0
    with source.open("rb") as src, target.open("xb") as out:
        for block in iter(lambda: src.read(COPY_SIZE), b""):
            digest.update(block)
            if block.count(0) == len(block):
                out.seek(len(block), os.SEEK_CUR)  # a hole stays a hole
            else:
                out.write(block)
            size += len(block)
        out.truncate(size)
        out.flush()
        os.fsync(out.fileno())
    if size != entry.size or digest.hexdigest() != entry.sha256:
        raise BackupError(f"{entry.path} changed while it was restored: the backup is being altered")
