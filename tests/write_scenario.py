"""A scripted sequence of changes to a merged tree, for comparing two overlay implementations.

Each step acts on the mount root and is recorded as "ok" or the errno name it raised, so the
kernel's overlayfs and overlayd can be compared step by step, then by the trees they leave.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from overlayd.syscalls import RENAME_EXCHANGE, RENAME_NOREPLACE, renameat2
from tests.snapshot import Entry

Step = tuple[str, Callable[[Path], object]]


def build_lowers(root: Path) -> list[Path]:
    """Two lower layers, top first, holding what the steps below change."""
    top, bottom = root / "lower1", root / "lower2"
    for layer in (top, bottom):
        layer.mkdir()
    for d in ("etc", "var/log", "usr/share/doc/pkg", "srv/data", "opt/app", "home/u",
              "emptydir", "movedst"):
        (bottom / d).mkdir(parents=True, exist_ok=True)
    (bottom / "etc/motd").write_text("motd from bottom\n")
    (bottom / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (bottom / "etc/hosts").write_text("127.0.0.1 localhost\n")
    (bottom / "var/log/old.log").write_text("old\n" * 100)
    (bottom / "usr/share/doc/pkg/README").write_text("readme\n")
    (bottom / "usr/share/doc/pkg/COPYING").write_text("copying\n")
    (bottom / "srv/data/a").write_text("a\n")
    (bottom / "opt/app/bin").write_text("#!/bin/sh\n")
    os.chmod(bottom / "opt/app/bin", 0o755)
    (bottom / "srv/hl1").write_text("linked\n")
    os.link(bottom / "srv/hl1", bottom / "srv/hl2")
    with open(bottom / "srv/sparse", "wb") as f:
        f.truncate(4 << 20)
        f.seek(1 << 20)
        f.write(b"data")
    os.setxattr(bottom / "etc/hosts", "user.origin", b"bottom")
    (top / "etc").mkdir()
    (top / "etc/motd").write_text("motd from top\n")
    (top / "home").mkdir()
    (top / "home/u/").mkdir()
    (top / "home/u/notes").write_text("notes\n")
    os.chown(top / "home/u/notes", 1000, 1000)
    os.chown(top / "home/u", 1000, 1000)
    # Fixed times for everything, so copies can be told from the originals.
    for layer in (top, bottom):
        for dirpath, dirnames, filenames in os.walk(layer, topdown=False):
            for name in filenames + dirnames:
                os.utime(os.path.join(dirpath, name), ns=(10**18, 10**18),
                         follow_symlinks=False)
            os.utime(dirpath, ns=(10**18, 10**18))
    return [top, bottom]


def _append(path: Path, data: str) -> None:
    with open(path, "a") as f:
        f.write(data)


def _rename2(root: Path, old: str, new: str, flags: int) -> None:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        renameat2(fd, old.encode(), fd, new.encode(), flags)
    finally:
        os.close(fd)


def _rm_tree(path: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(path, topdown=False):
        for name in filenames:
            os.unlink(os.path.join(dirpath, name))
        for name in dirnames:
            os.rmdir(os.path.join(dirpath, name))
    os.rmdir(path)


STEPS: list[Step] = [
    ("append to a lower file (copy-up)", lambda r: _append(r / "etc/motd", "more\n")),
    ("truncate a lower file by open O_TRUNC", lambda r: open(r / "etc/passwd", "w").close()),
    ("chmod a lower file", lambda r: os.chmod(r / "opt/app/bin", 0o700)),
    ("chown a lower file", lambda r: os.chown(r / "srv/data/a", 1234, 5678)),
    ("utime a lower file", lambda r: os.utime(r / "var/log/old.log", ns=(5, 7 * 10**17))),
    ("setxattr on a lower file", lambda r: os.setxattr(r / "etc/hosts", "user.new", b"v")),
    ("removexattr on a lower file", lambda r: os.removexattr(r / "etc/hosts", "user.origin")),
    ("removexattr of a missing xattr", lambda r: os.removexattr(r / "etc/motd", "user.none")),
    ("setxattr on a lower dir", lambda r: os.setxattr(r / "srv", "user.dir", b"d")),
    ("chmod a lower dir", lambda r: os.chmod(r / "usr/share", 0o750)),
    ("write into a sparse lower file", lambda r: _pwrite(r / "srv/sparse", b"X", 3 << 20)),
    ("append through one name of a lower hard link", lambda r: (
        os.stat(r / "srv/hl1"), os.stat(r / "srv/hl2"), _append(r / "srv/hl2", "new\n"))),
    ("unlink a lower file (whiteout)", lambda r: os.unlink(r / "var/log/old.log")),
    ("unlink it again", lambda r: os.unlink(r / "var/log/old.log")),
    ("create and unlink an upper file", lambda r: (_append(r / "tmpfile", "t"),
                                                   os.unlink(r / "tmpfile"))),
    ("rmdir a non-empty merged dir", lambda r: os.rmdir(r / "etc")),
    ("rmdir an empty lower dir", lambda r: os.rmdir(r / "emptydir")),
    ("rm -r a lower subtree", lambda r: _rm_tree(r / "usr/share/doc")),
    ("mkdir over a whiteout (opaque)", lambda r: os.mkdir(r / "emptydir", 0o705)),
    ("create a file over a whiteout", lambda r: _append(r / "var/log/old.log", "new\n")),
    ("rename a lower file", lambda r: os.rename(r / "etc/hosts", r / "etc/hosts.moved")),
    ("rename a file over a lower file", lambda r: os.rename(r / "etc/motd", r / "srv/data/a")),
    ("rename a merged dir (EXDEV)", lambda r: os.rename(r / "etc", r / "etc2")),
    ("rename a lower-only dir (EXDEV)", lambda r: os.rename(r / "opt", r / "opt2")),
    ("mkdir a new dir", lambda r: os.mkdir(r / "newdir", 0o755)),
    ("create in the new dir", lambda r: _append(r / "newdir/f", "f\n")),
    ("rename an upper-only dir", lambda r: os.rename(r / "newdir", r / "newdir2")),
    ("rename an upper dir over an empty lower dir", lambda r: os.rename(r / "newdir2",
                                                                       r / "movedst")),
    ("rename NOREPLACE onto a free name",
     lambda r: _rename2(r, "etc/passwd", "etc/passwd.new", RENAME_NOREPLACE)),
    ("rename NOREPLACE onto a lower name",
     lambda r: _rename2(r, "etc/passwd.new", "home/u/notes", RENAME_NOREPLACE)),
    ("rename NOREPLACE onto an upper name",
     lambda r: _rename2(r, "etc/passwd.new", "srv/data/a", RENAME_NOREPLACE)),
    ("rename EXCHANGE of two files",
     lambda r: _rename2(r, "etc/passwd.new", "opt/app/bin", RENAME_EXCHANGE)),
    ("rename EXCHANGE of a file and a lower dir",
     lambda r: _rename2(r, "etc/passwd.new", "var/log", RENAME_EXCHANGE)),
    ("hard link a lower file", lambda r: os.link(r / "home/u/notes", r / "home/u/notes2")),
    ("symlink", lambda r: os.symlink("../etc/passwd", r / "home/link")),
    ("mkfifo", lambda r: os.mkfifo(r / "home/fifo", 0o640)),
    ("mknod char device", lambda r: os.mknod(r / "home/null", 0o666 | stat.S_IFCHR,
                                              os.makedev(1, 3))),
    ("unlink the hard link", lambda r: os.unlink(r / "home/u/notes2")),
    ("rmdir of a dir left with whiteouts only", lambda r: (os.unlink(r / "srv/data/a"),
                                                           os.rmdir(r / "srv/data"))),
    ("mkdir over it again", lambda r: os.mkdir(r / "srv/data")),
    ("unlink a file in a lower dir then the dir", lambda r: (os.unlink(r / "opt/app/bin"),
                                                             os.rmdir(r / "opt/app"))),
    ("mkdir over an existing lower name", lambda r: os.mkdir(r / "etc/hosts.moved")),
    ("create O_EXCL over a lower file", lambda r: os.close(os.open(
        r / "etc/passwd.new", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))),
    ("open a missing file", lambda r: open(r / "etc/nothing").close()),
    ("unlink a directory", lambda r: os.unlink(r / "var/log")),
    ("rmdir a file", lambda r: os.rmdir(r / "etc/hosts.moved")),
    ("rename a dir over a file", lambda r: os.rename(r / "movedst", r / "etc/hosts.moved")),
    ("rename a file over a dir", lambda r: os.rename(r / "etc/hosts.moved", r / "movedst")),
    ("rename a dir into itself", lambda r: (os.mkdir(r / "selfdir"),
                                            os.rename(r / "selfdir", r / "selfdir/sub"))),
    ("rename a dir over a non-empty dir", lambda r: os.rename(r / "selfdir", r / "movedst")),
    ("rename a dir over an empty upper dir", lambda r: (os.mkdir(r / "emptyup"),
                                                        os.rename(r / "selfdir", r / "emptyup"))),
    ("hard link to a dir", lambda r: os.link(r / "emptyup", r / "emptyup.link")),
    ("rename a name onto another name of the same file",
     lambda r: (os.link(r / "etc/passwd.new", r / "etc/passwd.same"),
                os.rename(r / "etc/passwd.new", r / "etc/passwd.same"))),
    ("truncate a lower file by path", lambda r: os.truncate(r / "etc/passwd.same", 3)),
    ("symlink over a whiteout", lambda r: os.symlink("target", r / "var/log/old.log.2")),
    ("mkfifo over a whiteout", lambda r: (os.unlink(r / "usr/share/doc.none")
                                          if os.path.exists(r / "usr/share/doc.none") else None,
                                          os.mkfifo(r / "usr/share/doc"))),
    ("write through a handle held across a rename", lambda r: _held_write(r)),
    ("setxattr of an overlay xattr through the mount",
     lambda r: os.setxattr(r / "srv", "trusted.overlay.opaque", b"y")),
    ("getxattr of an overlay xattr through the mount",
     lambda r: os.getxattr(r / "emptydir", "trusted.overlay.opaque")),
    ("chown a lower symlink", lambda r: os.chown(r / "home/link", 7, 8, follow_symlinks=False)),
    ("copy up a lower dir by creating in it, then remove it all",
     lambda r: (_append(r / "var/log/new.log", "n"), _rm_tree(r / "var"))),
]


def _held_write(root: Path) -> None:
    fd = os.open(root / "home/u/notes", os.O_RDWR)
    try:
        os.rename(root / "home/u/notes", root / "home/notes.moved")
        os.pwrite(fd, b"through the held handle\n", 0)
    finally:
        os.close(fd)


def _pwrite(path: Path, data: bytes, offset: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


# With redirect_dir=on: merged and lower directories move, leaving redirects.
REDIRECT_STEPS: list[Step] = [
    ("rename a merged dir within its parent", lambda r: os.rename(r / "etc", r / "etc2")),
    ("rename a lower dir into another dir", lambda r: os.rename(r / "opt", r / "srv/opt")),
    ("rename a nested lower dir to the top", lambda r: os.rename(r / "usr/share",
                                                                r / "share2")),
    ("rename a redirected dir again", lambda r: os.rename(r / "etc2", r / "home/etc3")),
    ("rename a lower dir over an empty lower dir", lambda r: os.rename(r / "var/log",
                                                                      r / "movedst")),
    ("create in a redirected dir", lambda r: _append(r / "home/etc3/new", "new\n")),
    ("unlink in a redirected dir", lambda r: os.unlink(r / "home/etc3/motd")),
    ("append in a redirected dir", lambda r: _append(r / "srv/opt/app/bin", "# more\n")),
    ("rename a redirected dir back", lambda r: os.rename(r / "srv/opt", r / "opt")),
    ("mkdir where a dir moved away", lambda r: os.mkdir(r / "etc")),
    ("rename EXCHANGE of two merged dirs",
     lambda r: _rename2(r, "srv", "home", RENAME_EXCHANGE)),
    ("rename a dir into its own subdir", lambda r: os.rename(r / "share2", r / "share2/doc/x")),
    ("rename a merged dir over a non-empty dir", lambda r: os.rename(r / "srv", r / "share2")),
    ("remove a redirected tree", lambda r: _rm_tree(r / "share2")),
    ("rmdir of the moved-over dir's parent", lambda r: os.rmdir(r / "var")),
]


def run_steps(root: Path, steps: list[Step] = STEPS) -> list[tuple[str, str]]:
    """Run every step on the mount at *root*; the outcome of each: "ok" or an errno name."""
    results = []
    for title, step in steps:
        try:
            step(root)
            outcome = "ok"
        except OSError as e:
            outcome = errno.errorcode.get(e.errno or 0, str(e.errno))
        results.append((title, outcome))
    return results


@dataclass
class Run:
    """One mount's run of the scenario: its stack, each step's outcome, and what it left (the
    merged tree, the upper layer, and the upper layer's overlay xattrs)."""

    base: Path
    lowers: list[Path]
    outcomes: list[tuple[str, str]]
    merged: dict[bytes, Entry]
    upper: dict[bytes, Entry]
    marks: dict[str, dict[str, bytes]]
