"""The subscription engine of one process: append hook, lease sweep, webhook deliveries, wake events.

It runs beside the store for the app's lifespan. Appends only note which streams moved (a bounded set);
everything else runs in this engine's own tasks, so a dead webhook never slows an append. Deliveries are
held in the database with an expiry, so that one process sends a wake at a time and a crashed sender's
delivery is taken over by another process once its hold lapses.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import os
import random
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from prometheus_client import CollectorRegistry, Counter
from sqlalchemy import Connection, select, text
from sqlmodel import SQLModel

from .. import clock
from ..models import Change
from ..settings import Settings
from ..store.schema import streams
from ..store.store import Store
from ..store.subscription_tables import SUBSCRIPTION_TABLES
from . import activity, state
from . import keys as keyring
from .signing import NotIssuedError, SigningKey
from .urls import webhook_url_problem

log = logging.getLogger("streamhold.subscriptions")
T = TypeVar("T")

HOOK_GATHER_S = 0.02
SWEEP_INTERVAL_S = 0.5  # lease expiry, retries due and deliveries to take over are found this often
RECONCILE_EVERY = 10  # sweeps between looks for idle subscriptions with work no hook saw (a crash)
MAX_CONCURRENT_DELIVERIES = 16
MAX_NOTED_STREAMS = 10_000  # streams that moved since the hook last ran; past this the sweep catches up
MAX_RESPONSE_BYTES = 64 * 1024
HOLD_GRACE_S = 2.0
SCHEMA_LOCK = 0x53554253  # PostgreSQL advisory lock: one process makes the tables and the key


def retry_delay(attempt: int) -> float:
    """Seconds before retry `attempt` (1, 2, ...): 1 s doubling to 60 s, with 20% jitter either way."""
    base = min(1.0 * 2 ** min(attempt - 1, 10), 60.0)
    return base * random.uniform(0.8, 1.2)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.deliveries = Counter(
            "streamhold_webhook_deliveries_total",
            "Webhook deliveries this process attempted.",
            registry=registry,
        )
        self.failures = Counter(
            "streamhold_webhook_failures_total",
            "Webhook deliveries that failed (no answer in time, or not 2xx); each is retried later.",
            registry=registry,
        )
        self.retries = Counter(
            "streamhold_webhook_retries_total",
            "Webhook deliveries that were retries of a failed one.",
            registry=registry,
        )
        self.takeovers = Counter(
            "streamhold_subscription_lease_takeovers_total",
            "Webhook deliveries taken over from a process whose hold on them had lapsed.",
            registry=registry,
        )
        self.wake_events = Counter(
            "streamhold_wake_events_total", "Pull-wake events appended to wake streams.", registry=registry
        )


class SubscriptionEngine:
    """Subscriptions for one process: state transactions, and the background work they leave."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        key: SigningKey,
        keys: list[SigningKey],
        registry: CollectorRegistry | None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.key = key
        self.keys = keys
        self.metrics = Metrics(registry)
        self.me = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._moved: set[str] = set()
        # Whether any subscription exists (as of the last sweep, or made here since): without one, appends
        # cost the writer nothing extra.
        self.any_subscriptions = False
        self._moved_ready = asyncio.Event()
        self._due = asyncio.Event()
        self._sending: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._client = httpx.AsyncClient(
            trust_env=False,  # proxy variables must not divert a delivery
            follow_redirects=False,
            timeout=settings.webhook_timeout,
            limits=httpx.Limits(max_connections=MAX_CONCURRENT_DELIVERIES),
        )

    @classmethod
    @asynccontextmanager
    async def open(
        cls, store: Store, settings: Settings, registry: CollectorRegistry | None = None
    ) -> AsyncIterator[SubscriptionEngine]:
        """Make the tables and the key if missing, then run the engine for the life of the block."""
        published, any_subscriptions = await store.writer.call(
            lambda conn: (_prepare(conn, store.postgres), [])
        )
        engine = cls(store, settings, published[0], published, registry)
        engine.any_subscriptions = any_subscriptions
        store.subscribe(engine._on_commit)
        loop = asyncio.get_running_loop()
        engine._tasks = [
            loop.create_task(engine._hook_forever(), name="streamhold-subscription-hook"),
            loop.create_task(engine._sweep_forever(), name="streamhold-subscription-sweep"),
            loop.create_task(engine._deliver_forever(), name="streamhold-webhook-deliveries"),
        ]
        try:
            yield engine
        finally:
            await engine._stop()

    async def _stop(self) -> None:
        for task in [*self._tasks, *self._sending]:
            task.cancel()
        for task in [*self._tasks, *self._sending]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._client.aclose()

    async def run(self, fn: Callable[[Connection, float, state.Effects], T]) -> T:
        """Run `fn(conn, now, effects)` as one transaction, then what it left to do."""
        effects = state.Effects()
        result = await self.store.writer.call(lambda conn: (fn(conn, clock.now(), effects), []))
        await self.follow(effects)
        return result

    async def read(self, fn: Callable[[Connection, float], T]) -> T:
        return await self.store.writer.call(lambda conn: (fn(conn, clock.now()), []))

    def use_keys(self, published: list[SigningKey]) -> None:
        """Sign with the newest of the published keys (another process may have rotated them)."""
        if published:
            self.keys, self.key = published, published[0]

    def token_generation(self, token: str, subscription_id: str, now: float, conn: Connection) -> int:
        """A callback token's generation, if any published key made it (one made before a rotation too).

        A token no key here made may come from a key another process just rotated in: the keys are read
        again once before it is refused.
        """
        try:
            return self._token_generation(token, subscription_id, now)
        except NotIssuedError:
            self.use_keys(keyring.published(conn, now))
            return self._token_generation(token, subscription_id, now)

    def _token_generation(self, token: str, subscription_id: str, now: float) -> int:
        for key in self.keys[1:]:
            with contextlib.suppress(NotIssuedError):
                return key.token_generation(token, subscription_id, now)
        return self.key.token_generation(token, subscription_id, now)

    async def follow(self, effects: state.Effects) -> None:
        if effects.deliveries_due:
            self._due.set()
        for wake_stream, event in effects.wake_events:
            await self._append_wake_event(wake_stream, event)

    async def _append_wake_event(self, wake_stream: str, event: bytes) -> None:
        try:
            target = await self.store.get_by_name(wake_stream)
            if target is None or target.deleted or target.closed or not target.json_mode:
                log.warning(
                    "wake stream %r is missing, closed or not JSON; the wake waits for a claim", wake_stream
                )
                return
            await self.store.append(target.id, event + b"\n", content_type=target.content_type)
            self.metrics.wake_events.inc()
        except Exception:
            log.exception("could not append a wake event to %r; the wake waits for a claim", wake_stream)

    # --- the append hook -------------------------------------------------------------------------

    def _on_commit(self, changes: list[Change]) -> None:
        self.noted([c.stream_id for c in changes if not c.gone and c.tail > 0])

    def noted(self, stream_ids: list[str]) -> None:
        """Streams that just got data: the hook looks at them soon, in this engine's own task."""
        for stream_id in stream_ids:
            if len(self._moved) >= MAX_NOTED_STREAMS:
                break  # the sweep wakes what this misses; new glob matches wait for their next append
            self._moved.add(stream_id)
        if self._moved:
            self._moved_ready.set()

    async def _hook_forever(self) -> None:
        while True:
            await self._moved_ready.wait()
            # Let a busy writer's next commits join this look: one hook transaction per gathering, not per
            # commit, so the hook's share of the writer stays small under load.
            await asyncio.sleep(HOOK_GATHER_S)
            self._moved_ready.clear()
            moved, self._moved = list(self._moved), set()
            if not self.any_subscriptions:
                continue
            try:
                await self.run(functools.partial(_hook, stream_ids=moved))
            except Exception:
                log.exception("subscription hook failed; the sweep retries the wakes it missed")

    async def _sweep_forever(self) -> None:
        after = ""  # where the look at idle subscriptions goes on from, every RECONCILE_EVERY sweeps
        for count in itertools.count(1):
            await asyncio.sleep(SWEEP_INTERVAL_S)
            reconcile = after if count % RECONCILE_EVERY == 0 else None

            def sweep(
                conn: Connection, now: float, effects: state.Effects, reconcile: str | None = reconcile
            ) -> str | None:
                self.any_subscriptions = state.any_subscriptions(conn)
                found, resume = state.sweep(conn, now, reconcile)
                _merge(effects, found)
                if reconcile is not None:
                    self.use_keys(keyring.published(conn, now))
                return resume

            try:
                resume = await self.run(sweep)
                if resume is not None:
                    after = resume
            except Exception:
                log.exception("subscription sweep failed; retrying")
            if self.any_subscriptions:
                self._due.set()

    # --- webhook deliveries ----------------------------------------------------------------------

    async def _deliver_forever(self) -> None:
        hold = self.settings.webhook_timeout + HOLD_GRACE_S
        while True:
            await self._due.wait()
            self._due.clear()
            free = MAX_CONCURRENT_DELIVERIES - len(self._sending)

            def take(conn: Connection, now: float, free: int = free) -> list[state.Delivery]:
                return state.take_deliveries(conn, self.me, now, hold, free)

            try:
                taken = await self.read(take)
            except Exception:
                log.exception("could not take webhook deliveries; retrying at the next sweep")
                continue
            for delivery in taken:
                task = asyncio.get_running_loop().create_task(self._deliver(delivery))
                self._sending.add(task)
                task.add_done_callback(self._sending.discard)

    async def _deliver(self, delivery: state.Delivery) -> None:
        if delivery.took_over:
            self.metrics.takeovers.inc()
        if delivery.attempts:
            self.metrics.retries.inc()
        ok, done, error = await self._send(delivery)
        self.metrics.deliveries.inc()
        if not ok:
            self.metrics.failures.inc()
        delay = retry_delay(delivery.attempts + 1)
        try:

            def record(conn: Connection, now: float, effects: state.Effects) -> None:
                _merge(effects, state.delivered(conn, delivery, self.me, ok, done, delay, now))
                if state.load(conn, delivery.subscription_id, lock=False) is not None:
                    activity.record(conn, delivery.subscription_id, ok, error, now)

            await self.run(record)
        except Exception:
            log.exception("could not record a webhook delivery; it is retried when its hold lapses")
        self._due.set()

    async def _send(self, delivery: state.Delivery) -> tuple[bool, bool, str | None]:
        """(answered 2xx, answered done, why it failed)."""
        # Checked again before every connection: the rules (or the loopback switch) may have changed.
        problem = webhook_url_problem(delivery.url, self.settings.webhook_allow_loopback)
        if problem is not None:
            log.warning("webhook of subscription %r not sent: %s", delivery.subscription_id, problem)
            return False, False, f"not sent: {problem}"
        payload = {
            "subscription_id": delivery.subscription_id,
            "wake_id": delivery.wake_id,
            "generation": delivery.generation,
            "streams": delivery.streams,
            "callback_url": callback_url(delivery.origin, delivery.subscription_id),
            "callback_token": self.key.mint_token(delivery.subscription_id, delivery.generation, clock.now()),
        }
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
        headers = {
            "content-type": "application/json",
            "webhook-signature": self.key.signature_header(body, clock.now()),
            "user-agent": "streamhold-webhooks",
        }
        try:
            async with asyncio.timeout(self.settings.webhook_timeout):
                async with self._client.stream("POST", delivery.url, content=body, headers=headers) as reply:
                    answer = bytearray()
                    async for piece in reply.aiter_bytes():
                        answer += piece
                        if len(answer) > MAX_RESPONSE_BYTES:
                            break
                    status = reply.status_code
        except (TimeoutError, httpx.HTTPError) as exc:
            log.info("webhook of subscription %r failed: %s", delivery.subscription_id, exc)
            return False, False, f"no answer: {type(exc).__name__} {exc}".strip()
        if not 200 <= status < 300:
            log.info("webhook of subscription %r answered %d", delivery.subscription_id, status)
            return False, False, f"answered HTTP {status}"
        try:
            reply_json = json.loads(bytes(answer)) if len(answer) <= MAX_RESPONSE_BYTES else None
        except ValueError:
            reply_json = None
        return True, isinstance(reply_json, dict) and reply_json.get("done") is True, None


def callback_url(origin: str, subscription_id: str) -> str:
    return f"{origin}/v1/stream/__ds/subscriptions/{quote(subscription_id, safe='')}/callback"


def _merge(into: state.Effects, found: state.Effects) -> None:
    into.wake_events += found.wake_events
    into.deliveries_due = into.deliveries_due or found.deliveries_due
    into.next_wake = into.next_wake or found.next_wake


def _hook(conn: Connection, now: float, effects: state.Effects, stream_ids: list[str]) -> None:
    names = conn.execute(select(streams.c.name).where(streams.c.id.in_(stream_ids))).scalars().all()
    if names:
        _merge(effects, state.on_appends(conn, sorted(names), now))


def _prepare(conn: Connection, postgres: bool) -> tuple[list[SigningKey], bool]:
    """Make the subscription tables and the signing key unless there.

    Returns the published keys (the signing key first) and whether any subscription exists.
    """
    if postgres:
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": SCHEMA_LOCK})
    SQLModel.metadata.create_all(conn, tables=list(SUBSCRIPTION_TABLES))
    keyring.ensure(conn)
    return keyring.published(conn, clock.now()), state.any_subscriptions(conn)


def public_jwks(keys: list[SigningKey]) -> dict[str, Any]:
    return {"keys": [k for key in keys for k in key.jwks()["keys"]]}
