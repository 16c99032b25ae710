"""Rootless: overlayd run by an ordinary user through the setuid fusermount3 (tests/rootless.py
sets the user up). The user copies up, deletes, recreates a directory as opaque and renames,
then unmounts with ``fusermount3 -u``; the upper it leaves is in the kernel's unprivileged format
(user.overlay.opaque, char 0/0 whiteouts, nothing trusted), and the kernel's overlay mounted
with ``userxattr`` on the same layers shows the same tree the user saw."""

from __future__ import annotations

import ast
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.differences import normalize
from tests.mounting import KERNEL_PINNED, check_log, kernel_mounted, overlay_options
from tests.rootless import Rootless, rootless, why_not
from tests.snapshot import Entry, diff_snapshots, snapshot

pytestmark = [pytest.mark.mounted, pytest.mark.kernel,
              pytest.mark.skipif(why_not() is not None, reason=str(why_not()))]

KERNEL_USERXATTR = "userxattr," + KERNEL_PINNED.replace("redirect_dir=off", "redirect_dir=nofollow")

# Run as the user, on the mount: the changes, then a snapshot of the merged tree as it saw it.
CHANGES = r'''
import dataclasses, os, sys
from snapshot import snapshot
mnt = sys.argv[1]
def p(name): return os.path.join(mnt, name)
with open(p("etc/motd"), "a") as f:
    f.write("changed by the user\n")                 # copy-up of data
os.chmod(p("etc/hosts"), 0o600)                      # copy-up of metadata
os.setxattr(p("etc/hosts"), "user.note", b"rootless")
os.unlink(p("gone.txt"))                             # a whiteout
for name in os.listdir(p("d")):
    os.unlink(p("d/" + name))
os.rmdir(p("d"))
os.mkdir(p("d"))                                     # recreated: opaque
with open(p("d/fresh"), "w") as f:
    f.write("fresh\n")
os.rename(p("ren/old"), p("ren/new"))                # rename of a lower file
os.rename(p("d/fresh"), p("d/renamed"))              # rename of an upper one
os.mkdir(p("newdir"))
os.symlink("etc/motd", p("newdir/link"))
snap = snapshot(mnt)
print(repr({k: dataclasses.asdict(v) for k, v in snap.items()}))
'''


def build_layers(base: Path) -> list[Path]:
    top, bottom = base / "lower1", base / "lower2"
    for layer in (top, bottom):
        layer.mkdir()
    (bottom / "etc").mkdir()
    (bottom / "etc/motd").write_text("motd\n")
    (bottom / "etc/hosts").write_text("127.0.0.1 localhost\n")
    (bottom / "gone.txt").write_text("to be deleted\n")
    (bottom / "d").mkdir()
    (bottom / "d/a").write_text("a\n")
    (top / "d").mkdir()
    (top / "d/b").write_text("b\n")
    (bottom / "ren").mkdir()
    (bottom / "ren/old").write_text("renamed\n")
    for layer in (top, bottom):
        for dirpath, dirnames, filenames in os.walk(layer, topdown=False):
            for name in filenames + dirnames:
                os.utime(os.path.join(dirpath, name), ns=(10**18, 10**18))
            os.utime(dirpath, ns=(10**18, 10**18))
    return [top, bottom]


@pytest.fixture(scope="module")
def user() -> Iterator[Rootless]:
    with rootless() as env:
        yield env


def entries(text: str) -> dict[bytes, Entry]:
    return {path: Entry(**fields) for path, fields in ast.literal_eval(text).items()}


def test_user_changes_read_the_same_through_the_kernel(user: Rootless) -> None:
    base = user.base / "home" / "changes"
    base.mkdir()
    lowers = build_layers(base)
    for name in ("upper", "work", "mnt", "kmnt"):
        (base / name).mkdir()
    user.chown_tree(base)  # a rootless user's layers are its own (podman: mapped ids)
    opts = overlay_options(lowers, base / "upper", base / "work")
    since = time.time_ns() - 10**9
    with user.mounted(base / "mnt", opts) as daemon:
        done = user.python_run(CHANGES, str(base / "mnt"))
        assert done.returncode == 0, done.stderr
        unmounted = user.unmount(base / "mnt")
        assert unmounted.returncode == 0, unmounted.stderr
        assert daemon.proc.wait(timeout=10) == 0
    check_log(daemon.log())
    seen = normalize(entries(done.stdout), since)

    # What the user saw: the changes happened.
    assert seen[b"d"].names == (b"renamed",)
    assert b"gone.txt" not in seen
    assert seen[b"ren"].names == (b"new",)
    assert seen[b"etc/hosts"].perm == 0o600
    assert (b"user.note", b"rootless") in seen[b"etc/hosts"].xattrs
    assert {e.uid for e in seen.values()} == {user.uid}

    # The upper on disk: the kernel's unprivileged format, owned by the user.
    upper = base / "upper"
    gone = os.lstat(upper / "gone.txt")
    assert stat.S_ISCHR(gone.st_mode)
    assert gone.st_rdev == 0
    assert os.lstat(upper / "ren/old").st_rdev == 0
    assert os.getxattr(upper / "d", "user.overlay.opaque") == b"y"
    for dirpath, dirnames, filenames in os.walk(upper):
        for name in [".", *dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            assert os.lstat(path).st_uid == user.uid, path
            trusted = [x for x in os.listxattr(path, follow_symlinks=False)
                       if x.startswith("trusted.")]
            assert trusted == [], path
    assert os.listdir(base / "work" / "work") == []

    # The kernel, with userxattr, on the same layers: the same tree.
    with kernel_mounted(base / "kmnt", opts + "," + KERNEL_USERXATTR):
        kernel = normalize(snapshot(base / "kmnt"), since)
    assert diff_snapshots(kernel, seen) == []
