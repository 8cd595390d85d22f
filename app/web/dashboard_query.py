"""The dashboard's filter: namespace, metadata, state, prefix, sort and page, read from a query string."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import parse_qs, urlencode

from ..checks import count
from ..models import StreamFilter

SORTS = {"created": "desc", "size": "desc", "namespace": "asc"}
STATES = {"open": "Open", "closed": "Closed", "expiring": "Expiring < 24 h"}
MAX_META_PAIRS = 8
MAX_TEXT = 512
MAX_PAGE = 10**9
MAX_CURSOR = 4096


@dataclass(frozen=True)
class View:
    """What the dashboard shows (filters, sort, page), read from and written back to a query string."""

    namespace: str = ""
    meta: tuple[tuple[str, str], ...] = ()
    state: str = ""
    prefix: str = ""
    sort: str = "created"
    direction: str = "desc"
    page: int = 1
    # Where the page starts (a listing cursor); the page number then only numbers it. Empty: by page number.
    cursor: str = ""
    problems: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def from_query(cls, query: str) -> View:
        """Parse `?namespace=&meta=k=v&state=&prefix=&sort=&dir=&page=&cursor=`; bad values dropped, noted."""
        params = parse_qs(query, keep_blank_values=True)

        def one(name: str) -> str:
            return (params.get(name) or [""])[-1].strip()[:MAX_TEXT]

        problems: list[str] = []
        meta: list[tuple[str, str]] = []
        for raw in params.get("meta", []):
            key, sep, value = raw.strip().partition("=")
            if not raw.strip():
                continue
            if not sep or not key.strip():
                problems.append(f"“{raw[:60]}” is not a key=value pair")
            elif (key.strip(), value.strip()) not in meta:
                meta.append((key.strip()[:255], value.strip()[:1024]))
        if len(meta) > MAX_META_PAIRS:
            problems.append(f"at most {MAX_META_PAIRS} metadata pairs are used")
            meta = meta[:MAX_META_PAIRS]
        state = one("state")
        if state and state not in STATES:
            problems.append(f"unknown state “{state[:30]}”")
            state = ""
        sort = one("sort") or "created"
        if sort not in SORTS:
            sort = "created"
        direction = one("dir") or SORTS[sort]
        if direction not in ("asc", "desc"):
            direction = SORTS[sort]
        # Past the last page shows the last page; a page number of many digits is just that.
        page = min(count(one("page")) or 1, MAX_PAGE)
        cursor = (params.get("cursor") or [""])[-1].strip()
        if len(cursor) > MAX_CURSOR:
            problems.append("the page link was cut short: showing this page from its number")
            cursor = ""
        return cls(
            one("namespace"),
            tuple(meta),
            state,
            one("prefix"),
            sort,
            direction,
            max(page, 1),
            cursor,
            tuple(problems),
        )

    @property
    def where(self) -> StreamFilter:
        return StreamFilter(self.namespace or None, self.meta, self.state or None, self.prefix or None)

    @property
    def filtered(self) -> bool:
        return bool(self.namespace or self.meta or self.state or self.prefix)

    def params(self) -> list[tuple[str, str]]:
        """The canonical query: only what differs from the defaults, in a fixed order."""
        out: list[tuple[str, str]] = []
        if self.namespace:
            out.append(("namespace", self.namespace))
        out += [("meta", f"{k}={v}") for k, v in self.meta]
        if self.state:
            out.append(("state", self.state))
        if self.prefix:
            out.append(("prefix", self.prefix))
        if self.sort != "created" or self.direction != "desc":
            out += [("sort", self.sort), ("dir", self.direction)]
        if self.page > 1:
            out.append(("page", str(self.page)))
        if self.cursor:
            out.append(("cursor", self.cursor))
        return out

    @property
    def query(self) -> str:
        return urlencode(self.params())

    def url(self, **changes: Any) -> str:
        """The dashboard URL of this view with some fields changed (filters changing resets the page).

        A new page number without a cursor is a page by its number; any other change starts afresh too.
        """
        if changes.keys() - {"page", "sort", "direction", "cursor"}:
            changes.setdefault("page", 1)
        changes.setdefault("cursor", "")
        query = urlencode(replace(self, **changes).params())
        return "/?" + query if query else "/"

    def sort_url(self, column: str) -> str:
        if column == self.sort:
            return self.url(sort=column, direction="asc" if self.direction == "desc" else "desc", page=1)
        return self.url(sort=column, direction=SORTS[column], page=1)

    def with_meta(self, key: str, value: str) -> str:
        return self.url(meta=(*self.meta, (key, value))) if (key, value) not in self.meta else self.url()

    def without_meta(self, pair: tuple[str, str]) -> str:
        return self.url(meta=tuple(p for p in self.meta if p != pair))
