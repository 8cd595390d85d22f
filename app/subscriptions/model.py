"""Subscription values: the checked configuration, path globs, errors with their protocol codes."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from ..errors import StreamError
from ..store.subscription_tables import MAX_SUBSCRIPTION_ID

DEFAULT_LEASE_MS = 30_000
MIN_LEASE_MS, MAX_LEASE_MS = 1_000, 600_000
ZERO_OFFSET = "0000000000000000_0000000000000000"
UNSEEN = "-1"  # the cursor of a stream linked by its first append: everything in it is pending
MAX_EXPLICIT_STREAMS = 1000
MAX_TEXT = 1024
KINDS = ("webhook", "pull-wake")

STATUS_OF = {
    "INVALID_REQUEST": 400,
    "WEBHOOK_URL_REJECTED": 400,
    "TOKEN_INVALID": 401,
    "TOKEN_EXPIRED": 401,
    "SUBSCRIPTION_NOT_FOUND": 404,
    "SUBSCRIPTION_ALREADY_EXISTS": 409,
    "FENCED": 409,
    "ALREADY_CLAIMED": 409,
    "NO_PENDING_WORK": 409,
    "INVALID_OFFSET": 409,
}


class SubscriptionError(StreamError):
    """A refusal with the protocol's error code; `body` replaces the usual one where the protocol says so."""

    def __init__(self, code: str, message: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = STATUS_OF[code]
        self.body = body or {"error": {"code": code, "message": message}}


def invalid(message: str) -> SubscriptionError:
    return SubscriptionError("INVALID_REQUEST", message)


def not_found(subscription_id: str) -> SubscriptionError:
    return SubscriptionError("SUBSCRIPTION_NOT_FOUND", f"no subscription {subscription_id!r}")


def check_id(subscription_id: str) -> str:
    if not subscription_id or len(subscription_id) > MAX_SUBSCRIPTION_ID or "/" in subscription_id:
        raise invalid(f"a subscription id is 1 to {MAX_SUBSCRIPTION_ID} characters, without '/'")
    if not subscription_id.isprintable():
        raise invalid("a subscription id may not contain control characters")
    return subscription_id


def stream_paths(value: object, field: str) -> list[str]:
    """A list of stream paths (relative to the stream root), checked."""
    if not isinstance(value, list) or not all(isinstance(p, str) and p.strip("/") for p in value):
        raise invalid(f'{field} must be an array of non-empty stream paths, such as ["orders/42"]')
    if len(value) > MAX_EXPLICIT_STREAMS:
        raise invalid(f"{field} may name at most {MAX_EXPLICIT_STREAMS} streams")
    paths = [p.strip("/") for p in value]
    if any(len(p) > MAX_TEXT or not p.isprintable() for p in paths):
        raise invalid(f"{field} has a path that is too long or has control characters")
    return paths


@dataclass(frozen=True)
class Config:
    """What a client asked for; two PUTs with equal configs re-confirm the same subscription."""

    kind: str
    pattern: str | None
    streams: tuple[str, ...]
    webhook_url: str | None
    wake_stream: str | None
    lease_ttl_ms: int
    description: str | None

    @classmethod
    def parse(cls, body: object) -> Config:
        if not isinstance(body, dict):
            raise invalid("the body must be a JSON object")
        kind = body.get("type")
        if kind not in KINDS:
            raise invalid('type must be "webhook" or "pull-wake"')
        pattern = body.get("pattern")
        if pattern is not None:
            if not isinstance(pattern, str) or not pattern.strip("/") or len(pattern) > MAX_TEXT:
                raise invalid('pattern must be a non-empty glob such as "events/*" or "orders/**"')
            pattern = pattern.strip("/")
        streams = tuple(sorted(set(stream_paths(body["streams"], "streams")))) if "streams" in body else ()
        if pattern is None and not streams:
            raise invalid("give a pattern, a list of streams, or both")
        url = wake_stream = None
        if kind == "webhook":
            webhook = body.get("webhook")
            url = webhook.get("url") if isinstance(webhook, dict) else None
            if not isinstance(url, str) or not url:
                raise invalid(
                    'a webhook subscription needs webhook.url, e.g. {"webhook": {"url": "https://…"}}'
                )
        else:
            wake_stream = body.get("wake_stream")
            if not isinstance(wake_stream, str) or not wake_stream.strip("/"):
                raise invalid("a pull-wake subscription needs wake_stream, the stream its wake events go to")
            wake_stream = wake_stream.strip("/")
        lease = body.get("lease_ttl_ms", DEFAULT_LEASE_MS)
        if isinstance(lease, bool) or not isinstance(lease, int) or not MIN_LEASE_MS <= lease <= MAX_LEASE_MS:
            raise invalid(f"lease_ttl_ms must be a whole number from {MIN_LEASE_MS} to {MAX_LEASE_MS}")
        description = body.get("description")
        if description is not None and (not isinstance(description, str) or len(description) > MAX_TEXT):
            raise invalid(f"description must be a string of at most {MAX_TEXT} characters")
        return cls(kind, pattern, streams, url, wake_stream, lease, description)

    def to_json(self) -> str:
        return json.dumps(
            {
                "type": self.kind,
                "pattern": self.pattern,
                "streams": list(self.streams),
                "webhook_url": self.webhook_url,
                "wake_stream": self.wake_stream,
                "lease_ttl_ms": self.lease_ttl_ms,
                "description": self.description,
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> Config:
        d = json.loads(text)
        return cls(
            d["type"],
            d["pattern"],
            tuple(d["streams"]),
            d["webhook_url"],
            d["wake_stream"],
            d["lease_ttl_ms"],
            d["description"],
        )

    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def matches(self, path: str) -> bool:
        """Whether the pattern matches a stream path; `__ds` paths never match."""
        if self.pattern is None or path == "__ds" or path.startswith("__ds/"):
            return False
        return glob_match(self.pattern.split("/"), path.split("/"))

    def literal_prefix(self) -> str:
        """The pattern's leading literal segments, to narrow the streams a backfill looks at."""
        literal: list[str] = []
        for segment in (self.pattern or "").split("/"):
            if "*" in segment:
                break
            literal.append(segment.replace("%2A", "*"))
        return "/".join(literal)


def glob_match(pattern: list[str], path: list[str]) -> bool:
    """`*` matches one segment, `**` zero or more; `%2A` is a literal star."""
    if not pattern:
        return not path
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(glob_match(rest, path[i:]) for i in range(len(path) + 1))
    if not path:
        return False
    if head == "*" or head == path[0] or head.replace("%2A", "*") == path[0]:
        return glob_match(rest, path[1:])
    return False
