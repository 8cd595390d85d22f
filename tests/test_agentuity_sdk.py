"""Agentuity's own SDK (npm @agentuity/core 2.0.21 + @agentuity/server 2.0.21, pinned in
tests/conformance/package.json) against a real Streamhold subprocess with API keys set.

tests/clients/agentuity_sdk.mjs builds StreamStorageService the way an external Node backend does,
pointed at ``{origin}/stream`` (and once at the bare origin, the SDK's own default), runs the scenario
and prints what it saw as one JSON object, which is checked here.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests._server import ServerProcess
from tests.conformance_run import (
    NodeHarnessError,
    ensure_node_packages,
    harness_script,
    missing_node_tools,
    run_bounded,
)

KEY = "sdk-test-key-2"
MAX_APPEND = 65536
CONTENT = 'name,email\nada,ada@example.com\n# {"note":"object","n":1}42'

pytestmark = pytest.mark.timeout(360)


@pytest.fixture(scope="module")
def node_cache() -> Path:
    missing = missing_node_tools()
    if missing:
        pytest.skip(f"Agentuity SDK test skipped: Node.js tools not on PATH: {', '.join(missing)}")
    try:
        return ensure_node_packages(timeout=240)
    except NodeHarnessError as exc:
        pytest.fail(f"could not install the pinned npm packages: {exc}")


@pytest.fixture(scope="module")
def seen(node_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What the SDK saw while running the scenario once against a keyed server."""
    env = {
        "STREAMHOLD_DATA_DIR": str(tmp_path_factory.mktemp("agentuity-data")),
        "STREAMHOLD_API_KEYS": f"sdk-test-key-1,{KEY}",
        "STREAMHOLD_MAX_APPEND_BYTES": str(MAX_APPEND),
    }
    with ServerProcess(env=env) as server:
        run = run_bounded(
            [
                "node",
                str(harness_script("agentuity_sdk.mjs")),
                server.url,
                KEY,
                uuid.uuid4().hex[:8],
                str(MAX_APPEND),
            ],
            cwd=node_cache,
            timeout=60,
        )
        log = server.log_text()
    assert run.returncode == 0, f"{run.stderr}\n{run.stdout}\n{log}"
    assert KEY not in log, "the server log must never contain an API key"
    return json.loads(run.stdout)


def _expires_in(info: dict[str, Any], seconds: float) -> bool:
    expires = datetime.fromisoformat(info["expiresAt"])
    return abs(expires - datetime.now(UTC) - timedelta(seconds=seconds)) < timedelta(minutes=2)


def test_create_with_every_option_then_write_strings_bytes_and_objects(seen: dict[str, Any]) -> None:
    created = seen["created"]
    assert created["id"].startswith("stream_") and created["compressed"] is True
    assert created["url"].endswith(f"/stream/{created['id']}")
    assert seen["bytesWritten"] == len(CONTENT)
    info = seen["info"]
    assert info["namespace"].startswith("agentuity-") and info["metadata"]["kind"] == "report"
    assert info["sizeBytes"] == len(CONTENT) and info["url"] == created["url"]
    assert _expires_in(info, 3600)


def test_closed_with_compression_downloads_and_reads_publicly(seen: dict[str, Any]) -> None:
    assert seen["downloaded"] == CONTENT, (
        "the write after close must have been dropped, the rest kept in order"
    )
    public = seen["publicRead"]
    assert public == {"status": 200, "contentType": "text/csv", "contentEncoding": "gzip", "text": CONTENT}
    assert seen["blobBytes"] == [0, 1, 2, 255]


def test_ttl_null_never_expires_and_omitted_is_thirty_days(seen: dict[str, Any]) -> None:
    assert seen["neverExpires"]["expiresAt"] is None
    assert _expires_in(seen["defaultTtl"], 30 * 86400)


def test_list_filters_by_namespace_and_metadata_with_paging(seen: dict[str, Any]) -> None:
    listed, ids = seen["list"], seen["list"]["ids"]
    assert listed["all"]["success"] is True and listed["all"]["total"] == 3
    assert listed["all"]["ids"] == [ids["blob"], ids["audit"], ids["report"]], "newest first"
    assert listed["all"]["first"]["sizeBytes"] == 4 and listed["all"]["first"]["metadata"]["kind"] == "report"
    assert listed["reports"] == {"total": 2, "ids": [ids["blob"], ids["report"]]}
    assert listed["first"] == {"total": 3, "ids": [ids["blob"], ids["audit"]]}
    assert listed["second"] == {"total": 3, "ids": [ids["report"]]}
    assert listed["bySize"] == [ids["blob"], ids["audit"], ids["report"]]


def test_get_reader_tails_writes_until_close(seen: dict[str, Any]) -> None:
    assert seen["tail"]["text"] == "tick-1 tick-2"
    assert seen["tail"]["chunks"] >= 2, "each write reaches the reader as it is committed"


def test_errors_come_back_as_the_sdk_expects(seen: dict[str, Any]) -> None:
    too_large = seen["tooLarge"]
    assert (too_large["tag"], too_large["statusCode"]) == ("ServiceException", 413)
    assert str(MAX_APPEND) in too_large["message"]
    for name in ("getDeleted", "downloadDeleted", "deleteTwice"):
        assert seen[name] == {"tag": "ServiceException", "statusCode": 404, "message": "Not Found"}, name
    assert seen["wrongKey"] == {"tag": "ServiceException", "statusCode": 401, "message": "Unauthorized"}


def test_the_same_calls_work_at_the_root(seen: dict[str, Any]) -> None:
    root = seen["root"]
    stream_id = root["info"]["id"]
    assert root["url"].endswith(f"/{stream_id}") and "/stream/" not in root["url"]
    assert root["downloaded"] == "at the root" and root["listed"] == 1
    assert root["info"]["sizeBytes"] == len("at the root")
    assert root["afterDelete"]["statusCode"] == 404
