"""Operator mistakes and bad luck around backups and a full disk: refused or survived, never harmful."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from pathlib import Path

import httpx
import pytest

from streamhold import create_agent_context
from streamhold.settings import Settings
from streamhold.store import backup as backups
from tests._operator import STARTUP, append, cli, create, read_all
from tests._server import ServerProcess
from tests.test_disk_full import BIG, Client, fill, serve, small_disk, wait_for

__all__ = ["small_disk"]  # the fixture, used by name
KIB = 1024


def test_backup_into_the_data_directory_is_refused(tmp_path: Path) -> None:
    """A backup inside the store's own folder dies with it, and in the chunk folder it breaks the store."""
    data = tmp_path / "data"
    with (
        ServerProcess(env={"STREAMHOLD_DATA_DIR": str(data)}, startup_timeout=STARTUP) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        stream_id = create(client)
        append(client, stream_id, b"small")
        for inside in ("streamhold.db-chunks", "streamhold.db-chunks/x.chunks", "backups/b", "."):
            dest = data / inside
            refused = client.post("/admin/backup", json={"dest": str(dest)})
            assert refused.status_code == 400 and "data directory" in refused.text, refused.text
            dotted = client.post("/admin/backup", json={"dest": f"{tmp_path}/elsewhere/../data/{inside}"})
            assert dotted.status_code == 400 and "data directory" in dotted.text, dotted.text
            assert not (data / "streamhold.db-chunks" / "manifest.json").exists()
            assert not (data / "streamhold.db-chunks" / "x.chunks").exists()
            assert not (data / "backups").exists()
        nul = client.post("/admin/backup", json={"dest": f"{tmp_path}/a\u0000b"})
        assert nul.status_code == 400 and "absolute" in nul.text, nul.text
        with pytest.raises(backups.BackupError, match="data directory"):  # the command's way, in process
            backups.backup(data / "streamhold.db", data / "backups" / "b")
        big = KIB * 100
        append(client, stream_id, b"b" * big)  # the chunk folder is still the store's
        assert read_all(client, stream_id) == b"small" + b"b" * big


def test_close_with_compress_on_a_full_disk_keeps_the_stream_whole(small_disk: Path) -> None:
    """Compressing at close needs room for the gzip copy, and a create for its row: on a full disk either may
    fail, but no acknowledged byte is lost, no stream answers 5xx, and the store checks clean afterwards."""
    ballast, rng = small_disk / "ballast", random.Random(7)
    with serve(small_disk, reserve=0) as server:
        client = Client(server.url)
        paths, probe = [client.create(f"c{i}") for i in range(3)], client.create("probe")
        for _ in range(8):
            for i, path in enumerate(paths):
                size = BIG if i else 30 * KIB  # chunk files, or rows in the database
                assert client.append(path, rng.randbytes(size)).status_code == 204  # gzip cannot shrink it
        fill(ballast, leave=256 * KIB)
        assert client.append(probe, rng.randbytes(BIG)).status_code == 507  # the disk is full now
        for path in paths:
            closed = client.request("POST", path, headers={"stream-closed": "true", "x-compress": "gzip"})
            assert closed.status_code in (204, 507), (closed.status_code, closed.text)
        client.check_content()
        late = client.request("PUT", "/v1/stream/late", headers={"content-type": "text/plain"})
        assert late.status_code in (201, 507), late.text
        ballast.unlink()
        for path in paths:
            assert wait_for(
                lambda p=path: client.request("POST", p, headers={"stream-closed": "true"}).status_code
                in (204, 409)
            )
        client.check_content()
        client.assert_no_server_errors()
    checked = cli("check", "--data-dir", str(small_disk / "data"))
    assert checked.returncode == 0, checked.stderr + checked.stdout


async def _store_with_chunk_files(data: Path) -> dict[str, bytes]:
    contents = {}
    async with create_agent_context(Settings(data_dir=data)) as ctx:
        for parts in ([b"small"], [b"head", random.randbytes(100 * KIB)], [random.randbytes(80 * KIB)]):
            stream = await ctx.stream.create("attack")
            for part in parts:
                await stream.write(part)
            contents[stream.id] = b"".join(parts)
    return contents


def _reseal(backup: Path, files: list[dict[str, object]]) -> None:
    """Rewrite a backup's manifest and SHA256SUMS to match `files`, as someone editing it by hand would."""
    manifest = json.loads((backup / "manifest.json").read_text())
    manifest["files"] = files
    (backup / "manifest.json").write_text(json.dumps(manifest))
    sums = [f"{f['sha256']}  {f['path']}\n" for f in files]
    sums.append(f"{hashlib.sha256((backup / 'manifest.json').read_bytes()).hexdigest()}  manifest.json\n")
    (backup / "SHA256SUMS").write_text("".join(sums))


@pytest.mark.parametrize("damage", ["dropped", "cut short", "not a database"])
def test_restore_refuses_a_backup_whose_chunk_files_do_not_cover_its_database(
    tmp_path: Path, damage: str
) -> None:
    """Checksums that agree prove no more than that: a restore whose rows find no bytes would answer 5xx."""
    data, dest = tmp_path / "data", tmp_path / "backup"
    asyncio.run(_store_with_chunk_files(data))
    backups.backup(data / "streamhold.db", dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    files = manifest["files"]
    victim = next(f for f in files if str(f["path"]).endswith(".chunks"))
    if damage == "not a database":
        victim = next(f for f in files if f["path"] == "streamhold.db")
        path = dest / victim["path"]
        path.write_bytes(b"not SQLite at all" * 1000)
        victim["size"], victim["sha256"] = path.stat().st_size, backups.sha256_of(path)
    elif damage == "dropped":
        files.remove(victim)
        (dest / victim["path"]).unlink()
    else:
        path = dest / victim["path"]
        path.write_bytes(path.read_bytes()[: victim["size"] // 2])
        victim["size"], victim["sha256"] = path.stat().st_size, backups.sha256_of(path)
    _reseal(dest, files)
    backups.verify(dest)  # the checksums alone agree
    target = tmp_path / "restored"
    result = cli("restore", str(dest), "--data-dir", str(target))
    assert result.returncode == 1, result.stdout
    assert "damaged" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not target.exists()
