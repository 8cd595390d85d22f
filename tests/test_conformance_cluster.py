"""The conformance suite, subscriptions included, against one of two `streamhold serve` processes that share
one PostgreSQL database (and its LISTEN/NOTIFY channels), while the second process takes appends of its own:
both write the database throughout, webhook deliveries, leases and the signing key are shared state, and
either process may send a wake the other saw.

Skips with the reason when Node.js or PostgreSQL is missing (fails in CI, like the other PostgreSQL tests).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests._cluster import cluster, server_env, server_errors
from tests.conformance_run import (
    EXPECTED_CONFORMANCE_TESTS,
    SUBSCRIPTION_TESTS,
    run_conformance_suite,
)
from tests.test_conformance import INSTALL_TIMEOUT_S, node_packages

SUITE_TIMEOUT_S = 300.0
TEXT = {"content-type": "text/plain"}
__all__ = ["node_packages"]  # the fixture, used by name
pytestmark = pytest.mark.timeout(INSTALL_TIMEOUT_S + SUITE_TIMEOUT_S + 90)


@contextmanager
def side_traffic(url: str) -> Iterator[list[bytes]]:
    """Appends to a stream at `url` every 50 ms for the life of the block; yields what was acknowledged."""
    stop = threading.Event()
    written: list[bytes] = []

    def traffic() -> None:
        with httpx.Client(timeout=10) as client:
            client.put(url, headers=TEXT)
            for seq in range(10_000):
                if stop.wait(0.05):
                    return
                body = f"{seq};".encode()
                if client.post(url, content=body, headers=TEXT).status_code == 204:
                    written.append(body)

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        yield written
    finally:
        stop.set()
        thread.join(15)


def test_two_processes_on_one_postgres_pass_the_suite(
    node_packages: Path, pg_url: str, tmp_path: Path
) -> None:
    env = server_env(pg_url, pg_url, tmp_path, long_poll_timeout=0.5)
    env["STREAMHOLD_WEBHOOK_ALLOW_LOOPBACK"] = "true"
    side = f"/v1/stream/side/{uuid.uuid4().hex[:8]}"
    with cluster(env, count=2) as (tested, other):
        with side_traffic(other.url + side) as written:
            result = run_conformance_suite(tested.url, timeout=SUITE_TIMEOUT_S, subscriptions=True)
        print(result.report())
        assert other.running, "the second process stayed up"
        # What the second process acknowledged during the suite, read back whole through the first.
        read_back = httpx.get(tested.url + side, params={"offset": "-1"}, timeout=10).content
        errors = server_errors(tested) + server_errors(other)
        logs = tested.log_tail(80) + "\n" + other.log_tail(30)
    assert written, "the second process served nothing during the suite"
    assert read_back == b"".join(written)
    expected = EXPECTED_CONFORMANCE_TESTS + SUBSCRIPTION_TESTS
    assert not result.file_errors, result.report()
    assert (result.ran, len(result.passed)) == (expected, expected), result.report() + "\n" + logs
    assert sum(name.startswith("Reserved subscription APIs") for name in result.passed) == SUBSCRIPTION_TESTS
    assert errors == [], errors
