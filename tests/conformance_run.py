"""Node side of the test harnesses: the pinned npm packages, the conformance suite run, the reference server.

The packages pinned in tests/conformance/package.json (+ package-lock.json) are installed with ``npm install``
into a cache folder outside git's view (default ``<repo>/.cache/node``, or ``$STREAMHOLD_NODE_CACHE``),
only when the lockfile changed. The .mjs scripts of tests/conformance and tests/clients are copied to
``<cache>/harness/`` before each use, because Node resolves packages from a script's own folder upwards.

By hand (exit code 0 only when every test that ran passed)::

    python -m tests.conformance_run http://127.0.0.1:8000   # any running server, origin only
    python -m tests.conformance_run --reference             # start the upstream Node server and run on it
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests._server import REPO_ROOT, ServerProcess

NODE_SPEC_DIR = REPO_ROOT / "tests" / "conformance"
CLIENT_SCRIPTS_DIR = REPO_ROOT / "tests" / "clients"
SPEC_FILES = ("package.json", "package-lock.json", ".npmrc")
HARNESS_SUBDIR = "harness"
INSTALL_STAMP = ".streamhold-install-stamp"

EXPECTED_CONFORMANCE_TESTS = 332  # 338 in 0.3.6, minus the 6 opt-in subscription tests
SUBSCRIPTION_TESTS = 6  # "Reserved subscription APIs": run only when asked (`subscriptions=True`)


class NodeHarnessError(RuntimeError):
    pass


def node_cache_dir() -> Path:
    return Path(os.environ.get("STREAMHOLD_NODE_CACHE") or REPO_ROOT / ".cache" / "node")


def missing_node_tools() -> list[str]:
    return [tool for tool in ("node", "npm") if shutil.which(tool) is None]


def run_bounded(
    cmd: Sequence[str], *, cwd: Path, timeout: float, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command under a hard timeout, killing its whole process group on expiry.

    The command gets a session of its own so that its children (vitest's worker forks) die with it;
    only that group, which this function created, is signalled.
    """
    proc = subprocess.Popen(
        list(cmd),
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise NodeHarnessError(
            f"{' '.join(cmd)} did not finish within {timeout:.0f} s\n{_tail(stdout)}\n{_tail(stderr)}"
        ) from None
    return subprocess.CompletedProcess(list(cmd), proc.returncode, stdout, stderr)


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:])


@contextmanager
def _install_lock(cache: Path) -> Iterator[None]:
    with (cache / ".install.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _spec_digest() -> str:
    digest = hashlib.sha256()
    for name in SPEC_FILES:
        digest.update(name.encode() + b"\0" + (NODE_SPEC_DIR / name).read_bytes() + b"\0")
    return digest.hexdigest()


def ensure_node_packages(timeout: float = 300.0) -> Path:
    """Install the pinned packages into the cache folder unless already there; return the folder."""
    missing = missing_node_tools()
    if missing:
        raise NodeHarnessError(f"not on PATH: {', '.join(missing)}")
    cache = node_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    gitignore = cache / ".gitignore"
    if not gitignore.exists():
        gitignore.write_text("*\n")
    with _install_lock(cache):
        stamp = cache / "node_modules" / INSTALL_STAMP
        digest = _spec_digest()
        if not (stamp.exists() and stamp.read_text() == digest):
            for name in SPEC_FILES:
                shutil.copyfile(NODE_SPEC_DIR / name, cache / name)
            # Not `npm ci`: the registry reached here lacks some optional platform packages
            # (e.g. msgpackr-extract for darwin/win32), so the lockfile omits them and `npm ci`
            # rejects it as out of sync. `npm install` still installs exactly the locked versions.
            result = run_bounded(["npm", "install", "--ignore-scripts"], cwd=cache, timeout=timeout)
            if result.returncode != 0:
                raise NodeHarnessError(f"npm install failed ({result.returncode})\n{_tail(result.stderr)}")
            stamp.write_text(digest)
        harness = cache / HARNESS_SUBDIR
        harness.mkdir(exist_ok=True)
        for source_dir in (NODE_SPEC_DIR, CLIENT_SCRIPTS_DIR):
            for script in source_dir.glob("*.mjs"):
                shutil.copyfile(script, harness / script.name)
    return cache


def harness_script(name: str) -> Path:
    return node_cache_dir() / HARNESS_SUBDIR / name


def reference_server(long_poll_timeout_ms: int = 500) -> ServerProcess:
    """The upstream in-memory Node server (@durable-streams/server), to check the harnesses themselves."""
    cache = ensure_node_packages()
    script = harness_script("reference_server.mjs")
    return ServerProcess(
        command=lambda port: ["node", str(script), str(port), str(long_poll_timeout_ms)],
        cwd=cache,
        health_path="/",
        health_status=None,  # it treats every path as a stream, so any HTTP answer means it is up
    )


@dataclass
class SuiteResult:
    passed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    file_errors: list[str] = field(default_factory=list)

    @property
    def ran(self) -> int:
        return len(self.passed) + len(self.failed)

    def summary(self) -> str:
        return f"{len(self.passed)} passed, {len(self.failed)} failed, {len(self.skipped)} skipped"

    def report(self, max_message_lines: int = 3) -> str:
        lines = [self.summary()]
        lines += [f"FILE ERROR: {error}" for error in self.file_errors]
        for name, message in self.failed.items():
            lines.append(f"FAILED {name}")
            lines += [f"    {line}" for line in message.splitlines()[:max_message_lines]]
        return "\n".join(lines)


def parse_vitest_json(data: dict[str, object]) -> SuiteResult:
    """Read vitest's JSON reporter output (the Jest-compatible shape)."""
    result = SuiteResult()
    test_files = data.get("testResults")
    if not isinstance(test_files, list):
        raise NodeHarnessError("vitest JSON has no testResults list")
    for test_file in test_files:
        if test_file.get("status") == "failed" and test_file.get("message"):
            result.file_errors.append(str(test_file["message"]))
        for test in test_file.get("assertionResults", []):
            name = " › ".join([*test.get("ancestorTitles", []), test["title"]])
            status = test.get("status")
            if status == "passed":
                result.passed.append(name)
            elif status == "failed":
                result.failed[name] = "\n".join(test.get("failureMessages") or ["(no message)"])
            else:
                result.skipped.append(name)
    return result


def run_conformance_suite(
    base_url: str, *, timeout: float = 300.0, long_poll_timeout_ms: int = 5000, subscriptions: bool = False
) -> SuiteResult:
    """Run the pinned conformance suite against a server origin, e.g. ``http://127.0.0.1:8000``.

    ``subscriptions`` adds the opt-in subscription tests; their webhook receiver listens on loopback.
    """
    cache = ensure_node_packages()
    with tempfile.TemporaryDirectory(prefix="conformance-") as tmp:
        report = Path(tmp) / "vitest.json"
        completed = run_bounded(
            [
                "node",
                "node_modules/vitest/vitest.mjs",
                "run",
                f"{HARNESS_SUBDIR}/conformance.test.mjs",
                "--reporter=json",
                f"--outputFile={report}",
            ],
            cwd=cache,
            timeout=timeout,
            env={
                "CONFORMANCE_BASE_URL": base_url.rstrip("/"),
                "CONFORMANCE_LONG_POLL_TIMEOUT_MS": str(long_poll_timeout_ms),
                "CONFORMANCE_SUBSCRIPTIONS": "1" if subscriptions else "0",
                "NO_COLOR": "1",
            },
        )
        if not report.exists():
            raise NodeHarnessError(
                f"vitest wrote no report (exit {completed.returncode})\n"
                f"{_tail(completed.stdout)}\n{_tail(completed.stderr)}"
            )
        return parse_vitest_json(json.loads(report.read_text()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.conformance_run", description="Run the Durable Streams conformance suite."
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("url", nargs="?", help="server origin, e.g. http://127.0.0.1:8000")
    target.add_argument("--reference", action="store_true", help="start and test the upstream Node server")
    parser.add_argument("--timeout", type=float, default=300.0, help="hard limit for the vitest run, s")
    parser.add_argument("--long-poll-ms", type=int, default=5000, help="suite's long-poll test budget")
    parser.add_argument(
        "--subscriptions", action="store_true", help="add the subscription tests (webhooks to loopback)"
    )
    args = parser.parse_args(argv)

    def run(url: str) -> SuiteResult:
        print(f"conformance suite against {url} ...", flush=True)
        return run_conformance_suite(
            url,
            timeout=args.timeout,
            long_poll_timeout_ms=args.long_poll_ms,
            subscriptions=args.subscriptions,
        )

    if args.reference:
        with reference_server() as server:
            result = run(server.url)
    else:
        result = run(args.url)
    print(result.report())
    return 0 if result.ran > 0 and not result.failed and not result.file_errors else 1


if __name__ == "__main__":
    sys.exit(main())
