"""The one formatter of sizes, ages and durations, by a table of cases."""

from __future__ import annotations

import pytest

from streamhold.web.humanize import duration, human_bytes, relative

KIB, MIB, GIB, TIB = 1024, 1024**2, 1024**3, 1024**4
NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("size", "shown"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (13, "13 B"),
        (1023, "1,023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (2048, "2.0 KiB"),
        (99.9 * KIB, "99.9 KiB"),
        (99.96 * KIB, "100 KiB"),
        (123 * KIB, "123 KiB"),
        (1000 * KIB, "1,000 KiB"),
        (1023.4 * KIB, "1,023 KiB"),
        (1023.6 * KIB, "1.0 MiB"),
        (12.4 * MIB, "12.4 MiB"),
        (3 * GIB, "3.0 GiB"),
        (5 * TIB, "5.0 TiB"),
        (2048 * TIB, "2.0 PiB"),
        (12.7, "12 B"),  # a rate in bytes a second
    ],
)
def test_human_bytes(size: float, shown: str) -> None:
    assert human_bytes(size) == shown


@pytest.mark.parametrize(
    ("offset", "shown"),
    [
        (None, "never"),
        (0, "just now"),
        (-59, "just now"),
        (30, "in a moment"),
        (-60, "1 minute ago"),
        (-119, "1 minute ago"),
        (-180, "3 minutes ago"),
        (3600, "in 1 hour"),
        (-7200, "2 hours ago"),
        (86400 * 30, "in 30 days"),
        (-86400, "1 day ago"),
    ],
)
def test_relative(offset: float | None, shown: str) -> None:
    assert relative(None if offset is None else NOW + offset, NOW) == shown


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0, "0.0 s"),
        (0.42, "0.4 s"),
        (59.9, "59.9 s"),
        (59.97, "1 min 0 s"),
        (65, "1 min 5 s"),
        (3599.4, "59 min 59 s"),
        (7380, "2 h 3 min"),
    ],
)
def test_duration(seconds: float, shown: str) -> None:
    assert duration(seconds) == shown
