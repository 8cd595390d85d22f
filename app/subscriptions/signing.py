"""The server's Ed25519 key: webhook signatures, the published JWKS, and callback / claim tokens.

One key pair per store, made once and kept in the database, so that every process signs with it and a
restart keeps it. Tokens are HMAC-SHA256 over (subscription, generation, expiry) with a key derived from
the private key: any process can check a token that another minted, and a stale one stays authentic
(answered with FENCED by the caller, never 401).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

TOKEN_LIFETIME_S = 3600


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenError(Exception):
    """A token that is missing, forged or malformed (`TOKEN_INVALID`), or expired (`TOKEN_EXPIRED`)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class NotIssuedError(TokenError):
    """A token whose MAC this key did not make (another published key may have)."""

    def __init__(self) -> None:
        super().__init__("TOKEN_INVALID", "the token is not one this server issued")


@dataclass(frozen=True)
class SigningKey:
    private: Ed25519PrivateKey
    kid: str
    x: str
    token_key: bytes

    @classmethod
    def generate(cls) -> SigningKey:
        return cls.from_raw(
            Ed25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        )

    @classmethod
    def from_raw(cls, raw: bytes) -> SigningKey:
        private = Ed25519PrivateKey.from_private_bytes(raw)
        x = b64url(private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))
        # RFC 7638 thumbprint: the required members in lexical order, no spaces.
        thumbprint = hashlib.sha256(f'{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}'.encode()).digest()
        token_key = hmac.new(raw, b"streamhold subscription tokens", hashlib.sha256).digest()
        return cls(private, "ds_" + b64url(thumbprint), x, token_key)

    def raw(self) -> bytes:
        return self.private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    def jwks(self) -> dict[str, Any]:
        return {
            "keys": [
                {"kty": "OKP", "crv": "Ed25519", "x": self.x, "kid": self.kid, "use": "sig", "alg": "EdDSA"}
            ]
        }

    def signature_header(self, body: bytes, now: float) -> str:
        """`Webhook-Signature`: Ed25519 over `<unix seconds>.<body>`, unpadded base64url."""
        t = int(now)
        signature = self.private.sign(f"{t}.".encode() + body)
        return f"t={t},kid={self.kid},ed25519={b64url(signature)}"

    def mint_token(self, subscription_id: str, generation: int, now: float) -> str:
        claims = {
            "sub": f"subscription:{subscription_id}",
            "epoch": generation,
            "exp": int(now) + TOKEN_LIFETIME_S,
            "jti": secrets.token_hex(8),
        }
        payload = b64url(json.dumps(claims, separators=(",", ":")).encode())
        mac = hmac.new(self.token_key, payload.encode(), hashlib.sha256).digest()
        return f"{payload}.{b64url(mac)}"

    def token_generation(self, token: str, subscription_id: str, now: float) -> int:
        """The generation an authentic, unexpired token of this subscription was minted for."""
        payload, _, mac = token.partition(".")
        try:
            expected = hmac.new(self.token_key, payload.encode(), hashlib.sha256).digest()
            if not mac or not hmac.compare_digest(expected, _unb64url(mac)):
                raise NotIssuedError()
            claims = json.loads(_unb64url(payload))
        except (ValueError, UnicodeError):
            raise TokenError("TOKEN_INVALID", "the token is malformed") from None
        if not isinstance(claims, dict) or claims.get("sub") != f"subscription:{subscription_id}":
            raise TokenError("TOKEN_INVALID", "the token belongs to another subscription")
        generation, expiry = claims.get("epoch"), claims.get("exp")
        if not isinstance(generation, int) or not isinstance(expiry, int):
            raise TokenError("TOKEN_INVALID", "the token is malformed")
        if expiry < now:
            raise TokenError("TOKEN_EXPIRED", "the token has expired; wait for the next wake or claim again")
        return generation
