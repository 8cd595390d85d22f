"""create_app(settings) -> Litestar: wiring, lifespan (store, doorbells, sweeper, background work), errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeGuard, cast

from litestar import Litestar, Request, Response, Router
from litestar.datastructures import State
from litestar.di import Provide
from litestar.exceptions import HTTPException
from litestar.static_files import create_static_files_router
from litestar.template.config import TemplateConfig
from litestar.types import (
    ASGIApp,
    HTTPScope,
    LifeSpanReceive,
    LifeSpanScope,
    LifeSpanSend,
    Message,
    Receive,
    Scope,
    Send,
)

from . import agentuity_api, protocol, share_api, stop_api
from .errors import StreamError
from .http import admin, guard, headers, ops, token_api
from .http.auth import SIGN_IN_KEY
from .http.metrics import request_metrics
from .live import LiveHub
from .protocol.reads import is_sse_read, sse_asgi
from .sdk.base import StreamService
from .sdk.context import AgentContext, AgentRuntime
from .sdk.local import LocalStreams
from .settings import Settings
from .store.store import Store
from .subscriptions.engine import SubscriptionEngine
from .web import client, dashboard, session, viewer
from .web.history import History

log = logging.getLogger("streamhold")

HERE = Path(__file__).parent


APPEND_PATH = protocol.PREFIX + "/"
# Protocol appends and creates go straight to their handlers, past the framework's routing and middleware.
WRITES = {"POST": protocol.append_asgi, "PUT": protocol.create_asgi}
RESERVED_PATH = protocol.PREFIX + protocol.RESERVED


def reserved(scope: Scope) -> bool:
    """A request for the protocol's reserved APIs (subscriptions), which are not appends."""
    path: str = scope["path"]
    return path == RESERVED_PATH or path.startswith(RESERVED_PATH + "/")


def _is_http(scope: Scope | LifeSpanScope) -> TypeGuard[HTTPScope]:
    return scope["type"] == "http"


class Streamhold(Litestar):
    """The app: protocol appends go straight to their handler; everything else through the framework."""

    streamhold_settings: Settings

    async def __call__(
        self, scope: Scope | LifeSpanScope, receive: Receive | LifeSpanReceive, send: Send | LifeSpanSend
    ) -> None:
        if _is_http(scope):
            # ASGI pairs an HTTP scope with HTTP's receive and send; their types cannot say so.
            http_receive, http_send = cast(Receive, receive), cast(Send, send)
            refusal = guard.refusal(scope, self.streamhold_settings)
            if refusal is not None:
                await refusal(scope, http_receive, http_send)
                return
            method = scope["method"]
            if method in WRITES and scope["path"].startswith(APPEND_PATH) and not reserved(scope):
                if guard.on_content_origin(scope, self.streamhold_settings):
                    await guard.not_found()(scope, http_receive, http_send)
                    return
                await WRITES[method](self.state, scope, http_receive, http_send)
                return
            if scope["path"].startswith(APPEND_PATH) and not reserved(scope) and is_sse_read(scope):
                await sse_asgi(self, scope, http_receive, http_send)
                return
        await super().__call__(scope, receive, send)


def security_headers(settings: Settings) -> Callable[[ASGIApp], ASGIApp]:
    """Security headers decided by the route that answers, never by how its path was spelled.

    Stream content gets the sandbox (headers.py), the stream APIs CORS, everything `nosniff`; the
    content origin answers stream content only.
    """

    def wrap(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if not _is_http(scope):
                await app(scope, receive, send)
                return
            handler = scope.get("route_handler")
            opt = handler.opt if handler is not None else {}
            content = bool(opt.get("stream_content"))
            api = content or bool(opt.get("stream_api"))
            inline = guard.on_content_origin(scope, settings)
            if inline and not (content and scope["method"] in headers.SAFE_METHODS):
                await guard.not_found()(scope, receive, send)
                return
            if api and scope["method"] == "OPTIONS":
                await guard.preflight(scope, settings)(scope, receive, send)
                return

            async def send_wrapper(message: Message) -> None:
                if message["type"] == "http.response.start":
                    sent = list(message.get("headers", []))
                    if content:
                        kind = next((v for k, v in sent if k.lower() == b"content-type"), b"")
                        sent.extend(headers.content_headers(kind.decode("latin-1"), inline=inline))
                        sent.extend(headers.API_CORS_HEADERS)
                    elif api:
                        sent.extend(headers.API_RESPONSE_HEADERS)
                    elif not any(k.lower() == headers.NOSNIFF[0] for k, _ in sent):
                        sent.append(headers.NOSNIFF)
                    message = {**message, "headers": sent}
                await send(message)

            await app(scope, receive, send_wrapper)

        return middleware

    return wrap


def _stream_error(request: Request[Any, Any, Any], exc: StreamError) -> Response[Any]:
    return Response({"error": str(exc)}, status_code=exc.status)


def _http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    return Response({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def _sweep_forever(store: Store, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            swept = await store.sweep()
            if swept:
                log.info("swept %d expired or orphaned streams", swept)
        except Exception:
            log.exception("sweep failed; retrying at the next interval")


def create_app(settings: Settings | None = None, route_handlers: Sequence[Any] = ()) -> Streamhold:
    """The Streamhold ASGI app, plus your own handlers (which may ask for `ctx` or `stream`).

    Settings are read from the environment when not given.
    """
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with (
            Store.open(settings) as store,
            LiveHub.open(store, settings) as hub,
            History(settings.history_interval).running(store, hub) as history,
            SubscriptionEngine.open(store, settings, request_metrics(app.state).registry) as subscriptions,
        ):
            service = LocalStreams(store, hub, settings)
            runtime = AgentRuntime(service)
            app.state.update(
                store=store, hub=hub, service=service, runtime=runtime, settings=settings, history=history
            )
            app.state.subscriptions = subscriptions
            app.state[SIGN_IN_KEY] = session.reader
            sweeper = asyncio.get_running_loop().create_task(_sweep_forever(store, settings.sweep_interval))
            try:
                yield
            finally:
                hub.shutdown()
                sweeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sweeper
                await runtime.drain()

    def provide_store(state: State) -> Store:
        return state.store

    def provide_hub(state: State) -> LiveHub:
        return state.hub

    def provide_settings() -> Settings:
        return settings

    def provide_stream(state: State) -> StreamService:
        return state.service

    def provide_ctx(state: State) -> AgentContext:
        return AgentContext(state.runtime)

    routes: list[Any] = [
        Router(
            "/",
            route_handlers=[*protocol.routes, *agentuity_api.routes, *stop_api.routes, *share_api.routes],
            opt={"stream_api": True},
        ),
        *ops.routes,
        *admin.routes,
        *token_api.routes,
        *dashboard.routes,
        *viewer.routes,
        *client.routes,
        *route_handlers,
    ]
    static = HERE / "static"
    if static.is_dir():
        routes.append(create_static_files_router(path="/static", directories=[static], name="static"))
    template_config = None
    templates = HERE / "templates"
    if any(templates.glob("*.html")):
        from litestar.plugins.jinja import JinjaTemplateEngine

        template_config = TemplateConfig(directory=templates, engine=JinjaTemplateEngine)

    app = Streamhold(
        route_handlers=routes,
        lifespan=[lifespan],
        dependencies={
            "store": Provide(provide_store, sync_to_thread=False),
            "hub": Provide(provide_hub, sync_to_thread=False),
            "settings": Provide(provide_settings, sync_to_thread=False),
            "stream": Provide(provide_stream, sync_to_thread=False),
            "ctx": Provide(provide_ctx, sync_to_thread=False),
        },
        exception_handlers={StreamError: _stream_error, HTTPException: _http_error},
        middleware=[ops.request_timing, security_headers(settings)],
        template_config=template_config,
        request_max_body_size=settings.max_append_bytes + 65536,
        openapi_config=None,
        logging_config=None,
    )
    app.streamhold_settings = settings
    return app
