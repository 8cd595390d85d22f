"""A stream's content over HTTP: whole or by Range with validators, gzip as stored, or tailed while open.

A body that cannot be finished (the server stops, the stream is deleted) is cut off without its last
chunk, so that a client can tell it from a complete one and resume.
"""

from __future__ import annotations

import email.utils
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

from anyio import create_task_group
from litestar import Request
from litestar.response.base import ASGIResponse
from litestar.response.streaming import ASGIStreamingResponse
from litestar.types import HTTPResponseBodyEvent, Receive, Send

from ..checks import count
from ..errors import InvalidRequestError, StreamError
from ..live import CLOSED, DATA, LiveHub, follow
from ..models import StreamState
from ..settings import Settings
from ..store.store import Store
from .auth import principal_of
from .responses import BODY_SLICE, parse_query, respond, single
from .share_links import while_valid

TAIL_SLICE = 64 * 1024


class RangeNotSatisfiableError(StreamError):
    status = 416

    def __init__(self, message: str, length: int) -> None:
        super().__init__(message)
        self.length = length


class CutOff(Exception):
    """The body cannot be finished (server stopping, stream deleted): end it without its last chunk."""


class CutOffBody(ASGIStreamingResponse):
    """A streamed body cut off (no final chunk) when its source raises CutOff, so clients see it is short."""

    def __init__(self, body: AsyncIterator[bytes], headers: dict[str, str], status: int = 200) -> None:
        super().__init__(iterator=body, headers=headers, status_code=status)
        self._body = body

    async def send_body(self, send: Send, receive: Receive) -> None:
        async with create_task_group() as group:
            group.start_soon(self._listen_for_disconnect, group.cancel_scope, receive)
            try:
                async for chunk in self._body:
                    event: HTTPResponseBodyEvent = {
                        "type": "http.response.body",
                        "body": chunk,
                        "more_body": True,
                    }
                    await send(event)
                    # The server waits for the client to take what it was sent before writing more, not
                    # before it is handed more: this empty write waits there, so that a client that stops
                    # reading holds one slice, not two.
                    await send({"type": "http.response.body", "body": b"", "more_body": True})
            except CutOff:
                pass
            else:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            group.cancel_scope.cancel()


async def _plain(store: Store, state: StreamState, start: int, end: int) -> AsyncIterator[bytes]:
    """Uncompressed bytes [start, end), even if the stream gets compressed (its chunks replaced) meanwhile."""
    try:
        async for piece in store.iter_content(state, start, end, BODY_SLICE):
            yield piece
    except StreamError as exc:  # deleted meanwhile
        raise CutOff from exc


async def _gzipped(store: Store, stream_id: str, start: int, end: int) -> AsyncIterator[bytes]:
    """Bytes [start, end) of a compressed stream's stored gzip body."""
    position = 0
    async for packed in store.iter_gzip(stream_id):
        lo, hi = max(start - position, 0), min(end - position, len(packed))
        for at in range(lo, hi, BODY_SLICE):
            yield packed[at : min(at + BODY_SLICE, hi)]
        position += len(packed)
        if position >= end:
            return
    raise CutOff


async def tail(
    store: Store, hub: LiveHub, settings: Settings, state: StreamState, start: int
) -> AsyncGenerator[bytes, None]:
    """Send from `start` what exists, then each commit as it lands, until the stream is closed."""

    async def step(current: StreamState, position: int) -> tuple[bytes, int]:
        end = min(current.tail, position + TAIL_SLICE)
        if current.compressed:
            data = b"".join([piece async for piece in store.iter_content(current, position, end)])
        else:
            data = await hub.read(current.id, position, end)
        return data, position + len(data)

    events = follow(
        hub, store, state, start, step, kind="http", idle_after=settings.long_poll_timeout, reread=True
    )
    async with aclosing(events):
        try:
            async for event in events:
                if event.kind == DATA and event.piece:
                    yield event.piece
                elif event.kind == CLOSED:
                    return
        except StreamError as exc:  # deleted or expired while it was read
            raise CutOff from exc
    raise CutOff  # the server is stopping: the body is not finished


def _accepts_gzip(header: str | None) -> bool:
    """Whether Accept-Encoding admits gzip; a client that sends no Accept-Encoding gets identity."""
    weights: dict[str, float] = {}
    for part in (header or "").split(","):
        coding, *params = (p.strip() for p in part.split(";"))
        weight = 1.0
        for param in params:
            if param.lower().startswith("q="):
                try:
                    weight = float(param[2:])
                except ValueError:
                    weight = 0.0
        if coding:
            weights[coding.lower()] = weight
    for coding in ("gzip", "x-gzip", "*"):
        if coding in weights:
            return weights[coding] > 0
    return False


def _http_date(value: str) -> float | None:
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


def _not_modified(request: Request[Any, Any, Any], etag: str, modified: float) -> bool:
    match = request.headers.get("if-none-match")
    if match is not None:  # If-None-Match wins over If-Modified-Since (RFC 9110 13.2.2)
        tags = [tag.strip().removeprefix("W/") for tag in match.split(",")]
        return "*" in tags or etag in tags
    since = _http_date(request.headers.get("if-modified-since", ""))
    return since is not None and int(modified) <= since


def _byte_range(
    request: Request[Any, Any, Any], etag: str, modified: float, length: int
) -> tuple[int, int] | None:
    """The one byte range asked for, inclusive; None for the whole body (no, several or malformed ranges)."""
    header = request.headers.get("range")
    if not header:
        return None
    validator = request.headers.get("if-range")
    if validator is not None:
        if validator.startswith(('"', "W/")):
            if validator != etag:
                return None
        elif _http_date(validator) != float(int(modified)):
            return None
    unit, _, spec = header.partition("=")
    first, dash, last = spec.strip().partition("-")
    if unit.strip().lower() != "bytes" or "," in spec or not dash:
        return None
    unsatisfiable = RangeNotSatisfiableError(
        f"the range {spec.strip()[:60]} is outside the {length} bytes", length
    )
    begin, finish = count(first), count(last)
    if not first:
        if finish is None:
            return None
        if finish == 0 or length == 0:
            raise unsatisfiable
        return max(length - finish, 0), length - 1
    if begin is None or (last and finish is None):
        return None
    finish = length - 1 if finish is None else finish
    if last and finish < begin:
        return None
    if begin >= length:
        raise unsatisfiable
    return begin, min(finish, length - 1)


def _read_options(request: Request[Any, Any, Any]) -> tuple[bool, int | None]:
    query = parse_query(request)
    follow = (single(query, "follow") or "true").lower()
    if follow not in ("true", "false", "1", "0"):
        raise InvalidRequestError("follow must be true (tail an open stream) or false (send what exists)")
    offset = single(query, "offset")
    position = None if offset is None else count(offset)
    if offset is not None and position is None:
        raise InvalidRequestError("offset must be a byte position such as 1024")
    return follow in ("true", "1"), position


async def respond_with_content(
    request: Request[Any, Any, Any],
    store: Store,
    hub: LiveHub,
    settings: Settings,
    state: StreamState,
    head: bool = False,
) -> ASGIResponse:
    """The answer to a GET (or HEAD) of a live stream's content; raises StreamError for a bad request.

    `?offset=N` starts at byte N of the plain content; `?follow=false` sends an open stream's bytes so far.
    A tail opened with a share link ends when the link expires.
    """
    follow, offset = _read_options(request)
    headers = {"content-type": state.content_type}
    if state.closed:
        headers["stream-closed"] = "true"
    if offset is None and state.closed:
        return _closed_content(request, store, state, headers, head)
    start = offset or 0
    if start > state.tail:
        raise RangeNotSatisfiableError(f"offset {start} is past the end ({state.tail} bytes)", state.tail)
    if not state.closed and follow:
        headers.update({"cache-control": "no-store", "x-accel-buffering": "no"})
        if head:
            return ASGIResponse(body=b"", headers=headers, is_head_response=True)
        link = (await principal_of(request)).link
        until = link.expires if link is not None else None
        return CutOffBody(while_valid(tail(store, hub, settings, state, start), until), headers)
    headers.update({"content-length": str(state.tail - start), "cache-control": "no-store"})
    if head:
        return ASGIResponse(body=b"", headers=headers, is_head_response=True)
    return CutOffBody(_plain(store, state, start, state.tail), headers)


def _closed_content(
    request: Request[Any, Any, Any], store: Store, state: StreamState, headers: dict[str, str], head: bool
) -> ASGIResponse:
    """A closed stream is immutable: validators, one byte range, gzip as stored for clients that take it."""
    gzipped = state.compressed and _accepts_gzip(request.headers.get("accept-encoding"))
    length = state.stored_bytes if gzipped else state.tail
    modified = state.closed_at or state.updated_at
    etag = f'"{state.id.removeprefix("stream_")}-{state.tail}{"-gz" if gzipped else ""}"'
    headers.update(
        {
            "etag": etag,
            "last-modified": email.utils.formatdate(modified, usegmt=True),
            "accept-ranges": "bytes",
            "cache-control": "no-cache",
        }
    )
    if state.compressed:
        headers["vary"] = "accept-encoding"
    if gzipped:
        headers["content-encoding"] = "gzip"
    if _not_modified(request, etag, modified):
        return respond(304, headers)
    span = _byte_range(request, etag, modified, length)
    status, (start, end) = (200, (0, length)) if span is None else (206, (span[0], span[1] + 1))
    headers["content-length"] = str(end - start)
    if span is not None:
        headers["content-range"] = f"bytes {span[0]}-{span[1]}/{length}"
    if head:
        return ASGIResponse(body=b"", status_code=status, headers=headers, is_head_response=True)
    body = _gzipped(store, state.id, start, end) if gzipped else _plain(store, state, start, end)
    return CutOffBody(body, headers, status)
