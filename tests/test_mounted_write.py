"""Mounted tier: write-path behaviour that the kernel comparison cannot show."""

from __future__ import annotations

import mmap
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import needs_fuse, needs_root
from tests.mounting import overlay_options, overlayd_mounted

pytestmark = [pytest.mark.mounted, needs_fuse]

GiB = 1 << 30


def writable(stack: dict[str, Path]) -> str:
    return overlay_options([stack["lower1"], stack["lower2"]], stack["upper"], stack["work"])


def test_sparse_copy_up_stays_sparse(stack: dict[str, Path]) -> None:
    lower = stack["lower2"] / "sparse"
    with open(lower, "wb") as f:
        f.truncate(GiB)
        f.seek(GiB // 2)
        f.write(b"x" * 4096)
    lower_blocks = os.stat(lower).st_blocks
    with overlayd_mounted(stack["mnt"], writable(stack)):
        with open(stack["mnt"] / "sparse", "ab") as f:
            f.write(b"!")
        merged = os.stat(stack["mnt"] / "sparse")
        assert merged.st_size == GiB + 1
    upper = os.stat(stack["upper"] / "sparse")
    assert upper.st_size == GiB + 1
    # The data block, the appended byte's block, maybe metadata: nowhere near 1 GiB.
    assert upper.st_blocks * 512 <= lower_blocks * 512 + 64 * 1024
    with open(stack["upper"] / "sparse", "rb") as f:
        f.seek(GiB // 2 - 1)
        assert f.read(4098) == b"\0" + b"x" * 4096 + b"\0"


@needs_root
def test_chown_sends_no_getattr_first(stack: dict[str, Path]) -> None:
    """FUSE_HANDLE_KILLPRIV_V2, which our binding adds to the INIT reply: the kernel leaves the
    clearing of set-id bits to us, and stops asking for a file's attributes before each chown
    (fuse_setattr). -d logs every request as it arrives."""
    with overlayd_mounted(stack["mnt"], writable(stack), "-d") as daemon:
        path = stack["mnt"] / "f"
        path.write_bytes(b"x")
        ino = os.stat(path).st_ino  # fresh attributes: nothing else needs a GETATTR
        before = len(daemon.log())
        os.chown(path, 65534, -1)
        requests = [line.split(" request ", 1)[1] for line in daemon.log()[before:].splitlines()
                    if " request " in line]
    assert f"setattr({ino},)" in requests, requests
    assert f"getattr({ino},)" not in requests, requests


def test_reader_sees_bytes_of_a_later_copy_up(stack: dict[str, Path]) -> None:
    """The one deliberate difference from the kernel (whose old handle keeps the lower bytes)."""
    (stack["lower2"] / "f").write_bytes(b"lower bytes")
    with overlayd_mounted(stack["mnt"], writable(stack)):
        # The reader reads nothing before the copy-up, so its read reaches the daemon.
        reader = os.open(stack["mnt"] / "f", os.O_RDONLY)
        try:
            with open(stack["mnt"] / "f", "r+b") as writer:
                writer.write(b"UPPER")
            assert os.pread(reader, 100, 0) == b"UPPER bytes"
        finally:
            os.close(reader)
    assert (stack["lower2"] / "f").read_bytes() == b"lower bytes"


def test_handle_survives_copy_up_and_rename(stack: dict[str, Path]) -> None:
    (stack["lower2"] / "f").write_bytes(b"0123456789")
    with overlayd_mounted(stack["mnt"], writable(stack)):
        fd = os.open(stack["mnt"] / "f", os.O_RDWR)
        try:
            os.rename(stack["mnt"] / "f", stack["mnt"] / "g")
            os.pwrite(fd, b"ab", 0)
            os.fsync(fd)
            assert os.pread(fd, 100, 0) == b"ab23456789"
        finally:
            os.close(fd)
        assert (stack["mnt"] / "g").read_bytes() == b"ab23456789"
        assert not (stack["mnt"] / "f").exists()
    assert (stack["upper"] / "g").read_bytes() == b"ab23456789"
    assert stat.S_ISCHR(os.lstat(stack["upper"] / "f").st_mode)  # the whiteout left behind


@needs_root
def test_new_objects_belong_to_the_caller(stack: dict[str, Path]) -> None:
    shared = stack["lower2"] / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)
    (stack["lower2"] / "private").write_bytes(b"root only")
    os.chmod(stack["lower2"] / "private", 0o600)
    script = (
        "import os, sys\n"
        "os.chdir(sys.argv[1])  # pytest's temp dirs are 0700: enter before dropping root\n"
        "os.setgroups([]); os.setgid(2345); os.setuid(1234)\n"
        "m = '.'\n"
        "open(m + '/shared/mine', 'w').write('x')\n"
        "os.mkdir(m + '/shared/dir')\n"
        "os.symlink('t', m + '/shared/link')\n"
        "try:\n"
        "    open(m + '/private').read()\n"
        "except PermissionError:\n"
        "    print('EACCES')\n"
    )
    with overlayd_mounted(stack["mnt"], writable(stack)):
        out = subprocess.run([sys.executable, "-c", script, str(stack["mnt"])],
                             capture_output=True, text=True, check=True, timeout=30)
        assert out.stdout.strip() == "EACCES"  # default_permissions: the kernel checks modes
        for name in ("mine", "dir", "link"):
            st = os.lstat(stack["mnt"] / "shared" / name)
            assert (st.st_uid, st.st_gid) == (1234, 2345), name
    for name in ("mine", "dir", "link"):
        st = os.lstat(stack["upper"] / "shared" / name)
        assert (st.st_uid, st.st_gid) == (1234, 2345), name


def test_workdir_leftovers_removed_at_mount(stack: dict[str, Path]) -> None:
    work = stack["work"] / "work"
    work.mkdir()
    (work / "#overlayd.1.1").write_bytes(b"half a copy")
    (work / "#overlayd.1.2").mkdir()
    (work / "#overlayd.1.2" / "x").write_bytes(b"")
    (work / "#7").write_bytes(b"not ours")
    with overlayd_mounted(stack["mnt"], writable(stack)):
        assert sorted(os.listdir(work)) == ["#7"]


def test_remount_keeps_st_ino_of_copied_up_objects(stack: dict[str, Path]) -> None:
    (stack["lower2"] / "f").write_bytes(b"f")
    (stack["lower2"] / "d").mkdir()
    (stack["lower2"] / "d" / "g").write_bytes(b"g")
    names = ("f", "d", "d/g")
    with overlayd_mounted(stack["mnt"], writable(stack)):
        before = {n: os.lstat(stack["mnt"] / n).st_ino for n in names}
        with open(stack["mnt"] / "f", "ab") as f:
            f.write(b"!")
        os.chmod(stack["mnt"] / "d", 0o700)
        assert {n: os.lstat(stack["mnt"] / n).st_ino for n in names} == before
    # The copies are new inodes of the upper filesystem, with numbers of their own.
    assert os.lstat(stack["upper"] / "f").st_ino != before["f"]
    with overlayd_mounted(stack["mnt"], writable(stack)):
        assert {n: os.lstat(stack["mnt"] / n).st_ino for n in names} == before
        # The record is private: not listed, not readable through the mount.
        assert os.listxattr(stack["mnt"] / "f") == []


def test_appends_partial_pages_and_mmap_land_in_upper(stack: dict[str, Path]) -> None:
    """Every byte lands in the upper layer at the right offset: O_APPEND handles interleaved,
    a write-only handle writing across a page boundary, and mmap writes (what the kernel's
    writeback cache would change, were it turned on: see fs.py)."""
    (stack["lower2"] / "log").write_bytes(b"0123456789" * 1000)
    (stack["lower2"] / "page").write_bytes(b"a" * 10000)
    with overlayd_mounted(stack["mnt"], writable(stack)):
        mnt = stack["mnt"]
        first = os.open(mnt / "log", os.O_WRONLY | os.O_APPEND)
        second = os.open(mnt / "log", os.O_WRONLY | os.O_APPEND)
        try:
            for i in range(50):
                os.write(first if i % 2 else second, b"<%02d>" % i)
        finally:
            os.close(first)
            os.close(second)
        wo = os.open(mnt / "page", os.O_WRONLY)
        try:
            os.pwrite(wo, b"XY", 4095)  # straddles a page boundary of a cached-nowhere file
        finally:
            os.close(wo)
        with open(mnt / "page", "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
            m[0:3] = b"MAP"
            m.flush()
        expected_log = b"0123456789" * 1000 + b"".join(b"<%02d>" % i for i in range(50))
        assert (mnt / "log").read_bytes() == expected_log
        expected_page = b"MAP" + b"a" * 4092 + b"XY" + b"a" * (10000 - 4097)
        assert (mnt / "page").read_bytes() == expected_page
    assert (stack["upper"] / "log").read_bytes() == expected_log
    assert (stack["upper"] / "page").read_bytes() == expected_page
    assert (stack["lower2"] / "page").read_bytes() == b"a" * 10000


@needs_root
def test_capabilities_seen_set_and_removed_through_the_mount(stack: dict[str, Path]) -> None:
    """The kernel asks for security.capability before every write; the core answers from the
    xattr names it listed (overlay.py getxattr) and must forget them when xattrs change."""
    caps = bytes.fromhex("0100000200200000000000000000000000000000")  # v2: cap_net_raw
    (stack["lower2"] / "plain").write_bytes(b"x")
    (stack["lower2"] / "capped").write_bytes(b"y")
    os.setxattr(stack["lower2"] / "capped", "security.capability", caps)
    with overlayd_mounted(stack["mnt"], writable(stack)):
        mnt = stack["mnt"]
        assert os.getxattr(mnt / "capped", "security.capability") == caps
        with open(mnt / "plain", "ab") as f:
            f.write(b"more")  # the kernel asks, and learns there are none
        with pytest.raises(OSError, match="No data available"):
            os.getxattr(mnt / "plain", "security.capability")
        os.setxattr(mnt / "plain", "security.capability", caps)
        assert os.getxattr(mnt / "plain", "security.capability") == caps
        os.removexattr(mnt / "plain", "security.capability")
        with pytest.raises(OSError, match="No data available"):
            os.getxattr(mnt / "plain", "security.capability")
        os.setxattr(mnt / "plain", "security.capability", caps)
    assert os.getxattr(stack["upper"] / "plain", "security.capability") == caps
