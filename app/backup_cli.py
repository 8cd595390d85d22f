"""`streamhold backup`, `restore` and `check`: the operator's commands for an embedded (SQLite) store."""

from __future__ import annotations

import os
from pathlib import Path

import click
import httpx

from .settings import Settings, SettingsError
from .store import backup as backups
from .store.check import check as check_store

BACKUP_TIMEOUT = 3600.0


ON_POSTGRES = (
    "this store is on PostgreSQL, which keeps every byte in the database and has no chunk files: "
    "check it with PostgreSQL's own tools (pg_amcheck), and back it up with pg_dump"
)


def _database(data_dir: str | None, postgres: str = "") -> Path:
    """The store's database: under --data-dir, else where STREAMHOLD_DATA_DIR / DATABASE_URL put it."""
    try:
        settings = Settings.from_env()
        url = f"sqlite:///{Path(data_dir) / 'streamhold.db'}" if data_dir else settings.sqlalchemy_url
        return backups.database_path(url)
    except backups.BackupError as exc:
        raise click.ClickException(postgres or str(exc)) from None
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


_data_dir = click.option(
    "--data-dir", default=None, help="The store's data directory [default: STREAMHOLD_DATA_DIR, or ./data]."
)


@click.command()
@click.argument("dest", type=click.Path(path_type=Path))
@_data_dir
@click.option("--server", default="", help="Ask this running server to write it (DEST on its machine).")
@click.option("--key", envvar="STREAMHOLD_API_KEY", help="The server's API key, when it has keys.")
def backup(dest: Path, data_dir: str | None, server: str, key: str | None) -> None:
    """Back the store up into the new folder DEST, consistent, while it serves."""
    if server:
        _backup_through(server.rstrip("/"), os.path.abspath(dest), key)
        return
    try:
        manifest = backups.backup(_database(data_dir), dest)
    except (backups.BackupError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"backed up {manifest.streams} streams in {len(manifest.files)} files into {dest}")


def _backup_through(server: str, dest: str, key: str | None) -> None:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    try:
        url = f"{server}/admin/backup"
        response = httpx.post(url, json={"dest": dest}, headers=headers, timeout=BACKUP_TIMEOUT)
    except httpx.HTTPError as exc:
        raise click.ClickException(f"could not reach {server}: {exc}") from None
    if response.status_code != 201:
        try:
            body = response.json()
            detail = body.get("error") or body.get("detail") or response.text
        except ValueError:
            detail = response.text
        raise click.ClickException(f"the server refused the backup ({response.status_code}): {detail}")
    body = response.json()
    click.echo(f"backed up {body['streams']} streams in {len(body['files'])} files into {dest}")


@click.command()
@click.argument("source", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--data-dir", required=True, help="A new or empty data directory to restore into.")
def restore(source: Path, data_dir: str) -> None:
    """Restore the backup SOURCE (checksums verified) into an empty data dir."""
    try:
        manifest = backups.restore(source, Path(data_dir))
    except (backups.BackupError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"restored {manifest.streams} streams (backup of {manifest.created_at}) into {data_dir}; "
        f"serve it with STREAMHOLD_DATA_DIR={data_dir} streamhold serve"
    )


@click.command()
@_data_dir
@click.option("--repair", is_flag=True, help="Remove stray chunk files (never data that a row refers to).")
def check(data_dir: str | None, repair: bool) -> None:
    """Check stored bytes against the database, read-only; exit 1 on a problem."""
    report = check_store(_database(data_dir, ON_POSTGRES), repair=repair)
    for problem in report.problems:
        click.echo(problem, err=True)
    for path in report.strays:
        if path in report.removed:
            click.echo(f"removed stray chunk file {path}")
        else:
            click.echo(f"stray chunk file {path}: no chunk refers to it (`--repair` removes it)", err=True)
    if not report.ok:
        raise SystemExit(1)
    click.echo(f"ok: {report.streams} streams, {report.chunk_files} chunk files checked")
