"""POSIX ACLs through the mount, against the kernel's overlayfs: who may open a file, and what
mode and ACLs a new object gets (default ACLs, umask).

The kernel's overlay checks the real inode's ACLs. overlayd asks the kernel for FUSE_POSIX_ACL,
so the kernel checks the ACLs it reads through overlayd; without it, the mode bits alone
decided, and a user an ACL denied could read the file.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import needs_fuse, needs_kernel_overlay
from tests.mounting import (
    NOBODY,
    Pair,
    as_nobody,
    kernel_shows,
    let_nobody_walk,
    nobody_pair,
    overlay_options,
    overlayd_mounted,
)

pytestmark = [pytest.mark.kernel, pytest.mark.mounted, needs_kernel_overlay, needs_fuse]

ACCESS, DEFAULT = "system.posix_acl_access", "system.posix_acl_default"
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
UNDEFINED_ID = 0xFFFFFFFF


def acl(*entries: tuple[int, int, int]) -> bytes:
    """A POSIX ACL as its xattr value: version 2, then (tag, perm, id) entries, sorted."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, ident)
                                           for tag, perm, ident in sorted(entries))


def file_acl(owner: int, group: int, other: int, nobody: int) -> bytes:
    """An access ACL: the owner, group and other permissions, plus nobody's, with a mask that
    grants what nobody's entry and the group ask for."""
    return acl((USER_OBJ, owner, UNDEFINED_ID), (USER, nobody, NOBODY),
               (GROUP_OBJ, group, UNDEFINED_ID), (MASK, group | nobody, UNDEFINED_ID),
               (OTHER, other, UNDEFINED_ID))


def _acl_files(lowers: list[Path]) -> None:
    top = lowers[0]
    os.chmod(top, 0o755)
    os.chmod(top.parent, 0o755)
    cases = {
        # mode 0600, and an ACL that lets nobody read
        "granted": (0o600, file_acl(6, 0, 0, nobody=4)),
        # mode 0644, and an ACL that denies nobody what "other" would give
        "denied": (0o644, file_acl(6, 4, 4, nobody=0)),
        # the ACL's mask caps the named entry: rw- for nobody, masked to ---
        "masked": (0o600, acl((USER_OBJ, 6, UNDEFINED_ID), (USER, 6, NOBODY),
                              (GROUP_OBJ, 0, UNDEFINED_ID), (MASK, 0, UNDEFINED_ID),
                              (OTHER, 0, UNDEFINED_ID))),
        "plain": (0o644, None),
    }
    for name, (mode, value) in cases.items():
        path = top / name
        path.write_bytes(f"{name}\n".encode())
        os.chmod(path, mode)
        if value is not None:
            os.setxattr(path, ACCESS, value)
    (top / "dflt").mkdir(mode=0o755)
    (top / "dflt" / "was-file").write_bytes(b"lower\n")
    (top / "dflt" / "was-dir").mkdir()
    os.setxattr(top / "dflt", DEFAULT, file_acl(7, 5, 0, nobody=5))
    (top / "nodflt").mkdir(mode=0o755)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    with nobody_pair(tmp_path, _acl_files) as both:
        yield both


def mounts(pair: Pair) -> dict[str, Path]:
    return {"kernel": pair.kernel, "overlayd": pair.ours}


def test_acls_decide_who_may_read(pair: Pair) -> None:
    results = {kind: {name: as_nobody("cat", str(mnt / name))
                      for name in ("granted", "denied", "masked", "plain")}
               for kind, mnt in mounts(pair).items()}
    kernel_shows(results["kernel"] == {"granted": "ok", "denied": "denied", "masked": "denied",
                                       "plain": "ok"}, f"ACL checks: {results['kernel']}")
    assert results["overlayd"] == results["kernel"]


def test_an_acl_set_through_the_mount_takes_effect_at_once(pair: Pair) -> None:
    results = {}
    for kind, mnt in mounts(pair).items():
        before = as_nobody("cat", str(mnt / "plain"))
        os.setxattr(mnt / "plain", ACCESS, file_acl(6, 4, 4, nobody=0))
        denied = as_nobody("cat", str(mnt / "plain"))
        os.removexattr(mnt / "plain", ACCESS)
        results[kind] = [before, denied, as_nobody("cat", str(mnt / "plain")),
                         oct(os.stat(mnt / "plain").st_mode)]
    kernel_shows(results["kernel"][:3] == ["ok", "denied", "ok"], f"{results['kernel']}")
    assert results["overlayd"] == results["kernel"]


def snapshot(path: Path) -> tuple[str, bytes | None, bytes | None]:
    """Mode and ACLs of *path*."""
    def xattr(name: str) -> bytes | None:
        try:
            return os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            return None
    return oct(os.lstat(path).st_mode), xattr(ACCESS), xattr(DEFAULT)


@pytest.mark.parametrize("umask", [0o022, 0o077])
@pytest.mark.parametrize("where", ["dflt", "nodflt", "."])
def test_new_objects_get_default_acls_or_the_umask(pair: Pair, umask: int, where: str) -> None:
    """A directory with a default ACL hands it down and the umask is not applied; elsewhere
    the umask is, as the kernel's overlay leaves both to the upper filesystem."""
    results = {}
    old = os.umask(umask)
    try:
        for kind, mnt in mounts(pair).items():
            parent = mnt / where
            with open(parent / "f", "w"):
                pass
            os.mkdir(parent / "d", 0o777)
            os.mknod(parent / "p", stat.S_IFIFO | 0o666)
            results[kind] = [snapshot(parent / n) for n in ("f", "d", "p")]
    finally:
        os.umask(old)
    if where == "nodflt":
        kernel_shows([m for m, _, _ in results["kernel"]] == [
            oct(stat.S_IFREG | 0o666 & ~umask), oct(stat.S_IFDIR | 0o777 & ~umask),
            oct(stat.S_IFIFO | 0o666 & ~umask)], f"umask {oct(umask)}: {results['kernel']}")
    if where == "dflt":
        kernel_shows(results["kernel"][1][2] is not None, "a new directory inherits the default")
    assert results["overlayd"] == results["kernel"]
    # The upper layers hold the same: modes and ACLs on disk.
    uppers = {kind: [snapshot(upper / where / n) for n in ("f", "d", "p")]
              for kind, upper in (("kernel", pair.kernel_upper), ("overlayd", pair.our_upper))}
    assert uppers["overlayd"] == uppers["kernel"]


def test_objects_made_over_whiteouts_get_the_default_acl(pair: Pair) -> None:
    """A name deleted from a lower layer leaves a whiteout; what is made there later is built
    in the workdir and exchanged with it, and still gets the parent's default ACL, without
    the umask (the kernel's ovl_create_over_whiteout)."""
    results = {}
    old = os.umask(0o077)
    try:
        for kind, mnt in mounts(pair).items():
            os.unlink(mnt / "dflt" / "was-file")
            os.rmdir(mnt / "dflt" / "was-dir")
            with open(mnt / "dflt" / "was-file", "w"):
                pass
            os.mkdir(mnt / "dflt" / "was-dir", 0o777)
            results[kind] = [snapshot(mnt / "dflt" / n) for n in ("was-file", "was-dir")]
    finally:
        os.umask(old)
    kernel_shows(results["kernel"][0][0] == oct(stat.S_IFREG | 0o640),
                 f"the default ACL, not the umask: {results['kernel']}")
    assert results["overlayd"] == results["kernel"]
    uppers = {kind: [snapshot(upper / "dflt" / n) for n in ("was-file", "was-dir")]
              for kind, upper in (("kernel", pair.kernel_upper), ("overlayd", pair.our_upper))}
    assert uppers["overlayd"] == uppers["kernel"]
    assert not [p for p in (pair.our_upper.parent / "work" / "work").iterdir()], \
        "the workdir keeps nothing"


def test_chmod_of_a_file_with_an_acl_moves_its_mask(pair: Pair) -> None:
    results = {}
    for kind, mnt in mounts(pair).items():
        os.chmod(mnt / "granted", 0o600)  # the group bits are the mask: nobody loses read
        after = [snapshot(mnt / "granted"), as_nobody("cat", str(mnt / "granted"))]
        os.chmod(mnt / "granted", 0o640)
        results[kind] = [*after, snapshot(mnt / "granted"), as_nobody("cat", str(mnt / "granted"))]
    kernel_shows(results["kernel"][1] == "denied" and results["kernel"][3] == "ok",
                 f"chmod moves the mask: {results['kernel']}")
    assert results["overlayd"] == results["kernel"]


def test_noacl_leaves_the_mode_bits_alone_to_decide(tmp_path: Path) -> None:
    """fuse-overlayfs's noacl, which rootless engines may pass: the kernel checks modes only."""
    let_nobody_walk(tmp_path)
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for path in (lower, upper, work, mnt):
        path.mkdir(mode=0o755)
    _acl_files([lower])
    opts = overlay_options([lower], upper, work)
    with overlayd_mounted(mnt, opts + ",noacl"):
        results = {name: as_nobody("cat", str(mnt / name)) for name in ("granted", "denied")}
    assert results == {"granted": "denied", "denied": "ok"}
