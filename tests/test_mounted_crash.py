"""Mounted tier: the daemon's bad days. kill -9 (the OOM killer), the dead mount it leaves, the
operator's `overlayd umount` and remount, a copy-up cut in half, and fsync'ed data.

A kill -9 of the daemon loses nothing the kernel already holds: overlayd has no cache of its
own (no writeback cache: every write reaches the upper file before write() returns), so these
tests prove that no state lives only in the daemon, that the on-disk layout is consistent at any
instant, and that recovery works. They cannot prove durability across a power loss (that needs a
machine that loses its page cache); what they can prove about it is that an fsync through the
mount reaches fsync(2) on the upper file and directory, which test_fsync_reaches_the_upper_layer
watches with strace.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from overlayd.daemon import runtime_dir
from tests.conftest import needs_fuse, needs_root
from tests.mounting import (
    mount_fstype,
    overlay_options,
    overlayd_argv,
    overlayd_mounted,
    poll,
)

pytestmark = [pytest.mark.mounted, needs_fuse]

MiB = 1 << 20
BIG = 256 * MiB
TEMP_PREFIX = "#overlayd."  # copyup.TEMP_PREFIX: the only names overlayd leaves in work/


def writable(stack: dict[str, Path], *extra: str) -> str:
    return ",".join([overlay_options([stack["lower1"], stack["lower2"]], stack["upper"],
                                     stack["work"]), *extra])


def kill9(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def assert_dead_mount(mnt: Path) -> None:
    """The mount outlives its daemon, and every request that reaches it answers ENOTCONN
    (what the kernel still caches, such as the root's attributes, it answers itself)."""
    assert mount_fstype(mnt) == "fuse.overlayd"
    for request in (lambda: os.listdir(mnt), lambda: os.stat(mnt / "never looked up")):
        with pytest.raises(OSError, match="Transport endpoint is not connected") as excinfo:
            request()
        assert excinfo.value.errno == errno.ENOTCONN


def overlayd_umount(mnt: Path) -> None:
    proc = subprocess.run(overlayd_argv("umount", str(mnt)), capture_output=True, text=True,
                          timeout=30, check=False)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert mount_fstype(mnt) is None


def status_of(mnt: Path) -> dict[str, object] | None:
    proc = subprocess.run(overlayd_argv("status", "--json"), capture_output=True, text=True,
                          timeout=30, check=True)
    entries = [e for e in json.loads(proc.stdout) if e["mountpoint"] == os.path.realpath(mnt)]
    assert len(entries) <= 1
    return entries[0] if entries else None


def temps(work: Path) -> list[str]:
    return sorted(n for n in os.listdir(work / "work") if n.startswith(TEMP_PREFIX))


def test_kill9_then_umount_and_remount(stack: dict[str, Path]) -> None:
    """kill -9: the mount answers ENOTCONN and status calls it dead; `overlayd umount` clears
    it; the next mount removes overlayd's workdir leftovers (nothing else) and shows the data."""
    (stack["lower2"] / "kept").write_bytes(b"lower\n")
    (stack["lower2"] / "changed").write_bytes(b"lower\n")
    (stack["lower2"] / "gone").write_bytes(b"lower\n")
    mnt = stack["mnt"]
    with overlayd_mounted(mnt, writable(stack)) as daemon:
        (mnt / "changed").write_bytes(b"upper\n")
        (mnt / "gone").unlink()
        (mnt / "new").write_bytes(b"new\n")
        status = status_of(mnt) or {}
        if runtime_dir() is not None:  # where status learns pids
            assert (status["pid"], status["state"]) == (daemon.proc.pid, "running")
        kill9(daemon.proc)
        assert_dead_mount(mnt)
        if runtime_dir() is not None:
            assert (status_of(mnt) or {})["state"] == "dead"
        # What a crash mid-copy-up leaves in the workdir, and what is not overlayd's.
        (stack["work"] / "work" / f"{TEMP_PREFIX}999.0").write_bytes(b"half a copy")
        (stack["work"] / "work" / f"{TEMP_PREFIX}999.1").mkdir()
        (stack["work"] / "work" / "not-ours").write_bytes(b"x")
        overlayd_umount(mnt)
        assert status_of(mnt) is None
    with overlayd_mounted(mnt, writable(stack)) as daemon:
        assert sorted(os.listdir(mnt)) == ["changed", "kept", "new"]
        assert (mnt / "changed").read_bytes() == b"upper\n"
        assert (mnt / "kept").read_bytes() == b"lower\n"
        assert (mnt / "new").read_bytes() == b"new\n"
        assert os.listdir(stack["work"] / "work") == ["not-ours"]
    assert "removing leftover" in daemon.log()


def write_pseudo_random(path: Path, size: int) -> hashlib._Hash:
    """A file of seeded pseudo-random bytes (no hole, no repeat: a truncated, shifted or
    zero-filled copy cannot match); returns its sha256 object."""
    digest = hashlib.sha256()
    rng = random.Random(6)
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            chunk = rng.randbytes(MiB)
            f.write(chunk)
            digest.update(chunk)
        f.flush()
        os.fsync(f.fileno())
        # Out of the page cache: the copy-up reads from disk, slow enough to be caught halfway.
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return digest


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


APPEND = (
    "import os, sys\n"
    "with open(sys.argv[1], 'ab') as f:  # the open copies the file up\n"
    "    f.write(b'NEW')\n"
    "    f.flush()\n"
    "    os.fsync(f.fileno())\n"
)


@pytest.mark.slow
def test_kill9_during_copy_up_publishes_nothing_partial(
        stack: dict[str, Path], children: list[subprocess.Popen[bytes]]) -> None:
    """kill -9 while a 256 MiB copy-up is being built: afterwards the file is the whole lower
    file or the whole new one, never a prefix; the half-built copy is removed at remount."""
    digest = write_pseudo_random(stack["lower2"] / "big", BIG)
    lower_sha = digest.hexdigest()
    digest.update(b"NEW")  # what the writer appends
    new_sha = digest.hexdigest()
    mnt = stack["mnt"]
    with overlayd_mounted(mnt, writable(stack)) as daemon:
        children.append(subprocess.Popen([sys.executable, "-c", APPEND, str(mnt / "big")],
                                       stderr=subprocess.PIPE))
        # Wait for the copy to be under way: a temporary in work/ that grows, then kill at once.
        # A tight loop, not poll(): the copy takes a fraction of a second.
        sizes: list[int] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            names = temps(stack["work"])
            if names:
                try:
                    size = os.stat(stack["work"] / "work" / names[0]).st_size
                except FileNotFoundError:
                    size = -1  # published (renamed) under our eyes
                sizes.append(size)
                if size < 0 or (len(sizes) >= 2 and 0 < sizes[-2] < size < BIG):
                    break
            elif children[0].poll() is not None:
                break
        kill9(daemon.proc)
        assert sizes, "no copy-up temporary ever appeared in the workdir"
        assert children[0].wait(timeout=30) != 0, "the writer finished before the kill"
        assert_dead_mount(mnt)
        published = (stack["upper"] / "big").exists()
        if published:
            assert sha256(stack["upper"] / "big") in (lower_sha, new_sha)
        else:
            # Killed halfway: the partial copy is only in work/, under overlayd's own name.
            left = temps(stack["work"])
            assert len(left) == 1
            assert os.stat(stack["work"] / "work" / left[0]).st_size < BIG, sizes
        overlayd_umount(mnt)
    with overlayd_mounted(mnt, writable(stack)):
        assert os.stat(mnt / "big").st_size in (BIG, BIG + 3)
        assert sha256(mnt / "big") in (lower_sha, new_sha)
        if not published:
            assert sha256(mnt / "big") == lower_sha
        assert temps(stack["work"]) == []
    assert sha256(stack["lower2"] / "big") == lower_sha  # the lower layer is never written


def test_fsynced_data_survives_kill9(stack: dict[str, Path]) -> None:
    """Data fsync'ed through the mount is there after kill -9, umount and remount: a changed
    lower file (copy-up, then fsync), and a new file in a new directory (fsync of the file and
    fsyncdir of its directory, which is what makes a new name durable). This shows presence
    after the daemon's death, not after a power loss: see the module docstring."""
    (stack["lower2"] / "dir").mkdir()
    (stack["lower2"] / "dir" / "old").write_bytes(b"0123456789")
    mnt = stack["mnt"]
    with overlayd_mounted(mnt, writable(stack)) as daemon:
        fd = os.open(mnt / "dir" / "old", os.O_RDWR)
        try:
            os.pwrite(fd, b"AB", 2)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.mkdir(mnt / "dir" / "sub")
        fd = os.open(mnt / "dir" / "sub" / "new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, b"fresh")
            os.fsync(fd)
        finally:
            os.close(fd)
        for directory in (mnt / "dir" / "sub", mnt / "dir"):
            dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)  # FUSE_FSYNCDIR
            finally:
                os.close(dfd)
        kill9(daemon.proc)
        assert_dead_mount(mnt)
        overlayd_umount(mnt)
    with overlayd_mounted(mnt, writable(stack)):
        assert (mnt / "dir" / "old").read_bytes() == b"01AB456789"
        assert (mnt / "dir" / "sub" / "new").read_bytes() == b"fresh"
    assert (stack["lower2"] / "dir" / "old").read_bytes() == b"0123456789"


# --- what an fsync through the mount does on the upper layer -----------------------------------

needs_strace = pytest.mark.skipif(shutil.which("strace") is None,
                                  reason="needs strace (Debian package strace)")


class SyscallWatch:
    """strace attached to a running daemon, recording its fsync-family calls with fd paths."""

    def __init__(self, pid: int, out: Path) -> None:
        self.out = out
        self.errors = out.with_suffix(".err")
        with open(self.errors, "wb") as err:
            self.proc = subprocess.Popen(
                ["strace", "-f", "-qq", "-y", "-e", "trace=fsync,fdatasync,syncfs,sync",
                 "-o", str(out), "-p", str(pid)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        # strace holds every thread of the daemon once its /proc/PID/status says TracerPid.
        poll(lambda: self._traced(pid), 30, f"strace to attach to {pid}")

    def _traced(self, pid: int) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"strace failed: {self.errors.read_text()}")
        tids = os.listdir(f"/proc/{pid}/task")
        for tid in tids:
            with open(f"/proc/{pid}/task/{tid}/status", encoding="ascii") as f:
                tracer = re.search(r"^TracerPid:\s+(\d+)$", f.read(), re.MULTILINE)
            if tracer is None or int(tracer.group(1)) != self.proc.pid:
                return False
        return True

    def stop(self) -> list[str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # detaches, the daemon runs on
        self.proc.wait(timeout=30)
        return self.out.read_text().splitlines()


@pytest.fixture
def strace_daemon(tmp_path: Path) -> Iterator[list[SyscallWatch]]:
    watches: list[SyscallWatch] = []
    try:
        yield watches
    finally:
        for watch in watches:
            if watch.proc.poll() is None:
                watch.proc.send_signal(signal.SIGINT)
                try:
                    watch.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    watch.proc.kill()
                    watch.proc.wait()


def fsync_through(mnt: Path) -> None:
    """fsync of a copied-up file, of a new file, and fsyncdir of its directory."""
    fd = os.open(mnt / "old", os.O_RDWR)
    try:
        os.pwrite(fd, b"x", 0)
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    fd = os.open(mnt / "new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, b"y")
        os.fsync(fd)
    finally:
        os.close(fd)
    dfd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def synced_paths(lines: list[str]) -> list[tuple[str, str]]:
    """(call, path of its fd) of each completed call in strace -y output."""
    found = []
    for line in lines:
        m = re.search(r"\b(fsync|fdatasync|syncfs)\(\d+<([^>]*)>\)\s+=\s+0", line)
        if m:
            found.append((m.group(1), m.group(2)))
    return found


@needs_root  # ptrace of the daemon
@needs_strace
def test_fsync_reaches_the_upper_layer(stack: dict[str, Path], tmp_path: Path,
                                       strace_daemon: list[SyscallWatch]) -> None:
    """fsync and fdatasync through the mount are fsync(2)/fdatasync(2) of the upper file,
    fsyncdir is fsync(2) of the upper directory: nothing is acknowledged unsynced."""
    (stack["lower2"] / "old").write_bytes(b"lower")
    with overlayd_mounted(stack["mnt"], writable(stack)) as daemon:
        watch = SyscallWatch(daemon.proc.pid, tmp_path / "strace.out")
        strace_daemon.append(watch)
        fsync_through(stack["mnt"])
        calls = synced_paths(watch.stop())
    upper = str(stack["upper"])
    assert ("fsync", f"{upper}/old") in calls, calls
    assert ("fdatasync", f"{upper}/old") in calls, calls
    assert ("fsync", f"{upper}/new") in calls, calls
    assert ("fsync", upper) in calls, calls


@needs_root
@needs_strace
@pytest.mark.parametrize("option", ["volatile", "fsync=0"])
def test_volatile_makes_fsync_a_no_op(stack: dict[str, Path], tmp_path: Path, option: str,
                                      strace_daemon: list[SyscallWatch]) -> None:
    """`volatile` (podman's --rm containers) and fuse-overlayfs's `fsync=0` trade durability
    away explicitly, as the kernel's volatile does: no sync call reaches the upper layer, not
    at copy-up and not for a caller's fsync."""
    (stack["lower2"] / "old").write_bytes(b"lower")
    with overlayd_mounted(stack["mnt"], writable(stack, option)) as daemon:
        watch = SyscallWatch(daemon.proc.pid, tmp_path / "strace.out")
        strace_daemon.append(watch)
        fsync_through(stack["mnt"])
        calls = synced_paths(watch.stop())
        assert (stack["mnt"] / "new").read_bytes() == b"y"
    assert calls == []
