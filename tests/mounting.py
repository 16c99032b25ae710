"""Mounting helpers for the mounted test tiers.

Every helper here undoes what it did in ``finally``: an overlayd mount is unmounted with
``fusermount3 -u``, then ``-uz``, then its daemon (which the helper started itself) is terminated
and killed; a kernel overlay mount is unmounted with ``umount``, then ``umount -l``. Nothing waits
with a bare sleep: readiness is polled.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from overlayd import cli

FUSERMOUNT = "fusermount3"
READY_TIMEOUT = 30.0
NOBODY = 65534  # the uid and gid as_nobody runs as


def mount_fstype(mountpoint: Path) -> str | None:
    """The filesystem type mounted exactly at *mountpoint* (the top mount), or None."""
    return cli.mount_fstype(os.fsencode(os.path.realpath(mountpoint)))


def is_mounted(mountpoint: Path) -> bool:
    return mount_fstype(mountpoint) is not None


def poll(predicate: object, timeout: float, what: str) -> None:
    """Call *predicate* until it returns true, or fail after *timeout* seconds."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    delay = 0.005
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


@dataclass
class Daemon:
    """A foreground overlayd process this test started, and its log."""

    proc: subprocess.Popen[bytes]
    mountpoint: Path
    log_path: Path

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def overlayd_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "overlayd", *args]


def unmount_fuse(mountpoint: Path, proc: subprocess.Popen[bytes] | None) -> None:
    """Unmount a FUSE mount we made: -u, then -uz, then end our own daemon."""
    try:
        if is_mounted(mountpoint):
            subprocess.run([FUSERMOUNT, "-u", str(mountpoint)], check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if is_mounted(mountpoint):
            subprocess.run([FUSERMOUNT, "-uz", str(mountpoint)], check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finally:
        if proc is not None:
            try:
                proc.wait(timeout=10)  # a daemon exits once unmounted
            except subprocess.TimeoutExpired:
                stop_process(proc, 5)


def stop_process(proc: subprocess.Popen[bytes], grace: float) -> None:
    """End a process we started: SIGTERM, *grace* seconds to exit, then SIGKILL; reaped."""
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def check_log(text: str) -> None:
    """S3QL's checklogs: a warning or a traceback in the daemon's log fails the test."""
    bad = [line for line in text.splitlines()
           if " WARNING " in line or " ERROR " in line or " CRITICAL " in line
           or line.startswith("Traceback")]
    assert not bad, "daemon logged problems:\n" + text


@contextlib.contextmanager
def overlayd_mounted(mountpoint: Path, options: str, *extra: str,
                     check_logs: bool = True) -> Iterator[Daemon]:
    """Run ``overlayd mount -f -o OPTIONS MOUNTPOINT`` and yield once the mount answers."""
    argv = overlayd_argv("mount", "-f", *extra, "-o", options, str(mountpoint))
    with command_mounted(mountpoint, argv, check_logs=check_logs, log_name="overlayd",
                         what="overlayd") as daemon:
        yield daemon


@contextlib.contextmanager
def kernel_mounted(mountpoint: Path, options: str) -> Iterator[None]:
    """Mount the kernel's overlayfs with *options* (root only) and unmount it afterwards."""
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(mountpoint)],
                   check=True, capture_output=True)
    try:
        yield
    finally:
        if is_mounted(mountpoint):
            subprocess.run(["umount", str(mountpoint)], check=False, capture_output=True)
        if is_mounted(mountpoint):
            subprocess.run(["umount", "-l", str(mountpoint)], check=False, capture_output=True)


# The kernel's options pinned so the reference does not drift with module defaults.
KERNEL_PINNED = "redirect_dir=off,index=off,metacopy=off,xino=off"


def overlay_options(lowers: list[Path], upper: Path | None = None,
                    work: Path | None = None) -> str:
    opts = "lowerdir=" + ":".join(str(p) for p in lowers)
    if upper is not None:
        assert work is not None
        opts += f",upperdir={upper},workdir={work}"
    return opts


FUSE_OVERLAYFS = "fuse-overlayfs"


@contextlib.contextmanager
def fuse_overlayfs_mounted(mountpoint: Path, options: str) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``fuse-overlayfs -f -o OPTIONS MOUNTPOINT`` (the peer the differential fuzzer can
    measure) as our child and yield it once the mount answers; unmounted like overlayd's, and
    only the process started here is ever signalled."""
    log_path = mountpoint.parent / f".{mountpoint.name}.fuse-overlayfs.log"
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen([FUSE_OVERLAYFS, "-f", "-o", options, str(mountpoint)],
                                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"fuse-overlayfs exited with {proc.returncode}:\n"
                                   + log_path.read_text(errors="replace"))
            return mount_fstype(mountpoint) == "fuse.fuse-overlayfs"

        poll(ready, READY_TIMEOUT, f"fuse-overlayfs at {mountpoint}")
        os.stat(mountpoint)
        yield proc
    finally:
        unmount_fuse(mountpoint, proc)


@contextlib.contextmanager
def command_mounted(mountpoint: Path, argv: list[str], *, check_logs: bool = True,
                    log_name: str = "command", what: str = "") -> Iterator[Daemon]:
    """Run a foreground overlayd command line (overlayd_mounted's, or a wrapper script of the
    test's own that patches overlayd, then runs its main with ``mount -f ...``): yield once the
    mount answers, unmount in ``finally``, signalling only the process started here."""
    what = what or str(argv[:2])
    log_path = mountpoint.parent / f".{mountpoint.name}.{log_name}.log"
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
    daemon = Daemon(proc, mountpoint, log_path)
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode}:\n{daemon.log()}")
            return mount_fstype(mountpoint) == "fuse.overlayd"

        poll(ready, READY_TIMEOUT, f"{what} at {mountpoint}")
        os.stat(mountpoint)  # the first access answers
        yield daemon
    finally:
        unmount_fuse(mountpoint, proc)
    if check_logs:
        check_log(daemon.log())


def processes_mentioning(text: str) -> set[int]:
    """Pids of the live processes whose command line holds *text* (a test's unique temporary
    path): how a test finds a daemon it started, or one left behind, without naming programs."""
    found = set()
    needle = os.fsencode(text)
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in cmdline and state not in (b"Z", b"X"):
            found.add(int(entry))
    return found


Build = Callable[[list[Path]], None]  # writes the lower layers, top first


@dataclass
class Pair:
    """The same stack mounted by the kernel and by overlayd."""

    kernel: Path
    ours: Path
    kernel_upper: Path
    our_upper: Path


@contextlib.contextmanager
def mounted_pair(tmp_path: Path, build: Build, layers: int = 2) -> Iterator[Pair]:
    mounts = {}
    with contextlib.ExitStack() as stack:
        for kind in ("kernel", "overlayd"):
            base = tmp_path / kind
            lowers = [base / f"l{i}" for i in range(layers)]
            for path in (*lowers, base / "upper", base / "work", base / "mnt"):
                path.mkdir(parents=True)
            build(lowers)
            opts = overlay_options(lowers, base / "upper", base / "work")
            if kind == "kernel":
                stack.enter_context(kernel_mounted(base / "mnt", opts + "," + KERNEL_PINNED))
            else:
                stack.enter_context(overlayd_mounted(base / "mnt", opts))
            mounts[kind] = base
        yield Pair(mounts["kernel"] / "mnt", mounts["overlayd"] / "mnt",
                   mounts["kernel"] / "upper", mounts["overlayd"] / "upper")


def kernel_shows(condition: bool, what: str) -> None:
    """The reference itself: not an overlayd failure, so not covered by the xfail."""
    if not condition:
        pytest.fail(f"the kernel no longer does what this test expects: {what}")


def as_nobody(*argv: str) -> str:
    """Run *argv* as uid and gid 65534 without supplementary groups: "ok" or its error."""
    done = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                           "--clear-groups", *argv], capture_output=True, text=True)
    if done.returncode == 0:
        return "ok"
    return "denied" if "Permission denied" in done.stderr else done.stderr.strip()


def let_nobody_walk(tmp_path: Path) -> None:
    """Let others search *tmp_path* and its parents up to /tmp (pytest makes them 0700)."""
    os.chmod(tmp_path, 0o755)
    for parent in tmp_path.parents:
        if parent in (Path("/tmp"), Path("/")):
            break
        os.chmod(parent, os.stat(parent).st_mode | 0o005)


@contextlib.contextmanager
def nobody_pair(tmp_path: Path, build: Build) -> Iterator[Pair]:
    """mounted_pair of one lower layer, both mounts reachable by nobody (as_nobody)."""
    let_nobody_walk(tmp_path)
    with mounted_pair(tmp_path, build, layers=1) as both:
        for base in (both.kernel, both.ours):
            os.chmod(base.parent, 0o755)
        yield both
