"""Mounted tier: the daemon's life: readiness, daemon mode, signals, umount, read-only."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from overlayd.daemon import BUSY_POLL_US
from tests.conftest import needs_fuse
from tests.mounting import (
    READY_TIMEOUT,
    check_log,
    mount_fstype,
    overlay_options,
    overlayd_argv,
    overlayd_mounted,
    poll,
    unmount_fuse,
)

pytestmark = [pytest.mark.mounted, needs_fuse]


def daemons_serving(mountpoint: Path) -> list[int]:
    """Pids of overlayd processes whose command line names *mountpoint* (the ones we started)."""
    pids = []
    target = os.fsencode(str(mountpoint))
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if state != b"Z" and target in argv and any(b"overlayd" in a for a in argv):
            pids.append(int(entry))
    return pids


def test_daemon_mode_is_ready_on_return_and_umount_ends_it(stack: dict[str, Path]) -> None:
    (stack["lower1"] / "hello").write_text("hi\n")
    opts = overlay_options([stack["lower1"], stack["lower2"]], stack["upper"], stack["work"])
    mnt = stack["mnt"]
    log = stack["work"].parent / "daemon.log"
    proc = subprocess.run(overlayd_argv("mount", "--log", str(log), "-o", opts, str(mnt)),
                          capture_output=True, text=True, timeout=READY_TIMEOUT, check=False)
    try:
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == ""
        # No polling: the mount answers the moment `mount` has returned.
        assert (mnt / "hello").read_text() == "hi\n"
        assert mount_fstype(mnt) == "fuse.overlayd"
        assert daemons_serving(mnt), "no daemon serves the mount"
        umount = subprocess.run(overlayd_argv("umount", str(mnt)), capture_output=True,
                                text=True, timeout=30, check=False)
        assert umount.returncode == 0, umount.stderr
        assert mount_fstype(mnt) is None
        poll(lambda: not daemons_serving(mnt), 10, "the daemon to exit after umount")
    finally:
        unmount_fuse(mnt, None)
        for pid in daemons_serving(mnt):
            os.kill(pid, signal.SIGKILL)
    check_log(log.read_text())


@pytest.mark.parametrize("form", ["mount_program", "mount.fuse3"])
def test_other_argv_forms(stack: dict[str, Path], form: str) -> None:
    """`overlayd -o OPTS MNT`, as podman runs its mount_program (with its empty items and
    volatile), and `overlayd SOURCE MNT -o rw,...,dev,suid`, what mount.fuse3 runs for
    `mount -t fuse.overlayd`."""
    (stack["lower1"] / "f").write_text("x")
    opts = overlay_options([stack["lower1"]], stack["upper"], stack["work"])
    mnt = stack["mnt"]
    argv = (overlayd_argv("-o", opts + ",,volatile,", str(mnt)) if form == "mount_program"
            else overlayd_argv("overlay", str(mnt), "-o", "rw," + opts + ",dev,suid"))
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=READY_TIMEOUT,
                          check=False, stdin=subprocess.DEVNULL)
    try:
        assert proc.returncode == 0, proc.stderr
        assert (mnt / "f").read_text() == "x"
    finally:
        unmount_fuse(mnt, None)
        poll(lambda: not daemons_serving(mnt), 10, "the daemon to exit")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_and_exits_zero(stack: dict[str, Path], signum: int) -> None:
    opts = overlay_options([stack["lower1"], stack["lower2"]])
    with overlayd_mounted(stack["mnt"], opts) as daemon:
        daemon.proc.send_signal(signum)
        assert daemon.proc.wait(timeout=20) == 0
        assert mount_fstype(stack["mnt"]) is None


@pytest.mark.parametrize("busy_poll", ["", ",busy_poll=0", ",busy_poll=2000"])
def test_signal_under_load_unmounts_and_exits_zero(stack: dict[str, Path],
                                                   busy_poll: str) -> None:
    """The session loop serves a client that never pauses from one task, and leaves it to
    trio only every few requests: the signal must still be heard, however it waits."""
    (stack["lower1"] / "f").write_bytes(b"x")
    opts = overlay_options([stack["lower1"]], stack["upper"], stack["work"]) + busy_poll
    target = stack["mnt"] / "f"
    stop = threading.Event()
    served = [0]

    def client() -> None:
        while not stop.is_set():
            try:
                os.getxattr(target, "user.missing")
            except OSError as e:
                if e.errno != errno.ENODATA:
                    return  # unmounted: the name is gone from the empty directory below
            served[0] += 1

    with overlayd_mounted(stack["mnt"], opts) as daemon:
        thread = threading.Thread(target=client)
        thread.start()
        try:
            poll(lambda: served[0] >= 2000, 20, "the client's requests to be served")
            daemon.proc.send_signal(signal.SIGTERM)
            assert daemon.proc.wait(timeout=20) == 0
        finally:
            stop.set()
            thread.join()
        assert mount_fstype(stack["mnt"]) is None
        default = BUSY_POLL_US if len(os.sched_getaffinity(0)) > 1 else 0
        spin = busy_poll.partition("=")[2] or str(default)
        assert f"spinning up to {spin} us for the next request" in daemon.log()


def test_idle_daemon_stops_spinning(stack: dict[str, Path]) -> None:
    """After a burst of requests the session loop spins and polls for the next one, then
    sleeps in trio: a daemon left idle must use next to no CPU. A loop that never went back to
    sleep (checked with a binding whose poll never gives up) takes some 0.3 s of each second
    here with its 2 ms spin and 5 ms poll. A generous bound: this is about sleeping at all."""
    (stack["lower1"] / "f").write_bytes(b"x")
    opts = overlay_options([stack["lower1"]]) + ",busy_poll=2000"
    with overlayd_mounted(stack["mnt"], opts) as daemon:
        for _ in range(2000):
            with contextlib.suppress(OSError):
                os.getxattr(stack["mnt"] / "f", "user.missing")
        before = process_cpu_seconds(daemon.proc.pid)
        time.sleep(1.0)
        idle = process_cpu_seconds(daemon.proc.pid) - before
        assert idle < 0.1, f"the idle daemon used {idle:.2f} s of CPU in 1 s"


def process_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_read_only_without_upper(stack: dict[str, Path]) -> None:
    (stack["lower2"] / "f").write_text("x")
    with overlayd_mounted(stack["mnt"], overlay_options([stack["lower1"], stack["lower2"]])):
        mnt = stack["mnt"]
        for action in (lambda: (mnt / "new").write_text("y"),
                       lambda: (mnt / "f").write_text("y"),
                       lambda: (mnt / "f").unlink(),
                       lambda: (mnt / "d").mkdir()):
            with pytest.raises(OSError, match="Read-only file system") as excinfo:
                action()
            assert excinfo.value.errno == errno.EROFS
        assert (mnt / "f").read_text() == "x"


def test_umount_refuses_what_is_not_overlayd(tmp_path: Path) -> None:
    proc = subprocess.run(overlayd_argv("umount", str(tmp_path)), capture_output=True,
                          text=True, timeout=30, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"overlayd: {tmp_path}: not mounted"


def test_bad_input_mounts_nothing(stack: dict[str, Path]) -> None:
    opts = overlay_options([stack["lower1"], stack["work"].parent / "missing"])
    proc = subprocess.run(overlayd_argv("mount", "-o", opts, str(stack["mnt"])),
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1
    assert "missing: No such file or directory" in proc.stderr
    assert mount_fstype(stack["mnt"]) is None
    assert not daemons_serving(stack["mnt"])


def test_debug_logs_requests(stack: dict[str, Path]) -> None:
    (stack["lower1"] / "f").write_text("x")
    with (overlayd_mounted(stack["mnt"], overlay_options([stack["lower1"]]), "-d") as daemon,
          pytest.raises(FileNotFoundError)):
        os.stat(stack["mnt"] / "absent")
    assert "DEBUG" in daemon.log()
