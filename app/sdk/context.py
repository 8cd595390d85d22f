"""What an agent handler gets: its streams, a logger, and background work awaited at shutdown."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

from ..settings import Settings
from .base import StreamService
from .local import LocalStreams
from .remote import RemoteStreams


class AgentRuntime:
    """Background work started with `wait_until`: errors are logged, and shutdown awaits it."""

    def __init__(self, service: StreamService, logger: logging.Logger | None = None) -> None:
        self.service = service
        self.logger = logger or logging.getLogger("streamhold.agent")
        self._tasks: set[asyncio.Task[Any]] = set()

    def wait_until(self, work: Awaitable[Any] | Callable[[], Awaitable[Any]]) -> asyncio.Task[Any]:
        awaitable = work() if callable(work) and not inspect.isawaitable(work) else work
        task = asyncio.ensure_future(awaitable)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.logger.error("background work failed", exc_info=task.exception())

    @property
    def pending(self) -> int:
        return len(self._tasks)

    async def drain(self) -> None:
        """Wait until all background work has finished (including work it starts)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


class AgentContext:
    """What an agent handler gets: `.stream`, `.logger` and `.wait_until(...)`."""

    def __init__(
        self,
        runtime: AgentRuntime | None = None,
        *,
        trigger: str = "http",
        opener: Callable[[AsyncExitStack], Awaitable[StreamService]] | None = None,
    ) -> None:
        self._runtime = runtime
        self._opener = opener
        self._stack: AsyncExitStack | None = None
        self.trigger = trigger
        self.logger = runtime.logger if runtime else logging.getLogger("streamhold.agent")

    @property
    def stream(self) -> StreamService:
        if self._runtime is None:
            raise RuntimeError("open the context first: `async with create_agent_context() as ctx:`")
        return self._runtime.service

    def wait_until(self, work: Awaitable[Any] | Callable[[], Awaitable[Any]]) -> None:
        """Run `work` in the background, after the handler has answered."""
        if self._runtime is None:
            raise RuntimeError("open the context first: `async with create_agent_context() as ctx:`")
        self._runtime.wait_until(work)

    async def __aenter__(self) -> AgentContext:
        if self._runtime is None and self._opener is not None:
            self._stack = AsyncExitStack()
            service = await self._opener(self._stack)
            self._runtime = AgentRuntime(service)
            self.logger = self._runtime.logger
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runtime is not None:
            await self._runtime.drain()
        if self._stack is not None:
            await self._stack.aclose()
            self._stack = None
            self._runtime = None

    async def invoke(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        """Run `fn` with this context open, then wait for its background work."""
        async with self:
            return await fn()


def create_agent_context(
    settings: Settings | None = None,
    *,
    server_url: str | None = None,
    api_key: str | None = None,
    trigger: str = "manual",
) -> AgentContext:
    """A context for scripts and workers: remote with a server URL (or STREAMHOLD_URL), else local."""
    import os

    url = server_url or os.environ.get("STREAMHOLD_URL", "")
    key = api_key or os.environ.get("STREAMHOLD_API_KEY", "")

    async def open_service(stack: AsyncExitStack) -> StreamService:
        if url:
            return await stack.enter_async_context(RemoteStreams(url, api_key=key or None))
        from ..live import LiveHub
        from ..store.store import Store

        resolved = settings or Settings.from_env()
        store = await stack.enter_async_context(Store.open(resolved))
        hub = await stack.enter_async_context(LiveHub.open(store, resolved))
        return LocalStreams(store, hub, resolved)

    return AgentContext(trigger=trigger, opener=open_service)
