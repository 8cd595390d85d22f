"""Plain request and response helpers both stream APIs share: query parameters, raw responses, body slices."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

from litestar import Request
from litestar.response.base import ASGIResponse

from ..errors import InvalidRequestError

# A body is read and sent this much at a time: what a client that stops reading holds in the server.
BODY_SLICE = 64 * 1024


def respond(
    status: int, headers: dict[str, str] | None = None, body: bytes = b"", head_only: bool = False
) -> ASGIResponse:
    """A response whose Content-Type is sent exactly as given (no charset added)."""
    merged = dict(headers or {})
    if status in (204, 304) or head_only:
        merged.pop("content-length", None)
        return ASGIResponse(body=b"", status_code=status, headers=merged, is_head_response=head_only)
    merged.setdefault("content-type", "application/json")
    return ASGIResponse(body=body, status_code=status, headers=merged)


def parse_query(request: Request[Any, Any, Any]) -> dict[str, list[str]]:
    return parse_qs(request.scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)


def single(query: dict[str, list[str]], key: str) -> str | None:
    values = query.get(key)
    if values is None:
        return None
    if len(values) != 1:
        raise InvalidRequestError(f"give the {key} parameter once")
    return values[0]
