"""Subscriptions from Python: create, read and delete them over HTTP, and verify the webhooks they send.

A webhook delivery carries `Webhook-Signature: t=<unix seconds>,kid=<key id>,ed25519=<signature>`, an
Ed25519 signature over `<t>.<body>` by a key published at `/v1/stream/__ds/jwks.json`.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..errors import StreamError

SIGNATURE = re.compile(r"^t=(\d+),kid=([^,]+),ed25519=([A-Za-z0-9_-]+)$")
TOLERANCE_S = 300
RESERVED = "/v1/stream/__ds"

__all__ = ["SubscriptionRequestError", "WebhookVerificationError", "verify_webhook"]


class WebhookVerificationError(ValueError):
    """A webhook whose signature is missing, malformed, too old, by an unknown key, or wrong."""


class SubscriptionRequestError(StreamError):
    """The server refused a subscription call; `code` is the protocol's error code (e.g. FENCED)."""

    def __init__(self, message: str, status: int, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def verify_webhook(
    body: bytes, headers: Mapping[str, str], jwks: Mapping[str, Any], *, now: float | None = None
) -> dict[str, Any]:
    """The delivery's JSON payload, once its signature checks out against `jwks`; raises otherwise.

    `headers` may be any mapping (a framework's headers are case-insensitive; a plain dict is matched
    ignoring case). Signatures more than five minutes from `now` are refused, so a captured delivery
    cannot be replayed later.
    """
    value = next((v for k, v in headers.items() if k.lower() == "webhook-signature"), None)
    match = SIGNATURE.match(value or "")
    if match is None:
        raise WebhookVerificationError("no valid Webhook-Signature header (t=…,kid=…,ed25519=…)")
    sent_at, kid, signature = int(match.group(1)), match.group(2), match.group(3)
    if abs((time.time() if now is None else now) - sent_at) > TOLERANCE_S:
        raise WebhookVerificationError("the signature is more than five minutes old (or from the future)")
    key = next((k for k in jwks.get("keys", ()) if isinstance(k, Mapping) and k.get("kid") == kid), None)
    if key is None or key.get("kty") != "OKP" or key.get("crv") != "Ed25519":
        raise WebhookVerificationError(f"key {kid!r} is not an Ed25519 key of the JWKS; fetch it again")
    try:
        public = Ed25519PublicKey.from_public_bytes(_unb64url(str(key["x"])))
        public.verify(_unb64url(signature), f"{sent_at}.".encode() + body)
        payload = json.loads(body)
    except (InvalidSignature, ValueError, KeyError):
        raise WebhookVerificationError("the signature does not match the body") from None
    if not isinstance(payload, dict):
        raise WebhookVerificationError("the body is not a JSON object")
    return payload


def _raise_for(response: httpx.Response) -> None:
    if not response.is_error:
        return
    try:
        error = response.json().get("error", {})
    except (ValueError, AttributeError):
        error = {}
    if not isinstance(error, dict):
        error = {"message": str(error)}
    code = str(error.get("code", "HTTP_ERROR"))
    message = str(error.get("message") or f"the server answered {response.status_code} ({code})")
    raise SubscriptionRequestError(message, response.status_code, code)


def subscription_path(subscription_id: str) -> str:
    return f"{RESERVED}/subscriptions/{quote(subscription_id, safe='')}"


def subscription_body(
    kind: str,
    *,
    pattern: str | None,
    streams: Sequence[str] | None,
    webhook_url: str | None,
    wake_stream: str | None,
    lease_ttl_ms: int | None,
    description: str | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"type": kind}
    if pattern is not None:
        body["pattern"] = pattern
    if streams is not None:
        body["streams"] = list(streams)
    if webhook_url is not None:
        body["webhook"] = {"url": webhook_url}
    if wake_stream is not None:
        body["wake_stream"] = wake_stream
    if lease_ttl_ms is not None:
        body["lease_ttl_ms"] = lease_ttl_ms
    if description is not None:
        body["description"] = description
    return body


async def call(client: httpx.AsyncClient, method: str, path: str, **options: Any) -> dict[str, Any] | None:
    """One subscription call; the JSON answer, or None for 204 (or for a 404 on GET)."""
    response = await client.request(method, path, **options)
    if method == "GET" and response.status_code == 404:
        return None
    _raise_for(response)
    return None if response.status_code == 204 else dict(response.json())
