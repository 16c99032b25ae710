"""Daemon lifecycle: mount, daemonize with a readiness pipe, serve under trio, unmount.

Order matters (S3QL, borg): the fork happens before trio starts and before any thread exists.
The forked daemon mounts, serves, and proves the mount answers (a stat of the mountpoint from a
worker thread, served by its own loop) before it tells the waiting parent "ready"; the parent
then exits 0, or non-zero with the daemon's reason. Until ready, the daemon's stderr is the
readiness pipe, so anything libfuse prints reaches the user; afterwards fds 0-2 point at
/dev/null or the log file (podman waits for the mount program's stderr to close).

Only the foreground form talks to systemd (READY=1 once the mount answers, STOPPING=1 when it
starts to leave): the forked form drops NOTIFY_SOCKET, since whoever ran it (podman under a
Type=notify unit) owns that socket. SIGTERM and SIGINT unmount, SIGHUP reopens the log file.
While serving, a small JSON state file (pid, mountpoint, layers) lives in the runtime directory
for ``overlayd status``; it is removed on the way out, and by ``overlayd umount`` after a crash.
Everything runs in the trio thread but the readiness stat.
"""

from __future__ import annotations

import contextlib
import faulthandler
import fcntl
import hashlib
import json
import logging
import logging.handlers
import os
import resource
import signal
import socket
import sys
import tempfile
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyfuse3
import trio

from overlayd import __version__
from overlayd.constants import FSNAME, FUSE_SUBTYPE
from overlayd.errors import MountError
from overlayd.fs import Operations
from overlayd.options import MountOptions, shown
from overlayd.overlay import Overlay, open_layers

log = logging.getLogger(__name__)

READY_TOKEN = b"\0overlayd-ready\n"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


# Where running daemons describe themselves for `overlayd status`.
ROOT_RUNTIME_DIR = "/run/overlayd"


@dataclass
class RunState:
    terminated_by_signal: bool = False
    failure: str | None = None
    ready_callbacks: list[Callable[[], None]] = field(default_factory=list)
    notify: bool = False  # talk to systemd over $NOTIFY_SOCKET (foreground only)
    stopping: bool = False  # STOPPING=1 sent
    log_file: str | None = None
    stderr_is_log: bool = False  # fd 2 is the log file: reopened with it on SIGHUP
    state_file: str | None = None


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


def reopen_log(state: RunState) -> None:
    """SIGHUP: reopen the log file under its name (after logrotate moved the old one away)."""
    if state.log_file is None:
        log.info("SIGHUP: no log file to reopen")
        return
    for handler in logging.getLogger().handlers:
        if not isinstance(handler, logging.FileHandler):
            continue
        try:
            # The handler owns and closes it.
            stream = open(handler.baseFilename, "a", encoding=handler.encoding)  # noqa: SIM115
        except OSError as e:
            log.warning("SIGHUP: cannot reopen %s, keeping the old one: %s",
                        handler.baseFilename, e)
            return
        old = handler.setStream(stream)
        if old is not None:
            old.close()
    if state.stderr_is_log:
        with contextlib.suppress(OSError):
            fd = os.open(state.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                         0o640)
            os.dup2(fd, 2)
            os.close(fd)
    log.info("SIGHUP: reopened the log file %s", state.log_file)


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


def _notify_stopping(state: RunState) -> None:
    if state.notify and not state.stopping:
        state.stopping = True
        sd_notify(b"STOPPING=1")


# --- the state file read by `overlayd status` --------------------------------------------------

def runtime_dir() -> str | None:
    """The directory of state files: /run/overlayd for root, $XDG_RUNTIME_DIR/overlayd else."""
    if os.geteuid() == 0:
        return ROOT_RUNTIME_DIR
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(xdg, "overlayd") if xdg else None


def state_file_name(mountpoint: bytes) -> str:
    """The state file's name: the mountpoint, %-quoted, unless that is too long for a name."""
    name = urllib.parse.quote_from_bytes(mountpoint, safe=b"")
    if len(name) > 200:
        name = hashlib.sha256(mountpoint).hexdigest()
    return name + ".json"


def _proc_stat(pid: int) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name (field 3 on), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None


def proc_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (/proc/PID/stat field 22): tells a reused pid."""
    fields = _proc_stat(pid)
    return None if fields is None else int(fields[19])


def proc_state(pid: int) -> str | None:
    """The process's state letter (R, S, D, T, Z, ...), or None if there is no such process."""
    fields = _proc_stat(pid)
    return None if fields is None else fields[0].decode()


def write_state(opts: MountOptions, real: bytes, log_file: str | None) -> str | None:
    """Describe this daemon in the runtime directory; returns the file written, if any.

    *real* is the mountpoint as /proc/self/mountinfo shows it, resolved before the mount: never
    look the path up once mounted, from the one thread that serves it (a lookup the kernel
    has not cached would wait for our own answer forever).
    """
    directory = runtime_dir()
    if directory is None:
        return None
    pid = os.getpid()
    info: dict[str, Any] = {
        "pid": pid,
        "start_time": proc_start_time(pid),
        "mountpoint": os.fsdecode(real),
        "lowerdirs": [os.fsdecode(d) for d in opts.lowerdirs],
        "upperdir": None if opts.upperdir is None else os.fsdecode(opts.upperdir),
        "workdir": None if opts.workdir is None else os.fsdecode(opts.workdir),
        "writable": opts.writable,
        "fsync": opts.fsync,
        "redirect_dir": opts.redirect_dir,
        "fuse_options": sorted(fuse_options(opts)),
        "log_file": log_file,
        "version": __version__,
    }
    path = os.path.join(directory, state_file_name(real))
    tmp = f"{path}.{pid}.tmp"
    try:
        os.makedirs(directory, mode=0o755 if os.geteuid() == 0 else 0o700, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except OSError as e:
        log.warning("cannot write the state file %s: %s", path, e)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return None
    _remove_stale_states(directory)
    return path


def _remove_stale_states(directory: str) -> None:
    """Remove the state files of daemons that died (kill -9) and whose mount is gone."""
    from overlayd.cli import mounts  # the one mountinfo parser; cli imports us lazily only

    mounted = {point for point, _ in mounts()}
    for path, info in read_states():
        if os.path.dirname(path) == directory and not daemon_alive(info) \
                and os.fsencode(info["mountpoint"]) not in mounted:
            remove_state(path, pid=info["pid"])


def read_state(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not isinstance(info.get("pid"), int) \
            or not isinstance(info.get("mountpoint"), str):
        return None
    return info


def read_states() -> list[tuple[str, dict[str, Any]]]:
    """Every state file in our runtime directory, then root's (a user sees root's mounts too),
    with its path."""
    found = []
    directories = [runtime_dir(), ROOT_RUNTIME_DIR]
    for directory in dict.fromkeys(d for d in directories if d is not None):
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for name in names:
            if not name.endswith(".json"):
                continue
            path = os.path.join(directory, name)
            info = read_state(path)
            if info is not None:
                found.append((path, info))
    return found


def daemon_alive(info: dict[str, Any]) -> bool:
    """Whether the process a state file names still runs (and is the same process)."""
    pid = info["pid"]
    state = proc_state(pid)
    if state is None or state in ("Z", "X"):
        return False
    return info.get("start_time") in (None, proc_start_time(pid))


def remove_state(path: str, *, pid: int | None = None) -> None:
    """Remove a state file; with *pid*, only while it still names that process."""
    if pid is not None:
        info = read_state(path)
        if info is None or info["pid"] != pid:
            return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:  # root's, seen by a user
        log.debug("cannot remove the state file %s: %s", path, e)


def _raise_fd_limit() -> None:
    # Each directory node caches dir fds; give ourselves the room the hard limit allows.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def lock_layers(opts: MountOptions) -> list[int]:
    """Hold the upper and work directories for this daemon's life (an exclusive flock on each;
    the caller closes the fds returned). A second overlayd on them would clean the first one's
    copy-ups in progress out of work/ and race it in the upper layer; the kernel marks its
    layers in use the same way. The kernel drops a flock however its holder ends, so the
    workdir of a crashed mount is free again at once."""
    fds: list[int] = []
    try:
        for what, path in (("upperdir", opts.upperdir), ("workdir", opts.workdir)):
            if path is None:
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                continue  # open_overlay says why, in its words
            fds.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise MountError(f"{what} {shown(path)} is in use by another overlayd "
                                 f"mount") from None
            except OSError as e:  # ENOLCK: NFS without a lock manager
                log.warning("cannot lock %s %s (%s): a second mount of it would not be "
                            "refused", what, shown(path), e.strerror)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def open_overlay(opts: MountOptions) -> Overlay:
    """Open the layers and the workdir (cleaning what a crashed mount left there)."""
    try:
        return Overlay(opts, open_layers(opts))
    except OSError as e:
        where = "" if e.filename is None else f"{shown(e.filename)}: "
        raise MountError(f"cannot open the layers: {where}{e.strerror}") from None


def init_fuse(operations: Operations, mountpoint: bytes, options: set[str]) -> None:
    """pyfuse3.init, with what libfuse and fusermount3 print on failure made the one line of
    our error (pyfuse3 itself only says "fuse_session_mount failed")."""
    with tempfile.TemporaryFile() as captured:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(captured.fileno(), 2)
            try:
                pyfuse3.init(operations, os.fsdecode(mountpoint), options)
            finally:
                os.dup2(saved, 2)
        except RuntimeError as e:
            captured.seek(0)
            said = [line.strip() for line in captured.read().decode(errors="replace")
                    .splitlines() if line.strip()]
            raise MountError(f"cannot mount at {shown(mountpoint)}: "
                             f"{'; '.join(said) or e}") from None
        finally:
            os.close(saved)
        captured.seek(0)
        warnings = captured.read()
    if warnings:
        sys.stderr.buffer.write(warnings)
        sys.stderr.flush()


async def _handle_signals(state: RunState) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                reopen_log(state)
                continue
            log.info("received %s: unmounting", signal.Signals(signum).name)
            state.terminated_by_signal = True
            _notify_stopping(state)
            pyfuse3.terminate()


async def _announce_ready(mountpoint: bytes, dev_before: int, state: RunState) -> None:
    failure: str | None = None
    for delay in (0.0, 0.05, 0.1, 0.2, 0.4, 0.8):
        # Rarely (seen once in a fuzz run, right after another mount left the same
        # directory) the first stat still shows the directory underneath: ask again.
        await trio.sleep(delay)
        try:
            st = await trio.to_thread.run_sync(os.stat, mountpoint)
        except OSError as e:
            failure = f"the new mount does not answer: {e.strerror}"
            break
        if st.st_dev != dev_before:
            failure = None
            break
        failure = "the mountpoint does not show the new mount"
        log.debug("%s yet", failure)
    state.failure = state.failure or failure
    if state.failure is not None:
        log.error("%s", state.failure)
        pyfuse3.terminate()
        return
    log.info("mounted at %s", os.fsdecode(mountpoint))
    for callback in state.ready_callbacks:
        callback()


# How long the session loop spins for the next request after serving one, before it sleeps:
# a client that just had its answer usually sends the next request within microseconds, and
# waking a sleeping daemon costs more than a whole request (measured on a 2-CPU VM: 20,000
# getxattr took 67 us each with the daemon asleep between them, 22 us with a 30 us spin).
# After 8 spins in a row found nothing, it pauses for the next 64 waits (the binding's
# SPIN_MISSES_MAX and SPIN_PAUSE), so a client that cannot run while we spin (more runnable
# tasks than CPUs) costs little. With one CPU the spin would only delay the client: off.
BUSY_POLL_US = 50


def busy_poll_us(opts: MountOptions) -> int:
    if opts.busy_poll is not None:
        return opts.busy_poll
    return BUSY_POLL_US if len(os.sched_getaffinity(0)) > 1 else 0


async def _serve(mountpoint: bytes, dev_before: int, state: RunState, spin_us: int) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_handle_signals, state)
        nursery.start_soon(_announce_ready, mountpoint, dev_before, state)
        if "sole_reader" in getattr(pyfuse3, "OVERLAYD_FEATURES", ()):
            # One task reads /dev/fuse and serves each request in turn: our handlers never
            # await, so more tasks would only add task switches (scripts/pyfuse3-3.5.0.patch).
            log.info("one reader serves /dev/fuse, spinning up to %d us for the next request",
                     spin_us)
            await pyfuse3.main(sole_reader=True,  # type: ignore[call-arg,unused-ignore]
                               spin_us=spin_us)
        else:
            log.info("pyfuse3 is not overlayd's patched build: its own session loop serves")
            await pyfuse3.main(min_tasks=1, max_tasks=1)
        nursery.cancel_scope.cancel()


def serve(opts: MountOptions, mountpoint: bytes, state: RunState) -> int:
    """Mount and serve until unmounted or signalled. Returns the exit status."""
    os.umask(0)  # modes are given in full; a create applies the caller's umask (_publish)
    # Until the signal receiver runs, a SIGHUP (a log rotation) must not end the daemon.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _raise_fd_limit()
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    locks = lock_layers(opts)  # before the workdir is cleaned
    try:
        return _serve_locked(opts, mountpoint, state)
    finally:
        for fd in locks:
            os.close(fd)


def _serve_locked(opts: MountOptions, mountpoint: bytes, state: RunState) -> int:
    overlay = open_overlay(opts)
    try:
        dev_before = os.stat(mountpoint).st_dev
        real_mountpoint = os.path.realpath(mountpoint)  # not once mounted: see write_state
        init_fuse(Operations(overlay), mountpoint, fuse_options(opts))
    except BaseException:
        overlay.close()
        raise

    def describe() -> None:
        state.state_file = write_state(opts, real_mountpoint, state.log_file)

    state.ready_callbacks.insert(0, describe)  # before anyone hears "ready"
    clean = False
    try:
        trio.run(_serve, mountpoint, dev_before, state, busy_poll_us(opts))
        clean = True
    finally:
        # Unmount only what we were asked to stop; after an external unmount the mountpoint
        # may already hold somebody else's mount.
        _notify_stopping(state)
        pyfuse3.close(unmount=state.terminated_by_signal or state.failure is not None
                      or not clean)
        overlay.close()
        if state.state_file is not None:
            remove_state(state.state_file, pid=os.getpid())
    if state.failure is not None:
        print(f"overlayd: {state.failure}", file=sys.stderr)
        return 1
    log.info("unmounted %s", os.fsdecode(mountpoint))
    return 0


def run_foreground(opts: MountOptions, mountpoint: bytes, debug: bool,
                   log_file: str | None) -> int:
    setup_logging(debug, log_file, to_stderr=True)
    state = RunState(notify=True, log_file=log_file)
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
            # The parent shows the last line it reads: the traceback goes to the log first.
            logging.getLogger(__name__).exception("daemon failed")
            msg = f"overlayd: {e}\n" if str(e) else f"overlayd: {type(e).__name__}\n"
            with contextlib.suppress(OSError):
                os.write(2, msg.encode(errors="backslashreplace"))
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
    # The socket belongs to whoever ran us (podman under a Type=notify unit, say): our
    # READY=1 or STOPPING=1 would be taken for theirs.
    os.environ.pop("NOTIFY_SOCKET", None)
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

    state = RunState(ready_callbacks=[ready], log_file=log_file,
                     stderr_is_log=log_file is not None)
    return serve(opts, mountpoint, state)
