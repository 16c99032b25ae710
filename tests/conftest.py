"""Shared fixtures: what a test may need (root, /dev/fuse, the kernel's overlay) and a mount."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings


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


# Hypothesis profiles. "ci" (hypothesis loads it itself when CI is set) and "soak" give every
# property test their example counts; the differential fuzzer (test_kernel_fuzz.py) also takes
# its step count from them, and runs a quick 30 x 25 under any other profile. Select with
# --hypothesis-profile=NAME or OVERLAYD_FUZZ_PROFILE=NAME (the option wins).
settings.register_profile(
    "ci", max_examples=100, stateful_step_count=25, derandomize=True, deadline=None,
    database=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "soak", max_examples=600, stateful_step_count=60, derandomize=False, deadline=None,
    print_blob=True, suppress_health_check=[HealthCheck.too_slow])
if os.environ.get("OVERLAYD_FUZZ_PROFILE"):
    settings.load_profile(os.environ["OVERLAYD_FUZZ_PROFILE"])


@pytest.fixture
def stack(tmp_path: Path) -> dict[str, Path]:
    """Empty directories for a two-layer stack, an upper, a workdir and a mountpoint."""
    dirs = {name: tmp_path / name for name in ("lower1", "lower2", "upper", "work", "mnt")}
    for path in dirs.values():
        path.mkdir()
    return dirs


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts against a mount: killed if the test leaves them running, then
    reaped, and their pipes closed (a test may have closed some already)."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=60)
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
