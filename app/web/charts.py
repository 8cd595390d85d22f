"""Small inline SVG charts rendered on the server: the dashboard's history lines and namespace bars.

Written by hand rather than with a chart library: a polyline and a few rects are all the page draws, and the
dashboard loads no script beyond htmx. Every label goes through `escape`; numbers are formatted for people.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from markupsafe import Markup

from .history import DAY, HOUR, History, Point
from .humanize import human_bytes, relative

WIDTH, HEIGHT = 240.0, 56.0
EMPTY = "collecting…"

Format = Callable[[float], str]


def _num(value: float) -> str:
    """A coordinate in at most two decimals, without trailing zeros."""
    return f"{value:.2f}".rstrip("0").rstrip(".")


def scale(points: Sequence[Point], start: float, span: float, top: float) -> list[Point]:
    """Chart coordinates: time `start`..`start + span` to x 0..WIDTH, value 0..`top` to y HEIGHT..0."""
    top = top if top > 0 else 1.0
    out = []
    for t, value in points:
        x = min(WIDTH, max(0.0, (t - start) / span * WIDTH))
        y = HEIGHT - min(1.0, max(0.0, value / top)) * HEIGHT
        out.append((x, y))
    return out


def line(
    points: Sequence[Point], *, title: str, unit: str, span_label: str, span: float, now: float, fmt: Format
) -> Markup:
    """One chart as a `<figure>`: the line over the last `span` seconds, with min, max and latest as text.

    The y axis starts at zero, so a flat line near the top means a steady value, not a zoomed-in wobble.
    Fewer than two points draw no line: the figure says it is still collecting.
    """
    name = f"{title} ({unit}), {span_label}"
    if len(points) < 2:
        return Markup(
            '<figure class="chart empty" data-points="{n}"><figcaption><span class="chart-span">{span}</span>'
            '</figcaption><p class="chart-empty" role="img" aria-label="{name}: {empty}">{empty}</p></figure>'
        ).format(n=len(points), span=span_label, name=name, empty=EMPTY)
    values = [v for _, v in points]
    low, high, latest = min(values), max(values), values[-1]
    # A history younger than the span is drawn across the chart, and the axis says how far back it goes.
    start = max(now - span, points[0][0])
    shown = now - start if now - start > 0 else span
    coords = scale(points, now - shown, shown, high)
    line_points = " ".join(f"{_num(x)},{_num(y)}" for x, y in coords)
    area = f"M{_num(coords[0][0])},{_num(HEIGHT)} L" + " L".join(f"{_num(x)},{_num(y)}" for x, y in coords)
    area += f" L{_num(coords[-1][0])},{_num(HEIGHT)} Z"
    summary = f"min {fmt(low)} · max {fmt(high)} · latest {fmt(latest)}"
    return Markup(
        '<figure class="chart" data-points="{n}">'
        '<figcaption><span class="chart-span">{span}</span> '
        '<span class="chart-values">{summary}</span></figcaption>'
        '<svg class="spark" viewBox="0 0 {w} {h}" preserveAspectRatio="none" role="img">'
        "<title>{name}: {summary}</title>"
        '<path class="area" d="{area}"/><polyline class="line" points="{line}"/></svg>'
        '<div class="chart-axis" aria-hidden="true"><span>{ago} ago</span><span>now</span></div></figure>'
    ).format(
        n=len(points),
        span=span_label,
        summary=summary,
        w=_num(WIDTH),
        h=_num(HEIGHT),
        name=name,
        area=area,
        line=line_points,
        ago=duration(shown),
    )


def bar(label: str, value: float, top: float, text: str) -> Markup:
    """One horizontal bar, `value` against the largest (`top`), with its label and value as its title."""
    share = 100.0 * value / top if top > 0 else 0.0
    share = min(100.0, max(0.0, share))
    return Markup(
        '<svg class="ns-bar" viewBox="0 0 100 6" preserveAspectRatio="none" role="img">'
        "<title>{label}: {text} stored ({pct}% of the largest namespace)</title>"
        '<rect class="track" width="100" height="6"/><rect class="fill" width="{share}" height="6"/></svg>'
    ).format(label=label, text=text, pct=f"{share:.0f}", share=_num(share))


def duration(seconds: float) -> str:
    """`40 s`, `12 min`, `1 h`, `24 h`: how far back a chart reaches."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min" if seconds < 3570 else "1 h"
    return f"{seconds / 3600:.0f} h"


def per_second(value: float) -> str:
    if value == 0:
        return "0/s"
    return f"{value:,.1f}/s" if value < 100 else f"{value:,.0f}/s"


def bytes_per_second(value: float) -> str:
    return f"{human_bytes(value)}/s"


def count(value: float) -> str:
    return f"{value:,.0f}" if value == int(value) else f"{value:,.1f}"


@dataclass(frozen=True)
class Metric:
    """One charted figure: its history key, title, unit and how its values read."""

    key: str
    title: str
    unit: str
    fmt: Format


METRICS = (
    Metric("appends", "Appends", "per second", per_second),
    Metric("bytes", "Bytes written", "bytes per second", bytes_per_second),
    Metric("readers", "Live readers", "connections", count),
    Metric("stored", "Stored", "bytes, all streams", human_bytes),
)


@dataclass(frozen=True)
class Card:
    """One figure's charts: the last hour and the last 24 h."""

    key: str
    title: str
    unit: str
    hour: Markup
    day: Markup


def cards(history: History, now: float) -> list[Card]:
    """The dashboard's chart cards from a history, at monotonic time `now`."""
    out = []
    for m in METRICS:
        hour, day = (
            line(points, title=m.title, unit=m.unit, span_label=label, span=span, now=now, fmt=m.fmt)
            for points, label, span in (
                (history.hour(m.key, now), "last hour", HOUR),
                (history.day(m.key, now), "last 24 h", DAY),
            )
        )
        out.append(Card(m.key, m.title, m.unit, hour, day))
    return out


@dataclass(frozen=True)
class Panel:
    """The charts section: its cards, what they cover, and how often the page asks for it again."""

    cards: list[Card]
    note: str
    refresh: int


def panel(history: History, now: float, wall_now: float) -> Panel:
    """The charts section at monotonic time `now`; it refreshes as often as a sample is taken, 2 s at most."""
    return Panel(cards(history, now), note(history, wall_now), max(2, round(history.interval)))


def note(history: History, wall_now: float) -> str:
    """What the charts cover, said plainly: this process's own samples since it started."""
    started = relative(history.started_at, wall_now)
    every = f"{history.interval:g} s"
    return (
        f"History of this server process since it started ({started}): sampled every {every} for the last "
        "hour, one point per 5 minutes for the last 24 h. It starts empty when the process restarts, and "
        "other processes serving the same database keep their own."
    )
