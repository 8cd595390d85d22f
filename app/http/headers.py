"""Security headers in one place: stream content's sandbox, the pages' CSP and frame options, nosniff, CORS,
and which hosts a server answers.

Stream bytes are anyone's bytes. Wherever they are served they carry `Content-Security-Policy: sandbox`
and `nosniff`, and types a browser would run (HTML, SVG, XML) are sent as attachments, except from the
content origin (STREAMHOLD_CONTENT_ORIGIN), a host that serves nothing but stream content.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

NOSNIFF = (b"x-content-type-options", b"nosniff")
NOSNIFF_HEADERS = {NOSNIFF[0].decode(): NOSNIFF[1].decode()}
SANDBOX = (b"content-security-policy", b"sandbox")
ATTACHMENT = (b"content-disposition", b"attachment")

CORS = {
    "access-control-allow-origin": "*",
    "access-control-allow-methods": "GET, POST, PUT, DELETE, HEAD, OPTIONS",
    "access-control-allow-headers": (
        "content-type, authorization, if-none-match, last-event-id, stream-ttl, stream-expires-at, "
        "stream-closed, stream-seq, producer-id, producer-epoch, producer-seq, stream-forked-from, "
        "stream-fork-offset, stream-fork-sub-offset"
    ),
    "access-control-expose-headers": (
        "stream-next-offset, stream-cursor, stream-up-to-date, stream-closed, stream-ttl, stream-expires-at, "
        "stream-sse-data-encoding, producer-epoch, producer-seq, producer-expected-seq, "
        "producer-received-seq, etag, content-type, content-encoding, location, streamhold-stream-id"
    ),
    "access-control-max-age": "86400",
}
# A protocol HEAD names the stream's id, which the /stream API (and Stop) address it by.
STREAM_ID_HEADER = "streamhold-stream-id"
PREFLIGHT_HEADERS = [(k.encode(), v.encode()) for k, v in CORS.items()]

API_CORS_HEADERS = [
    (k.encode(), v.encode())
    for k, v in CORS.items()
    if k in ("access-control-allow-origin", "access-control-expose-headers")
]
# Added to every response on the stream APIs.
API_RESPONSE_HEADERS = [
    NOSNIFF,
    *API_CORS_HEADERS,
    (b"cross-origin-resource-policy", b"cross-origin"),
    # Stream content is anyone's bytes: opened in a browser it must not run as our origin.
    SANDBOX,
]

# The HTML pages (dashboard, sign-in, viewer) load nothing from elsewhere and run no inline script or eval,
# so even a rendering bug cannot run a stream's name, metadata or content as code; and no other site may
# frame them (their delete buttons stay out of clickjacking reach).
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
PAGE_HEADERS = {"content-security-policy": PAGE_CSP, "x-frame-options": "DENY"}


def page_headers(frame_ancestors: tuple[str, ...] = ()) -> dict[str, str]:
    """A page's CSP and frame options; an embeddable page (the viewer's embed mode) names who may frame it.

    With no origins listed nobody may, as for every other page.
    """
    if not frame_ancestors:
        return dict(PAGE_HEADERS)
    csp = PAGE_CSP.replace("frame-ancestors 'none'", "frame-ancestors " + " ".join(frame_ancestors))
    return {"content-security-policy": csp}


# The browser client module is loaded by other sites' pages, as a module script, which is a CORS request.
CLIENT_HEADERS = {"access-control-allow-origin": "*", "cross-origin-resource-policy": "cross-origin"}

# Types a browser renders as a document that can run script (XML can carry XHTML, and with it script).
ACTIVE_TYPES = frozenset(
    {
        "text/html",
        "application/xhtml+xml",
        "image/svg+xml",
        "text/xml",
        "application/xml",
        "text/xsl",
        "application/xslt+xml",
        "multipart/x-mixed-replace",
        "application/x-shockwave-flash",
        "text/vnd.wap.wml",
    }
)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})


def is_active(content_type: str) -> bool:
    """True for a type a browser may run as a page (HTML, SVG, any XML), or one it cannot parse."""
    # Browsers read `text/plain, text/html` as its last type they can parse: judge every listed type.
    for listed in content_type.split(","):
        kind = listed.split(";", 1)[0].strip().lower()
        if kind and ("/" not in kind or kind in ACTIVE_TYPES or kind.endswith(("+xml", "/xml"))):
            return True
    return "/" not in content_type


def content_headers(content_type: str, *, inline: bool) -> list[tuple[bytes, bytes]]:
    """The headers every response carrying stream bytes gets; `inline` only on the content origin."""
    headers = [NOSNIFF, SANDBOX, (b"cross-origin-resource-policy", b"cross-origin")]
    if not inline and is_active(content_type):
        headers.append(ATTACHMENT)
    return headers


def host_name(host: str) -> str:
    """The name in a Host header or URL netloc, lower-cased, without port or IPv6 brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def url_host(url: str) -> str:
    return host_name(urlsplit(url).netloc) if url else ""


def answers_to(host: str, own_names: frozenset[str]) -> bool:
    """Whether a keyless server answers a request for `host`.

    A DNS-rebinding page reaches a loopback server under the attacker's own name; IP literals and
    loopback names cannot be rebound, and the configured public names are the operator's.
    """
    name = host_name(host)
    if not name or name in LOOPBACK_NAMES or name.endswith(".localhost") or name in own_names:
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def origin_of(url: str) -> str:
    """`scheme://host[:port]` of a URL, lower-cased, for comparing origins."""
    parts = urlsplit(url.strip())
    return f"{parts.scheme}://{parts.netloc}".lower() if parts.scheme and parts.netloc else ""
