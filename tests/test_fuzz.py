"""A bounded fuzzer against a real server: whatever the request, the answer is never a 5xx.

Hypothesis generates requests to the /stream JSON API and to the protocol's headers and query; a reference
stream written first must read back byte-identical at the end. The default run is short; set
STREAMHOLD_TORTURE=1 for a long one.
"""

from __future__ import annotations

import json
import os
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests._server import ServerProcess

TORTURE = os.environ.get("STREAMHOLD_TORTURE") == "1"
EXAMPLES = 3000 if TORTURE else 250
KEY = "fuzz-key-5531"
pytestmark = pytest.mark.timeout(3600 if TORTURE else 120)

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@dataclass(repr=False)
class Target:
    """The server under fuzz, a client for it, and what the fuzzer has learnt and sent."""

    server: ServerProcess
    http: httpx.Client
    reference: dict[str, bytes]
    ids: list[str] = field(default_factory=list)
    sent: int = 0

    def __repr__(self) -> str:
        return f"Target({self.server.url}, {self.sent} sent)"

    def send(self, method: str, url: str, **options: Any) -> httpx.Response:
        """Send one request; only its status and headers are read, so a tail that never ends is fine."""
        self.sent += 1
        request = self.http.build_request(method, url, **options)
        response = self.http.send(request, stream=True)
        try:
            if response.status_code >= 500:
                body = response.read()[:500]
                shown = {k: v[:200] for k, v in request.headers.items() if k != "authorization"}
                pytest.fail(
                    f"{response.status_code} for {method} {str(request.url)[:500]}\n"
                    f"headers: {shown}\nbody: {request.content[:500]!r}\nanswer: {body!r}\n"
                    f"server log:\n{self.server.log_tail()}"
                )
            if response.headers.get("content-type") == "application/json" and method != "HEAD":
                response.read()
        finally:
            response.close()
        return response


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    env = {
        "STREAMHOLD_DATA_DIR": str(tmp_path_factory.mktemp("fuzz")),
        "STREAMHOLD_API_KEYS": KEY,
        "STREAMHOLD_LONG_POLL_TIMEOUT": "0.2",
    }
    auth = {"authorization": f"Bearer {KEY}"}
    with (
        ServerProcess(env=env) as server,
        httpx.Client(base_url=server.url, headers=auth, timeout=15) as http,
    ):
        content = random.Random(7).randbytes(100_000)
        binary = {"content-type": "application/octet-stream"}
        assert http.put("/v1/stream/ref/bytes", content=content, headers=binary).status_code == 201
        made = http.post("/stream", json={"name": "reference", "metadata": {"kind": "ref"}}).json()["id"]
        http.post(f"/stream/{made}/append", content=content)
        http.post(f"/stream/{made}/complete")
        found = Target(server, http, {"/v1/stream/ref/bytes": content, f"/stream/{made}": content})
        yield found
        for url, expected in found.reference.items():
            assert http.get(url, params={"follow": "false"}).content == expected, f"{url} changed"
        print(f"\nfuzz: {found.sent} requests, no 5xx", file=sys.stderr)


# --- values an attacker tries ----------------------------------------------------------------------

NUMBERS = st.one_of(
    st.sampled_from(
        ["0", "1", "-1", "007", "1e19", "9" * 30, "9" * 5000, "\u00b2", "\u0663", "", " 1", "2" * 19]
    ),
    st.integers(-(2**70), 2**70).map(str),
    st.text("0123456789", min_size=1, max_size=40),
)
HEADER_TEXT = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=300
)
HEADER_VALUE = st.one_of(NUMBERS, HEADER_TEXT, st.sampled_from(["true", "false", "a" * 6000]))
OFFSETS = st.one_of(
    st.sampled_from(["-1", "now", "0000000000000000_0000000000000000", "_", "1_1"]),
    st.integers(0, 10**19).map(lambda n: f"0000000000000000_{n:016d}"),
    NUMBERS,
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
NASTY_BODIES = st.sampled_from(
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'["\\ud800"]',
        b'{"name": "\\udfff"}',
        b"1" * 5000,
        b'{"a": ' * 2000 + b"1" + b"}" * 2000,
        b"\x1f\x8b\x08\x00junk",
    ]
)
BODIES = st.one_of(
    st.binary(max_size=2048), JSON.map(lambda v: json.dumps(v).encode()), NASTY_BODIES, st.just(b"")
)
NAMES = st.one_of(
    st.sampled_from(["f/a", "f/b", "f/json", "f/c/d", "f/a/../b", "ref", "f/%00"]),
    st.text(min_size=1, max_size=40).map(lambda t: quote("f/" + t, safe="/")),
)
PROTOCOL_HEADERS = st.dictionaries(
    st.sampled_from(
        [
            "content-type",
            "stream-ttl",
            "stream-expires-at",
            "stream-closed",
            "stream-seq",
            "producer-id",
            "producer-epoch",
            "producer-seq",
            "stream-forked-from",
            "stream-fork-offset",
            "stream-fork-sub-offset",
            "range",
            "if-none-match",
            "last-event-id",
            "content-length",
        ]
    ),
    st.one_of(
        HEADER_VALUE,
        OFFSETS,
        st.sampled_from(
            ["text/plain", "application/json", "9999-12-31T23:59:59-14:00", "2030-01-01T00:00:00Z"]
        ),
    ),
    max_size=5,
)


def _raw(headers: dict[str, str]) -> dict[str, bytes]:
    """Header values as bytes, as a client that knows no rules would send them (UTF-8 past Latin-1)."""
    # HTTP trims the spaces around a value, and the client refuses to send them.
    return {k: v.strip(" \t").encode("latin-1" if v.isascii() else "utf-8") for k, v in headers.items()}


@FUZZ
@given(
    method=st.sampled_from(["PUT", "POST", "GET", "HEAD", "DELETE", "PATCH"]),
    name=NAMES,
    headers=PROTOCOL_HEADERS,
    query=st.dictionaries(
        st.sampled_from(["offset", "live", "cursor"]), st.one_of(OFFSETS, HEADER_TEXT), max_size=3
    ),
    body=BODIES,
)
def test_protocol_requests_never_get_a_5xx(
    target: Target, method: str, name: str, headers: dict[str, str], query: dict[str, str], body: bytes
) -> None:
    headers = {k: v for k, v in headers.items() if not (k == "content-length" and method in ("GET", "HEAD"))}
    if "content-length" in headers:  # a declared length that the body does not match is a client bug
        headers.pop("content-length")
    # Never the reference stream: the fuzzer is allowed to do anything the key allows elsewhere.
    content = body if method in ("PUT", "POST") else None
    target.send(method, f"/v1/stream/{name}", headers=_raw(headers), params=query, content=content)


CREATE_BODIES = st.fixed_dictionaries(
    {},
    optional={
        "name": st.one_of(
            st.sampled_from(["export", "a\x00b", "\x1b[31m", "n" * 255]), st.text(max_size=30), JSON
        ),
        "metadata": st.one_of(
            st.dictionaries(st.text(max_size=10), st.text(max_size=10) | st.integers()), JSON
        ),
        "headers": st.one_of(st.fixed_dictionaries({"content-type": st.one_of(HEADER_TEXT, JSON)}), JSON),
        "ttl": st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=5)),
        "limit": st.one_of(st.integers(), st.floats(), NUMBERS),
        "offset": st.one_of(st.integers(), st.floats(), NUMBERS),
        "sort": st.one_of(st.sampled_from(["created", "size", "name", "lastUsed"]), JSON),
        "direction": st.one_of(st.sampled_from(["asc", "desc"]), JSON),
    },
)


@FUZZ
@given(path=st.sampled_from(["/stream", "/stream/list", "/", "/list"]), body=CREATE_BODIES, raw=st.booleans())
def test_json_api_bodies_never_get_a_5xx(target: Target, path: str, body: dict[str, Any], raw: bool) -> None:
    content = json.dumps(body).encode()
    if raw:  # the same body cut short, or with a nasty tail
        content = content[: len(content) // 2] + b"\xff\xfe"
    response = target.send("POST", path, content=content, headers={"content-type": "application/json"})
    if response.status_code == 200 and path in ("/stream", "/") and len(target.ids) < 50:
        target.ids.append(response.json()["id"])


@FUZZ
@given(
    pick=st.integers(0, 1000),
    stranger=st.text(min_size=1, max_size=30),
    action=st.sampled_from(["info", "append", "complete", "put", "delete", "get", "head"]),
    headers=st.dictionaries(
        st.sampled_from(["x-compress", "content-encoding", "range", "if-range", "if-none-match"]),
        HEADER_VALUE,
        max_size=3,
    ),
    query=st.dictionaries(st.sampled_from(["offset", "follow"]), NUMBERS | HEADER_TEXT, max_size=2),
    body=BODIES,
)
def test_json_api_stream_calls_never_get_a_5xx(
    target: Target,
    pick: int,
    stranger: str,
    action: str,
    headers: dict[str, str],
    query: dict[str, str],
    body: bytes,
) -> None:
    stream_id = target.ids[pick % len(target.ids)] if target.ids and pick % 4 else quote(stranger, safe="")
    options: dict[str, Any] = {"headers": _raw(headers)}
    method, path = {
        "info": ("POST", f"/stream/{stream_id}/info"),
        "append": ("POST", f"/stream/{stream_id}/append"),
        "complete": ("POST", f"/stream/{stream_id}/complete"),
        "put": ("PUT", f"/stream/{stream_id}"),
        "delete": ("DELETE", f"/stream/{stream_id}"),
        "get": ("GET", f"/stream/{stream_id}"),
        "head": ("HEAD", f"/stream/{stream_id}"),
    }[action]
    if method in ("POST", "PUT"):
        options["content"] = body
    if method in ("GET", "HEAD"):
        options["params"] = query
    target.send(method, path, **options)
