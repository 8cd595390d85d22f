"""The live viewer at /watch/{name}: the stream rendered up to its tail, then followed live; POST /demo.

The page is refresh-safe by construction: its server render is a catch-up read from the store, and its
live connection (the protocol's SSE) starts at the offset where that read ended.
"""

from __future__ import annotations

import base64
import mimetypes
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from litestar import Request, Response, get, post
from litestar.di import NamedDependency
from litestar.exceptions import HTTPException
from litestar.params import FromPath, FromQuery
from litestar.response import Redirect, Stream, Template
from markupsafe import Markup, escape

from .. import demo
from ..errors import StreamError
from ..http.auth import (
    CHALLENGE,
    OTHER_STREAM,
    Principal,
    bearer,
    is_public,
    may_read,
    principal_of,
    require_key,
    share_param,
)
from ..http.headers import content_headers, page_headers
from ..http.responses import BODY_SLICE
from ..models import StreamState, iso, require_live
from ..protocol.reads import whole_utf8 as protocol_whole_utf8
from ..protocol.wire import is_text, stream_name
from ..sdk.context import AgentContext
from ..settings import Settings
from ..store.appends import media_type
from ..store.store import Store
from ..urls import protocol_url, viewer_url
from . import session
from .humanize import human_bytes, relative

WINDOW = 256 * 1024
JSON_LOOKBACK = 1024 * 1024
HEADER_LIMIT = 64 * 1024
HEX_PREVIEW = 1024
STREAM_ID = re.compile(r"^stream_[0-9a-f]{32}$")
MARKDOWN = {"text/markdown", "text/x-markdown"}
CSV = {"text/csv", "text/tab-separated-values"}
JSON_TYPES = {
    "application/json",
    "application/x-ndjson",
    "application/ndjson",
    "application/jsonl",
    "application/x-jsonlines",
}


def view_kind(content_type: str) -> str:
    """How the page renders a content type: markdown, csv, json, text or binary."""
    kind = media_type(content_type)
    if kind in MARKDOWN:
        return "markdown"
    if kind in CSV:
        return "csv"
    if kind in JSON_TYPES or kind.endswith("+json"):
        return "json"
    if kind.startswith("text/"):
        return "text"
    return "binary"


def sse_encoding(state: StreamState) -> str:
    """What the protocol's SSE data events carry for this stream: a JSON array, text, or base64."""
    if state.json_mode:
        return "json"
    return "text" if is_text(state.content_type) else "base64"


@dataclass(frozen=True)
class Window:
    """The bytes [start, end) of a stream as text, cut on boundaries the renderer can start from."""

    start: int
    end: int
    text: str
    header: str = ""


def whole_utf8(data: bytes) -> bytes:
    """`data` without a UTF-8 sequence cut at its end (the live connection sends those bytes again)."""
    return protocol_whole_utf8(data, final=False)


async def read_bytes(store: Store, state: StreamState, start: int, end: int) -> bytes:
    """The uncompressed bytes [start, end), whether the stream is stored compressed or not."""
    return b"".join([piece async for piece in store.iter_content(state, start, end)])


async def read_window(store: Store, state: StreamState, kind: str, end: int, size: int = WINDOW) -> Window:
    """The last `size` bytes before `end`, starting on a message, line or character boundary."""
    start = max(0, end - size)
    if state.json_mode and start > 0:
        # A JSON-mode offset must fall between messages: widen the window back to the previous newline.
        low = max(0, start - JSON_LOOKBACK)
        data = await read_bytes(store, state, low, end)
        back = start - low
        cut = data.rfind(b"\n", 0, back) + 1
        if not cut and low > 0:
            cut = data.find(b"\n", back) + 1
        data, start = data[cut:], low + cut
    elif start > 0:
        data = await read_bytes(store, state, start, end)
        newline = data.find(b"\n", 0, min(len(data) - 1, 4096 if kind in ("text", "markdown") else len(data)))
        skip = newline + 1 if newline >= 0 else 0
        while skip < len(data) and 0x80 <= data[skip] < 0xC0:
            skip += 1
        data, start = data[skip:], start + skip
    else:
        data = await read_bytes(store, state, 0, end)
    if not state.closed or end < state.tail:
        data = whole_utf8(data)
    header = ""
    if kind == "csv" and start > 0:
        head = await read_bytes(store, state, 0, min(state.tail, HEADER_LIMIT))
        header = head[: head.find(b"\n") + 1].decode("utf-8", errors="replace")
    return Window(start, start + len(data), data.decode("utf-8", errors="replace"), header)


def exact_html(text: str) -> Markup:
    """Escaped text whose carriage returns survive HTML parsing (the parser turns a literal CR into LF)."""
    return Markup(str(escape(text)).replace("\r", "&#13;"))


def hex_rows(data: bytes) -> list[tuple[str, str, str]]:
    """(offset, hex, printable) rows of 16 bytes, like `xxd`."""
    rows = []
    for at in range(0, len(data), 16):
        piece = data[at : at + 16]
        hexed = " ".join(f"{b:02x}" for b in piece)
        text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in piece)
        rows.append((f"{at:08x}", hexed, text))
    return rows


def download_name(state: StreamState) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", state.name.rsplit("/", 1)[-1]).strip("._") or "stream"
    if state.json_mode:
        return base + ".ndjson"
    ext = mimetypes.guess_extension(media_type(state.content_type)) or ".bin"
    return base if base.endswith(ext) else base + ext


def page(context: dict[str, Any], status: int = 200, frame_ancestors: tuple[str, ...] = ()) -> Template:
    """The watch page; in embed mode (`frame_ancestors` given) it may be framed by those origins."""
    headers = {**page_headers(frame_ancestors), "cache-control": "no-store", "referrer-policy": "same-origin"}
    return Template("watch.html", context=context, status_code=status, headers=headers)


def raw_url(settings: Settings, state: StreamState, share: str = "") -> str:
    """The stream's bytes on the content origin, when there is one (the page itself reads them here)."""
    if not settings.content_origin:
        return ""
    link = f"&share={share}" if share else ""
    return protocol_url(settings.content_origin, state.name) + "?offset=-1" + link


def refused(status: int, message: str, name: str, embed: bool, ancestors: tuple[str, ...]) -> Template:
    """The page of a stream that may not be shown, saying why (nothing of the stream but its name in it)."""
    context = {"refusal": message, "refusal_status": status, "name": name, "embed": embed}
    headers = {**page_headers(ancestors), "cache-control": "no-store", **(CHALLENGE if status == 401 else {})}
    return Template("watch_refused.html", context=context, status_code=status, headers=headers)


def shared_by(request: Request[Any, Any, Any], principal: Principal, state: StreamState) -> str:
    """The share link the page was opened with, when that is what lets it read the stream: the page's own
    reads and its Copy link carry it on."""
    if not principal.reads_by_link(state):
        return ""
    return share_param(request.scope.get("query_string", b""))


async def watch_context(
    store: Store, state: StreamState, settings: Settings, show_metadata: bool, share: str = ""
) -> dict[str, Any]:
    """Everything the watch page shows of a live stream; metadata only to those the API shows it to."""
    kind = view_kind(state.content_type)
    now = time.time()
    head = b""
    if kind == "binary":
        head = await read_bytes(store, state, 0, min(state.tail, HEX_PREVIEW))
        window = Window(0, state.tail, "")
    else:
        window = await read_window(store, state, kind, state.tail)
    metadata = state.metadata if show_metadata else {}
    links = {k: v for k, v in metadata.items() if STREAM_ID.match(v)}
    return {
        "state": state,
        "kind": kind,
        "encoding": sse_encoding(state),
        "window": window,
        "window_size": WINDOW,
        "text": exact_html(window.text),
        "header": exact_html(window.header),
        "head_b64": base64.b64encode(head).decode(),
        "head_len": len(head),
        "hex_rows": hex_rows(head),
        "size": human_bytes(state.tail),
        "shown": human_bytes(window.end - window.start),
        "created": relative(state.created_at, now),
        "created_iso": iso(state.created_at),
        "expires": relative(state.expires_at, now),
        "expires_iso": iso(state.expires_at),
        "closed_ago": relative(state.closed_at, now) if state.closed_at else "",
        "metadata": sorted(metadata.items()),
        "raw_url": raw_url(settings, state, share),
        "links": links,
        "download_name": download_name(state),
    }


@get("/watch/{name:path}", name="watch")
async def watch(
    name: FromPath[str],
    request: Request[Any, Any, Any],
    store: NamedDependency[Store],
    settings: NamedDependency[Settings],
    before: FromQuery[int | None] = None,
    download: FromQuery[bool] = False,
    embed: FromQuery[bool] = False,
) -> Response[Any]:
    """The live viewer; `?download=1` saves the content so far, `?before=N` is an earlier JSON-mode range,
    `?embed=1` the page without the app's chrome, for the origins in STREAMHOLD_EMBED_ORIGINS to frame."""
    current = await session.current(request, settings)
    # A token's sign-in may not start the demo (its streams are in namespaces of the server's choosing).
    demo_csrf = current.csrf if current is not None and not embed and not current.scoped else ""
    ancestors = settings.embed_origins if embed else ()
    gone = {"gone": True, "name": name.lstrip("/"), "demo_csrf": demo_csrf, "embed": embed}
    try:
        state = require_live(await store.get_by_name(stream_name(name)))
    except StreamError:
        return page(gone, status=404, frame_ancestors=ancestors)
    try:
        principal = await principal_of(request)
    except HTTPException as exc:  # a share link that grants nothing: altered, expired, another secret's
        return refused(exc.status_code, str(exc.detail), state.name, embed, ancestors)
    if principal.kind == "anonymous" and current is not None and current.signed_in and not embed:
        principal = current.principal  # the dashboard's sign-in: an API key's, or its token's rights
    if not may_read(principal, state, settings):
        if principal.kind == "link":
            return refused(403, OTHER_STREAM, state.name, embed, ancestors)
        private = "this stream is private: open it with an API key, a read token for its namespace or a link"
        return refused(403 if principal.kind == "token" else 401, private, state.name, embed, ancestors)
    operator = not embed and (
        not settings.api_keys or (current is not None and current.principal.may("manage", state.namespace))
    )
    share = shared_by(request, principal, state)
    try:
        if before is not None or download:
            return await _watch_range(store, state, before, download)
        context = await watch_context(store, state, settings, show_metadata=operator, share=share)
    except StreamError:  # deleted while it was read
        return page(gone, status=404, frame_ancestors=ancestors)
    # Whoever may start a demo here may stop a stream's writer (POST /stream/{id}/stop checks it again), and
    # so may a share link made with stop. Only a page that may make links offers one on a private stream.
    by_link = principal.link is not None and principal.link.stop and bool(share)
    context.update(
        gone=False,
        name=state.name,
        demo_csrf=demo_csrf,
        embed=embed,
        may_stop=bool(demo_csrf) or by_link,
        share=share,
        may_share=bool(demo_csrf and settings.secret) and not share and not is_public(state, settings),
    )
    return page(context, frame_ancestors=ancestors)


async def _watch_range(store: Store, state: StreamState, before: int | None, download: bool) -> Response[Any]:
    """The content so far as a download, or the JSON-mode window before `before` for "Load earlier"."""
    if download:
        return Stream(
            _content(store, state, state.tail),
            media_type="application/x-ndjson" if state.json_mode else state.content_type,
            headers={
                **{k.decode(): v.decode() for k, v in content_headers(state.content_type, inline=False)},
                "content-disposition": f'attachment; filename="{download_name(state)}"',
                "content-length": str(state.tail),
            },
        )
    end = min(max(before or 0, 0), state.tail)
    window = await read_window(store, state, view_kind(state.content_type), end)
    return Response(
        window.text,
        media_type="text/plain; charset=utf-8",
        headers={"stream-range-start": str(window.start), "stream-range-end": str(window.end)},
    )


async def _content(store: Store, state: StreamState, end: int) -> AsyncIterator[bytes]:
    try:
        async for piece in store.iter_content(state, 0, end, BODY_SLICE):
            yield piece
    except StreamError:  # deleted meanwhile: the body stops short of its Content-Length
        return


async def _demo_refusal(request: Request[Any, Any, Any], settings: Settings) -> Response[Any] | None:
    """API clients send a key (when keys are set); browsers need a session and its CSRF token."""
    if bearer(request):
        require_key(request, settings)
        return None
    current = await session.current(request, settings)
    if current is None:
        return session.denied(request, change=True)
    if current.scoped:
        refused = "the demo needs an API key's sign-in, not a token's"
        return Response(refused, status_code=403, media_type="text/plain")
    if not settings.api_keys:
        return None if session.same_origin(request, settings) else session.forbidden()
    form = await session.read_form(request)
    token = str(form.get(session.CSRF_FIELD, ""))
    return None if session.csrf_ok(request, settings, current, token) else session.forbidden()


@post("/demo", status_code=303, request_max_body_size=session.FORM_LIMIT)
async def start_demo(
    request: Request[Any, Any, Any], ctx: NamedDependency[AgentContext], settings: NamedDependency[Settings]
) -> Response[Any]:
    """Start the demo agent and open its answer in the viewer (JSON with the URLs for API clients)."""
    refusal = await _demo_refusal(request, settings)
    if refusal is not None:
        return refusal
    try:
        started = await demo.start(ctx, settings)
    except demo.DemoBusyError as exc:
        return Response({"error": str(exc)}, status_code=429, headers={"retry-after": "5"})
    if "application/json" in request.headers.get("accept", ""):
        return Response(started.as_dict(), status_code=201)
    return Redirect(path=viewer_url("", started.answer.id), status_code=303)


routes = [watch, start_demo]
