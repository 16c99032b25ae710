"""Kernel comparison tier: overlayd and the kernel's overlayfs show the same tree for one stack.

The stack (tests/treebuild.py) is written in the kernel's own formats; each test mounts it with
``mount -t overlay`` and with overlayd and compares full snapshots (tests/snapshot.py). Needs root;
the overlayd half also needs /dev/fuse.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import needs_fuse, needs_kernel_overlay, needs_root
from tests.differences import lower_links_split
from tests.mounting import KERNEL_PINNED, kernel_mounted, overlay_options, overlayd_mounted
from tests.snapshot import Entry, diff_snapshots, snapshot
from tests.treebuild import HIDDEN, OPAQUE_DIRS, VISIBLE, build_three_layer_stack

pytestmark = [pytest.mark.kernel, needs_root, needs_kernel_overlay]
uses_overlayd = [pytest.mark.mounted, needs_fuse]

# A fixed time for the upper directories' root, which is the merged root's mtime.
UPPER_ROOT_MTIME_NS = 1_650_000_000_987_654_321

Mounter = Callable[[Path, str], contextlib.AbstractContextManager[object]]


def kernel(mountpoint: Path, options: str) -> contextlib.AbstractContextManager[object]:
    return kernel_mounted(mountpoint, options + "," + KERNEL_PINNED)


def overlayd(mountpoint: Path, options: str) -> contextlib.AbstractContextManager[object]:
    return overlayd_mounted(mountpoint, options)


@pytest.fixture
def layers(tmp_path: Path) -> list[Path]:
    return build_three_layer_stack(tmp_path / "layers")


def make_dir(path: Path, mtime_ns: int | None = None) -> Path:
    path.mkdir()
    os.chmod(path, 0o755)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def snapshot_of(mount: Mounter, mountpoint: Path, options: str) -> dict[bytes, Entry]:
    with mount(mountpoint, options):
        return snapshot(mountpoint)


def assert_same_tree(kernel_view: dict[bytes, Entry], overlayd_view: dict[bytes, Entry],
                     *, writable: bool = False) -> None:
    missing = [path for path in VISIBLE if path not in kernel_view]
    assert not missing, f"the kernel does not show the stack as built: {missing}"
    if writable:
        kernel_view, overlayd_view = (lower_links_split(kernel_view),
                                      lower_links_split(overlayd_view))
    diff = diff_snapshots(kernel_view, overlayd_view)
    assert diff == [], "overlayd (b) differs from the kernel (a):\n" + "\n".join(diff)



@pytest.mark.mounted
@needs_fuse
def test_read_only_stack_matches_kernel(tmp_path: Path, layers: list[Path]) -> None:
    options = overlay_options(layers)
    expected = snapshot_of(kernel, make_dir(tmp_path / "kernel_mnt"), options)
    actual = snapshot_of(overlayd, make_dir(tmp_path / "overlayd_mnt"), options)
    assert_same_tree(expected, actual)


@pytest.mark.mounted
@needs_fuse
def test_empty_upper_stack_matches_kernel(tmp_path: Path, layers: list[Path]) -> None:
    views = {}
    uppers = {}
    for name, mount in (("kernel", kernel), ("overlayd", overlayd)):
        top = make_dir(tmp_path / name)
        upper = make_dir(top / "upper", UPPER_ROOT_MTIME_NS)
        options = overlay_options(layers, upper, make_dir(top / "work"))
        views[name] = snapshot_of(mount, make_dir(top / "mnt"), options)
        uppers[name] = upper
    assert_same_tree(views["kernel"], views["overlayd"], writable=True)
    # Reading writes nothing into upper (the kernel does set trusted.overlay.uuid on its root).
    for name, upper in uppers.items():
        assert os.listdir(upper) == [], f"{name} wrote into its upper dir"
        assert os.lstat(upper).st_mtime_ns == UPPER_ROOT_MTIME_NS, f"{name} touched upper's root"


@pytest.mark.parametrize("mount", [
    pytest.param(kernel, id="kernel"),
    pytest.param(overlayd, id="overlayd", marks=uses_overlayd),
])
def test_whited_out_names_are_absent(tmp_path: Path, layers: list[Path], mount: Mounter) -> None:
    mnt = make_dir(tmp_path / "mnt")
    base = os.fsencode(mnt)
    with mount(mnt, overlay_options(layers)):
        for rel in HIDDEN:
            path = base + b"/" + rel
            with pytest.raises(FileNotFoundError) as excinfo:
                os.lstat(path)
            assert excinfo.value.errno == errno.ENOENT
            parent, name = os.path.split(path)
            if os.path.isdir(parent):
                assert name not in os.listdir(parent), rel
        for rel in OPAQUE_DIRS:
            names = os.listxattr(base + b"/" + rel, follow_symlinks=False)
            assert [n for n in names if not n.startswith("user.")] == [], rel


def test_comparator_sees_a_different_tree(tmp_path: Path, layers: list[Path]) -> None:
    """diff_snapshots must tell the merged view from its top layer alone, and equal from equal."""
    mnt = make_dir(tmp_path / "mnt")
    with kernel(mnt, overlay_options(layers)):
        merged = snapshot(mnt)
        again = snapshot(mnt)
    assert diff_snapshots(merged, again) == []
    diff = diff_snapshots(merged, snapshot(layers[0]))
    assert diff != []
    assert any(line.startswith(repr(b"merged/from3.txt") + ": only in a") for line in diff), diff
    assert any(line.startswith(repr(b"orphan_whiteout") + ": only in b") for line in diff), diff
    assert any(line.startswith(repr(b"merged") + ": nlink") for line in diff), diff


def test_stack_build_is_deterministic(tmp_path: Path) -> None:
    first = build_three_layer_stack(tmp_path / "first")
    second = build_three_layer_stack(tmp_path / "second")
    for a, b in zip(first, second, strict=True):
        assert diff_snapshots(snapshot(a), snapshot(b)) == [], a.name

