"""The conformance suite, subscriptions included, against one of two `streamhold serve` processes that share
one PostgreSQL database (and its LISTEN/NOTIFY channels): webhook deliveries, leases and the signing key
are shared state, and either process may send a wake the other saw.

Skips with the reason when Node.js or PostgreSQL is missing (fails in CI, like the other PostgreSQL tests).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._cluster import cluster, server_env, server_errors
from tests.conformance_run import (
    EXPECTED_CONFORMANCE_TESTS,
    SUBSCRIPTION_TESTS,
    run_conformance_suite,
)
from tests.test_conformance import INSTALL_TIMEOUT_S, node_packages

SUITE_TIMEOUT_S = 300.0
__all__ = ["node_packages"]  # the fixture, used by name
pytestmark = pytest.mark.timeout(INSTALL_TIMEOUT_S + SUITE_TIMEOUT_S + 90)


def test_two_processes_on_one_postgres_pass_the_suite(
    node_packages: Path, pg_url: str, tmp_path: Path
) -> None:
    env = server_env(pg_url, pg_url, tmp_path, long_poll_timeout=0.5)
    env["STREAMHOLD_WEBHOOK_ALLOW_LOOPBACK"] = "true"
    with cluster(env, count=2) as (tested, other):
        result = run_conformance_suite(tested.url, timeout=SUITE_TIMEOUT_S, subscriptions=True)
        print(result.report())
        assert other.running, "the second process stayed up"
        errors = server_errors(tested) + server_errors(other)
        logs = tested.log_tail(80) + "\n" + other.log_tail(30)
    expected = EXPECTED_CONFORMANCE_TESTS + SUBSCRIPTION_TESTS
    assert not result.file_errors, result.report()
    assert (result.ran, len(result.passed)) == (expected, expected), result.report() + "\n" + logs
    assert sum(name.startswith("Reserved subscription APIs") for name in result.passed) == SUBSCRIPTION_TESTS
    assert errors == [], errors
