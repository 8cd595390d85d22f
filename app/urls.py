"""The URLs Streamhold hands out and reads back: streams, the viewer, the protocol, the pages; origins.

An origin here is `scheme://host[:port]` without a trailing slash, as `Settings.origin()` gives it.
"""

from __future__ import annotations

from urllib.parse import quote, urlsplit

PROTOCOL_PREFIX = "/v1/stream"
STREAM_PREFIX = "/stream"
DEFAULT_PORTS = {"http": 80, "https": 443}


def stream_url(origin: str, stream_id: str) -> str:
    """A stream's content on the Agentuity-compatible API: what the SDK and `streamhold write` print."""
    return f"{origin}{STREAM_PREFIX}/{stream_id}"


def viewer_url(origin: str, name: str) -> str:
    """The live viewer of a stream; an empty origin gives the path alone (for links on our own pages)."""
    return f"{origin}/watch/{quote(name, safe='/')}"


def protocol_base(origin: str) -> str:
    """The Durable Streams protocol's base: a stream named `x` is at this URL followed by `x`."""
    return f"{origin}{PROTOCOL_PREFIX}/"


def protocol_url(origin: str, name: str) -> str:
    """A stream by name on the Durable Streams protocol."""
    return protocol_base(origin) + quote(name, safe="/")


def dashboard_url(origin: str) -> str:
    return f"{origin}/"


def demo_url(origin: str) -> str:
    """Where the demo starts (a POST: the dashboard's Start the demo button sends it)."""
    return f"{origin}/demo"


def listen_origin(host: str, port: int) -> str:
    """The origin a server listening on host:port is reached at from this machine."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    if ":" in shown:  # an IPv6 address
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


def same_origin(a: str, b: str) -> bool:
    """Whether two URLs share scheme, host and port (a default port counts as written)."""
    try:
        left, right = urlsplit(a.strip()), urlsplit(b.strip())
        ports = (left.port, right.port)
    except ValueError:
        return False
    if not left.scheme or not left.hostname:
        return False
    scheme = left.scheme.lower()
    return (
        scheme == right.scheme.lower()
        and left.hostname == right.hostname
        and (ports[0] or DEFAULT_PORTS.get(scheme)) == (ports[1] or DEFAULT_PORTS.get(scheme))
    )


def split_stream_url(url: str) -> tuple[str, str] | None:
    """(origin, id) of a stream URL such as http://host:8000/stream/<id>; None when it is not one."""
    base, sep, rest = url.partition(STREAM_PREFIX + "/")
    stream_id = rest.split("?", 1)[0].split("#", 1)[0].strip("/")
    if not sep or not stream_id or "/" in stream_id:
        return None
    try:
        urlsplit(base).port  # noqa: B018 - a port that is not a number makes it no URL
    except ValueError:
        return None
    return base, stream_id
