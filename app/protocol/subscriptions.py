"""The protocol's reserved subscription APIs under /v1/stream/__ds/: subscriptions, JWKS, callbacks, claims.

Every path under `__ds` is answered here, before any stream route: no stream is ever named `__ds`.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

from litestar import Request
from litestar.exceptions import HTTPException, NotAuthorizedException, PermissionDeniedException
from litestar.types import Receive, Scope, Send

from ..errors import StreamError
from ..http.auth import Principal, bearer_token, principal_of, require, require_key
from ..http.responses import respond
from ..settings import Settings
from ..subscriptions import activity, manage, state
from ..subscriptions import keys as keyring
from ..subscriptions.engine import SubscriptionEngine, public_jwks
from ..subscriptions.model import Config, SubscriptionError, check_id, invalid, not_found, stream_paths
from ..subscriptions.signing import SigningKey, TokenError
from ..subscriptions.urls import webhook_url_problem
from .wire import PREFIX, namespace_of, read_body

RESERVED = "/__ds"
MAX_BODY = 256 * 1024
JSON = {"content-type": "application/json"}


def _origin(request: Request[Any, Any, Any], settings: Settings) -> str:
    return settings.public_url or str(request.base_url).rstrip("/")


def _segments(scope: Scope) -> list[str]:
    """The path after `/v1/stream/__ds/`, split on raw slashes, so `%2F` inside a segment stays in it."""
    raw = scope.get("raw_path")
    path = raw.decode("latin-1").split("?", 1)[0] if raw else PREFIX + scope["path"]
    rest = path[len(PREFIX + RESERVED) :] if path.startswith(PREFIX + RESERVED) else ""
    return [unquote(s) for s in rest.strip("/").split("/")] if rest.strip("/") else []


async def _json_body(request: Request[Any, Any, Any]) -> dict[str, Any]:
    raw = await read_body(request, MAX_BODY)
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise invalid("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise invalid("the body must be a JSON object")
    return body


def _view(
    engine: SubscriptionEngine, row: state.Row, cursors: list[state.Row], origin: str
) -> dict[str, Any]:
    config = Config.from_json(row["config_json"])
    view: dict[str, Any] = {"id": row["id"], "subscription_id": row["id"], "type": row["kind"]}
    if config.pattern is not None:
        view["pattern"] = config.pattern
    view["streams"] = [state.link_view(c) for c in cursors]
    if config.webhook_url is not None:
        view["webhook"] = {
            "url": config.webhook_url,
            "signing": {
                "alg": "ed25519",
                "kid": engine.key.kid,
                "jwks_url": f"{origin}{PREFIX}{RESERVED}/jwks.json",
            },
        }
    if config.wake_stream is not None:
        view["wake_stream"] = config.wake_stream
    view["lease_ttl_ms"] = config.lease_ttl_ms
    view["created_at"] = _iso(row["created_at"])
    view["status"] = row["status"]
    if config.description is not None:
        view["description"] = config.description
    return view


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _bearer(request: Request[Any, Any, Any]) -> str:
    token = bearer_token(request.headers.get("authorization", ""))
    if not token:
        raise SubscriptionError("TOKEN_INVALID", "send the wake's token as Authorization: Bearer <token>")
    return token


async def _put(engine: SubscriptionEngine, request: Request[Any, Any, Any], sid: str) -> tuple[int, Any]:
    principal = await _manager(request)
    config = Config.parse(await _json_body(request))
    await _check_reach(principal, engine, sid, [config])
    origin = _origin(request, engine.settings)
    existing = await engine.read(lambda conn, now: state.load(conn, sid, lock=False))
    if existing is None and config.webhook_url is not None:
        problem = webhook_url_problem(config.webhook_url, engine.settings.webhook_allow_loopback)
        if problem is not None:
            raise SubscriptionError("WEBHOOK_URL_REJECTED", problem)
    row, created = await engine.run(lambda conn, now, effects: manage.create(conn, sid, config, origin, now))
    engine.any_subscriptions = True
    cursors = await engine.read(lambda conn, now: state.links_of(conn, sid))
    return (201 if created else 200), _view(engine, row, cursors, origin)


async def _get(engine: SubscriptionEngine, request: Request[Any, Any, Any], sid: str) -> tuple[int, Any]:
    def both(conn: Any, now: float) -> tuple[state.Row | None, list[state.Row]]:
        return state.load(conn, sid, lock=False), state.links_of(conn, sid)

    row, cursors = await engine.read(both)
    if row is None:
        raise not_found(sid)
    return 200, _view(engine, row, cursors, _origin(request, engine.settings))


async def _callback(
    engine: SubscriptionEngine, request: Request[Any, Any, Any], sid: str, action: str
) -> tuple[int, Any]:
    token = _bearer(request)  # before the body is read
    body = await _json_body(request)

    def apply(conn: Any, now: float, effects: state.Effects) -> bool:
        row = state.fresh(conn, sid, now, effects)  # a lease that ran out has ended the wake: FENCED
        try:
            generation = engine.token_generation(token, sid, now, conn)
        except TokenError as exc:
            raise SubscriptionError(exc.code, str(exc)) from None
        wanted = "pull-wake" if action in ("ack", "release") else "webhook"
        if row["kind"] != wanted:
            raise invalid(f"{action} is for {wanted} subscriptions; this one is {row['kind']}")
        state.fence(row, generation, body)
        if action == "release":
            state.release(conn, row, now, effects)
        else:
            state.acknowledge(conn, row, body, now, effects)
        return effects.next_wake

    next_wake = await engine.run(apply)
    if action == "release":
        return 204, None
    return 200, {"ok": True, "next_wake": next_wake}


async def _claim(engine: SubscriptionEngine, request: Request[Any, Any, Any], sid: str) -> tuple[int, Any]:
    body = await _json_body(request)
    worker = body.get("worker")
    if not isinstance(worker, str) or not worker.strip() or len(worker) > 255:
        raise invalid('claim needs a worker name: {"worker": "worker-1"}')

    def claim(conn: Any, now: float, effects: state.Effects) -> dict[str, Any]:
        row = state.claim(conn, sid, worker, now, effects)
        activity.record(conn, sid, True, None, now)
        config = Config.from_json(row["config_json"])
        return {
            "wake_id": row["wake_id"],
            "generation": row["generation"],
            "token": engine.key.mint_token(sid, row["generation"], now),
            "streams": state.wake_streams(conn, row, now),
            "lease_ttl_ms": config.lease_ttl_ms,
        }

    return 200, await engine.run(claim)


async def _dispatch(request: Request[Any, Any, Any], engine: SubscriptionEngine) -> tuple[int, Any]:
    parts, method = _segments(request.scope), request.method
    settings = engine.settings
    if parts == ["jwks.json"]:
        if method != "GET":
            raise _MethodNotAllowed("GET")
        return 200, public_jwks(engine.keys)
    if parts in (["jwks", "rotate"], ["jwks", "retire"]):
        if method != "POST":
            raise _MethodNotAllowed("POST")
        _require_admin(request, settings)
        return 200, await _keys_action(engine, parts[1])
    if parts == ["subscriptions"]:
        if method != "GET":
            raise _MethodNotAllowed("GET")
        _require_admin(request, settings)
        return 200, await _listing(engine)
    if len(parts) < 2 or parts[0] != "subscriptions":
        raise not_found("/".join(parts))
    sid = check_id(parts[1])
    rest = parts[2:]
    if not rest:
        allowed = {"PUT": _put, "GET": _get}
        if method == "DELETE":
            await _check_reach(await _manager(request), engine, sid)
            await engine.run(lambda conn, now, effects: manage.remove(conn, sid))
            return 204, None
        if method not in allowed:
            raise _MethodNotAllowed("PUT, GET, DELETE")
        if method == "GET":
            await _check_reach(await _manager(request), engine, sid)
        return await allowed[method](engine, request, sid)
    if rest[0] == "streams":
        if len(rest) == 1 and method == "POST":
            principal = await _manager(request)
            paths = stream_paths((await _json_body(request)).get("streams"), "streams")
            await _check_reach(principal, engine, sid, paths=paths)
            await engine.run(lambda conn, now, effects: manage.add_streams(conn, sid, paths, now))
            return 204, None
        if len(rest) > 1 and method == "DELETE":
            await _check_reach(await _manager(request), engine, sid)
            path = "/".join(rest[1:]).strip("/")
            await engine.run(lambda conn, now, effects: manage.remove_stream(conn, sid, path))
            return 204, None
        raise _MethodNotAllowed("POST" if len(rest) == 1 else "DELETE")
    if len(rest) == 1 and rest[0] in ("callback", "ack", "release", "claim"):
        if method != "POST":
            raise _MethodNotAllowed("POST")
        if rest[0] == "claim":
            await _check_reach(await _manager(request), engine, sid)
            return await _claim(engine, request, sid)
        return await _callback(engine, request, sid, rest[0])
    raise not_found(sid)


GLOB = re.compile(r"[*?\[\]{}]")


def reach(config: Config) -> set[str] | None:
    """The namespaces a subscription's streams (and its wake stream) can be in; None when its pattern can
    match any namespace. A stream's namespace is its name's first segment, or `default` for one segment.
    """
    found = {namespace_of(path) for path in config.streams}
    if config.wake_stream is not None:
        found.add(namespace_of(config.wake_stream))
    if config.pattern is None:
        return found
    head, slash, _ = config.pattern.partition("/")
    if slash:
        return None if GLOB.search(head) else found | {head}
    return None if "**" in head else found | {"default"}


async def _manager(request: Request[Any, Any, Any]) -> Principal:
    """The caller, if it may manage subscriptions at all: 401 without a credential, 403 without `manage`."""
    principal = await principal_of(request)
    require(principal, "manage")
    return principal


async def _check_reach(
    principal: Principal,
    engine: SubscriptionEngine,
    sid: str,
    asked: Iterable[Config] = (),
    paths: Iterable[str] = (),
) -> None:
    """A token manages a subscription only if it covers every namespace the subscription (as it is, and as
    asked) can reach; an admin key manages every one."""
    if principal.full:
        return
    configs = list(asked)
    existing = await engine.read(lambda conn, now: state.load(conn, sid, lock=False))
    if existing is not None:
        configs.append(Config.from_json(existing["config_json"]))
    namespaces = {namespace_of(path) for path in paths}
    for config in configs:
        reached = reach(config)
        if reached is None:
            if "*" not in principal.namespaces:
                raise PermissionDeniedException(
                    f"the pattern {config.pattern!r} can match streams of any namespace: managing it needs "
                    "an admin key or a manage token for every namespace (*)"
                )
            continue
        namespaces |= reached
    for namespace in sorted(namespaces):
        require(principal, "manage", namespace)


def _require_admin(request: Request[Any, Any, Any], settings: Settings) -> None:
    """An API key when keys are set; without keys, a caller on the server's own machine only."""
    require_key(request, settings)
    host = request.client.host if request.client else ""
    try:
        local = ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = False
    if not settings.api_keys and not local:
        raise NotAuthorizedException("a server without API keys takes this call from its own machine only")


async def _listing(engine: SubscriptionEngine) -> dict[str, Any]:
    """Every subscription with what it last did: not part of the protocol, for operators."""
    found = await engine.read(lambda conn, now: activity.listing(conn))
    for item in found:
        item["created_at"] = _iso(item["created_at"])
        if item["last_delivery_at"] is not None:
            item["last_delivery_at"] = _iso(item["last_delivery_at"])
    return {"subscriptions": found}


async def _keys_action(engine: SubscriptionEngine, action: str) -> dict[str, Any]:
    """Rotate (a new key signs; the previous stays published for a grace) or retire the older keys."""

    def act(conn: Any, now: float, effects: state.Effects) -> tuple[list[SigningKey], list[str]]:
        retired = keyring.retire(conn, now) if action == "retire" else []
        if action == "rotate":
            keyring.rotate(conn, now)
        return keyring.published(conn, now), retired

    published, retired = await engine.run(act)
    engine.use_keys(published)  # this process at once; the others at their next reload of the keys
    return {
        "kid": published[0].kid,
        "published": [k.kid for k in published],
        "retired": retired,
        "grace_s": keyring.KEY_GRACE_S,
    }


class _MethodNotAllowed(Exception):
    def __init__(self, allow: str) -> None:
        super().__init__(allow)
        self.allow = allow


async def reserved_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Every request under /v1/stream/__ds/."""
    request: Request[Any, Any, Any] = Request(scope, receive, send)
    engine: SubscriptionEngine = request.app.state.subscriptions
    headers = dict(JSON)
    try:
        status, payload = await _dispatch(request, engine)
        if _segments(scope) == ["jwks.json"]:
            headers = {"content-type": "application/jwk-set+json", "cache-control": "public, max-age=300"}
        body = b"" if payload is None else json.dumps(payload, separators=(",", ":")).encode()
    except SubscriptionError as exc:
        status, body = exc.status, json.dumps(exc.body).encode()
    except StreamError as exc:  # a body over the limit, or one that never arrived
        status = exc.status
        body = json.dumps({"error": {"code": "INVALID_REQUEST", "message": str(exc)}}).encode()
    except _MethodNotAllowed as exc:
        status, body = 405, b"method not allowed"
        headers = {"content-type": "text/plain", "allow": exc.allow}
    except HTTPException as exc:  # a missing API key, or a body over the server's limit
        status, body = exc.status_code, json.dumps({"error": exc.detail}).encode()
        headers = {**(exc.headers or {}), **JSON}
    await respond(status, headers, body)(scope, receive, send)
