"""Asking a stream's writer to stop: POST /stream/{id}/stop, and GET /stream/{id}/stop?wait=N for writers.

A stop is recorded on the stream's record, so a writer that starts listening later still sees it, and rung on
the stream's doorbell, which reaches the writer on whichever process it runs. The writer decides when to stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from typing import Any

from litestar import Request, get, post
from litestar.di import NamedDependency
from litestar.exceptions import PermissionDeniedException
from litestar.params import FromPath, FromQuery
from litestar.response.base import ASGIResponse

from .agentuity_api import _json, _paths
from .errors import InvalidRequestError, StreamNotFoundError
from .http.auth import Principal, bearer, principal_of, require, require_right
from .live import LiveHub
from .models import StreamState, iso, lifecycle
from .settings import Settings
from .store.store import Store
from .web import session

MAX_WAIT = 30.0  # seconds a writer's GET may wait for a stop; it asks again after


async def _stream(store: Store, stream_id: str) -> StreamState:
    """The live stream with this id, or else this protocol name."""
    state = await store.get(stream_id)
    if not lifecycle(state).readable:
        state = await store.get_by_name(stream_id)
    if state is None or not lifecycle(state).readable:
        raise StreamNotFoundError(f"stream {stream_id} not found (it may have expired or been deleted)")
    return state


async def _authorise(request: Request[Any, Any, Any], settings: Settings) -> Principal:
    """Whose stop this is: a key or token with the write right, or, from a viewer page, its sign-in with
    its CSRF token (an API key's sign-in may stop any stream a page shows; a token's, those it may write)."""
    if not bearer(request) and settings.api_keys:
        current = await session.current(request, settings)
        if current is not None:
            if not session.csrf_ok(request, settings, current):
                raise PermissionDeniedException(
                    "stopping a stream from a page needs its CSRF token (X-CSRF-Token); reload the page"
                )
            return current.principal
    await require_right(request, request.route_handler)
    return await principal_of(request)


def _answer(state: StreamState) -> dict[str, Any]:
    return {
        "id": state.id,
        "stop_requested": state.stop_requested_at is not None,
        "stop_requested_at": iso(state.stop_requested_at),
        "closed": state.closed,
    }


@post(_paths("/{stream_id:str}/stop"), status_code=202, opt={"right": "write"})
async def stop_stream(
    stream_id: FromPath[str],
    request: Request[Any, Any, Any],
    store: NamedDependency[Store],
    settings: NamedDependency[Settings],
) -> ASGIResponse:
    """Ask the stream's writer to stop (202); a closed stream has nothing to stop (200, `stopped: false`)."""
    principal = await _authorise(request, settings)
    found = await _stream(store, stream_id)
    require(principal, "write", found.namespace)  # a token must also cover the stream's namespace
    state = await store.request_stop(found.id)
    if state.closed:
        return _json(200, {**_answer(state), "stop_requested": False, "stopped": False, "reason": "closed"})
    return _json(202, _answer(state))


@get(_paths("/{stream_id:str}/stop"), opt={"right": "write"}, guards=[require_right])
async def stop_status(
    stream_id: FromPath[str],
    request: Request[Any, Any, Any],
    store: NamedDependency[Store],
    hub: NamedDependency[LiveHub],
    wait: FromQuery[float] = 0.0,
) -> ASGIResponse:
    """Whether a stop was asked; with `wait`, the answer waits up to that many seconds for one (long-poll)."""
    if not math.isfinite(wait) or not 0 <= wait <= MAX_WAIT:
        raise InvalidRequestError(f"wait must be a number of seconds from 0 to {MAX_WAIT:.0f}")
    state = await _stream(store, stream_id)
    require(await principal_of(request), "write", state.namespace)
    asked = asyncio.Event()
    unlisten = hub.on_stop(state.id, asked.set)
    try:
        state = await _stream(store, state.id)  # read again once listening: no stop slips between the two
        if wait and not state.closed and state.stop_requested_at is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await asked.wait()
            state = await _stream(store, state.id)
    finally:
        unlisten()
    return _json(200, _answer(state))


routes: list[Any] = [stop_stream, stop_status]
