"""Input checks shared by the protocol, the /stream API and the in-process SDK: one rule, one message each.

A refusal is an InvalidInputError: a 400 on the HTTP APIs, and a ValueError to SDK callers.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from .errors import InvalidRequestError
from .models import MAX_NAMESPACE_LENGTH

MAX_SAFE_INTEGER = 2**53 - 1
MAX_DIGITS = 19  # past any size, offset or count this server holds (SQLite's INTEGER is 64-bit)
BEYOND = 10**MAX_DIGITS
MAX_TTL_SECONDS = 100 * 365 * 86400
MAX_TIMESTAMP = 221845392000  # 9000-01-01T00:00:00Z: far from the calendar's end in any zone
MAX_TEXT = 255  # header values such as Producer-Id and Stream-Seq, content types, metadata keys
MAX_METADATA_VALUE = 1024
MAX_METADATA_PAIRS = 64
MAX_LIST_LIMIT = 1000
MAX_JSON_DIGITS = 20
# Control characters would reach terminals and logs raw; lone surrogates cannot be stored as UTF-8.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_PLAIN_DIGITS = re.compile(r"[0-9]+")
_DIGITS = re.compile(r"0|[1-9][0-9]*")


class InvalidInputError(InvalidRequestError, ValueError):
    """Refused input: the HTTP APIs answer 400 with its message; SDK callers catch it as ValueError."""


def whole_number(
    text: str, label: str, maximum: int = MAX_SAFE_INTEGER, *, leading_zeros: bool = True
) -> int:
    """A header value of ASCII digits as an int of at most `maximum`; else refused, naming `label`."""
    pattern = _PLAIN_DIGITS if leading_zeros else _DIGITS
    if len(text) > MAX_DIGITS or not pattern.fullmatch(text) or int(text) > maximum:
        raise InvalidInputError(f"{label} must be a whole number from 0 to {maximum}")
    return int(text)


def count(text: str) -> int | None:
    """ASCII digits as an int (past 19 digits: 10**19, beyond anything stored); None when not digits."""
    if not text or not text.isascii() or not text.isdigit():
        return None
    return BEYOND if len(text) > MAX_DIGITS else int(text)


def short_text(value: str, label: str, limit: int = MAX_TEXT) -> str:
    """A header value kept by the server (Producer-Id, Stream-Seq): bounded, printable."""
    if len(value) > limit or _UNPRINTABLE.search(value):
        raise InvalidInputError(f"{label} must be at most {limit} characters, without control characters")
    return value


def printable(text: str) -> bool:
    """True when `text` has no control characters (C0, DEL, C1) and no lone surrogates."""
    return _UNPRINTABLE.search(text) is None


def shown(text: str) -> str:
    """`text` with control characters and lone surrogates written as escapes, safe to print to a terminal."""
    return _UNPRINTABLE.sub(lambda found: f"\\u{ord(found[0]):04x}", text)


def namespace(value: Any) -> str:
    if (
        not isinstance(value, str)
        or not 1 <= len(value) <= MAX_NAMESPACE_LENGTH
        or _UNPRINTABLE.search(value)
    ):
        raise InvalidInputError(
            'the namespace ("name" in a /stream body) must be a string of 1 to 254 characters '
            'without control characters, such as "export"'
        )
    return value


def content_type(value: Any) -> str:
    """A MIME type as given, trimmed: printable ASCII (header values are Latin-1 on the wire), bounded."""
    text = value.strip() if isinstance(value, str) else ""
    if not text or len(text) > MAX_TEXT or not text.isascii() or not text.isprintable():
        raise InvalidInputError(
            f"Content-Type must be a MIME type of 1 to {MAX_TEXT} printable ASCII characters, "
            'such as "text/plain"'
        )
    return text


def _as_text(item: Any) -> Any:
    """Numbers and booleans as JavaScript's String() writes them (the /stream API takes them as metadata)."""
    if isinstance(item, bool):
        return "true" if item else "false"
    if isinstance(item, int):
        return str(item)
    if isinstance(item, float) and math.isfinite(item):
        return str(int(item)) if item.is_integer() and abs(item) < 1e21 else repr(item)
    return item


def metadata(value: Any, *, coerce: bool = False) -> dict[str, str]:
    """A flat map of strings, for a stream's metadata or a filter on it; `coerce` turns numbers into text."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidInputError('metadata must be an object of strings, such as {"user_id": "u1"}')
    if len(value) > MAX_METADATA_PAIRS:
        raise InvalidInputError(f"metadata may have at most {MAX_METADATA_PAIRS} pairs")
    result: dict[str, str] = {}
    for key, raw in value.items():
        item = _as_text(raw) if coerce else raw
        if not isinstance(key, str) or not isinstance(item, str):
            raise InvalidInputError(
                f'metadata must be an object of strings, such as {{"user_id": "u1"}}; {key!r} is not'
            )
        if not 1 <= len(key) <= MAX_TEXT or len(item) > MAX_METADATA_VALUE:
            raise InvalidInputError(
                f"metadata keys must be 1-{MAX_TEXT} characters "
                f"and values at most {MAX_METADATA_VALUE} characters"
            )
        if _UNPRINTABLE.search(key) or _UNPRINTABLE.search(item):
            raise InvalidInputError(f"metadata may not contain control characters; {key!r} does")
        result[key] = item
    return result


def list_window(limit: Any, offset: Any) -> tuple[int, int]:
    """A listing's page size (1-1000) and the number of matches to skip (0 to 2^53-1)."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIST_LIMIT:
        raise InvalidInputError(f"limit must be a whole number from 1 to {MAX_LIST_LIMIT}")
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= MAX_SAFE_INTEGER:
        raise InvalidInputError(f"offset must be a whole number from 0 to {MAX_SAFE_INTEGER}")
    return limit, offset


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_JSON_DIGITS:
        raise InvalidInputError(f"numbers in the body may have at most {MAX_JSON_DIGITS} digits")
    return int(text)


def json_value(raw: bytes) -> Any:
    """A JSON request body parsed; numbers are bounded, and nesting too deep for the stack is refused."""
    try:
        return json.loads(raw, parse_int=_bounded_int)
    except RecursionError:
        raise InvalidInputError("the JSON body is nested too deeply; send a flatter document") from None
