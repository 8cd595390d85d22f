"""Who is asking and what they may do: the one access rule of both APIs, the viewer and the SDK's server.

A request's principal is one of: `open` (a keyless server: loopback only, everything allowed), `admin` (a key
of STREAMHOLD_API_KEYS: every right everywhere), `token` (a scoped token minted at /tokens: its scopes over
its namespaces), `link` (a share link in the `share` query parameter: reading one stream, maybe stopping it)
or `anonymous` (no credential). A key or token that is presented but unknown, revoked or expired is a 401,
a share link that is altered, expired or signed with another secret a 403: never taken as anonymous.

`require_right` is the /stream API's guard: each handler declares the right it needs (read, write or
manage) and checks the stream's namespace itself once it knows it (`require`).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qs

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.exceptions import (
    ImproperlyConfiguredException,
    NotAuthorizedException,
    PermissionDeniedException,
)
from litestar.handlers.base import BaseRouteHandler

from .. import clock
from ..errors import InvalidRequestError
from ..models import StreamState
from ..settings import Settings
from ..store.tokens import TokenRecord, Tokens
from . import share_links

Right = Literal["read", "write", "manage"]
RIGHTS: tuple[Right, ...] = ("read", "write", "manage")
Kind = Literal["open", "admin", "token", "link", "anonymous"]
LINK_READS_ONLY = (
    "a share link only reads the stream it was made for (and asks its writer to stop, when made so): this "
    "call needs an API key or a token"
)
OTHER_STREAM = (
    "this share link was made for another stream (or for an earlier stream of this name, since deleted): "
    "ask for a new one"
)
CHALLENGE = {"www-authenticate": 'Bearer realm="streamhold"'}
STATE_KEY = "streamhold_principal"
SIGN_IN_KEY = "sign_in"  # in the app's state: the dashboard's reader of sign-in cookies (see principal_of)
SignIn = Callable[[Any], Awaitable["Principal | None"]]


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


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request comes from, and what that lets it do."""

    kind: Kind
    scopes: frozenset[str] = frozenset()
    namespaces: tuple[str, ...] = ()
    token_id: str = ""
    link: share_links.Link | None = None  # what a share link grants (kind "link")

    @property
    def full(self) -> bool:
        """Every right over every namespace: an admin key, or anyone at a keyless server."""
        return self.kind in ("open", "admin")

    def covers(self, namespace: str) -> bool:
        """Whether the namespace is one of the token's, exactly or under a prefix written `exports/*`."""
        if self.full:
            return True
        return any(namespace_matches(pattern, namespace) for pattern in self.namespaces)

    def may(self, right: Right, namespace: str | None = None) -> bool:
        if self.full:
            return True
        if self.kind != "token" or right not in self.scopes:
            return False
        return namespace is None or self.covers(namespace)

    def reads_by_link(self, state: StreamState) -> bool:
        """Whether this is a share link made for this very stream (not a deleted one of its name)."""
        link = self.link
        return link is not None and link.stream_id == state.id and link.generation == state.generation


OPEN = Principal("open")
ADMIN = Principal("admin")
ANONYMOUS = Principal("anonymous")


def namespace_matches(pattern: str, namespace: str) -> bool:
    """`*` is every namespace; `exports/*` is `exports` and every namespace that starts with `exports/`."""
    if pattern == "*":
        return True
    if pattern.endswith("/*"):
        stem = pattern[:-2]
        return namespace == stem or namespace.startswith(stem + "/")
    return namespace == pattern


def _from_record(record: TokenRecord) -> Principal:
    return Principal("token", frozenset(record.scopes), record.namespaces, record.id)


def unauthorized(message: str) -> NotAuthorizedException:
    return NotAuthorizedException(message, headers=CHALLENGE)


def share_param(query_string: bytes) -> str:
    """The `share` query parameter of a raw query string, or "" (the common case costs one search)."""
    if share_links.PARAM.encode() not in query_string:
        return ""
    found = parse_qs(query_string.decode("latin-1")).get(share_links.PARAM)
    return found[0] if found else ""


def link_principal(share: str, settings: Settings) -> Principal:
    """The principal of a share link's text; raises 403 saying why a link grants nothing."""
    try:
        link = share_links.verify(share, settings.secret, clock.now())
    except share_links.LinkError as exc:
        raise PermissionDeniedException(str(exc)) from None
    return Principal("link", link=link)


async def resolve(authorization: str, settings: Settings, tokens: Tokens, share: str = "") -> Principal:
    """The principal of an Authorization header value, else of a share link; raises 401 for a key or token
    that is no longer good, 403 for a share link that grants nothing. A key or token wins over a link."""
    if not settings.api_keys:
        return OPEN
    presented = bearer_token(authorization)
    if not presented:
        return link_principal(share, settings) if share else ANONYMOUS
    if key_is_valid(presented, settings.api_keys):
        return ADMIN
    record = await tokens.check(presented)
    if record is None:
        raise unauthorized(
            "the key or token was refused (unknown, revoked or expired): this call needs an API key or a "
            "valid token; send Authorization: Bearer <key or token>"
        )
    return _from_record(record)


async def principal_of(connection: Any) -> Principal:
    """The principal of a Litestar request (resolved once per request, then kept in its state)."""
    state = connection.scope.setdefault("state", {})
    found = state.get(STATE_KEY)
    if isinstance(found, Principal):
        return found
    app_state = connection.app.state
    principal = await resolve(
        connection.headers.get("authorization", ""),
        app_state.settings,
        app_state.store.tokens,
        share_param(connection.scope.get("query_string", b"")),
    )
    if principal.kind == "anonymous" and _own_page_read(connection):
        sign_in: SignIn | None = app_state.get(SIGN_IN_KEY)
        principal = (await sign_in(connection) if sign_in is not None else None) or principal
    state[STATE_KEY] = principal
    return principal


def _own_page_read(connection: Any) -> bool:
    """A read that the browser says one of this origin's pages made: the viewer's live connection.

    Only then may a sign-in's cookie count. The cookie is SameSite=Strict, so another site's page never sends
    it; `Sec-Fetch-Site` also shuts out a page of another origin on the same site, and a client that does not
    say. Changes never count the cookie here: they carry a key, or go through the dashboard's CSRF checks.
    """
    return connection.scope.get("method") in ("GET", "HEAD") and (
        connection.headers.get("sec-fetch-site") == "same-origin"
    )


def require(principal: Principal, right: Right, namespace: str | None = None) -> None:
    """Raise 401 without a credential, 403 naming what a token lacks; return when the right is held."""
    if principal.may(right, namespace):
        return
    if principal.kind == "anonymous":
        raise unauthorized(
            "this call needs an API key or a token: send Authorization: Bearer <key or token> (a key of "
            "STREAMHOLD_API_KEYS, or a token minted at /tokens)"
        )
    if principal.kind == "link":
        raise PermissionDeniedException(LINK_READS_ONLY)
    if right not in principal.scopes:
        raise PermissionDeniedException(f"this token lacks the {right} scope")
    raise PermissionDeniedException(f"this token does not cover namespace {namespace}")


def is_public(state: StreamState, settings: Settings) -> bool:
    """Whether anyone with the URL may read the stream: its own choice, else STREAMHOLD_READS."""
    return (state.visibility or settings.reads) == "public"


def may_read(principal: Principal, state: StreamState, settings: Settings) -> bool:
    """Whether the principal may read the stream's content and metadata.

    The single place every read asks: a public stream, a key or `read` token for its namespace, or a share
    link made for this stream.
    """
    return (
        is_public(state, settings) or principal.may("read", state.namespace) or principal.reads_by_link(state)
    )


def require_read(principal: Principal, state: StreamState, settings: Settings) -> None:
    """Raise 401 (no credential) or 403 (a token without read on its namespace) for a stream not readable."""
    if not may_read(principal, state, settings):
        if principal.kind == "anonymous":
            raise unauthorized(
                "this stream is private: send Authorization: Bearer <key or read token>, or open it with a "
                "share link"
            )
        if principal.kind == "link":
            raise PermissionDeniedException(OTHER_STREAM)
        require(principal, "read", state.namespace)


def require_stop_by_link(principal: Principal, state: StreamState) -> None:
    """Raise 403 unless the principal is a share link for this stream made with the right to stop it."""
    if not principal.reads_by_link(state):
        raise PermissionDeniedException(OTHER_STREAM)
    if principal.link is None or not principal.link.stop:
        raise PermissionDeniedException(
            "this share link reads the stream but may not stop it: ask for a link made with stop"
        )


def visibility_of(value: Any, what: str) -> str | None:
    """A requested visibility: "public", "private", or None (follow STREAMHOLD_READS); 400 otherwise."""
    if value is None:
        return None
    if value is True or value == "public":
        return "public"
    if value is False or value == "private":
        return "private"
    raise InvalidRequestError(f"{what} must be public or private (true or false in JSON), got {value!r}")


async def require_right(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """A guard: let a request through only with the right its handler declares in `opt={"right": ...}`.

    An admin key (STREAMHOLD_API_KEYS) carries every right over every namespace; a token must hold the
    right as a scope (the handler checks the stream's namespace once it knows it); a handler under this
    guard that declares no right is refused, so a new route fails closed.
    """
    if isinstance(connection, Request) and connection.method == "OPTIONS":  # a CORS preflight has no key
        return
    right = handler.opt.get("right")
    if right not in RIGHTS:
        raise ImproperlyConfiguredException(
            f"{handler} declares no right: give it opt={{'right': ...}}, one of {', '.join(RIGHTS)}"
        )
    require(await principal_of(connection), right)
