"""Kernel comparison of the unprivileged upper format: the write scenario of
tests/test_kernel_write.py with ``userxattr`` on both the kernel's overlay and overlayd (as root,
so that only the option makes overlayd write user.overlay.*): the same errno at every step, the
same merged tree, the same upper layer on disk with its user.overlay.opaque marks and no
trusted.overlay.* xattr, and each upper reads the same through the other implementation."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from pathlib import Path

import pytest

from tests.conftest import needs_fuse, needs_kernel_overlay
from tests.differences import CHANGED, normalize
from tests.mounting import KERNEL_PINNED, kernel_mounted, overlay_options, overlayd_mounted
from tests.snapshot import Entry, diff_snapshots, snapshot
from tests.write_scenario import STEPS, Run, build_lowers, run_steps

pytestmark = [pytest.mark.kernel, pytest.mark.mounted, needs_kernel_overlay, needs_fuse]

OPTIONS = ",userxattr"
# The kernel refuses userxattr with redirect_dir=off (which follows redirects): it takes
# nofollow, as overlayd does with userxattr.
KERNEL_OPTIONS = OPTIONS + "," + KERNEL_PINNED.replace("redirect_dir=off", "redirect_dir=nofollow")
# Each implementation's own bookkeeping, user.* xattrs in this format that the snapshot of an
# upper layer would show: the kernel's origin file handles, impure marks and layer uuid, and
# overlayd's recorded inode numbers (as root, both are trusted.* and a snapshot skips them).
# What the format means, the opaque and redirect marks, is compared.
MEANING = (b"user.overlay.opaque", b"user.overlay.redirect")
OPAQUE = "user.overlay.opaque"


def _bookkeeping(name: bytes) -> bool:
    return name.startswith(b"user.overlay.") and name not in MEANING


def without_bookkeeping(snap: dict[bytes, Entry]) -> dict[bytes, Entry]:
    return {path: dataclasses.replace(entry, xattrs=tuple(
        (name, value) for name, value in entry.xattrs if not _bookkeeping(name)))
        for path, entry in snap.items()}


def overlay_xattrs(root: Path) -> dict[str, dict[str, bytes]]:
    """Every trusted.overlay.* and user.overlay.* xattr (bookkeeping aside) under *root*."""
    found: dict[str, dict[str, bytes]] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in [".", *dirs, *files]:
            path = os.path.join(dirpath, name)
            for xname in os.listxattr(path, follow_symlinks=False):
                bname = os.fsencode(xname)
                if bname.startswith((b"trusted.overlay.", b"user.overlay.")) and not (
                        _bookkeeping(bname)):
                    rel = os.path.normpath(os.path.relpath(path, root))
                    found.setdefault(rel, {})[xname] = os.getxattr(path, xname,
                                                                   follow_symlinks=False)
    return found


def mount(kind: str, mnt: Path, opts: str) -> contextlib.AbstractContextManager[object]:
    if kind == "kernel":
        return kernel_mounted(mnt, opts + KERNEL_OPTIONS)
    return overlayd_mounted(mnt, opts + OPTIONS)


def run(kind: str, base: Path, since_ns: int) -> Run:
    base.mkdir()
    lowers = build_lowers(base)
    for name in ("upper", "work", "mnt"):
        (base / name).mkdir()
    opts = overlay_options(lowers, base / "upper", base / "work")
    with mount(kind, base / "mnt", opts):
        outcomes = run_steps(base / "mnt", STEPS)
        merged = normalize(snapshot(base / "mnt"), since_ns)
    upper = without_bookkeeping(normalize(snapshot(base / "upper"), since_ns))
    return Run(base, lowers, outcomes, merged, upper, overlay_xattrs(base / "upper"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    base = tmp_path_factory.mktemp("userxattr")
    since = time.time_ns() - 1_000_000_000
    return {kind: run(kind, base / kind, since) for kind in ("kernel", "overlayd")}


def test_same_outcome_at_every_step(runs: dict[str, Run]) -> None:
    kernel, ours = runs["kernel"].outcomes, runs["overlayd"].outcomes
    differ = [f"{title}: kernel {k}, overlayd {o}"
              for (title, k), (_, o) in zip(kernel, ours, strict=True) if k != o]
    assert differ == []
    assert {o for _, o in kernel} >= {"ok", "ENOENT", "ENOTEMPTY", "EXDEV", "EEXIST"}


def test_same_merged_tree(runs: dict[str, Run]) -> None:
    assert diff_snapshots(runs["kernel"].merged, runs["overlayd"].merged) == []


def test_same_upper_layer_on_disk(runs: dict[str, Run]) -> None:
    assert diff_snapshots(runs["kernel"].upper, runs["overlayd"].upper) == []
    assert runs["kernel"].marks == runs["overlayd"].marks
    # With userxattr, trusted.overlay.* is an ordinary xattr: set through the mount (by root),
    # it is stored as is, not escaped, and does not make the directory opaque (the merged tree
    # and the cross mounts check that).
    assert runs["overlayd"].marks["srv"] == {"trusted.overlay.opaque": b"y"}
    # The directories made opaque carry the kernel's unprivileged mark, and nothing trusted.
    opaque = {path for path, marks in runs["overlayd"].marks.items() if OPAQUE in marks}
    assert opaque >= {"emptydir", "srv/data", "movedst", "emptyup"}
    assert not any(x.startswith("trusted.") for path, marks in runs["overlayd"].marks.items()
                   if path != "srv" for x in marks)


@pytest.mark.parametrize(("writer", "reader"), [("overlayd", "kernel"), ("kernel", "overlayd")])
def test_cross_mount(runs: dict[str, Run], writer: str, reader: str) -> None:
    written = runs[writer]
    mnt = written.base / "mnt"
    opts = overlay_options(written.lowers, written.base / "upper", written.base / "work")
    with mount(reader, mnt, opts):
        view = snapshot(mnt)
    since = min(e.mtime_ns for e in written.merged.values() if e.mtime_ns != CHANGED) + 1
    since = max(since, time.time_ns() - 3600 * 10**9)
    assert diff_snapshots(normalize(view, since), written.merged) == []
