"""Byte sizes, ages and durations as people read them: the one formatter every page and command uses.

The watch page's script (static/watch.js) repeats `human_bytes` to update the size live; keep them alike.
"""

from __future__ import annotations

UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")
# Coarse on purpose: a table of ages changes at most once a minute per row.
AGE_UNITS = (("day", 86400), ("hour", 3600), ("minute", 60))


def human_bytes(n: float) -> str:
    """`0 B`, `1,023 B`, `1.0 KiB`, `12.4 MiB`, `123 MiB`: binary units, about three significant figures."""
    if abs(n) < 1024:
        return f"{int(n):,} B"
    value, unit = n / 1024, 0
    while round(abs(value)) >= 1024 and unit < len(UNITS) - 1:
        value, unit = value / 1024, unit + 1
    name = UNITS[unit]
    return f"{value:.1f} {name}" if round(abs(value), 1) < 100 else f"{value:,.0f} {name}"


def relative(ts: float | None, now: float) -> str:
    """`3 minutes ago`, `in 30 days`, `just now`, `in a moment`; `never` for no time at all."""
    if ts is None:
        return "never"
    delta = ts - now
    seconds = abs(delta)
    for unit, length in AGE_UNITS:
        if seconds >= length:
            count = int(seconds // length)
            text = f"{count} {unit}{'' if count == 1 else 's'}"
            return f"in {text}" if delta > 0 else f"{text} ago"
    return "just now" if delta <= 0 else "in a moment"


def duration(seconds: float) -> str:
    """How long something took: `0.4 s`, `59.9 s`, `1 min 5 s`, `2 h 3 min`."""
    if seconds < 59.95:
        return f"{max(seconds, 0.0):.1f} s"
    whole = round(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    return f"{whole // 3600} h {whole % 3600 // 60} min"
