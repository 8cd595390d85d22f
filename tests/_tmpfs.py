"""A small tmpfs for full-disk tests, and a ballast file that fills it."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

MIB = 1024 * 1024


@contextmanager
def small_disk(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `folder`, unmounted afterwards; skips unless root may mount one."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("full-disk tests mount a small tmpfs, which needs root and mount(8)")
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); the full-disk test did not run")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(path: Path, leave: int) -> None:
    """Take all but `leave` bytes of the filesystem that holds `path` with a ballast file at `path`."""
    stats = os.statvfs(path.parent)
    size = max(stats.f_bavail * stats.f_frsize - leave, 0)
    with path.open("wb") as ballast:
        while size > 0:
            ballast.write(b"\0" * min(size, MIB))
            size -= min(size, MIB)
