"""Operator actions on a running server: `POST /admin/backup` writes a backup on the server's machine."""

from __future__ import annotations

import asyncio
import ipaddress
import threading
from pathlib import Path
from typing import Any

from litestar import Request, Response, post
from litestar.di import NamedDependency
from litestar.exceptions import ClientException, NotAuthorizedException, ValidationException

from ..settings import Settings
from ..store import backup
from .auth import require_key

NO_STORE = {"cache-control": "no-store"}
_one_at_a_time = threading.Lock()


def _from_loopback(request: Request[Any, Any, Any]) -> bool:
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@post("/admin/backup", status_code=201)
async def backup_store(
    request: Request[Any, Any, Any], settings: NamedDependency[Settings]
) -> Response[dict[str, Any]]:
    """Back the store up into {"dest": "<new folder on the server>"} while it keeps serving; its manifest."""
    require_key(request, settings)
    if not settings.api_keys and not _from_loopback(request):
        raise NotAuthorizedException("a server without API keys takes backups from its own machine only")
    try:
        body = await request.json()
    except Exception:
        body = None
    dest = body.get("dest") if isinstance(body, dict) else None
    if not isinstance(dest, str) or not dest.startswith("/") or "\x00" in dest:  # no path holds a NUL
        raise ValidationException('send {"dest": "/absolute/path/of/a/new/folder"} on the server\'s machine')
    try:
        database = backup.database_path(settings.sqlalchemy_url)
        if not _one_at_a_time.acquire(blocking=False):
            raise ClientException("a backup is running already: try again when it is done", status_code=409)
        try:
            manifest = await asyncio.to_thread(backup.backup, database, Path(dest))
        finally:
            _one_at_a_time.release()
    except backup.BackupError as exc:
        raise ValidationException(str(exc)) from None
    except OSError as exc:
        raise ValidationException(f"could not write the backup into {dest}: {exc.strerror or exc}") from None
    return Response({"dest": dest, **manifest.to_json()}, status_code=201, headers=NO_STORE)


routes = [backup_store]
