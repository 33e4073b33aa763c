"""A small file system of its own that a test can fill, as a real disk fills: the errors come
from the kernel through every layer (Python, pyarrow, Lance), none simulated."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest


@contextlib.contextmanager
def tmpfs(mount: Path, size_mib: int):
    """A tmpfs of `size_mib` MiB mounted at `mount` for the block; skipped where mounting needs
    a root this process is not (the suite runs as root in CI)."""
    mount.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root (the suite runs as root in CI)")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(mount: Path, leave: int) -> Path:
    """Fill the file system but `leave` bytes; delete the returned file to free the space."""
    filler = mount / "filler"
    with open(filler, "wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(shutil.disk_usage(mount).free - leave, 0))
    return filler
