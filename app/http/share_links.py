"""Share links: expiring, signed grants to read one stream (and, when made so, to ask its writer to stop).

A link is `v1.<stream id>.<generation>.<expires>.<r|s>.<mac>`, sent as the `share` query parameter (a
browser's EventSource cannot send headers). The MAC is keyed by a key derived from STREAMHOLD_SECRET, so
every process with the same secret accepts the link and changing the secret revokes every link at once. The
link names the stream's id and generation: a stream deleted and made again under the name is another stream.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, TypeVar

from .. import clock
from ..errors import InvalidRequestError, SharingUnavailableError
from ..models import StreamState, iso
from ..urls import stream_url, viewer_url

T = TypeVar("T")
PARAM = "share"
MIN_TTL = 1.0
MAX_TTL = 90 * 86400.0  # as long as a stream may live
EXPIRED = "this share link has expired: ask for a new one"
INVALID = (
    "this share link is not valid (it was altered, or the server's STREAMHOLD_SECRET has changed since it "
    "was made): ask for a new one"
)
NO_SECRET = (
    "share links need STREAMHOLD_SECRET: set it on the server (a long random string, the same on every "
    "process) and restart it"
)
UNSIGNED = "this server has no STREAMHOLD_SECRET, so it accepts no share links: ask its operator to set it"


class LinkError(Exception):
    """A link that grants nothing: forged, altered, signed with another secret, or expired."""


@dataclass(frozen=True, slots=True)
class Link:
    """What a valid link grants: reading this incarnation of one stream until `expires`, maybe stopping it."""

    stream_id: str
    generation: int
    expires: int
    stop: bool


def _key(secret: str) -> bytes:
    """The links' own key, so that STREAMHOLD_SECRET itself signs nothing another feature might echo."""
    return hmac.new(secret.encode(), b"streamhold share link v1", hashlib.sha256).digest()


def _mac(secret: str, body: str) -> str:
    digest = hmac.new(_key(secret), body.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def sign(secret: str, link: Link) -> str:
    """The link's text, safe in a URL as it is."""
    body = f"v1.{link.stream_id}.{link.generation}.{link.expires}.{'s' if link.stop else 'r'}"
    return f"{body}.{_mac(secret, body)}"


def verify(value: str, secret: str, now: float) -> Link:
    """The grant of a link's text; LinkError with a message saying what to do when it grants nothing."""
    if not secret:
        raise LinkError(UNSIGNED)
    parts = value.split(".")
    if len(parts) != 6 or parts[0] != "v1":
        raise LinkError(INVALID)
    body, mac = ".".join(parts[:5]), parts[5]
    if not hmac.compare_digest(_mac(secret, body).encode(), mac.encode("utf-8", "replace")):
        raise LinkError(INVALID)
    _, stream_id, generation, expires, right = parts[:5]
    if not (generation.isdigit() and expires.isdigit() and right in ("r", "s")):
        raise LinkError(INVALID)  # signed by us, so this cannot happen unless the format changes
    if int(expires) <= now:
        raise LinkError(EXPIRED)
    return Link(stream_id, int(generation), int(expires), right == "s")


def check_ttl(value: Any) -> float:
    """A link's lifetime in seconds: a number from MIN_TTL to MAX_TTL (400 otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRequestError(f"ttl must be a number of seconds from 1 to {MAX_TTL:.0f} (90 days)")
    if not MIN_TTL <= value <= MAX_TTL:
        raise InvalidRequestError(f"ttl must be a number of seconds from 1 to {MAX_TTL:.0f} (90 days)")
    return float(value)


def share(secret: str, origin: str, state: StreamState, ttl: Any, stop: Any, now: float) -> dict[str, Any]:
    """A new link to the stream: its viewer and content URLs, its expiry (ISO 8601), whether it stops."""
    if not secret:
        raise SharingUnavailableError(NO_SECRET)
    seconds = check_ttl(ttl)
    if not isinstance(stop, bool):
        raise InvalidRequestError("stop must be true or false")
    link = Link(state.id, state.generation, math.ceil(now + seconds), stop)
    query = f"?{PARAM}={sign(secret, link)}"
    return {
        "url": viewer_url(origin, state.name) + query,
        "content_url": stream_url(origin, state.id) + query,
        "expires_at": iso(link.expires),
        "stop": stop,
    }


async def while_valid(pieces: AsyncGenerator[T, None], expires: float | None) -> AsyncGenerator[T, None]:
    """A live body (SSE, a tail) that ends at its first piece after the link that opened it expired: nothing
    committed after expiry reaches the reader, and a reconnect is then refused with the reason."""
    async with aclosing(pieces):
        async for piece in pieces:
            if expires is not None and clock.now() >= expires:
                return
            yield piece
