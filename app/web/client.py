"""The browser client module (follow(), the renderers, <streamhold-stream>) for other sites' pages.

Served at /static/streamhold-<version>.js, cached for good because its content changes only with the
version, and at /static/streamhold.js, a short-lived alias for those who always want the latest.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import metadata
from pathlib import Path
from typing import Any

from litestar import Request, Response, get

from ..http.headers import CLIENT_HEADERS

MODULE = Path(__file__).resolve().parent.parent / "static" / "streamhold.js"
IMMUTABLE = "public, max-age=31536000, immutable"
SHORT = "public, max-age=300"


def package_version() -> str:
    """The installed package's version, which names the module's long-cached URL."""
    try:
        return metadata.version("streamhold")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "0"


VERSION = package_version()
VERSIONED_PATH = f"/static/streamhold-{VERSION}.js"


@functools.cache
def _module() -> tuple[bytes, str]:
    body = MODULE.read_bytes()
    return body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def _answer(request: Request[Any, Any, Any], cache_control: str) -> Response[bytes]:
    body, etag = _module()
    headers = {**CLIENT_HEADERS, "cache-control": cache_control, "etag": etag}
    if etag in request.headers.get("if-none-match", ""):
        return Response(b"", status_code=304, headers=headers)
    return Response(body, media_type="text/javascript", headers=headers)


@get(VERSIONED_PATH, name="client-versioned", include_in_schema=False)
async def versioned(request: Request[Any, Any, Any]) -> Response[bytes]:
    """The module under its version: the URL to put in other sites' pages."""
    return _answer(request, IMMUTABLE)


@get("/static/streamhold.js", name="client-latest", include_in_schema=False)
async def latest(request: Request[Any, Any, Any]) -> Response[bytes]:
    """The module under a stable name (the viewer imports it from here), revalidated every few minutes."""
    return _answer(request, SHORT)


routes = [versioned, latest]
