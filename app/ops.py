"""Operator endpoints: /healthz, /readyz and /metrics (Prometheus text)."""

from __future__ import annotations

from litestar import Response, get

from app.live import LiveHub
from app.store import Store


@get("/healthz", sync_to_thread=False)
def healthz() -> Response[dict[str, str]]:
    """The process is up."""
    return Response({"status": "ok"}, headers={"cache-control": "no-store"})


@get("/readyz")
async def readyz(store: Store, hub: LiveHub) -> Response[dict[str, str]]:
    """The database and the channels backend answer."""
    problems: dict[str, str] = {}
    try:
        await store.ping()
    except Exception as exc:
        problems["database"] = type(exc).__name__
    if not hub.connected:
        problems["channels"] = "not subscribed"
    status = 503 if problems else 200
    return Response({"status": "unready" if problems else "ready", **problems}, status_code=status)


routes = [healthz, readyz]
