"""The one clock expiry is judged by: a reference time (the database's) carried on by a steady clock.

A wall clock can be stepped (by hand, by NTP, by a VM resuming) or simply be wrong on one machine; judged
by it, a stream would be refused or purged early. So the time is taken from a reference now and then, and
counted on between readings by the boot-time clock, which steps never move. On PostgreSQL the reference is
the database's clock, shared by every process; on SQLite it is this machine's wall clock, followed when it
steps back (streams then live longer, never shorter) but not when it jumps ahead by more than `MAX_SLEW`:
an early purge cannot be undone, a late one costs only space. One clock per process: the store that opens
last sets it.
"""

from __future__ import annotations

import time

MAX_SLEW = 2.0  # seconds the wall clock may run ahead of this one and still be followed

_STEADY = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)  # boot time also counts a suspend
# (reference time, steady clock when it was read): one tuple, so that other threads never see half of it.
_anchor = (time.time(), time.clock_gettime(_STEADY))


def now() -> float:
    """Seconds since the epoch by which expiry is judged."""
    reference, at = _anchor
    return reference + (time.clock_gettime(_STEADY) - at)


def set_to(reference: float) -> None:
    """Take `reference` (the database's time, read just now) as the time from here on."""
    global _anchor
    _anchor = (reference, time.clock_gettime(_STEADY))


def follow_wall() -> None:
    """Follow this machine's wall clock unless it has jumped ahead (see the module's note)."""
    wall = time.time()
    if wall < now() + MAX_SLEW:
        set_to(wall)
