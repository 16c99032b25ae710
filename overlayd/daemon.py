"""Daemon lifecycle: mount, daemonize with a readiness pipe, serve under trio, unmount.

Order matters (S3QL, borg): the fork happens before trio starts and before any thread exists.
The forked daemon mounts, serves, and proves the mount answers (a stat of the mountpoint from a
worker thread, served by its own loop) before it tells the waiting parent "ready"; the parent
then exits 0, or non-zero with the daemon's reason. Until ready, the daemon's stderr is the
readiness pipe, so anything libfuse prints reaches the user; afterwards fds 0-2 point at
/dev/null or the log file (podman waits for the mount program's stderr to close).
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import logging.handlers
import os
import resource
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import pyfuse3
import trio

from overlayd.constants import FSNAME, FUSE_SUBTYPE
from overlayd.fs import Operations
from overlayd.options import MountOptions
from overlayd.overlay import Overlay, open_layers

log = logging.getLogger(__name__)

READY_TOKEN = b"\0overlayd-ready\n"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass
class RunState:
    terminated_by_signal: bool = False
    failure: str | None = None
    ready_callbacks: list[Callable[[], None]] = field(default_factory=list)


def setup_logging(debug: bool, log_file: str | None, to_stderr: bool) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler: logging.Handler
    if log_file is not None:
        handler = logging.FileHandler(log_file)
    elif to_stderr:
        handler = logging.StreamHandler(sys.stderr)
    else:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)


def fuse_options(opts: MountOptions) -> set[str]:
    fopts = set(opts.fuse_options) | {"default_permissions", f"subtype={FUSE_SUBTYPE}"}
    if not any(o.startswith("fsname=") for o in fopts):
        fopts.add(f"fsname={FSNAME}")
    if os.geteuid() == 0:
        # Mounted by root, the overlay is for every user, as the kernel's is; the kernel
        # checks mode bits (default_permissions).
        fopts.add("allow_other")
        # libfuse adds nosuid,nodev unless told otherwise; the kernel's overlay mount has
        # neither, and a container's root filesystem needs setuid binaries and devices.
        if "nosuid" not in fopts:
            fopts.add("suid")
        if "nodev" not in fopts:
            fopts.add("dev")
    if not opts.writable:
        fopts.discard("rw")
        fopts.add("ro")
    return fopts


def sd_notify(message: bytes) -> None:
    """Tell systemd (Type=notify) about our state, if it is listening."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(message, address)
        except OSError as e:
            log.warning("cannot notify systemd at %s: %s", address, e)


def _raise_fd_limit() -> None:
    # Each directory node caches dir fds; give ourselves the room the hard limit allows.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _handle_signals(state: RunState) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s: unmounting", signal.Signals(signum).name)
            state.terminated_by_signal = True
            pyfuse3.terminate()


async def _announce_ready(mountpoint: bytes, dev_before: int, state: RunState) -> None:
    try:
        st = await trio.to_thread.run_sync(os.stat, mountpoint)
    except OSError as e:
        state.failure = f"the new mount does not answer: {e.strerror}"
    else:
        if st.st_dev == dev_before:
            state.failure = "the mountpoint does not show the new mount"
    if state.failure is not None:
        log.error("%s", state.failure)
        pyfuse3.terminate()
        return
    log.info("mounted at %s", os.fsdecode(mountpoint))
    for callback in state.ready_callbacks:
        callback()


async def _serve(mountpoint: bytes, dev_before: int, state: RunState) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_handle_signals, state)
        nursery.start_soon(_announce_ready, mountpoint, dev_before, state)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def serve(opts: MountOptions, mountpoint: bytes, state: RunState) -> int:
    """Mount and serve until unmounted or signalled. Returns the exit status."""
    os.umask(0)  # modes are the caller's, already masked by the kernel
    _raise_fd_limit()
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    layers = open_layers(opts)
    overlay = Overlay(opts, layers)
    dev_before = os.stat(mountpoint).st_dev
    pyfuse3.init(Operations(overlay), os.fsdecode(mountpoint), fuse_options(opts))
    clean = False
    try:
        trio.run(_serve, mountpoint, dev_before, state)
        clean = True
    finally:
        # Unmount only what we were asked to stop; after an external unmount the mountpoint
        # may already hold somebody else's mount.
        pyfuse3.close(unmount=state.terminated_by_signal or state.failure is not None
                      or not clean)
        overlay.close()
        sd_notify(b"STOPPING=1")
    if state.failure is not None:
        print(f"overlayd: {state.failure}", file=sys.stderr)
        return 1
    log.info("unmounted %s", os.fsdecode(mountpoint))
    return 0


def run_foreground(opts: MountOptions, mountpoint: bytes, debug: bool,
                   log_file: str | None) -> int:
    setup_logging(debug, log_file, to_stderr=True)
    state = RunState()
    state.ready_callbacks.append(lambda: sd_notify(b"READY=1"))
    return serve(opts, mountpoint, state)


def run_daemon(opts: MountOptions, mountpoint: bytes, debug: bool, log_file: str | None) -> int:
    """Fork a daemon; return 0 once its mount answers, 1 with its reason if it failed."""
    sys.stdout.flush()
    sys.stderr.flush()
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(rfd)
        code = 1
        try:
            code = _daemon_child(opts, mountpoint, debug, log_file, wfd)
        except BaseException as e:
            msg = f"overlayd: {e}\n" if str(e) else f"overlayd: {type(e).__name__}\n"
            with contextlib.suppress(OSError):
                os.write(2, msg.encode())
            logging.getLogger(__name__).exception("daemon failed")
        finally:
            os._exit(code)
    os.close(wfd)
    chunks = []
    with os.fdopen(rfd, "rb") as pipe:
        while chunk := pipe.read(4096):
            chunks.append(chunk)
    out = b"".join(chunks)
    if out.endswith(READY_TOKEN):
        sys.stderr.buffer.write(out[: -len(READY_TOKEN)])
        return 0
    _, status = os.waitpid(pid, 0)
    text = out.decode(errors="replace").strip()
    if not text:
        text = f"overlayd: the daemon exited with status {os.waitstatus_to_exitcode(status)}"
    print(text.splitlines()[-1] if text else text, file=sys.stderr)
    return 1


def _daemon_child(opts: MountOptions, mountpoint: bytes, debug: bool, log_file: str | None,
                  ready_fd: int) -> int:
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(ready_fd, 2)  # until ready, errors go to the waiting parent
    setup_logging(debug, log_file, to_stderr=False)
    if log_file is None and os.path.exists("/dev/log"):
        syslog = logging.handlers.SysLogHandler(address="/dev/log")
        syslog.setFormatter(logging.Formatter("overlayd[%(process)d]: %(levelname)s %(message)s"))
        logging.getLogger().addHandler(syslog)
    log_fd = (os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
              if log_file is not None else null)

    def ready() -> None:
        os.write(ready_fd, READY_TOKEN)
        os.dup2(log_fd, 2)
        os.close(ready_fd)
        os.chdir("/")

    state = RunState(ready_callbacks=[ready])
    return serve(opts, mountpoint, state)
