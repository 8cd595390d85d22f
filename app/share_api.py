"""Making share links: POST /stream/{id}/share answers an expiring link that reads one stream.

A link is made with an admin key, a token with `manage` on the stream's namespace, or from a signed-in
viewer page (its sign-in cookie and CSRF token). The link itself is checked where every read is judged
(`may_read` in http/auth.py); http/share_links.py signs and verifies it.
"""

from __future__ import annotations

from typing import Any

from litestar import Request, post
from litestar.di import NamedDependency
from litestar.exceptions import PermissionDeniedException
from litestar.params import FromPath
from litestar.response.base import ASGIResponse

from . import clock
from .agentuity_api import _json, _json_object, _paths
from .errors import InvalidRequestError
from .http import share_links
from .http.auth import ADMIN, Principal, bearer, principal_of, require
from .models import StreamState
from .settings import Settings
from .stop_api import _stream as find_stream
from .store.store import Store
from .web import session

DEFAULT_TTL = 3600.0
FIELDS = {"ttl", "stop"}


async def _shareable(
    request: Request[Any, Any, Any], store: Store, settings: Settings, stream_id: str
) -> StreamState:
    """The stream, once the request may make links to it (401, 403 or 404 otherwise)."""
    principal: Principal | None = None
    if settings.api_keys and not bearer(request):
        current = await session.current(request, settings)
        if current is not None:
            if not session.csrf_ok(request, settings, current):
                raise PermissionDeniedException(
                    "making a share link from a page needs its CSRF token (X-CSRF-Token); reload the page"
                )
            # A sign-in acts with its own rights: an API key's, or a token's where a sign-in carries one.
            principal = getattr(current, "principal", ADMIN)
    if principal is None:
        principal = await principal_of(request)
    require(principal, "manage")
    state = await find_stream(store, stream_id)
    require(principal, "manage", state.namespace)
    return state


@post(_paths("/{stream_id:str}/share"), status_code=201)
async def share_stream(
    stream_id: FromPath[str],
    request: Request[Any, Any, Any],
    store: NamedDependency[Store],
    settings: NamedDependency[Settings],
) -> ASGIResponse:
    """A new share link: {"ttl": seconds, "stop": false} gets 201 with url, content_url, expires_at, stop."""
    state = await _shareable(request, store, settings, stream_id)
    body = await _json_object(request)
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise InvalidRequestError(f"unknown fields {unknown}: a share link takes ttl (seconds) and stop")
    made = share_links.share(
        settings.secret, settings.origin(), state, body.get("ttl", DEFAULT_TTL), body.get("stop", False),
        clock.now(),
    )
    return _json(201, made, {"cache-control": "no-store"})


routes: list[Any] = [share_stream]
