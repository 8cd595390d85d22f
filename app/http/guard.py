"""Which requests a server answers: its own host names, writes from its own pages, the content origin's reads.

A keyless server trusts whoever can reach it, which is why it listens on loopback only; these checks keep
a web page from reaching it through the browser (DNS rebinding, cross-site writes).
"""

from __future__ import annotations

import json

from litestar.response.base import ASGIResponse
from litestar.types import Scope

from ..settings import Settings
from . import headers


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


def _netloc(value: str, scheme: str) -> str:
    """A host[:port] without the scheme's default port, lower-cased."""
    value = value.strip().lower()
    default = {"http": ":80", "https": ":443"}.get(scheme, "")
    return value[: -len(default)] if default and value.endswith(default) else value


def own_origins(scope: Scope, settings: Settings) -> set[str]:
    """The origins of this server's pages: the request's own, the public URL's, the content origin's."""
    scheme = scope.get("scheme", "http")
    host = header(scope, b"host")
    origins = {headers.origin_of(url) for url in (settings.public_url, settings.content_origin)}
    if host:
        origins.add(f"{scheme}://{_netloc(host, scheme)}")
    return origins - {""}


def same_origin(scope: Scope, settings: Settings, origin: str) -> bool:
    """Whether an Origin header names this server (scheme, host and port all compared)."""
    parts = origin.strip().lower().split("://", 1)
    if len(parts) != 2:
        return False
    return f"{parts[0]}://{_netloc(parts[1], parts[0])}" in own_origins(scope, settings)


def cross_site_write_allowed(scope: Scope, settings: Settings, origin: str) -> bool:
    allowed = {headers.origin_of(o) for o in settings.cors_origins}
    return same_origin(scope, settings, origin) or origin.strip().lower() in allowed


def on_content_origin(scope: Scope, settings: Settings) -> bool:
    """Whether the request was sent to STREAMHOLD_CONTENT_ORIGIN (which serves stream content only)."""
    if not settings.content_origin:
        return False
    host = header(scope, b"host") or ""
    scheme = settings.content_origin.split("://", 1)[0]
    wanted = settings.content_origin.split("://", 1)[1]
    return _netloc(host, scheme) == _netloc(wanted, scheme)


def _answer(status: int, message: str) -> ASGIResponse:
    body = json.dumps({"error": message}).encode()
    sent = {"content-type": "application/json", **headers.NOSNIFF_HEADERS}
    return ASGIResponse(body=body, status_code=status, headers=sent)


def not_found() -> ASGIResponse:
    return _answer(404, "not found: this host serves stream content only")


def refusal(scope: Scope, settings: Settings) -> ASGIResponse | None:
    """A keyless server's answer to a request for a name it does not serve, or a write from another site."""
    if settings.api_keys:
        return None
    own = frozenset(headers.url_host(url) for url in (settings.public_url, settings.content_origin)) - {""}
    host = header(scope, b"host") or ""
    if not headers.answers_to(host, own):
        return _answer(
            421,
            "this server has no API keys, so it answers only to loopback names and IP addresses, not to "
            f"host {headers.host_name(host)!r}; set STREAMHOLD_PUBLIC_URL to the URL you reach it by",
        )
    origin = header(scope, b"origin")
    if scope.get("method") not in headers.SAFE_METHODS and origin is not None:
        if not cross_site_write_allowed(scope, settings, origin):
            return _answer(
                403,
                "this server has no API keys, so it takes changes only from its own pages, not from "
                f"{origin!r}; list the origin in STREAMHOLD_CORS_ORIGINS to allow it",
            )
    return None


def preflight(scope: Scope, settings: Settings) -> ASGIResponse:
    """A CORS preflight answer: reads from anywhere; changes from anywhere only when they need a key."""
    method = (header(scope, b"access-control-request-method") or "GET").upper()
    origin = header(scope, b"origin") or ""
    allowed = (
        settings.api_keys
        or method in headers.SAFE_METHODS
        or cross_site_write_allowed(scope, settings, origin)
    )
    sent = dict(headers.NOSNIFF_HEADERS)
    if allowed:
        sent.update(headers.CORS)
    return ASGIResponse(body=b"", status_code=204, headers=sent)
