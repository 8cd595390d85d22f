"""Dashboard sign-in: signed cookies recorded in the database, and CSRF checks on every change.

A browser signs in with an API key (every right everywhere) or a scoped token holding `manage` (the token's
rights over its namespaces). The database records which token a sign-in used, and every request reads
that token again (at most `tokens.CACHE_SECONDS` old), so revoking it or its expiry ends the sign-in on every
process within a second.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from litestar import Request, Response
from litestar.datastructures import Cookie, FormMultiDict
from litestar.exceptions import ClientException

from .. import clock
from ..checks import BEYOND, count
from ..http import guard
from ..http.auth import ADMIN, OPEN, Principal, key_is_valid
from ..http.headers import PAGE_HEADERS
from ..settings import Settings
from ..store.store import Store
from ..store.tokens import TokenRecord

COOKIE = "streamhold_session"
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf"
SESSION_SECONDS = 12 * 3600
SIGNIN_PATH = "/signin"
MAX_NEXT = 2048
FORM_LIMIT = 8 * 1024  # bytes of a sign-in, sign-out or demo form: a key, a CSRF token and a path fit
ENDED_KEY = "streamhold_token_ended"  # request state: the sign-in's token was revoked or has expired
ENDED_NOTICE = "The token this browser signed in with was revoked or has expired. Sign in again."

# Without API keys there is nothing to derive a secret from; a per-process one still ties the CSRF token to
# pages this process served (such a server listens on loopback only, so one process is the usual case).
_PROCESS_SECRET = secrets.token_bytes(32)
RELOAD_PAGE = (
    '<!doctype html><meta charset="utf-8"><meta http-equiv="refresh" content="0">'
    "<title>Streamhold</title><p>Opening the dashboard…</p>"
)


@dataclass(frozen=True, slots=True)
class Session:
    """A signed-in browser (or, without API keys, anyone): what its CSRF token is derived from."""

    nonce: str
    secret: bytes
    expires: int
    signed_in: bool
    principal: Principal = ADMIN  # what the sign-in may do: an API key's every right, or its token's

    @property
    def scoped(self) -> bool:
        """Signed in with a token: it sees and changes only the token's namespaces."""
        return not self.principal.full

    @property
    def csrf(self) -> str:
        return _mac(self.secret, f"csrf.{self.nonce}")


def _mac(secret: bytes, message: str) -> str:
    return hmac.new(secret, message.encode(), hashlib.sha256).hexdigest()


def _secret_for(key: str) -> bytes:
    """A signing secret per API key, so removing a key from STREAMHOLD_API_KEYS ends its sessions."""
    return hmac.new(key.encode(), b"streamhold dashboard session v1", hashlib.sha256).digest()


def _token_secret(record: TokenRecord) -> bytes:
    """A signing secret per token, from the digest the server keeps (the token itself is never stored)."""
    label = b"streamhold dashboard token sign-in v1"
    return hmac.new(record.secret_hash.encode(), label, hashlib.sha256).digest()


def token_principal(record: TokenRecord) -> Principal:
    return Principal("token", frozenset(record.scopes), record.namespaces, record.id)


def _id_hash(value: str) -> str:
    """What the database keeps of a session: a digest of the cookie's random id, never the id itself."""
    parts = value.split(".")
    return hashlib.sha256(parts[2].encode()).hexdigest() if len(parts) == 4 else ""


async def start(store: Store, key: str) -> str:
    """A new session's cookie value, recorded so that signing out can end it on every process."""
    value = issue(key)
    await store.sign_ins.add(_id_hash(value), float(value.split(".")[1]))
    return value


async def start_with_token(store: Store, record: TokenRecord) -> str:
    """A new sign-in with a token (which the caller has checked); `current` ends it when the token ends."""
    value = _signed(_token_secret(record), int(clock.now() + SESSION_SECONDS))
    await store.sign_ins.add(_id_hash(value), float(value.split(".")[1]), record.id)
    return value


async def end(request: Request[Any, Any, Any], store: Store) -> None:
    """Forget the request's session, so its cookie no longer signs anyone in."""
    value = request.cookies.get(COOKIE)
    if value and _id_hash(value):
        await store.sign_ins.end(_id_hash(value))


def issue(key: str, now: float | None = None) -> str:
    """A cookie value for a session signed in with `key` (which the caller has checked)."""
    return _signed(_secret_for(key), int((clock.now() if now is None else now) + SESSION_SECONDS))


def _signed(secret: bytes, expires: int) -> str:
    body = f"v1.{expires}.{secrets.token_hex(16)}"
    return f"{body}.{_mac(secret, body)}"


def _parts(value: str, now: float | None) -> list[str] | None:
    """A cookie value's fields, or None when it is not shaped like one or has expired."""
    parts = value.split(".")
    # ASCII digits only, and few of them: `²` passes str.isdigit but not int().
    expires = count(parts[1]) if len(parts) == 4 and parts[0] == "v1" else None
    if expires is None or expires == BEYOND:
        return None
    return parts if expires > (clock.now() if now is None else now) else None


def verify(value: str, settings: Settings, now: float | None = None) -> Session | None:
    """The session a cookie value stands for, or None when it is forged, expired or its key was removed."""
    parts = _parts(value, now)
    if parts is None:
        return None
    body, mac = ".".join(parts[:3]), parts[3]
    found: bytes | None = None
    for key in settings.api_keys:
        secret = _secret_for(key)
        if hmac.compare_digest(_mac(secret, body), mac):
            found = secret
    return Session(parts[2], found, int(parts[1]), True) if found is not None else None


def verify_token(value: str, record: TokenRecord, now: float | None = None) -> Session | None:
    """The sign-in a token's cookie value stands for; None when forged or expired, or the token has ended."""
    parts = _parts(value, now)
    if parts is None or not record.alive(now):
        return None
    secret = _token_secret(record)
    if not hmac.compare_digest(_mac(secret, ".".join(parts[:3])), parts[3]):
        return None
    return Session(parts[2], secret, int(parts[1]), True, token_principal(record))


async def current(request: Request[Any, Any, Any], settings: Settings) -> Session | None:
    """The request's session; without API keys every request has an anonymous one.

    A token's sign-in is judged again on every request: when its token was revoked or has expired, the
    sign-in is over (None) and `denied` sends the browser to sign in with a notice saying why.
    """
    if not settings.api_keys:
        return Session("open", _PROCESS_SECRET, 0, False, OPEN)
    value = request.cookies.get(COOKIE)
    if not value or _parts(value, None) is None:
        return None
    store: Store = request.app.state.store
    holder = await store.sign_ins.holder(_id_hash(value))
    if holder is None:
        return None
    if not holder:
        return verify(value, settings)
    record = await store.tokens.find(holder)
    if record is None or not record.alive():
        request.scope.setdefault("state", {})[ENDED_KEY] = True
        return None
    return verify_token(value, record)


async def reader(request: Request[Any, Any, Any]) -> Principal | None:
    """What a signed-in browser may read with its cookie alone (the app's `sign_in`, see `principal_of`)."""
    if COOKIE not in request.cookies:
        return None
    found = await current(request, request.app.state.settings)
    return found.principal if found is not None and found.signed_in else None


def same_origin(request: Request[Any, Any, Any], settings: Settings) -> bool:
    """False when the browser says the request came from another site (Origin, else Sec-Fetch-Site).

    The Origin is compared whole (scheme, host, port): an http:// page is not the https:// dashboard.
    """
    origin = request.headers.get("origin")
    if origin is not None:
        return guard.same_origin(request.scope, settings, origin)
    return request.headers.get("sec-fetch-site", "same-origin") in ("same-origin", "none")


def csrf_ok(
    request: Request[Any, Any, Any], settings: Settings, session: Session, form_token: str = ""
) -> bool:
    """The request carries the session's CSRF token (header or form field) and comes from our own origin."""
    token = request.headers.get(CSRF_HEADER) or form_token
    return bool(token) and hmac.compare_digest(token, session.csrf) and same_origin(request, settings)


def signin_url(next_url: str, ended: bool = False) -> str:
    """The sign-in form, returning to `next_url`; `ended` has it say that the token is no longer good."""
    query = [f"next={quote(next_url, safe='/')}"] if next_url not in ("", "/") else []
    query += ["ended=token"] if ended else []
    return f"{SIGNIN_PATH}?{'&'.join(query)}" if query else SIGNIN_PATH


def token_ended(request: Request[Any, Any, Any]) -> bool:
    """Whether `current` found this request's sign-in over because its token was revoked or has expired."""
    return bool(request.scope.get("state", {}).get(ENDED_KEY))


def safe_next(next_url: str) -> str:
    """A path on this server to return to after sign-in; anything else (another host, a scheme) becomes `/`.

    Browsers drop tabs and newlines from URLs and read a backslash as a slash, so `/<tab>/evil.example`
    would lead to `//evil.example`: such characters are refused, not cleaned.
    """
    if not next_url.startswith("/") or len(next_url) > MAX_NEXT:
        return "/"
    if any(ord(c) <= 0x20 or ord(c) == 0x7F or c == "\\" or c.isspace() for c in next_url):
        return "/"
    if any(0xD800 <= ord(c) <= 0xDFFF for c in next_url):  # a lone surrogate has no UTF-8 to quote
        return "/"
    if next_url.startswith("//"):
        return "/"
    # Header values are Latin-1: non-ASCII characters travel percent-encoded.
    return quote(next_url, safe="".join(chr(c) for c in range(0x21, 0x7F)))


async def read_form(request: Request[Any, Any, Any]) -> FormMultiDict:
    """The request's form fields; a form whose bytes are not text in its stated charset is a 400."""
    try:
        return await request.form()
    except (UnicodeDecodeError, LookupError) as exc:
        raise ClientException("the form is not valid UTF-8 text; send it as the sign-in page does") from exc


def denied(request: Request[Any, Any, Any], *, change: bool) -> Response[str]:
    """No valid session: pages go to the sign-in form, htmx requests and changes get 401."""
    path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    ended = token_ended(request)
    page = not request.headers.get("hx-request") or request.headers.get("hx-history-restore-request")
    if request.method == "GET" and page:
        if request.headers.get("sec-fetch-site") == "cross-site":
            # A SameSite=Strict cookie is withheld on a link followed from another site; a same-site
            # reload sends it, so a shared dashboard link works for someone who is signed in.
            headers = {"cache-control": "no-store", **PAGE_HEADERS}
            return Response(RELOAD_PAGE, media_type="text/html", headers=headers)
        return Response("", status_code=303, headers={"location": signin_url(path, ended)})
    # htmx follows HX-Redirect, so a tab whose session expired lands on the sign-in form by itself.
    back = request.headers.get("hx-current-url", "")
    back_path = urlsplit(back).path + (f"?{urlsplit(back).query}" if urlsplit(back).query else "")
    headers = {"hx-redirect": signin_url(safe_next(back_path) if back else "/", ended)}
    message = "sign in first" if not change else "sign in first: this change needs a dashboard session"
    if ended:
        message = "sign in again: the token this browser signed in with was revoked or has expired"
    return Response(message, status_code=401, headers=headers, media_type="text/plain")


def forbidden() -> Response[str]:
    return Response(
        "this change needs the dashboard's CSRF token and must come from its own origin; reload the page",
        status_code=403,
        media_type="text/plain",
    )


def check_key(presented: str, settings: Settings) -> bool:
    return bool(presented) and key_is_valid(presented, settings.api_keys)


def _secure(request: Request[Any, Any, Any], settings: Settings) -> bool:
    return request.url.scheme == "https" or settings.public_url.startswith("https://")


def session_cookie(request: Request[Any, Any, Any], settings: Settings, value: str) -> Cookie:
    return Cookie(
        key=COOKIE,
        value=value,
        max_age=SESSION_SECONDS,
        path="/",
        httponly=True,
        samesite="strict",
        secure=_secure(request, settings),
    )


def cleared_cookie(request: Request[Any, Any, Any], settings: Settings) -> Cookie:
    secure = _secure(request, settings)
    return Cookie(key=COOKIE, value="", max_age=0, path="/", httponly=True, samesite="strict", secure=secure)
