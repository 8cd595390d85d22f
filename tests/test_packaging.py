"""The wheel in a fresh venv, beside a user's own `app` package: the import name, the CLI, the shipped files.

Slow-ish (a build and an install, a few seconds from uv's cache); skipped only when uv is missing or cannot
reach a package index.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests._server import HOST, REPO_ROOT, ServerProcess

pytestmark = pytest.mark.timeout(180)

PUBLIC = ["create_app", "create_agent_context", "AgentContext", "StreamService", "RemoteStreams", "Settings"]
ERRORS = [
    "StreamError", "StreamNotFoundError", "StreamClosedError", "PayloadTooLargeError", "UnauthorizedError",
]
NETWORK_TROUBLE = ("failed to fetch", "network", "dns", "connect", "offline", "timed out")


@dataclass(frozen=True)
class Installed:
    wheel: Path
    python: Path
    bin: Path
    project: Path  # a user's project folder holding its own `app` package


def find_uv() -> str:
    beside = Path(sys.executable).parent / "uv"
    found = str(beside) if beside.exists() else shutil.which("uv")
    if found is None:
        pytest.skip("THE WHEEL IS NOT CHECKED: uv is not installed here; run `make install`")
    return found


def run_uv(uv: str, args: Sequence[str], what: str) -> None:
    """Run uv from its cache alone first, then with the index; skip only when the index is out of reach."""
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never"}
    offline = subprocess.run([uv, *args, "--offline"], capture_output=True, text=True, env=env, timeout=120)
    if offline.returncode == 0:
        return
    online = subprocess.run([uv, *args], capture_output=True, text=True, env=env, timeout=150)
    if online.returncode == 0:
        return
    if any(word in online.stderr.lower() for word in NETWORK_TROUBLE):
        reason = f"THE WHEEL IS NOT CHECKED: {what} needs packages neither cached nor downloadable"
        pytest.skip(f"{reason}:\n{online.stderr}")
    pytest.fail(f"{what} failed:\n{online.stderr}")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    uv = find_uv()
    root = tmp_path_factory.mktemp("packaging")
    source = root / "source"  # a copy, so that the build leaves nothing in the repository
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    shutil.copytree(REPO_ROOT / "app", source / "app", ignore=shutil.ignore_patterns("__pycache__"))
    dist = root / "dist"
    build = ["build", "--wheel", "-q", "--python", sys.executable, "-o", str(dist), str(source)]
    run_uv(uv, build, "uv build")
    (wheel,) = dist.glob("streamhold-*.whl")

    venv = root / "venv"
    run_uv(uv, ["venv", "-q", "--python", sys.executable, str(venv)], "uv venv")
    python = venv / "bin" / "python"
    lock = REPO_ROOT / "requirements.lock"
    install = ["pip", "install", "-q", "--python", str(python), "-c", str(lock), str(wheel)]
    run_uv(uv, install, "installing the wheel")

    project = root / "project"
    (project / "app").mkdir(parents=True)
    (project / "app" / "__init__.py").write_text('OWNER = "the user"\n')
    return Installed(wheel=wheel, python=python, bin=venv / "bin", project=project)


def run_in_project(installed: Installed, code: str) -> dict:
    """Run `code` with the fresh venv's Python in the user's project folder; it prints one JSON object."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("STREAMHOLD_")}
    done = subprocess.run(
        [str(installed.python), "-c", code],
        cwd=installed.project,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_wheel_ships_templates_static_files_and_py_typed(installed: Installed) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    for path in (REPO_ROOT / "app").rglob("*"):
        if path.is_file() and (path.suffix in (".html", ".css", ".js") or path.name == "py.typed"):
            assert f"streamhold/{path.relative_to(REPO_ROOT / 'app')}" in names
    assert not any(name.startswith("app/") for name in names)


def test_public_names_import_beside_a_users_own_app_package(installed: Installed) -> None:
    found = run_in_project(
        installed,
        f"""
import json, sys
import app
import streamhold
from streamhold import {", ".join(PUBLIC + ERRORS)}
print(json.dumps({{
    "app": app.OWNER,
    "file": streamhold.__file__,
    "all": streamhold.__all__,
    "errors": [issubclass(e, StreamError) for e in ({", ".join(ERRORS)},)],
}}))
""",
    )
    assert found["app"] == "the user"
    assert Path(found["file"]).is_relative_to(installed.python.parent.parent)
    assert set(PUBLIC + ERRORS) <= set(found["all"])
    assert all(found["errors"])


def test_the_remote_client_does_not_import_sqlalchemy(installed: Installed) -> None:
    found = run_in_project(
        installed,
        """
import json, sys
from streamhold import RemoteStreams, StreamError
import streamhold.sdk.remote
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("sqlalchemy", "sqlmodel", "litestar"))))
""",
    )
    assert found == []


def test_the_console_script_serves_dashboard_viewer_and_static_files(
    installed: Installed, tmp_path: Path
) -> None:
    def command(port: int) -> list[str]:
        return [str(installed.bin / "streamhold"), "serve", "--host", HOST, "--port", str(port)]

    env = {"STREAMHOLD_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": ""}
    with ServerProcess(env=env, command=command, cwd=installed.project, log_dir=tmp_path) as server:
        dashboard = httpx.get(f"{server.url}/", timeout=10)
        assert dashboard.status_code == 200, server.log_tail()
        assert "<title>Streams · Streamhold</title>" in dashboard.text
        viewer = httpx.get(f"{server.url}/watch/nothing-here", timeout=10)
        assert viewer.status_code == 404
        assert "<title>nothing-here · Streamhold</title>" in viewer.text
        assert '<link rel="stylesheet" href="/static/app.css">' in viewer.text
        htmx = httpx.get(f"{server.url}/static/htmx-2.0.11.min.js", timeout=10)
        assert htmx.status_code == 200
        assert htmx.content == (REPO_ROOT / "app" / "static" / "htmx-2.0.11.min.js").read_bytes()
