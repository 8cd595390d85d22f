"""Run a real server as a subprocess for tests that need one (live tails, restarts, Node clients).

Typical use::

    with ServerProcess(env={"STREAMHOLD_DATA_DIR": str(tmp_path)}) as server:
        httpx.get(f"{server.url}/v1/stream/x")
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

import httpx
import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
LOOPBACK = f"http://{HOST}"  # a keyless server answers only loopback Hosts (see app/http/guard.py)

CommandFactory = Callable[[int], Sequence[str]]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def streamhold_command(port: int) -> list[str]:
    return [sys.executable, "-m", "streamhold.cli", "serve", "--host", HOST, "--port", str(port)]


def settled_rss(pid: int, limit: float = 15.0) -> int:
    """The process's resident memory once it stops growing for a second (or after `limit` seconds)."""
    process = psutil.Process(pid)
    last, steady, deadline = process.memory_info().rss, 0, time.monotonic() + limit
    while time.monotonic() < deadline and steady < 5:
        time.sleep(0.2)
        now = process.memory_info().rss
        steady = steady + 1 if now - last < (1024 * 1024) else 0
        last = max(last, now)
    return last


class ServerStartError(RuntimeError):
    pass


class ServerProcess:
    """One server subprocess on a fixed port; output goes to ``log_path``.

    ``command`` builds the argv from the port (default: ``streamhold serve``). The server counts as up
    when ``GET health_path`` answers ``health_status``; ``health_status=None`` accepts any HTTP answer,
    for servers without a health endpoint (the Node reference server answers 404 there).

    ``env`` is merged over ``os.environ``, from which variables starting with ``drop_env_prefix`` are
    removed first, so a developer's own STREAMHOLD_DATABASE_URL or API keys cannot leak into a test.
    """

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        port: int | None = None,
        command: CommandFactory = streamhold_command,
        cwd: Path = REPO_ROOT,
        health_path: str = "/healthz",
        health_status: int | None = 200,
        startup_timeout: float = 20.0,
        stop_timeout: float = 5.0,
        log_dir: Path | None = None,
        drop_env_prefix: str | None = "STREAMHOLD_",
    ) -> None:
        self.port = port if port is not None else free_port()
        self.env = dict(env or {})
        self.command = command
        self.cwd = cwd
        self.health_path = health_path
        self.health_status = health_status
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.drop_env_prefix = drop_env_prefix
        self._own_log_dir = log_dir is None
        self.log_dir = log_dir if log_dir is not None else Path(tempfile.mkdtemp(prefix="server-log-"))
        self.log_path = self.log_dir / f"server-{self.port}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("server is not started")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> ServerProcess:
        if self.running:
            raise RuntimeError(f"server already running (pid {self.pid})")
        self._close_log()
        # Append, so a restart keeps the earlier run's output for post-mortems.
        self._log = self.log_path.open("ab")
        self._log.write(f"--- start {' '.join(self.command(self.port))}\n".encode())
        self._log.flush()
        self._proc = subprocess.Popen(
            list(self.command(self.port)),
            cwd=self.cwd,
            env=self._child_env(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            self._wait_until_up()
        except BaseException:
            self.kill()
            raise
        return self

    def _child_env(self) -> dict[str, str]:
        prefix = self.drop_env_prefix
        inherited = {k: v for k, v in os.environ.items() if not (prefix and k.startswith(prefix))}
        return {**inherited, "PYTHONUNBUFFERED": "1", **self.env}

    def _wait_until_up(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        last_error = "no answer yet"
        with httpx.Client(timeout=1.0) as client:
            while time.monotonic() < deadline:
                code = self._proc.poll()
                if code is not None:
                    raise ServerStartError(
                        f"server exited with code {code} during startup\n{self.log_tail()}"
                    )
                try:
                    response = client.get(self.url + self.health_path)
                except httpx.TransportError as exc:
                    last_error = repr(exc)
                else:
                    if self.health_status is None or response.status_code == self.health_status:
                        return
                    last_error = f"GET {self.health_path} answered {response.status_code}"
                time.sleep(0.1)
        waited = f"{self.startup_timeout:.0f} s"
        raise ServerStartError(
            f"server not up on {self.url} after {waited} ({last_error})\n{self.log_tail()}"
        )

    def kill(self) -> int | None:
        """SIGKILL, as a crash would; returns the exit code."""
        return self._signal_and_wait(signal.SIGKILL, self.stop_timeout)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if the server has not exited after ``stop_timeout`` seconds."""
        if not self.running:
            self._close_log()
            return self._proc.returncode if self._proc is not None else None
        try:
            return self._signal_and_wait(signal.SIGTERM, self.stop_timeout)
        except subprocess.TimeoutExpired:
            return self.kill()

    def restart(self) -> ServerProcess:
        """Stop if still running, then start again on the same port with the same env."""
        self.stop()
        return self.start()

    def _signal_and_wait(self, sig: signal.Signals, timeout: float) -> int | None:
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._proc.send_signal(sig)
        try:
            return self._proc.wait(timeout=timeout)
        finally:
            if self._proc.poll() is not None:
                self._close_log()

    def log_text(self) -> str:
        if self._log is not None:
            self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        tail = "\n".join(self.log_text().splitlines()[-lines:])
        return f"--- last {lines} lines of {self.log_path}:\n{tail}"

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self._close_log()
        # Keep the log when the block failed: the error report may point at it.
        if self._own_log_dir and exc_type is None:
            shutil.rmtree(self.log_dir, ignore_errors=True)
