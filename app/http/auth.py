"""API keys: `Authorization: Bearer <key>` on every call that changes or lists streams, when keys are set.

`require_right` is the /stream API's guard: each handler declares the right it needs (read, write or
manage); an admin key holds them all, and scoped tokens will be judged against the same declarations.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any, Literal

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.exceptions import ImproperlyConfiguredException, NotAuthorizedException
from litestar.handlers.base import BaseRouteHandler

from ..settings import Settings

Right = Literal["read", "write", "manage"]
RIGHTS: tuple[Right, ...] = ("read", "write", "manage")


def key_is_valid(presented: str, keys: tuple[str, ...]) -> bool:
    """Compare against every key in constant time, so timing tells nothing about which one nearly matched."""
    # Digests have one length, so not even a key's length shows in the timing.
    offered = hashlib.sha256(presented.encode()).digest()
    valid = False
    for key in keys:
        valid |= hmac.compare_digest(offered, hashlib.sha256(key.encode()).digest())
    return valid


def bearer(request: Request[Any, Any, Any]) -> str:
    return bearer_token(request.headers.get("authorization", ""))


def bearer_token(authorization: str) -> str:
    """The token of an `Authorization: Bearer <token>` value, or ""."""
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def require_key(request: Request[Any, Any, Any], settings: Settings) -> None:
    """Raise 401 unless no keys are configured or the request carries a valid one."""
    check_key(request.headers.get("authorization", ""), settings)


def check_key(authorization: str, settings: Settings) -> None:
    """Raise 401 unless no keys are configured or `authorization` carries a valid one."""
    if not settings.api_keys:
        return
    if not key_is_valid(bearer_token(authorization), settings.api_keys):
        raise NotAuthorizedException(
            "this call needs an API key: send Authorization: Bearer <key> (one of STREAMHOLD_API_KEYS)",
            headers={"www-authenticate": 'Bearer realm="streamhold"'},
        )


def require_right(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """A guard: let a request through only with the right its handler declares in `opt={"right": ...}`.

    An admin key (STREAMHOLD_API_KEYS) carries every right over every namespace; a handler under this
    guard that declares no right is refused, so a new route fails closed.
    """
    if isinstance(connection, Request) and connection.method == "OPTIONS":  # a CORS preflight has no key
        return
    right = handler.opt.get("right")
    if right not in RIGHTS:
        raise ImproperlyConfiguredException(
            f"{handler} declares no right: give it opt={{'right': ...}}, one of {', '.join(RIGHTS)}"
        )
    settings: Settings = connection.app.state.settings
    check_key(connection.headers.get("authorization", ""), settings)
