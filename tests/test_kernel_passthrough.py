"""Passthrough (FOPEN_PASSTHROUGH, overlayd/openmodes.py): the kernel reads and writes an
upper file itself, without the daemon; a lower file stays with the daemon, but in a read-only
mount; and opens of every
kind on one file, mixed as the kernel would refuse them (EIO), give the kernel's overlay's
bytes. Root only: the kernel hands out backing files to CAP_SYS_ADMIN."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import needs_fuse, needs_kernel_overlay, needs_root
from tests.mounting import kernel_shows, mounted_pair, overlay_options, overlayd_mounted

pytestmark = [pytest.mark.kernel, pytest.mark.mounted, needs_kernel_overlay, needs_fuse,
              needs_root]


class Call(threading.Thread):
    """*fn* in a thread of its own, so that a call the stopped daemon would answer can hang."""

    def __init__(self, fn: Callable[[], bytes]) -> None:
        super().__init__(daemon=True)
        self.fn = fn
        self.result: bytes | None = None

    def run(self) -> None:
        self.result = self.fn()


def test_an_upper_file_is_read_and_written_without_the_daemon(tmp_path: Path) -> None:
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir()
    (lower / "below").write_bytes(b"lower bytes")
    with overlayd_mounted(mnt, overlay_options([lower], upper, work)) as daemon:
        (mnt / "made").write_bytes(b"0123456789")
        made = os.open(mnt / "made", os.O_RDWR)
        below = os.open(mnt / "below", os.O_RDONLY)
        try:
            os.pwrite(made, b"ab", 0)  # the kernel's first write asks for capabilities
            os.kill(daemon.proc.pid, signal.SIGSTOP)
            try:
                def write_and_read() -> bytes:
                    os.pwrite(made, b"passed", 2)
                    return os.pread(made, 20, 0)

                upper_io = Call(write_and_read)
                lower_io = Call(lambda: os.pread(below, 20, 0))
                for call in (upper_io, lower_io):
                    call.start()
                upper_io.join(10)
                lower_io.join(1)
                stopped = (upper_io.result, lower_io.is_alive())
            finally:
                os.kill(daemon.proc.pid, signal.SIGCONT)
            lower_io.join(10)
            assert stopped == (b"abpassed89", True)  # the lower read waited for the daemon
            assert lower_io.result == b"lower bytes"
        finally:
            os.close(made)
            os.close(below)
    assert (upper / "made").read_bytes() == b"abpassed89"


def test_a_read_only_mount_reads_every_layer_without_the_daemon(tmp_path: Path) -> None:
    """Nothing is copied up in a read-only mount, so a lower file's readers never move: every
    file is opened passthrough, the bottom layer's too."""
    top, bottom, mnt = (tmp_path / n for n in ("top", "bottom", "mnt"))
    for d in (top, bottom, mnt):
        d.mkdir()
    (top / "t").write_bytes(b"top bytes")
    (bottom / "b").write_bytes(b"bottom bytes")
    with overlayd_mounted(mnt, overlay_options([top, bottom])) as daemon:
        fds = [os.open(mnt / name, os.O_RDONLY) for name in ("t", "b")]
        try:
            os.kill(daemon.proc.pid, signal.SIGSTOP)
            try:
                reads = [Call(lambda fd=fd: os.pread(fd, 20, 0)) for fd in fds]
                for call in reads:
                    call.start()
                for call in reads:
                    call.join(10)
                stopped = [call.result for call in reads]
            finally:
                os.kill(daemon.proc.pid, signal.SIGCONT)
            for call in reads:
                call.join(10)
            assert stopped == [b"top bytes", b"bottom bytes"]
        finally:
            for fd in fds:
                os.close(fd)


MIXED = r"""
import mmap, os
out = []
r = os.open("f", os.O_RDONLY)  # the lower file, through the page cache
out.append(os.pread(r, 100, 0))
w = os.open("f", os.O_WRONLY)  # copies it up while the page-cache open stays open
os.pwrite(w, b"WRITE", 0)
out.append(os.pread(r, 100, 0))
rw = os.open("f", os.O_RDWR)
m = mmap.mmap(rw, 0)
m[5:10] = b"MMAP!"
m.flush()
m.close()
out.append(os.pread(r, 100, 0))
for fd in (r, w, rw):
    os.close(fd)
a = os.open("f", os.O_RDWR)  # nothing else open: passthrough
b = os.open("f", os.O_RDONLY)  # so this one must be too
os.pwrite(a, b"PASS", 10)
out.append(os.pread(b, 100, 0))
m = mmap.mmap(b, 0, prot=mmap.PROT_READ)
out.append(m[:])
m.close()
d = os.open("f", os.O_WRONLY | os.O_DIRECT)  # may not start passthrough, and must follow
os.pwrite(a, b"+", 14)
os.close(d)
for fd in (a, b):
    os.close(fd)
c = os.open("f", os.O_RDONLY)  # through the page cache again, after passthrough writes
out.append(os.pread(c, 100, 0))
os.truncate("f", 8)
out.append(os.pread(c, 100, 0))
out.append(os.stat("f").st_size)
print(out)
"""


def test_opens_of_every_kind_mixed_on_one_file(tmp_path: Path) -> None:
    def build(lowers: list[Path]) -> None:
        (lowers[0] / "f").write_bytes(b"lower file, twenty-nine bytes")

    outputs = []
    with mounted_pair(tmp_path, build, layers=1) as pair:
        for mnt in (pair.kernel, pair.ours):
            done = subprocess.run(["python3", "-c", MIXED], cwd=mnt, capture_output=True,
                                  text=True)
            outputs.append((done.returncode, done.stdout, done.stderr))
    kernel_shows(outputs[0][0] == 0 and "MMAP!PASS+" in outputs[0][1], str(outputs[0]))
    assert outputs[1] == outputs[0]


CACHED_THEN_PASSTHROUGH = r"""
import os
with open("f", "rb") as r:  # copied up below, then read through the page cache
    pass
w = os.open("f", os.O_WRONLY)
os.close(w)
out = []
r = os.open("f", os.O_RDONLY)
out.append(os.pread(r, 8192, 0)[4090:4100])
os.close(r)
a = os.open("f", os.O_RDWR)  # nothing else open: passthrough
os.pwrite(a, b"ZZZZ", 4094)
os.close(a)
c = os.open("f", os.O_RDONLY)  # through the page cache: the new bytes, not what it kept
out.append(os.pread(c, 8192, 0)[4090:4100])
os.close(c)
print(out)
"""


def test_a_page_cache_open_after_passthrough_writes_reads_them(tmp_path: Path) -> None:
    def build(lowers: list[Path]) -> None:
        (lowers[0] / "f").write_bytes(b"a" * 8192)

    outputs = []
    with mounted_pair(tmp_path, build, layers=1) as pair:
        for mnt in (pair.kernel, pair.ours):
            done = subprocess.run(["python3", "-c", CACHED_THEN_PASSTHROUGH], cwd=mnt,
                                  capture_output=True, text=True)
            outputs.append((done.returncode, done.stdout, done.stderr))
    kernel_shows(outputs[0] == (0, "[b'aaaaaaaaaa', b'aaaaZZZZaa']\n", ""), str(outputs[0]))
    assert outputs[1] == outputs[0]
