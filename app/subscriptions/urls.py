"""Which webhook URLs a subscription may call: literal public IP addresses only, judged from the string.

No name is ever resolved: a DNS answer can change between the check and the connection (rebinding), so a
host that is not a literal IP address is refused outright. Loopback is refused too unless the operator
allows it (`STREAMHOLD_WEBHOOK_ALLOW_LOOPBACK=true`, for development and tests).
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

MAX_URL_LENGTH = 2048


def webhook_url_problem(url: object, allow_loopback: bool) -> str | None:
    """Why `url` may not be called, or None when it may."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL_LENGTH:
        return f"webhook.url must be an absolute http(s) URL of at most {MAX_URL_LENGTH} characters"
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        return "webhook.url may not contain spaces or control characters"
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises on a port that is not a number in range
    except ValueError:
        return "webhook.url does not parse as a URL"
    if parts.scheme not in ("http", "https"):
        return "webhook.url must use http or https"
    if parts.username is not None or parts.password is not None:
        return "webhook.url may not carry a user name or password"
    if not host:
        return "webhook.url has no host"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return (
            f"webhook.url's host {host!r} is not a literal IP address; names are never resolved here "
            "(a DNS answer can change after the check), so give the receiver's public IP address"
        )
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_loopback:
        if allow_loopback:
            return None
        return (
            "webhook.url points at loopback; set STREAMHOLD_WEBHOOK_ALLOW_LOOPBACK=true to allow it "
            "(development only)"
        )
    if not address.is_global or address.is_multicast or address.is_reserved or address.is_unspecified:
        return (
            f"webhook.url's address {address} is private, link-local, multicast or otherwise not public; "
            "a webhook must point at a public address"
        )
    if parts.scheme != "https":
        return "webhook.url must use https unless it points at loopback"
    return None
