"""Scoped tokens at /tokens: minted, listed and revoked by an admin key (or anyone at a keyless server)."""

from __future__ import annotations

import json
import math
from typing import Any

from litestar import Request, delete, get, post
from litestar.exceptions import NotFoundException, PermissionDeniedException, ValidationException
from litestar.params import FromPath
from litestar.response.base import ASGIResponse

from .. import checks
from ..models import iso
from ..store.tokens import TokenRecord, Tokens
from .auth import RIGHTS, Principal, principal_of, unauthorized
from .responses import respond

MAX_TTL = 10 * 365 * 86400  # ten years; leave ttl out for a token that never expires
MAX_LABEL = 255
MAX_NAMESPACES = 100
NO_STORE = {"cache-control": "no-store"}


def _json(status: int, payload: Any) -> ASGIResponse:
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    return respond(status, {"content-type": "application/json", **NO_STORE}, body)


async def _admin(request: Request[Any, Any, Any]) -> Tokens:
    """The store's tokens, once the request is known to come from an admin."""
    principal: Principal = await principal_of(request)
    if principal.kind == "anonymous":
        raise unauthorized("managing tokens needs an API key: send Authorization: Bearer <key>")
    if not principal.full:
        raise PermissionDeniedException("managing tokens needs an API key (STREAMHOLD_API_KEYS), not a token")
    tokens: Tokens = request.app.state.store.tokens
    return tokens


def _scopes(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ValidationException('scopes must be a non-empty list, such as ["read", "write"]')
    for scope in value:
        if scope not in RIGHTS:
            raise ValidationException(f"unknown scope {scope!r}: scopes are {', '.join(RIGHTS)}")
    return tuple(s for s in RIGHTS if s in value)


def _namespace_pattern(value: Any) -> str:
    """A namespace, a prefix written `exports/*`, or `*` for every namespace."""
    if value == "*":
        return "*"
    stem = value[:-2] if isinstance(value, str) and value.endswith("/*") else value
    try:
        checks.namespace(stem)
    except checks.InvalidInputError:
        raise ValidationException(
            f"namespace {value!r} is not a namespace (1 to 254 printable characters), a prefix such as "
            '"exports/*", or "*"'
        ) from None
    return str(value)


def _namespaces(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ValidationException(
            'namespaces must list at least one namespace, such as ["chat"] or ["exports/*"]'
        )
    if len(value) > MAX_NAMESPACES:
        raise ValidationException(f"a token covers at most {MAX_NAMESPACES} namespaces")
    return tuple(dict.fromkeys(_namespace_pattern(v) for v in value))


def _ttl(value: Any) -> float | None:
    if value is None or value == 0:
        return None
    number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not number or not 0 < value <= MAX_TTL:
        raise ValidationException(
            f"ttl must be a number of seconds from 1 to {MAX_TTL}, or 0 (or left out) for no expiry"
        )
    return float(value)


def _label(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > MAX_LABEL or not value.isprintable():
        raise ValidationException(f"label must be text of at most {MAX_LABEL} printable characters")
    return value


def token_json(record: TokenRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "scopes": list(record.scopes),
        "namespaces": list(record.namespaces),
        "expires_at": iso(record.expires_at),
        "label": record.label,
        "created_at": iso(record.created_at),
    }


@post("/tokens", status_code=201)
async def mint_token(request: Request[Any, Any, Any]) -> ASGIResponse:
    """Mint a token from {scopes, namespaces, ttl?, label?}; its secret is in this answer only."""
    tokens = await _admin(request)
    raw = await request.body()
    try:
        body = json.loads(raw) if raw.strip() else None
    except (ValueError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        raise ValidationException(
            'the body must be a JSON object such as {"scopes": ["read"], "namespaces": ["chat"], "ttl": 3600}'
        )
    unknown = set(body) - {"scopes", "namespaces", "ttl", "label"}
    if unknown:
        raise ValidationException(f"unknown fields {sorted(unknown)}: give scopes, namespaces, ttl and label")
    record, text = await tokens.mint(
        _scopes(body.get("scopes")), _namespaces(body.get("namespaces")), _ttl(body.get("ttl")),
        _label(body.get("label")),
    )
    return _json(201, {**token_json(record), "token": text})


@get("/tokens")
async def list_tokens(request: Request[Any, Any, Any]) -> ASGIResponse:
    """The tokens not revoked (never their secrets)."""
    tokens = await _admin(request)
    return _json(200, {"tokens": [token_json(r) for r in await tokens.list()]})


@delete("/tokens/{token_id:str}", status_code=200)
async def revoke_token(token_id: FromPath[str], request: Request[Any, Any, Any]) -> ASGIResponse:
    """Revoke a token: every process refuses it within a second."""
    tokens = await _admin(request)
    if len(token_id) > 32 or not await tokens.revoke(token_id):
        raise NotFoundException(f"no token {token_id!r} (it may have been revoked already)")
    return respond(204)


routes = [mint_token, list_tokens, revoke_token]
