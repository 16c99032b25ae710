"""Kernel comparison of the write path: the same changes through the kernel's overlay and
overlayd give the same errno at every step, the same merged tree, the same upper layer on disk,
and each upper layer reads the same when mounted by the other implementation."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import needs_fuse, needs_kernel_overlay
from tests.differences import CHANGED, normalize
from tests.mounting import KERNEL_PINNED, kernel_mounted, overlay_options, overlayd_mounted
from tests.snapshot import Entry, diff_snapshots, snapshot
from tests.write_scenario import build_lowers, run_steps

pytestmark = [pytest.mark.kernel, pytest.mark.mounted, needs_kernel_overlay, needs_fuse]

OPAQUE = "trusted.overlay.opaque"


def opaque_dirs(root: Path) -> set[str]:
    found = set()
    for dirpath, _dirs, _files in os.walk(root):
        try:
            if os.getxattr(dirpath, OPAQUE) == b"y":
                found.add(os.path.relpath(dirpath, root))
        except OSError:
            pass
    return found


@contextlib.contextmanager
def mounted(kind: str, mnt: Path, opts: str) -> Iterator[None]:
    if kind == "kernel":
        with kernel_mounted(mnt, opts + "," + KERNEL_PINNED):
            yield
    else:
        with overlayd_mounted(mnt, opts):
            yield


@dataclasses.dataclass
class Run:
    base: Path
    lowers: list[Path]
    outcomes: list[tuple[str, str]]
    merged: dict[bytes, Entry]
    upper: dict[bytes, Entry]
    opaque: set[str]


def run(kind: str, base: Path, since_ns: int) -> Run:
    base.mkdir()
    lowers = build_lowers(base)
    for name in ("upper", "work", "mnt"):
        (base / name).mkdir()
    with mounted(kind, base / "mnt", overlay_options(lowers, base / "upper", base / "work")):
        outcomes = run_steps(base / "mnt")
        merged = normalize(snapshot(base / "mnt"), since_ns)
    upper = normalize(snapshot(base / "upper"), since_ns)
    return Run(base, lowers, outcomes, merged, upper, opaque_dirs(base / "upper"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    base = tmp_path_factory.mktemp("write")
    since = time.time_ns() - 1_000_000_000
    return {kind: run(kind, base / kind, since) for kind in ("kernel", "overlayd")}


def test_same_outcome_at_every_step(runs: dict[str, Run]) -> None:
    kernel, ours = runs["kernel"].outcomes, runs["overlayd"].outcomes
    assert len(kernel) == len(ours)
    differ = [f"{title}: kernel {k}, overlayd {o}"
              for (title, k), (_, o) in zip(kernel, ours, strict=True) if k != o]
    assert differ == []
    # The scenario exercises failures as well as successes.
    assert {o for _, o in kernel} >= {"ok", "ENOENT", "ENOTEMPTY", "EXDEV", "EEXIST", "ENODATA"}


def test_same_merged_tree(runs: dict[str, Run]) -> None:
    assert diff_snapshots(runs["kernel"].merged, runs["overlayd"].merged) == []


def test_same_upper_layer_on_disk(runs: dict[str, Run]) -> None:
    assert diff_snapshots(runs["kernel"].upper, runs["overlayd"].upper) == []
    assert runs["kernel"].opaque == runs["overlayd"].opaque
    assert runs["overlayd"].opaque == {"emptydir", "srv/data", "movedst", "emptyup"}


def test_upper_whiteouts_are_kernel_whiteouts(runs: dict[str, Run]) -> None:
    upper = runs["overlayd"].upper
    whiteouts = {p for p, e in upper.items() if e.kind == stat.S_IFCHR and e.rdev == (0, 0)}
    assert whiteouts >= {b"opt/app", b"var", b"etc/hosts", b"etc/motd"}


def test_workdir_left_clean(runs: dict[str, Run]) -> None:
    assert os.listdir(runs["overlayd"].base / "work" / "work") == []


@pytest.mark.parametrize(("writer", "reader"), [("overlayd", "kernel"), ("kernel", "overlayd")])
def test_cross_mount(runs: dict[str, Run], writer: str, reader: str) -> None:
    """The upper one implementation wrote reads the same through the other."""
    written = runs[writer]
    mnt = written.base / "mnt"
    opts = overlay_options(written.lowers, written.base / "upper", written.base / "work")
    with mounted(reader, mnt, opts):
        view = snapshot(mnt)
    since = min(e.mtime_ns for e in written.merged.values() if e.mtime_ns != CHANGED) + 1
    since = max(since, time.time_ns() - 3600 * 10**9)
    assert diff_snapshots(normalize(view, since), written.merged) == []
