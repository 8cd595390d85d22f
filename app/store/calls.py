"""Writes other than appends (creates, closes, deletes, ...): each a function of a connection, run by the
writer one at a time or, when they may, several in one transaction."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine

from ..errors import StreamError
from ..models import Change
from . import transactions

log = logging.getLogger("streamhold.writer")

Outcomes = list[tuple[bool, Any]]


@dataclass(slots=True)
class CallOp:
    """Any other write: `fn(conn)` in a transaction of its own; returns (result, changes)."""

    fn: Callable[[Connection], tuple[Any, list[Change]]]
    future: asyncio.Future[Any]
    # Whether it may share a transaction with other such ops, each in a savepoint of its own (creates).
    group: bool = False
    key: str = ""  # what it locks first on PostgreSQL (a name): a shared transaction takes them in order
    new: transactions.NewStream | None = None  # a plain create (no fork), which SQLite runs as a batch


class _CallFailed(Exception):
    """A grouped call failed in a transaction without savepoints: run the group again with them."""


def run(engine: Engine, postgres: bool, ops: list[CallOp]) -> tuple[Outcomes, list[Change], int]:
    """Run calls in one transaction: one alone as it is, several together; also returns the commits made.

    Several run first without savepoints, which cost as much as a create; if one fails, the shared
    transaction is rolled back and run again with each call in a savepoint of its own, so that only the
    failing call fails. If the shared transaction fails before its COMMIT was sent (a deadlock between
    processes, say), nothing of it is committed and each call runs again alone. Every future is settled
    only after the COMMIT.
    """
    if len(ops) == 1:
        try:
            with engine.begin() as conn:
                result, changes = ops[0].fn(conn)
        except StreamError as exc:
            return [(False, exc)], [], 0
        return [(True, result)], changes, 1
    committing = [False]
    try:
        try:
            return (*_shared(engine, postgres, ops, False, committing), 1)
        except _CallFailed:
            return (*_shared(engine, postgres, ops, True, committing), 1)
    except Exception:
        if committing[0]:
            raise
        log.warning("a transaction of %d grouped writes failed; running them apart", len(ops))
        outcomes: Outcomes = []
        apart: list[Change] = []
        commits = 0
        for op in ops:
            try:
                (outcome,), done, made = run(engine, postgres, [op])
            except Exception as exc:
                outcome, done, made = (False, exc), [], 0
            outcomes.append(outcome)
            apart += done
            commits += made
        return outcomes, apart, commits


def _shared(
    engine: Engine, postgres: bool, ops: list[CallOp], savepoints: bool, committing: list[bool]
) -> tuple[Outcomes, list[Change]]:
    results: dict[int, tuple[bool, Any]] = {}
    changes = []
    # In the order of what they lock (stably: creates of one name keep theirs), so that processes
    # creating the same names in shared transactions never wait for each other in a circle.
    order = sorted(range(len(ops)), key=lambda i: ops[i].key)
    with engine.begin() as conn:
        if postgres:
            transactions.lock_names(conn, sorted({op.key for op in ops if op.key}))
        for i in order:
            savepoint = conn.begin_nested() if savepoints else None
            try:
                result, done = ops[i].fn(conn)
            except Exception as exc:
                if savepoint is None:
                    raise _CallFailed() from exc
                savepoint.rollback()
                results[i] = (False, exc)
            else:
                if savepoint is not None:
                    savepoint.commit()
                results[i] = (True, result)
                changes += done
        committing[0] = True
    return [results[i] for i in range(len(ops))], changes
