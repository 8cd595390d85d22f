"""What the dashboard displays, formatted: table rows, live figures and per-namespace lines."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..live import LiveHub
from ..models import StreamState, iso
from ..urls import viewer_url
from .dashboard_query import View
from .humanize import human_bytes, relative

EXPIRING_SOON = 86400
SHOWN_METADATA = 4


@dataclass(frozen=True)
class Row:
    """One stream as the table shows it."""

    id: str
    name: str
    watch_url: str
    namespace: str
    content_type: str
    size: str
    size_title: str
    state: str
    expiring: bool
    created: str
    created_title: str
    expires: str
    expires_title: str
    metadata: tuple[tuple[str, str, str], ...]
    more_metadata: int
    readers: int
    delete_url: str


@dataclass(frozen=True)
class Figures:
    """The live figures at the top of the page."""

    streams: str
    open: str
    stored: str
    content: str
    appends_rate: str
    bytes_rate: str
    readers: str
    readers_detail: str


@dataclass(frozen=True)
class NamespaceLine:
    """One namespace in the summary: streams, bytes, its share of the largest and a link filtering to it."""

    namespace: str
    streams: str
    stored: str
    share: float
    url: str
    current: bool


def rows(states: list[StreamState], view: View, hub: LiveHub, now: float) -> list[Row]:
    """Table rows for one page of streams."""
    out = []
    for s in states:
        size = human_bytes(s.tail)
        size_title = f"{s.tail:,} bytes of content"
        if s.compressed:
            size_title += f", stored gzipped in {s.stored_bytes:,} bytes"
        pairs = sorted(s.metadata.items())
        out.append(
            Row(
                id=s.id,
                name=s.name,
                watch_url=viewer_url("", s.name),
                namespace=s.namespace,
                content_type=s.content_type,
                size=size + (" · gz" if s.compressed else ""),
                size_title=size_title,
                state="closed" if s.closed else "open",
                expiring=s.expires_at is not None and s.expires_at - now < EXPIRING_SOON,
                created=relative(s.created_at, now),
                created_title=iso(s.created_at) or "",
                expires=relative(s.expires_at, now),
                expires_title=iso(s.expires_at) or "no TTL",
                metadata=tuple((k, v, view.with_meta(k, v)) for k, v in pairs[:SHOWN_METADATA]),
                more_metadata=max(0, len(pairs) - SHOWN_METADATA),
                readers=hub.live_readers(s.id),
                delete_url=f"/dashboard/streams/{s.id}" + (f"?{view.query}" if view.query else ""),
            )
        )
    return out


def figures(
    summary: Mapping[str, Any],
    rate: tuple[float, float] | None,
    readers: Mapping[str, int],
    *,
    server_wide: bool = True,
) -> Figures:
    """The top figures from Store.summary, the sampled write rate and the hub's reader counts.

    Without `server_wide` (a token's sign-in) the rate and reader counts, which cover every namespace, are
    left out: the summary is then of the token's namespaces only.
    """
    live = {kind: n for kind, n in readers.items() if n}
    streams, stored = f"{summary['streams']:,}", human_bytes(summary["stored_bytes"])
    if not server_wide:
        hidden = "server-wide: shown to an API key's sign-in"
        content = human_bytes(summary["content_bytes"])
        return Figures(streams, f"{summary['open']:,}", stored, content, "—", hidden, "—", hidden)
    return Figures(
        streams=streams,
        open=f"{summary['open']:,}",
        stored=stored,
        content=human_bytes(summary["content_bytes"]),
        appends_rate="…" if rate is None else (f"{rate[0]:,.1f}" if rate[0] < 100 else f"{rate[0]:,.0f}"),
        bytes_rate="measuring" if rate is None else f"{human_bytes(rate[1])}/s",
        readers=f"{sum(readers.values()):,}",
        readers_detail=" · ".join(f"{n} {kind}" for kind, n in live.items()) or "none connected",
    )


def namespace_lines(summary: Mapping[str, Any], view: View) -> list[NamespaceLine]:
    """Per-namespace stream counts and bytes, largest first."""
    namespaces = sorted(
        summary["namespaces"], key=lambda n: (-n["stored_bytes"], -n["streams"], n["namespace"])
    )
    biggest = max((n["stored_bytes"] for n in namespaces), default=0) or 1
    return [
        NamespaceLine(
            namespace=n["namespace"],
            streams=f"{n['streams']:,}",
            stored=human_bytes(n["stored_bytes"]),
            share=round(100 * n["stored_bytes"] / biggest, 1),
            url=view.url(namespace="" if view.namespace == n["namespace"] else n["namespace"]),
            current=view.namespace == n["namespace"],
        )
        for n in namespaces
    ]
