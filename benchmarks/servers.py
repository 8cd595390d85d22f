"""Start and stop the servers under test (Streamhold and the reference Node server) and watch their memory.

Only processes started here are ever signalled, by their PID; each server gets a fresh data directory
under `<repo>/.cache/bench-data/`, on the same disk as the repo so that fsync costs what it really costs.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import psycopg

from benchmarks.wire import Client, HttpError, Origin

REPO = Path(__file__).resolve().parent.parent
PEER_SOURCE = Path(__file__).resolve().parent / "peer"
CACHE = REPO / ".cache"
PEER_CACHE = CACHE / "bench-peer"
DATA_ROOT = CACHE / "bench-data"
LONG_POLL_TIMEOUT_S = 2
MAX_CONNECTIONS = 12_000
_PEER_PACKAGE = "@durable-streams/server"


class ServerStartError(Exception):
    """A server could not be started; the message says why and what to do."""


@dataclass
class Server:
    """A server process this run started, with its data directory and log file."""

    label: str
    origin: Origin
    process: subprocess.Popen[bytes]
    data_dir: Path
    log_path: Path
    database: str | None = None  # a PostgreSQL database made for it, dropped when it stops
    admin_url: str | None = None

    @property
    def pid(self) -> int:
        """The PID of the process we started."""
        return self.process.pid


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard one (children inherit it); return the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def streamhold_command() -> list[str]:
    """The `streamhold` console script of the running venv (or PATH)."""
    beside = Path(sys.executable).parent / "streamhold"
    found = str(beside) if beside.exists() else shutil.which("streamhold")
    if not found:
        raise ServerStartError(
            "the `streamhold` command is not installed in this venv: run `pip install -e .` in the repo first"
        )
    return [found]


def ensure_peer_installed() -> Path:
    """Install the pinned reference server into .cache/bench-peer/ unless that exact lockfile is in place."""
    PEER_CACHE.mkdir(parents=True, exist_ok=True)
    # Two runs at once must not both run npm in the same folder.
    with open(PEER_CACHE.parent / ".bench-peer.lock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        return _install_peer()


def _install_peer() -> Path:
    lock = PEER_SOURCE / "package-lock.json"
    installed = PEER_CACHE / "node_modules" / _PEER_PACKAGE / "package.json"
    cached_lock = PEER_CACHE / "package-lock.json"
    if installed.exists() and cached_lock.exists() and cached_lock.read_bytes() == lock.read_bytes():
        return PEER_CACHE
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        raise ServerStartError("node and npm are needed for the reference server (Node 18 or newer)")
    PEER_CACHE.mkdir(parents=True, exist_ok=True)
    for name in ("package.json", "package-lock.json"):
        shutil.copyfile(PEER_SOURCE / name, PEER_CACHE / name)
    where = PEER_CACHE.relative_to(REPO) if PEER_CACHE.is_relative_to(REPO) else PEER_CACHE
    print(f"installing {_PEER_PACKAGE} into {where}/ ...", file=sys.stderr, flush=True)
    # `npm install` rather than `npm ci`: npm 11 leaves foreign-platform optional packages out of the
    # lockfile and then `npm ci` refuses it; with the lockfile present, install keeps its versions.
    # Scripts are skipped: lmdb and msgpackr ship prebuilt binaries as optional packages.
    cmd = [npm, "install", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"]
    try:
        done = subprocess.run(cmd, cwd=PEER_CACHE, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as exc:
        raise ServerStartError("npm install of the reference server took over 5 minutes") from exc
    if done.returncode != 0 or not installed.exists():
        raise ServerStartError(f"npm install of the reference server failed:\n{done.stderr[-2000:]}")
    shutil.copyfile(lock, cached_lock)  # npm may rewrite it; the marker is our pinned copy
    return PEER_CACHE


def _spawn(label: str, cmd: list[str], env: dict[str, str], port: int, data_dir: Path) -> Server:
    log_path = data_dir.parent / f"{data_dir.name}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return Server(label, Origin("127.0.0.1", port), process, data_dir, log_path)


def fresh_data_dir(label: str) -> Path:
    """A new, empty data directory under .cache/bench-data/."""
    DATA_ROOT.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{label}-", dir=DATA_ROOT))


def remove_data_dir(path: Path) -> None:
    """Delete a data directory made by `fresh_data_dir`, and its log file."""
    shutil.rmtree(path, ignore_errors=True)
    path.parent.joinpath(f"{path.name}.log").unlink(missing_ok=True)


def start_streamhold(
    label: str = "streamhold", database_url: str | None = None, data_dir: Path | None = None
) -> Server:
    """Start `streamhold serve` on a free port with a fresh data directory (or the one given), and
    `database_url`, if given."""
    cmd = streamhold_command()
    port = free_port()
    data_dir = data_dir or fresh_data_dir(label)
    env = dict(
        os.environ,
        STREAMHOLD_DATA_DIR=str(data_dir),
        STREAMHOLD_LONG_POLL_TIMEOUT=str(LONG_POLL_TIMEOUT_S),
        # readers-10k holds 10,000 readers and still needs a connection for its writer.
        STREAMHOLD_MAX_CONNECTIONS=str(MAX_CONNECTIONS),
    )
    env.pop("STREAMHOLD_DATABASE_URL", None)
    if database_url is not None:
        env["STREAMHOLD_DATABASE_URL"] = database_url
    return _spawn(label, [*cmd, "serve", "--host", "127.0.0.1", "--port", str(port)], env, port, data_dir)


def start_streamhold_postgres(admin_url: str) -> Server:
    """Start `streamhold serve` on a new, empty PostgreSQL database (made through `admin_url`)."""
    database = f"streamhold_bench_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{database}"')
    except psycopg.Error as exc:
        raise ServerStartError(f"could not create a PostgreSQL database through {admin_url}: {exc}") from exc
    try:
        server = start_streamhold("streamhold-pg", f"{admin_url.rsplit('/', 1)[0]}/{database}")
    except BaseException:
        _drop_database(admin_url, database)
        raise
    server.database, server.admin_url = database, admin_url
    return server


def _drop_database(admin_url: str, database: str) -> None:
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def start_reference() -> Server:
    """Start the reference Node server, file-backed, on a free port with a fresh data directory."""
    modules = ensure_peer_installed()
    node = shutil.which("node")
    assert node is not None
    port = free_port()
    data_dir = fresh_data_dir("reference")
    cmd = [
        node,
        str(PEER_SOURCE / "launch.mjs"),
        "--modules",
        str(modules),
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        "--long-poll-ms",
        str(LONG_POLL_TIMEOUT_S * 1000),
    ]
    return _spawn("reference", cmd, dict(os.environ), port, data_dir)


def log_tail(server: Server, lines: int = 15) -> str:
    """The last lines the server printed."""
    try:
        text = server.log_path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


async def wait_ready(server: Server, limit_s: float = 30.0) -> None:
    """Wait until the server answers HTTP (any status) on its port, or fail with its log."""
    client = Client(server.origin)
    give_up = time.monotonic() + limit_s
    last = "no attempt"
    try:
        while time.monotonic() < give_up:
            if server.process.poll() is not None:
                tail = log_tail(server)
                last = tail.strip().splitlines()[-1] if tail.strip() else "no output"
                raise ServerStartError(
                    f"{server.label} exited with code {server.process.returncode} while starting ({last}); "
                    f"its log ends:\n{tail}"
                )
            try:
                await client.request("HEAD", f"{server.origin.prefix}/v1/stream/bench-probe", limit_s=2.0)
                return
            except (OSError, TimeoutError, HttpError) as exc:
                last = f"{type(exc).__name__}: {exc}"
                client.close()
                await asyncio.sleep(0.1)
        raise ServerStartError(
            f"{server.label} did not answer within {limit_s:.0f} s ({last}):\n{log_tail(server)}"
        )
    finally:
        client.close()


def stop(server: Server, grace: float = 5.0, keep_data: bool = False) -> None:
    """Stop a server we started: SIGTERM, then SIGKILL after `grace`; its own children too, by PID. Its data
    directory goes too, unless `keep_data` (a directory the caller made and removes)."""
    try:
        children = psutil.Process(server.pid).children(recursive=True)
    except psutil.Error:
        children = []
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(grace)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(grace)
    for child in children:
        try:
            if child.is_running():
                child.kill()
        except psutil.Error:
            pass
    if not keep_data:
        remove_data_dir(server.data_dir)
    if server.database is not None and server.admin_url is not None:
        _drop_database(server.admin_url, server.database)


def vm_hwm_mib(pid: int) -> float | None:
    """The kernel's record of a process's peak resident memory (VmHWM), in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError):
        pass
    return None


class RssSampler:
    """Samples the resident memory of a process and its children every 50 ms while in use."""

    def __init__(self, pid: int | None, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_bytes = 0
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        """Take one sample now."""
        if self.pid is None:
            return
        try:
            proc = psutil.Process(self.pid)
            total = proc.memory_info().rss
            for child in proc.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:
                    pass
        except psutil.Error:
            return
        self.peak_bytes = max(self.peak_bytes, total)

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval)

    async def __aenter__(self) -> RssSampler:
        if self.pid is not None:
            self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.sample()

    @property
    def peak_mib(self) -> float | None:
        """The highest sample, in MiB (None when there is no PID to watch)."""
        return round(self.peak_bytes / (1024 * 1024), 1) if self.peak_bytes else None
