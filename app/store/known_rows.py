"""PostgreSQL: the stream rows a store's writer last read or wrote, shared by its connections (lanes).

A batch of appends whose streams this process wrote last can skip reading them: it writes each row only if it
is still the version (xmin) this process left, and fails as a whole otherwise (statements.py). Two lanes
never hold one stream at once, but they run on threads of their own, so the map takes a lock.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from ..models import LRU
from .appends import Record


@dataclass(frozen=True, slots=True)
class KnownRow:
    """A stream's row as the writer's locked read returns it, its record, and its version once written."""

    row: tuple[Any, ...]
    record: Record
    xmin: str | None


class KnownRows:
    """At most `size` rows, the least recently used forgotten first."""

    def __init__(self, size: int) -> None:
        self._rows: LRU[str, KnownRow] = LRU(size)
        self._lock = threading.Lock()

    def get(self, stream_id: str) -> KnownRow | None:
        with self._lock:
            return self._rows.get(stream_id)

    def put(self, stream_id: str, known: KnownRow) -> None:
        with self._lock:
            self._rows.put(stream_id, known)

    def written(self, stream_ids: set[str]) -> dict[str, KnownRow] | None:
        """Each stream's row, if this process wrote every one of them and knows the version it left."""
        found = {}
        with self._lock:
            for stream_id in stream_ids:
                known = self._rows.get(stream_id)
                if known is None or known.xmin is None:
                    return None
                found[stream_id] = known
        return found
