"""The dashboard's Subscriptions panel: each subscription, what it watches, and how its deliveries go."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..subscriptions import activity
from ..subscriptions.engine import SubscriptionEngine
from .humanize import relative

MAX_SHOWN = 200


@dataclass(frozen=True)
class SubscriptionLine:
    id: str
    watches: str
    kind: str
    status: str
    last: str  # "3 minutes ago", "never"
    last_at: str  # ISO 8601, for the title; "" when never
    failures: int
    last_error: str  # why the last delivery failed; "" when it did not

    @property
    def failing(self) -> bool:
        return bool(self.last_error) or self.status == "failed"


def _line(item: dict[str, Any], now: float) -> SubscriptionLine:
    watches = [item["pattern"]] if item["pattern"] else []
    watches += item["streams"]
    at = item["last_delivery_at"]
    return SubscriptionLine(
        id=item["id"],
        watches=", ".join(watches),
        kind=item["type"],
        status=item["status"],
        last=relative(at, now),
        last_at=datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds") if at is not None else "",
        failures=item["failures"],
        last_error=(item["last_error"] or "") if item["last_ok"] is False else "",
    )


async def lines(engine: SubscriptionEngine | None, now: float) -> list[SubscriptionLine]:
    """The panel's lines (none while the app runs without its lifespan's engine)."""
    if engine is None:
        return []
    found = await engine.read(lambda conn, _now: activity.listing(conn, MAX_SHOWN))
    return [_line(item, now) for item in found]
