"""The operator dashboard at `/`: streams with filters, sorting, paging, deletes and live figures.

One handler serves the full page or the partial the page includes (htmx); deletes answer with the partial too.
A sign-in with a scoped token sees, counts and deletes only the streams of the token's namespaces: the
namespaces go down to the store as part of the filter, so the database does the counting.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import parse_qs

from litestar import Request, Response, delete, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.exceptions import ImproperlyConfiguredException
from litestar.params import FromPath, FromQuery

from ..checks import BEYOND, count
from ..errors import InvalidRequestError, StreamGoneError, StreamNotFoundError
from ..http.auth import Principal
from ..http.headers import PAGE_HEADERS
from ..live import LiveHub
from ..models import StreamFilter
from ..settings import Settings
from ..store.listing import Listing
from ..store.store import Store
from . import charts, session
from .dashboard_format import Figures, NamespaceLine, Row, figures, namespace_lines, rows
from .dashboard_query import STATES, View
from .dashboard_subscriptions import SubscriptionLine
from .dashboard_subscriptions import lines as subscription_lines

PAGE_SIZE = 50
HTML_HEADERS = {"cache-control": "no-store", "vary": "HX-Request, HX-Target", **PAGE_HEADERS}


class Rate:
    """Appends and bytes per second, from the writer's counters sampled on each dashboard request."""

    WINDOW = 10.0

    def __init__(self) -> None:
        self._samples: collections.deque[tuple[float, int, int]] = collections.deque(maxlen=64)

    def sample(self, appends: int, nbytes: int, now: float | None = None) -> tuple[float, float] | None:
        """(appends/s, bytes/s) over roughly the last ten seconds; None until two samples are apart."""
        now = time.monotonic() if now is None else now
        self._samples.append((now, appends, nbytes))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.WINDOW:
            self._samples.popleft()
        then, appends0, bytes0 = self._samples[0]
        if now - then < 0.5:
            return None
        return (appends - appends0) / (now - then), (nbytes - bytes0) / (now - then)


@dataclass
class Page:
    """Everything a dashboard template needs."""

    view: View
    total: int
    rows: list[Row]
    next: str | None  # the cursors of the next and previous pages (None at either end)
    previous: str | None
    figures: Figures
    namespaces: list[NamespaceLine]
    history: charts.Panel | None = None
    facets: list[tuple[str, int]] = field(default_factory=list)
    notice: str = ""
    csrf: str = ""
    signed_in: bool = False
    scoped: bool = False  # a token's sign-in: server-wide figures, charts and subscriptions are not shown
    storage: str = ""  # why storage counts as full, shown as a banner while it does
    subscriptions: list[SubscriptionLine] = field(default_factory=list)

    @property
    def pages(self) -> int:
        return max(1, math.ceil(self.total / PAGE_SIZE))

    @property
    def first(self) -> int:
        return (self.view.page - 1) * PAGE_SIZE + 1 if self.total else 0

    @property
    def last(self) -> int:
        return min(self.view.page * PAGE_SIZE, self.total)

    @property
    def fingerprint(self) -> str:
        """Same fingerprint, same table HTML: a poll that finds it unchanged swaps nothing."""
        return hashlib.blake2b(repr((self.view, self.total, self.rows)).encode(), digest_size=8).hexdigest()

    @property
    def poll_url(self) -> str:
        query = self.view.query
        return f"/?{query}&seen={self.fingerprint}" if query else f"/?seen={self.fingerprint}"


def _rate(state: State) -> Rate:
    rate = state.get("dashboard_rate")
    if rate is None:
        rate = state["dashboard_rate"] = Rate()
    return rate


def within(where: StreamFilter, principal: Principal) -> StreamFilter:
    """The filter kept to the namespaces the sign-in covers (all of them for an API key)."""
    return where if principal.full else replace(where, namespaces=principal.namespaces)


async def _page_of(store: Store, view: View, principal: Principal) -> tuple[View, Listing]:
    """The view's page: from its cursor, or by its number (a cursor not one of ours is noted, dropped)."""
    where = within(view.where, principal)
    if view.cursor:
        try:
            found = await store.listing(
                where, sort=view.sort, direction=view.direction, limit=PAGE_SIZE, cursor=view.cursor
            )
            return view, found
        except InvalidRequestError as exc:
            view = replace(view, cursor="", problems=(*view.problems, str(exc)))
    offset = (view.page - 1) * PAGE_SIZE
    found = await store.listing(
        where, sort=view.sort, direction=view.direction, limit=PAGE_SIZE, offset=offset
    )
    return view, found


async def build(
    request: Request[Any, Any, Any],
    store: Store,
    hub: LiveHub,
    view: View,
    principal: Principal,
    *,
    facets: bool,
) -> Page:
    """Read what a view shows: one page of streams, the totals and (for the filter form) namespace counts."""
    now = time.time()
    scoped = not principal.full
    (view, found), summary, counted, subscribed = await asyncio.gather(
        _page_of(store, view, principal),
        store.summary(within(StreamFilter(), principal)),
        store.facets(within(replace(view.where, namespace=None), principal))
        if facets
        else asyncio.sleep(0, None),
        # Listing subscriptions takes an admin key, as on the protocol's API.
        asyncio.sleep(0, []) if scoped else subscription_lines(request.app.state.get("subscriptions"), now),
    )
    if not found.streams and found.total and (view.page > 1 or view.cursor):
        view = replace(view, page=max(1, math.ceil(found.total / PAGE_SIZE)), cursor="")
        view, found = await _page_of(store, view, principal)
    total, states = found.total, found.streams
    rate = _rate(request.app.state).sample(store.writer.appends, store.writer.bytes_appended)
    page = Page(
        view=view,
        total=total,
        rows=rows(states, view, hub, now),
        next=found.next,
        previous=found.previous,
        figures=figures(summary, rate, hub.readers, server_wide=not scoped),
        namespaces=namespace_lines(summary, view),
        storage=store.space.problem() or "",
        subscriptions=subscribed,
        scoped=scoped,
    )
    page.history = None if scoped else history_panel(request)
    if counted is not None:
        page.facets = list(counted)
        if view.namespace and view.namespace not in {name for name, _ in page.facets}:
            page.facets.append((view.namespace, 0))
    return page


def history_panel(request: Request[Any, Any, Any]) -> charts.Panel | None:
    """The charts of this process's history (None while the app runs without its lifespan's sampler)."""
    history = request.app.state.get("history")
    return None if history is None else charts.panel(history, time.monotonic(), time.time())


def render(request: Request[Any, Any, Any], template: str, **context: Any) -> str:
    engine = request.app.template_engine
    if engine is None:
        raise ImproperlyConfiguredException("the dashboard needs its templates: reinstall streamhold")
    return engine.get_template(template).render(states=STATES, bar=charts.bar, **context)


def html(body: str, status: int = 200, headers: Mapping[str, str] | None = None) -> Response[str]:
    sent = {**HTML_HEADERS, **(headers or {})}
    return Response(body, status_code=status, media_type="text/html", headers=sent)


def respond(request: Request[Any, Any, Any], page: Page, target: str) -> Response[str]:
    """The partial htmx asked for (with the live figures out of band), or the full page."""
    if target == "streams":
        oob = render(request, "_dashboard_live.html", page=page, oob=True)
        seen = parse_qs(request.url.query).get("seen", [""])[-1]
        if seen == page.fingerprint:
            return html(oob, headers={"hx-reswap": "none"})
        return html(render(request, "_streams.html", page=page) + oob)
    if target == "board":
        body = render(request, "_dashboard_board.html", page=page)
        body += render(request, "_dashboard_live.html", page=page, oob=True)
        headers = {"hx-push-url": page.view.url()} if request.method == "GET" else {}
        return html(body, headers=headers)
    return html(render(request, "dashboard.html", page=page))


def _target(request: Request[Any, Any, Any]) -> str:
    if not request.headers.get("hx-request") or request.headers.get("hx-history-restore-request"):
        return ""
    return request.headers.get("hx-target", "")


async def _change_allowed(
    request: Request[Any, Any, Any], settings: Settings
) -> Response[str] | session.Session:
    current = await session.current(request, settings)
    if current is None:
        return session.denied(request, change=True)
    if not session.csrf_ok(request, settings, current):
        return session.forbidden()
    return current


@get("/", name="dashboard")
async def dashboard(
    request: Request[Any, Any, Any],
    store: NamedDependency[Store],
    hub: NamedDependency[LiveHub],
    settings: NamedDependency[Settings],
) -> Response[str]:
    """The dashboard page, or the table (`HX-Target: streams`), filters and table (`board`) or `charts`."""
    current = await session.current(request, settings)
    if current is None:
        return session.denied(request, change=False)
    target = _target(request)
    if target == "charts":
        if current.scoped:
            return _refused("the history charts cover the whole server: they need an API key's sign-in")
        return html(render(request, "_dashboard_charts.html", history=history_panel(request)))
    view = View.from_query(request.url.query)
    page = await build(request, store, hub, view, current.principal, facets=target != "streams")
    page.csrf, page.signed_in = current.csrf, current.signed_in
    return respond(request, page, target)


def _refused(message: str) -> Response[str]:
    return Response(message, status_code=403, media_type="text/plain", headers={"cache-control": "no-store"})


@delete("/dashboard/streams/{stream_id:str}", status_code=200)
async def delete_stream(
    stream_id: FromPath[str],
    request: Request[Any, Any, Any],
    store: NamedDependency[Store],
    hub: NamedDependency[LiveHub],
    settings: NamedDependency[Settings],
) -> Response[str]:
    """Delete one stream (its live readers end, its bytes are purged) and answer with the refreshed board."""
    allowed = await _change_allowed(request, settings)
    if isinstance(allowed, Response):
        return allowed
    state = await store.get(stream_id)
    if state is not None and not allowed.principal.may("manage", state.namespace):
        return _refused(
            f"this sign-in's token does not cover namespace {state.namespace}: nothing was deleted"
        )
    try:
        await store.delete(stream_id)
        notice = f"Deleted {state.name if state else stream_id}."
    except (StreamNotFoundError, StreamGoneError):
        notice = "That stream was already gone."
    return await _after_change(request, store, hub, allowed, notice)


@delete("/dashboard/streams", status_code=200)
async def delete_filtered(
    request: Request[Any, Any, Any],
    store: NamedDependency[Store],
    hub: NamedDependency[LiveHub],
    settings: NamedDependency[Settings],
) -> Response[str]:
    """Delete every stream of the current filter, unless it now matches more than the confirmed count."""
    allowed = await _change_allowed(request, settings)
    if isinstance(allowed, Response):
        return allowed
    view = View.from_query(request.url.query)
    expected = count(parse_qs(request.url.query).get("expected", [""])[-1])
    if expected is None or expected == BEYOND:
        return html("a bulk delete needs ?expected=N, the number of streams the user confirmed", status=400)
    where = within(view.where, allowed.principal)
    total, _ = await store.list(where, limit=1)
    if total > expected:
        notice = (
            f"Nothing was deleted: the filter now matches {total:,} streams, not the {expected:,} you "
            "confirmed. Check the list and try again."
        )
    else:
        deleted = await store.delete_matching(where)
        notice = f"Deleted {deleted:,} stream{'s' if deleted != 1 else ''}."
    return await _after_change(request, store, hub, allowed, notice, replace(view, page=1))


async def _after_change(
    request: Request[Any, Any, Any],
    store: Store,
    hub: LiveHub,
    current: session.Session,
    notice: str,
    view: View | None = None,
) -> Response[str]:
    view = view or View.from_query(request.url.query)
    page = await build(request, store, hub, view, current.principal, facets=True)
    page.csrf, page.signed_in, page.notice = current.csrf, current.signed_in, notice
    return respond(request, page, "board")


@get("/signin", name="signin")
async def signin_form(
    request: Request[Any, Any, Any],
    settings: NamedDependency[Settings],
    next: FromQuery[str] = "/",
    ended: FromQuery[str] = "",
) -> Response[str]:
    """The sign-in form (only when API keys are configured)."""
    if not settings.api_keys or await session.current(request, settings) is not None:
        return Response("", status_code=303, headers={"location": session.safe_next(next)})
    notice = session.ENDED_NOTICE if ended == "token" else ""
    return html(render(request, "signin.html", next=session.safe_next(next), error="", notice=notice))


@post("/signin", status_code=303, request_max_body_size=session.FORM_LIMIT)
async def signin(
    request: Request[Any, Any, Any], store: NamedDependency[Store], settings: NamedDependency[Settings]
) -> Response[str]:
    """Check an API key or a `manage` token and sign the browser in: an HttpOnly, SameSite=Strict cookie."""
    form = await session.read_form(request)
    target = session.safe_next(str(form.get("next", "/")))
    if not settings.api_keys:
        return Response("", status_code=303, headers={"location": target})
    if not session.same_origin(request, settings):
        return session.forbidden()
    key = str(form.get("key", "")).strip()
    if session.check_key(key, settings):
        value = await session.start(store, key)
    else:
        record = await store.tokens.check(key) if key else None
        if record is None:
            error = "That key is not one of this server's API keys." if key else "Enter an API key."
            return html(render(request, "signin.html", next=target, error=error), status=401)
        if "manage" not in record.scopes:
            error = "Refused: this token lacks the manage scope. The dashboard needs a key or a manage token."
            return html(render(request, "signin.html", next=target, error=error), status=403)
        value = await session.start_with_token(store, record)
    cookie = session.session_cookie(request, settings, value)
    return Response("", status_code=303, headers={"location": target}, cookies=[cookie])


@post("/signout", status_code=303, request_max_body_size=session.FORM_LIMIT)
async def signout(
    request: Request[Any, Any, Any], store: NamedDependency[Store], settings: NamedDependency[Settings]
) -> Response[str]:
    """End the session everywhere (CSRF-checked, so another site cannot sign you out)."""
    current = await session.current(request, settings)
    token = str((await session.read_form(request)).get(session.CSRF_FIELD, ""))
    if current is not None and not session.csrf_ok(request, settings, current, token):
        return session.forbidden()
    if current is not None and current.signed_in:
        await session.end(request, store)
    location = session.SIGNIN_PATH if settings.api_keys else "/"
    cookie = session.cleared_cookie(request, settings)
    return Response("", status_code=303, headers={"location": location}, cookies=[cookie])


routes = [dashboard, delete_stream, delete_filtered, signin_form, signin, signout]
