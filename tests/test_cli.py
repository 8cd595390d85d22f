"""The client commands (`write`, `cat`, `ls`, `info`, `rm`) as subprocesses against a real server."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO

import httpx
import pytest
import uvicorn
from click.testing import CliRunner
from litestar.types import Receive, Scope, Send

from streamhold.cli import main
from streamhold.serve import Protocol
from tests._server import REPO_ROOT, ServerProcess, free_port

pytestmark = pytest.mark.timeout(90)

KEY = "cli-test-key-4410"
BINARY = bytes(range(256)) * 64


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {
        "STREAMHOLD_DATA_DIR": str(tmp_path_factory.mktemp("cli-data")),
        "STREAMHOLD_API_KEYS": KEY,
        "STREAMHOLD_LONG_POLL_TIMEOUT": "1",
    }
    with ServerProcess(env=env) as process:
        yield process


def cli_env(server: str, key: str | None = KEY) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMHOLD_")}
    env["STREAMHOLD_URL"] = server
    if key is not None:
        env["STREAMHOLD_API_KEY"] = key
    return env


def streamhold(
    *args: str, server: str, key: str | None = KEY, stdin: bytes = b"", timeout: float = 30
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "streamhold.cli", *args],
        cwd=REPO_ROOT,
        env=cli_env(server, key),
        input=stdin,
        capture_output=True,
        timeout=timeout,
    )


def api(server: ServerProcess) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {KEY}"}, timeout=10)


def make_stream(
    server: ServerProcess, namespace: str, content: bytes = b"", close: bool = True, **body: object
) -> str:
    with api(server) as http:
        stream_id = http.post("/stream", json={"name": namespace, **body}).json()["id"]
        if content:
            http.post(f"/stream/{stream_id}/append", content=content)
        if close:
            http.post(f"/stream/{stream_id}/complete")
    return str(stream_id)


class Output(threading.Thread):
    """Collects a subprocess pipe in the background, so a test can wait for text with a deadline."""

    def __init__(self, pipe: IO[bytes]) -> None:
        super().__init__(daemon=True)
        self.pipe = pipe
        self.data = bytearray()

    def run(self) -> None:
        while chunk := self.pipe.read1(65536):  # type: ignore[attr-defined]
            self.data += chunk

    def wait_for(self, expected: bytes, seconds: float = 20) -> None:
        deadline = time.monotonic() + seconds
        while expected not in self.data:
            assert time.monotonic() < deadline, (
                f"no {expected!r} within {seconds} s; got {bytes(self.data)!r}"
            )
            time.sleep(0.05)


def test_write_prints_the_url_at_once_and_closes_at_end_of_input(server: ServerProcess) -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamhold.cli",
            "write",
            "cli-logs",
            "-t",
            "text/plain",
            "-m",
            "job=42",
            "--ttl=2h",
        ],
        cwd=REPO_ROOT,
        env=cli_env(server.url),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        process.stdin.write(b"first line\n")
        process.stdin.flush()
        url = process.stdout.readline().decode().strip()  # printed before the input ends
        stream_id = url.rsplit("/", 1)[1]
        assert url == f"{server.url}/stream/{stream_id}"
        with api(server) as http:
            deadline = time.monotonic() + 20
            while http.post(f"/stream/{stream_id}/info").json()["size_bytes"] < 11:
                assert time.monotonic() < deadline, (
                    "the first line was not written while input was still open"
                )
                time.sleep(0.05)
            assert http.post(f"/stream/{stream_id}/info").json()["completed"] is False
            process.stdin.write(b"second line\n")
            process.stdin.close()
            assert process.wait(timeout=30) == 0, process.stderr.read() if process.stderr else ""
            record = http.post(f"/stream/{stream_id}/info").json()
            assert http.get(f"/stream/{stream_id}").content == b"first line\nsecond line\n"
    finally:
        if process.poll() is None:
            process.kill()
    assert record["completed"] is True and record["content_type"] == "text/plain"
    assert record["name"] == "cli-logs" and record["metadata"] == {"job": "42"}
    expires = datetime.fromisoformat(record["expires_at"])
    assert abs(expires - datetime.now(UTC) - timedelta(hours=2)) < timedelta(minutes=1)


def test_write_large_binary_input_with_progress_and_compression(server: ServerProcess) -> None:
    content = BINARY * 200  # 3.1 MiB, every byte value
    result = streamhold("write", "cli-big", "--compress", "--ttl", "never", server=server.url, stdin=content)
    assert result.returncode == 0, result.stderr
    url = result.stdout.decode().strip()
    assert b"MiB written" in result.stderr and b"3.1 MiB written in" in result.stderr
    assert b"stream closed" in result.stderr
    with api(server) as http:
        record = http.post(f"/stream/{url.rsplit('/', 1)[1]}/info").json()
    assert (
        record["compressed"] is True and record["size_bytes"] == len(content) and record["expires_at"] is None
    )
    cat = streamhold("cat", url, server="http://127.0.0.1:9", key=None)  # a URL names its own server
    assert cat.returncode == 0 and cat.stdout == content


def test_serve_answers_with_a_date_but_without_naming_its_http_server(server: ServerProcess) -> None:
    response = httpx.get(f"{server.url}/healthz")
    assert response.status_code == 200
    assert "date" in response.headers and "server" not in response.headers


def serve_banner(env: dict[str, str], timeout: float = 60) -> tuple[str, int]:
    """Start `streamhold serve` on a free port and return what it printed up to its banner's last line."""
    port = free_port()
    command = [sys.executable, "-m", "streamhold.cli", "serve", "--port", str(port)]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STREAMHOLD_")}
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env={**clean, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    lines: list[str] = []
    done = threading.Event()

    def read(out: IO[bytes]) -> None:
        for raw in out:
            lines.append(raw.decode(errors="replace"))
            if lines[-1].lstrip().startswith("API keys"):
                done.set()
        done.set()

    assert process.stdout is not None
    threading.Thread(target=read, args=(process.stdout,), daemon=True).start()
    try:
        done.wait(timeout)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    output = "".join(lines)
    assert "API keys" in output, f"no banner within {timeout} s; the server printed:\n{output}"
    return output, port


def test_serve_prints_where_to_go_once_it_listens(tmp_path: Path) -> None:
    output, port = serve_banner({"STREAMHOLD_DATA_DIR": str(tmp_path / "data"), "STREAMHOLD_API_KEYS": KEY})
    origin = f"http://127.0.0.1:{port}"
    banner = {line.split()[0]: line for line in output.splitlines()[-6:]}
    assert banner["Streamhold"] == f"Streamhold is listening on {origin}"
    assert banner["dashboard"].split() == ["dashboard", f"{origin}/"]
    assert banner["demo"].split()[:2] == ["demo", f"{origin}/demo"]
    assert banner["protocol"].split() == ["protocol", f"{origin}/v1/stream/"]
    assert banner["data"].split() == ["data", str((tmp_path / "data").resolve()), "(SQLite)"]
    assert banner["API"].startswith("  API keys   set (1)")
    assert KEY not in output


def test_serve_names_a_postgres_database_without_its_password(pg_url: str, tmp_path: Path) -> None:
    user, rest = pg_url.removeprefix("postgresql://").split("@", 1)
    password = "banner-secret-7731"
    url = f"postgresql://{user}:{password}@{rest}"
    output, _ = serve_banner({"STREAMHOLD_DATA_DIR": str(tmp_path), "STREAMHOLD_DATABASE_URL": url})
    host_port, database = rest.split("/", 1)
    assert f"  data       PostgreSQL database {database} on {host_port} as {user}" in output
    assert "  API keys   none" in output
    assert password not in output


def test_cat_prints_bytes_as_they_are(server: ServerProcess) -> None:
    stream_id = make_stream(server, "cli-cat", BINARY)
    result = streamhold("cat", stream_id, server=server.url, key=None)
    assert (result.returncode, result.stdout, result.stderr) == (0, BINARY, b"")
    empty = make_stream(server, "cli-cat")
    assert streamhold("cat", empty, server=server.url).stdout == b""


def test_cat_reads_a_private_stream_with_a_key_or_a_read_token(server: ServerProcess) -> None:
    stream_id = make_stream(server, "cli-private", b"secret bytes", public=False)
    with api(server) as http:
        token = http.post("/tokens", json={"scopes": ["read"], "namespaces": ["cli-private"]}).json()["token"]
    runner = CliRunner(env={"STREAMHOLD_URL": server.url, "STREAMHOLD_API_KEY": None})
    for args in (["--key", KEY], ["--key", token], []):
        env = {"STREAMHOLD_API_KEY": token} if not args else None
        result = runner.invoke(main, ["cat", *args, f"{server.url}/stream/{stream_id}"], env=env)
        assert (result.exit_code, result.stdout_bytes) == (0, b"secret bytes"), result.output

    keyless = runner.invoke(main, ["cat", stream_id])
    assert keyless.exit_code == 1 and keyless.stdout == ""
    assert keyless.stderr == "Error: this stream is private: pass --key or set STREAMHOLD_API_KEY\n"
    refused = runner.invoke(main, ["cat", "--key", "wrong", stream_id])
    assert refused.exit_code == 1 and refused.stdout == ""
    assert refused.stderr.startswith("Error: the API key was refused: pass --key"), refused.stderr
    # localhost is another origin than 127.0.0.1: the key stays home, and the message says why.
    elsewhere = f"http://localhost:{server.url.rsplit(':', 1)[1]}"
    url = f"{server.url}/stream/{stream_id}"
    held = runner.invoke(main, ["cat", "--server", elsewhere, "--key", KEY, url])
    assert held.exit_code == 1 and held.stdout == ""
    assert held.stderr == (
        f"Error: this stream is private, and the key goes only to --server ({elsewhere}): "
        f"pass --server {server.url}\n"
    )


def test_cat_without_follow_prints_what_an_open_stream_holds_now(server: ServerProcess) -> None:
    stream_id = make_stream(server, "cli-open", b"so far", close=False)
    result = streamhold("cat", stream_id, server=server.url, timeout=20)
    assert (result.returncode, result.stdout) == (0, b"so far")


def test_cat_follow_tails_until_the_stream_is_closed(server: ServerProcess) -> None:
    stream_id = make_stream(server, "cli-follow", b"one ", close=False)
    process = subprocess.Popen(
        [sys.executable, "-m", "streamhold.cli", "cat", "--follow", stream_id],
        cwd=REPO_ROOT,
        env=cli_env(server.url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    out = Output(process.stdout)
    out.start()
    try:
        out.wait_for(b"one ")
        with api(server) as http:
            http.post(f"/stream/{stream_id}/append", content=b"two ")
            out.wait_for(b"one two ")
            assert process.poll() is None, "it keeps following while the stream is open"
            http.post(f"/stream/{stream_id}/append", content=b"three")
            http.post(f"/stream/{stream_id}/complete")
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
    out.join(5)
    assert bytes(out.data) == b"one two three"


def test_cat_follow_resumes_across_a_server_restart(tmp_path: Path) -> None:
    env = {"STREAMHOLD_DATA_DIR": str(tmp_path), "STREAMHOLD_LONG_POLL_TIMEOUT": "1"}
    with ServerProcess(env=env) as own:
        with httpx.Client(base_url=own.url, timeout=10) as http:
            stream_id = http.post("/stream", json={"name": "cli-restart"}).json()["id"]
            http.post(f"/stream/{stream_id}/append", content=b"before ")
        process = subprocess.Popen(
            [
                sys.executable, "-m", "streamhold.cli", "cat", "-f", f"{own.url}/stream/{stream_id}",
                "--retry-for=30",
            ],
            cwd=REPO_ROOT,
            env=cli_env("http://127.0.0.1:9", key=None),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert process.stdout is not None and process.stderr is not None
        out = Output(process.stdout)
        out.start()
        try:
            out.wait_for(b"before ")
            own.restart()
            assert process.poll() is None, "cat keeps trying while the server is away"
            with httpx.Client(base_url=own.url, timeout=10) as http:
                http.post(f"/stream/{stream_id}/append", content=b"after")
                http.post(f"/stream/{stream_id}/complete")
            assert process.wait(timeout=30) == 0, process.stderr.read()
        finally:
            if process.poll() is None:
                process.kill()
        out.join(5)
    assert bytes(out.data) == b"before after", "every byte once, in order"


def test_ls_shows_a_table_filtered_by_namespace_and_metadata(server: ServerProcess) -> None:
    ids = [
        make_stream(server, "cli-ls", b"x" * i, metadata={"team": "a" if i < 2 else "b"}) for i in range(3)
    ]
    make_stream(server, "cli-ls-other", metadata={"team": "a"})
    result = streamhold("ls", "--namespace", "cli-ls", server=server.url)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[0].split() == ["ID", "NAMESPACE", "TYPE", "SIZE", "STATE", "CREATED", "EXPIRES"]
    assert [line.split()[0] for line in lines[1:]] == ids[::-1], "newest first"
    assert lines[1].split()[1:5] == ["cli-ls", "application/octet-stream", "2", "B"]
    team_a = (
        streamhold("ls", "-n", "cli-ls", "--meta", "team=a", server=server.url).stdout.decode().splitlines()
    )
    assert [line.split()[0] for line in team_a[1:]] == ids[1::-1]
    paged = streamhold("ls", "-n", "cli-ls", "--limit", "1", server=server.url)
    assert len(paged.stdout.decode().splitlines()) == 2
    assert paged.stderr.decode().strip() == "showing 1-1 of 3; --offset 1 for more"
    as_json = streamhold("ls", "-n", "cli-ls", "--json", server=server.url).stdout.decode().splitlines()
    records = [json.loads(line) for line in as_json]
    assert [r["id"] for r in records] == ids[::-1] and records[0]["metadata"] == {"team": "b"}
    none = streamhold("ls", "-n", "cli-ls-none", server=server.url)
    assert (none.returncode, none.stdout, none.stderr.strip()) == (0, b"", b"no streams match")


def test_info_and_rm(server: ServerProcess) -> None:
    stream_id = make_stream(
        server, "cli-info", b"hello", metadata={"user": "u1"}, headers={"content-type": "text/csv"}
    )
    shown = streamhold("info", stream_id, server=server.url)
    assert shown.returncode == 0
    fields = dict(line.split(":", 1) for line in shown.stdout.decode().splitlines())
    assert fields["id"].strip() == stream_id and fields["namespace"].strip() == "cli-info"
    assert fields["url"].strip() == f"{server.url}/stream/{stream_id}"
    assert fields["content type"].strip() == "text/csv" and fields["size"].strip() == "5 bytes"
    assert fields["state"].strip().startswith("closed at") and fields["metadata"].strip() == "user=u1"
    as_json = json.loads(streamhold("info", stream_id, "--json", server=server.url).stdout)
    assert as_json["size_bytes"] == 5 and as_json["namespace"] == "cli-info"

    removed = streamhold("rm", stream_id, server=server.url)
    assert (removed.returncode, removed.stdout.decode()) == (0, f"deleted {stream_id}\n")
    for args in (["info", stream_id], ["cat", stream_id]):
        gone = streamhold(*args, server=server.url)
        assert gone.returncode == 1 and gone.stdout == b""
        assert (
            gone.stderr.decode()
            == f"Error: stream {stream_id} not found (it may have expired or been deleted)\n"
        )


@pytest.mark.parametrize(
    ("args", "key", "message"),
    [
        (["ls"], None, "Error: the server needs an API key: pass --key or set STREAMHOLD_API_KEY"),
        (
            ["info", "stream_x"],
            "wrong",
            "Error: the API key was refused: pass --key or set STREAMHOLD_API_KEY",
        ),
        (
            ["write", "x", "--meta", "novalue"],
            KEY,
            "Error: --meta takes KEY=VALUE, such as --meta user_id=u1",
        ),
        (
            ["write", "x", "--ttl", "soon"],
            KEY,
            "Error: --ttl takes seconds or a duration (30m, 12h, 7d) or never",
        ),
        (["ls", "--limit", "0"], KEY, "Error: limit must be a whole number from 1 to 1000"),
        (["cat", "http://example.invalid/watch/x"], KEY, "Error: not a stream URL: expected .../stream/<id>"),
    ],
)
def test_errors_are_one_clear_line(
    server: ServerProcess, args: list[str], key: str | None, message: str
) -> None:
    # In-process, to keep the suite fast; the commands themselves run as subprocesses above.
    result = CliRunner(env={"STREAMHOLD_URL": server.url, "STREAMHOLD_API_KEY": key}).invoke(main, args)
    assert result.exit_code == 1 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), lines
    assert KEY not in result.stderr


def test_an_unreachable_server_is_named_with_what_to_do() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = streamhold("ls", server=url)
    lines = result.stderr.decode().splitlines()
    assert result.returncode == 1 and len(lines) == 1
    assert lines[0].startswith(f"Error: cannot reach the server at {url}")
    assert lines[0].endswith("start it with `streamhold serve` or point --server / STREAMHOLD_URL at it")
    flag = streamhold("ls", "--server", url, server="http://127.0.0.1:9")
    assert f"cannot reach the server at {url}" in flag.stderr.decode(), "--server wins over STREAMHOLD_URL"


@pytest.mark.parametrize("protocol", [Protocol, "httptools"])
def test_serve_reads_a_mebibyte_body_without_waiting_for_the_app(protocol: object) -> None:
    """`serve` buffers up to 1 MiB of a body before it waits for the app; uvicorn's own protocol, 64 KiB."""
    pieces: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await asyncio.sleep(0.5)  # a busy app: the body arrives meanwhile, as far as the server reads it
        while True:
            message = await receive()
            pieces.append(len(message.get("body", b"")))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=protocol, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        body = os.urandom(1024 * 1024)
        with httpx.Client(timeout=10) as client:
            assert client.post(f"http://127.0.0.1:{port}/", content=body).status_code == 204
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert sum(pieces) == len(body)
    if protocol == "httptools":
        assert len(pieces) >= 4, "uvicorn's own protocol stops reading past 64 KiB"
    else:
        assert pieces == [len(body)]


class _Recorder(ThreadingHTTPServer):
    """A stand-in server on 127.0.0.1 that writes down the Authorization header of every request."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _RecordingHandler)
        self.seen: list[tuple[str, str, str | None]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _RecordingHandler(BaseHTTPRequestHandler):
    server: _Recorder

    def _answer(self) -> None:
        self.server.seen.append((self.command, self.path, self.headers.get("authorization")))
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        body = b"closed content"
        self.send_response(200)
        self.send_header("content-type", "text/plain")
        self.send_header("stream-closed", "true")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_DELETE = do_HEAD = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def recorders() -> Iterator[tuple[_Recorder, _Recorder]]:
    pair = (_Recorder(), _Recorder())
    threads = [threading.Thread(target=r.serve_forever, kwargs={"poll_interval": 0.05}) for r in pair]
    for thread in threads:
        thread.start()
    yield pair
    for recorder, thread in zip(pair, threads, strict=True):
        recorder.shutdown()
        recorder.server_close()
        thread.join(5)


@pytest.mark.parametrize("command", ["cat", "info", "rm"])
def test_the_key_never_goes_to_a_host_named_in_a_url(
    recorders: tuple[_Recorder, _Recorder], command: str
) -> None:
    configured, other = recorders
    runner = CliRunner(env={"STREAMHOLD_URL": configured.url, "STREAMHOLD_API_KEY": KEY})
    runner.invoke(main, [command, f"{other.url}/stream/stream_x"])
    assert other.seen, "the command did reach the host in the URL"
    assert all(auth is None for _, _, auth in other.seen), other.seen
    assert configured.seen == []


def test_the_key_given_as_an_option_never_goes_to_a_host_named_in_a_url(
    recorders: tuple[_Recorder, _Recorder],
) -> None:
    configured, other = recorders
    runner = CliRunner(env={"STREAMHOLD_URL": configured.url, "STREAMHOLD_API_KEY": None})
    result = runner.invoke(main, ["cat", "--key", KEY, f"{other.url}/stream/stream_x"])
    assert result.exit_code == 0 and result.stdout == "closed content", result.output
    assert other.seen and all(auth is None for _, _, auth in other.seen), other.seen
    assert configured.seen == []


def test_the_key_goes_to_the_configured_origin_only(recorders: tuple[_Recorder, _Recorder]) -> None:
    configured, _ = recorders
    runner = CliRunner(env={"STREAMHOLD_URL": configured.url, "STREAMHOLD_API_KEY": KEY})
    runner.invoke(main, ["info", f"{configured.url}/stream/stream_x"])
    runner.invoke(main, ["rm", "stream_y"])
    runner.invoke(main, ["cat", "stream_x"])
    runner.invoke(main, ["cat", f"{configured.url}/stream/stream_x"])
    assert [auth for _, _, auth in configured.seen] == [f"Bearer {KEY}"] * 4, configured.seen


class _HostileHandler(_RecordingHandler):
    """Answers every call with a stream record full of terminal control sequences."""

    def _answer(self) -> None:
        self.server.seen.append((self.command, self.path, self.headers.get("authorization")))
        self.rfile.read(int(self.headers.get("content-length") or 0))
        record = {
            "id": "stream_x\x1b[2J",
            "name": "\x1b]0;owned\x07",
            "metadata": {"k\x9b31m": "\x1b[31mred"},
            "url": "http://127.0.0.1/stream/x\x08",
            "content_type": "text/plain\x1b[8m",
            "size_bytes": 1,
        }
        body = json.dumps(record if "/info" in self.path else {"streams": [record], "total": 1}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer


def test_ls_and_info_print_control_characters_escaped() -> None:
    hostile = _Recorder()
    hostile.RequestHandlerClass = _HostileHandler
    thread = threading.Thread(target=hostile.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        runner = CliRunner(env={"STREAMHOLD_URL": hostile.url, "STREAMHOLD_API_KEY": KEY})
        for args in (["ls"], ["info", "stream_x"]):
            result = runner.invoke(main, args)
            assert result.exit_code == 0, result.output
            assert not any(c in result.stdout for c in "\x1b\x07\x08\x9b"), repr(result.stdout)
            assert "\\u001b" in result.stdout
    finally:
        hostile.shutdown()
        hostile.server_close()
        thread.join(5)
