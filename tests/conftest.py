"""Shared fixtures: what a test may need (root, /dev/fuse, the kernel's overlay) and a mount."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


def have_fuse() -> bool:
    return os.access("/dev/fuse", os.R_OK | os.W_OK) and shutil.which("fusermount3") is not None


def have_kernel_overlay() -> bool:
    if os.geteuid() != 0:
        return False
    with open("/proc/filesystems", encoding="ascii") as f:
        return any(line.split()[-1] == "overlay" for line in f if line.strip())


needs_fuse = pytest.mark.skipif(not have_fuse(), reason="needs /dev/fuse and fusermount3")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
needs_kernel_overlay = pytest.mark.skipif(
    not have_kernel_overlay(), reason="needs root and the kernel's overlay filesystem")


@pytest.fixture
def stack(tmp_path: Path) -> dict[str, Path]:
    """Empty directories for a two-layer stack, an upper, a workdir and a mountpoint."""
    dirs = {name: tmp_path / name for name in ("lower1", "lower2", "upper", "work", "mnt")}
    for path in dirs.values():
        path.mkdir()
    return dirs
