"""Server-sent events read off a response's lines, as a browser's EventSource would frame them."""

from __future__ import annotations

from collections.abc import AsyncIterator


async def sse_events(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, str, str | None]]:
    """Each event as (event name, data lines joined by newlines, id or None); comments are skipped."""
    kind, data, event_id = "", [], None
    async for line in lines:
        if line.startswith(":"):
            continue
        if line:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                kind = value
            elif name == "data":
                data.append(value)
            elif name == "id":
                event_id = value
            continue
        yield kind, "\n".join(data), event_id
        kind, data, event_id = "", [], None
