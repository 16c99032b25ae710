"""The daemon as services and mount(8) see it: systemd's notify protocol, the template unit
(checked by systemd-analyze, and its commands run as systemd would run them), its config file,
SIGHUP, `mount -t fuse.overlayd` and fstab through mount.fuse3, and `overlayd status`.

No systemd manager runs here (the machine may not boot with systemd), so the unit's commands run
under setpriv with the unit's capability bounding set and no_new_privs, with a real AF_UNIX
datagram socket as $NOTIFY_SOCKET: what systemd would do, minus the cgroup and seccomp.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from overlayd.cli import read_config
from overlayd.daemon import runtime_dir, state_file_name
from overlayd.errors import UsageError
from tests.conftest import needs_fuse, needs_root
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
from tests.test_mounted_lifecycle import daemons_serving

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "overlayd@.service"
SYSTEM_OVERLAYD = Path("/usr/local/bin/overlayd")  # the unit's and mount.fuse3's command
# systemd's default PATH for services and mount units: what mount.fuse3 gets at boot.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# `overlayd status` learns pids and layers from state files in the runtime directory.
needs_runtime_dir = pytest.mark.skipif(
    runtime_dir() is None, reason="no runtime directory for state files (not root, no "
    "XDG_RUNTIME_DIR)")


# --- helpers ------------------------------------------------------------------------------------

def unit_settings(path: Path = UNIT) -> dict[str, dict[str, list[str]]]:
    """The unit file as {section: {key: [values...]}} (our unit has no line continuations)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        assert current is not None, line
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def unit_command(key: str, instance: str, config: Path, mainpid: int | None = None) -> list[str]:
    """The unit's Exec*= command line for *instance*, with our config file and our overlayd."""
    (value,) = unit_settings()["Service"][key]
    value = value.lstrip("-")  # "-": failure ignored
    value = value.replace("/etc/overlayd/%i.conf", str(config)).replace("%i", instance)
    if mainpid is not None:
        value = value.replace("$MAINPID", str(mainpid))
    argv = shlex.split(value)
    if argv[0] == str(SYSTEM_OVERLAYD):
        return overlayd_argv(*argv[1:])
    return argv


def capability_bounding_set() -> list[str]:
    (value,) = unit_settings()["Service"]["CapabilityBoundingSet"]
    return value.split()


def cap_numbers(names: list[str]) -> int:
    """The capability mask of CAP_* names, numbered as in linux/capability.h."""
    numbers = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_FOWNER": 3, "CAP_FSETID": 4,
               "CAP_SYS_ADMIN": 21, "CAP_MKNOD": 27, "CAP_SETFCAP": 31}
    mask = 0
    for name in names:
        mask |= 1 << numbers[name]
    return mask


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        return dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)


class NotifySocket:
    """What systemd listens on for Type=notify: an AF_UNIX datagram socket that learns each
    sender's pid (SO_PASSCRED), as systemd does to apply NotifyAccess=main."""

    def __init__(self, address: str) -> None:
        self.address = address  # the NOTIFY_SOCKET value: a path, or "@name" (abstract)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)

    def close(self) -> None:
        self.sock.close()

    def receive(self, proc: subprocess.Popen[bytes], timeout: float = READY_TIMEOUT,
                ) -> tuple[set[str], int]:
        """The next datagram's assignments and its sender's pid; fails if *proc* exits."""
        deadline = time.monotonic() + timeout
        self.sock.settimeout(0.1)
        creds_size = struct.calcsize("3i")
        while True:
            try:
                data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(creds_size))
                break
            except TimeoutError:
                if proc.poll() is not None and proc.returncode != 0:
                    raise RuntimeError(f"the daemon exited with {proc.returncode}") from None
                if time.monotonic() > deadline:
                    raise
        pid = -1
        for level, kind, cdata in ancdata:
            if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS):
                pid = array.array("i", cdata[:creds_size])[0]
        return set(data.decode().splitlines()), pid


@contextlib.contextmanager
def notify_socket(address: str) -> Iterator[NotifySocket]:
    sock = NotifySocket(address)
    try:
        yield sock
    finally:
        sock.close()


@contextlib.contextmanager
def overlayd_on_system_path() -> Iterator[None]:
    """/usr/local/bin/overlayd, for mount.fuse3 and the unit: our venv's, if none is there
    (removed afterwards); one already installed is used as it is."""
    made = False
    if not os.path.lexists(SYSTEM_OVERLAYD):
        os.symlink(Path(sys.executable).parent / "overlayd", SYSTEM_OVERLAYD)
        made = True
    try:
        yield
    finally:
        if made:
            os.unlink(SYSTEM_OVERLAYD)


def end_daemons(mnt: Path) -> None:
    """Unmount *mnt* and end the daemon serving it (one we started: it names our temp dir)."""
    unmount_fuse(mnt, None)
    with contextlib.suppress(TimeoutError):
        poll(lambda: not daemons_serving(mnt), 10, "the daemon to exit")
    for pid in daemons_serving(mnt):
        os.kill(pid, signal.SIGKILL)


def writable(stack: dict[str, Path]) -> str:
    return overlay_options([stack["lower1"], stack["lower2"]], stack["upper"], stack["work"])


def status_json() -> list[dict[str, object]]:
    proc = subprocess.run(overlayd_argv("status", "--json"), capture_output=True, text=True,
                          timeout=30, check=True)
    return list(json.loads(proc.stdout))


def status_of(mnt: Path) -> dict[str, object] | None:
    found = [e for e in status_json() if e["mountpoint"] == os.path.realpath(mnt)]
    assert len(found) <= 1
    return found[0] if found else None


# --- the unit file ------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="needs systemd-analyze (Debian package systemd; scripts/setup installs "
                           "it)")
@needs_root  # the executable the unit names is put at /usr/local/bin if missing
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """The template and an instance of it load without a warning (systemd-analyze exits 0 even
    on a misspelt directive; its complaints go to stderr, so silence is the check)."""
    instance = tmp_path / "overlayd@web.service"
    shutil.copyfile(UNIT, instance)
    with overlayd_on_system_path():
        for unit in (UNIT, instance):
            proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                                  capture_output=True, text=True, timeout=60, check=False,
                                  env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice"})
            assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", ""), unit


# Directives that give the service a mount namespace of its own (the mount would be invisible
# outside it), or a device policy that would refuse /dev/fuse and mknod of whiteouts, or a
# ban on the setuid bits copy-up must keep.
BREAKS_FUSE = {
    "PrivateTmp", "PrivateDevices", "PrivateMounts", "PrivateNetwork", "PrivateUsers",
    "PrivateIPC", "ProtectSystem", "ProtectHome", "ProtectKernelTunables",
    "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "ProtectProc",
    "ProcSubset", "ProtectHostname", "ProtectClock", "ReadOnlyPaths", "ReadWritePaths",
    "InaccessiblePaths", "ExecPaths", "NoExecPaths", "TemporaryFileSystem", "BindPaths",
    "BindReadOnlyPaths", "RootDirectory", "RootImage", "MountAPIVFS", "DeviceAllow",
    "DevicePolicy", "RestrictSUIDSGID", "DynamicUser", "NetworkNamespacePath",
    "IPCNamespacePath", "MemoryDenyWriteExecute", "User", "SystemCallFilter",
}


def test_unit_shape() -> None:
    unit = unit_settings()
    service = unit["Service"]
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert not set(service) & BREAKS_FUSE
    assert "mount -f --config /etc/overlayd/%i.conf" in service["ExecStart"][0]
    assert "umount --config /etc/overlayd/%i.conf" in service["ExecStop"][0]
    assert unit["Unit"]["ConditionPathExists"] == ["/etc/overlayd/%i.conf"]


# --- the config file ----------------------------------------------------------------------------

def test_config_file(tmp_path: Path) -> None:
    config = tmp_path / "web.conf"
    config.write_text("# comment\n\nMOUNTPOINT='/srv/my web'\n"
                      "OPTIONS='lowerdir=/a\\:b:/c,upperdir=/u,workdir=/w'  # the layers\n"
                      'LOG="/var/log/o.log"\n')
    assert read_config(str(config)) == {"MOUNTPOINT": "/srv/my web",
                                        "OPTIONS": "lowerdir=/a\\:b:/c,upperdir=/u,workdir=/w",
                                        "LOG": "/var/log/o.log"}


@pytest.mark.parametrize(("text", "message"), [
    ("MOUNTPOINT=/m\nOPTION=x\n", "line 2: unknown key 'OPTION'"),
    ("MOUNTPOINT=/m\nMOUNTPOINT=/n\n", "line 2: MOUNTPOINT given twice"),
    ("MOUNTPOINT=m\n", "line 1: MOUNTPOINT must be an absolute path"),
    ("MOUNTPOINT=/m p\n", "line 1: expected KEY=VALUE (quote values holding spaces)"),
    ("MOUNTPOINT='/m\n", "line 1: No closing quotation"),
    ("OPTIONS=lowerdir=/l\n", "no MOUNTPOINT="),
])
def test_config_file_errors(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "bad.conf"
    config.write_text(text)
    with pytest.raises(UsageError, match=re.escape(message)):
        read_config(str(config))


def test_config_file_errors_reach_the_command_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.conf"
    config.write_text("MOUNTPOINT=/m\nOPTIONS=lowerdir=/l\nDEBUG=1\n")
    proc = subprocess.run(overlayd_argv("mount", "--config", str(config)), capture_output=True,
                          text=True, timeout=30, check=False)
    assert (proc.returncode, proc.stderr) == (
        2, f"overlayd: config {config} line 3: unknown key 'DEBUG' (known: MOUNTPOINT, OPTIONS,"
           " LOG)\n")


# --- foreground readiness and stopping over $NOTIFY_SOCKET --------------------------------------

@needs_fuse
@pytest.mark.mounted
@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_notify_ready_then_stopping_on_sigterm(stack: dict[str, Path], tmp_path: Path,
                                               kind: str) -> None:
    """READY=1 comes from the main pid once the mount answers; SIGTERM brings STOPPING=1, an
    unmount and exit status 0."""
    (stack["lower1"] / "f").write_text("x")
    mnt = stack["mnt"]
    address = str(tmp_path / "notify") if kind == "path" else f"@overlayd-test-{os.getpid()}"
    log = tmp_path / "daemon.log"
    with notify_socket(address) as sock, open(log, "wb") as logf:
        proc = subprocess.Popen(overlayd_argv("mount", "-f", "-o", writable(stack), str(mnt)),
                                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                env={**os.environ, "NOTIFY_SOCKET": address})
        try:
            message, sender = sock.receive(proc)
            # The moment systemd hears READY=1, the mount answers.
            assert (mnt / "f").read_text() == "x"
            assert "READY=1" in message
            assert sender == proc.pid
            proc.send_signal(signal.SIGTERM)
            message, sender = sock.receive(proc)
            assert "STOPPING=1" in message
            assert sender == proc.pid
            assert proc.wait(timeout=30) == 0
            assert mount_fstype(mnt) is None
        finally:
            unmount_fuse(mnt, proc)
    check_log(log.read_text())


@needs_fuse
@pytest.mark.mounted
def test_daemon_form_leaves_the_notify_socket_alone(stack: dict[str, Path],
                                                    tmp_path: Path) -> None:
    """The forking form (podman's mount program, itself perhaps under a Type=notify unit with
    NotifyAccess=all) says nothing on a socket that is its caller's."""
    mnt = stack["mnt"]
    with notify_socket(str(tmp_path / "notify")) as sock:
        proc = subprocess.run(overlayd_argv("mount", "-o", writable(stack), str(mnt)),
                              capture_output=True, text=True, timeout=READY_TIMEOUT, check=False,
                              env={**os.environ, "NOTIFY_SOCKET": sock.address})
        try:
            assert proc.returncode == 0, proc.stderr
            umount = subprocess.run(overlayd_argv("umount", str(mnt)), capture_output=True,
                                    text=True, timeout=30, check=False)
            assert umount.returncode == 0, umount.stderr
            poll(lambda: not daemons_serving(mnt), 10, "the daemon to exit")
            sock.sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.sock.recv(4096)
        finally:
            end_daemons(mnt)


# --- the unit's commands, as systemd runs them --------------------------------------------------

CAP_NET_BIND_SERVICE_V2 = struct.pack("<5I", 0x02000001, 1 << 10, 0, 0, 0)  # vfs_cap_data


def hardened(argv: list[str]) -> list[str]:
    """*argv* under the unit's CapabilityBoundingSet= and NoNewPrivileges=yes."""
    caps = ",".join("+" + c.removeprefix("CAP_").lower() for c in capability_bounding_set())
    (nnp,) = unit_settings()["Service"]["NoNewPrivileges"]
    assert nnp == "yes"
    return ["setpriv", f"--bounding-set=-all,{caps}", "--inh-caps=-all", "--no-new-privs",
            "--", *argv]


def build_root_layers(stack: dict[str, Path]) -> None:
    """What a container image holds that needs the unit's capabilities to serve."""
    lower = stack["lower2"]
    suid = lower / "suid"
    suid.write_bytes(b"#!/bin/sh\n")
    os.chown(suid, 1234, 2345)
    os.chmod(suid, 0o6755)
    os.setxattr(suid, "security.capability", CAP_NET_BIND_SERVICE_V2)
    private = lower / "private"
    private.mkdir(mode=0o700)
    (private / "secret").write_bytes(b"secret")
    os.chmod(private / "secret", 0o600)
    os.chown(private / "secret", 1234, 1234)
    os.chown(private, 1234, 1234)
    os.mknod(lower / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    (lower / "gone").write_bytes(b"x")
    (lower / "dir").mkdir()
    (lower / "dir" / "inside").write_bytes(b"x")
    shared = lower / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)


AS_USER = (
    "import os, sys\n"
    "os.chdir(sys.argv[1])\n"
    "os.setgroups([]); os.setgid(2345); os.setuid(1234)\n"
    "open('shared/mine', 'w').write('x')\n"
)


def exercise_root_layers(mnt: Path, upper: Path) -> None:
    assert (mnt / "private" / "secret").read_bytes() == b"secret"  # DAC_OVERRIDE
    os.utime(mnt / "suid", ns=(10**18, 10**18))  # a copy-up: CHOWN, FOWNER, FSETID, SETFCAP
    os.chmod(mnt / "null", 0o644)  # a device copied up: MKNOD
    (mnt / "gone").unlink()  # a whiteout
    (mnt / "dir" / "inside").unlink()
    os.rmdir(mnt / "dir")
    os.mkdir(mnt / "dir")  # opaque: trusted.overlay.opaque, SYS_ADMIN
    subprocess.run([sys.executable, "-c", AS_USER, str(mnt)], check=True, timeout=30)
    st = os.stat(upper / "suid")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 2345, 0o6755)
    assert os.getxattr(upper / "suid", "security.capability") == CAP_NET_BIND_SERVICE_V2
    st = os.lstat(upper / "null")
    assert (stat.S_ISCHR(st.st_mode), st.st_rdev, stat.S_IMODE(st.st_mode)) == (
        True, os.makedev(1, 3), 0o644)
    assert os.lstat(upper / "gone").st_rdev == 0
    assert stat.S_ISCHR(os.lstat(upper / "gone").st_mode)
    assert os.getxattr(upper / "dir", "trusted.overlay.opaque") == b"y"
    st = os.stat(upper / "shared" / "mine")
    assert (st.st_uid, st.st_gid) == (1234, 2345)


@needs_root
@needs_fuse
@pytest.mark.mounted
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_unit_commands_under_its_hardening(stack: dict[str, Path], tmp_path: Path) -> None:
    """ExecStart under the unit's bounding set and no_new_privs: READY=1 from the main pid, a
    workload that needs every capability kept, ExecReload reopening LOG=, ExecStop unmounting
    with exit 0 and STOPPING=1; then kill -9, ExecStop clearing the dead mount (systemd runs
    ExecStop after a crash too), and ExecStart mounting again (Restart=on-failure)."""
    build_root_layers(stack)
    mnt = stack["mnt"]
    log = tmp_path / "web.log"
    config = tmp_path / "web.conf"
    config.write_text(f"MOUNTPOINT={mnt}\nOPTIONS={writable(stack)}\nLOG={log}\n")
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")}
    start = hardened(unit_command("ExecStart", "web", config))
    stop = unit_command("ExecStop", "web", config)
    with notify_socket(env["NOTIFY_SOCKET"]) as sock:
        proc = subprocess.Popen(start, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            message, sender = sock.receive(proc)
            assert "READY=1" in message
            assert sender == proc.pid  # NotifyAccess=main: setpriv exec'd the daemon
            status = proc_status(proc.pid)
            assert int(status["CapEff"], 16) == cap_numbers(capability_bounding_set())
            assert status["NoNewPrivs"].strip() == "1"
            exercise_root_layers(mnt, stack["upper"])

            # ExecReload: kill -HUP $MAINPID, after logrotate moved the log away.
            log.rename(tmp_path / "web.log.1")
            subprocess.run(unit_command("ExecReload", "web", config, proc.pid), check=True,
                           timeout=30)
            poll(lambda: "reopened the log file" in (log.read_text() if log.exists() else ""),
                 30, "the log to be reopened")

            subprocess.run(stop, check=True, timeout=30)
            message, _ = sock.receive(proc)
            assert "STOPPING=1" in message
            assert proc.wait(timeout=30) == 0
            assert mount_fstype(mnt) is None

            # A crash, the ExecStop systemd runs after it, the restart.
            proc = subprocess.Popen(start, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            assert "READY=1" in sock.receive(proc)[0]
            proc.kill()
            proc.wait(timeout=30)
            with pytest.raises(OSError, match="Transport endpoint is not connected"):
                os.listdir(mnt)
            subprocess.run(stop, check=True, timeout=30)
            assert mount_fstype(mnt) is None
            proc = subprocess.Popen(start, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            assert "READY=1" in sock.receive(proc)[0]
            assert (mnt / "shared" / "mine").read_text() == "x"
            subprocess.run(stop, check=True, timeout=30)
            assert proc.wait(timeout=30) == 0
        finally:
            unmount_fuse(mnt, proc)
    check_log(log.read_text())


# --- SIGHUP: reopen the log file ----------------------------------------------------------------

@needs_fuse
@needs_runtime_dir
@pytest.mark.mounted
def test_sighup_reopens_the_log_file(stack: dict[str, Path], tmp_path: Path) -> None:
    """The forking form with --log: after the log file is renamed, SIGHUP makes the daemon
    write to a new file under the old name: its log lines, and its stderr (fd 2) too."""
    mnt = stack["mnt"]
    log = tmp_path / "overlayd.log"
    proc = subprocess.run(overlayd_argv("mount", "--log", str(log), "-o", writable(stack),
                                        str(mnt)),
                          capture_output=True, text=True, timeout=READY_TIMEOUT, check=False)
    try:
        assert proc.returncode == 0, proc.stderr
        pid = (status_of(mnt) or {})["pid"]
        assert isinstance(pid, int)
        assert pid in daemons_serving(mnt)
        assert "mounted at" in log.read_text()
        rotated = tmp_path / "overlayd.log.1"
        log.rename(rotated)
        os.kill(pid, signal.SIGHUP)
        poll(log.exists, 30, "a new log file")
        poll(lambda: "reopened the log file" in log.read_text(), 30, "the reopen message")
        os.kill(pid, signal.SIGUSR1)  # faulthandler writes its stack dump to fd 2
        poll(lambda: "File " in log.read_text(), 30, "the stack dump in the new log")
        subprocess.run(overlayd_argv("umount", str(mnt)), check=True, timeout=30)
        poll(lambda: not daemons_serving(mnt), 10, "the daemon to exit")
        assert "unmounted" in log.read_text()
        assert "reopened" not in rotated.read_text()
        assert "File " not in rotated.read_text()
    finally:
        end_daemons(mnt)


# --- mount(8): mount -t fuse.overlayd and fstab -------------------------------------------------

@needs_root
@needs_fuse
@pytest.mark.mounted
@pytest.mark.parametrize("how", ["mount -t", "fstab"])
def test_mount_8_through_mount_fuse3(stack: dict[str, Path], tmp_path: Path, how: str) -> None:
    """`mount -t fuse.overlayd overlay MNT -o ...` and an fstab line (`mount --fstab FILE MNT`,
    so /etc/fstab stays untouched) run mount.fuse3, which runs overlayd with systemd's PATH;
    the mount answers when mount(8) returns; umount(8) ends the daemon."""
    if shutil.which("mount.fuse3", path=SYSTEM_PATH) is None:
        pytest.skip("needs mount.fuse3 (Debian package fuse3)")
    (stack["lower1"] / "f").write_text("lower")
    mnt = stack["mnt"]
    options = writable(stack) + ",nofail,x-systemd.after=local-fs.target"
    if how == "fstab":
        fstab = tmp_path / "fstab"
        fstab.write_text(f"# test\noverlay {mnt} fuse.overlayd {options} 0 0\n")
        argv = ["mount", "--fstab", str(fstab), str(mnt)]
    else:
        argv = ["mount", "-t", "fuse.overlayd", "overlay", str(mnt), "-o", options]
    env = {**os.environ, "PATH": SYSTEM_PATH}
    with overlayd_on_system_path():
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, env=env,
                                  timeout=READY_TIMEOUT, check=False)
            assert proc.returncode == 0, proc.stderr
            assert mount_fstype(mnt) == "fuse.overlayd"
            assert (mnt / "f").read_text() == "lower"
            (mnt / "f").write_text("upper")
            entry = status_of(mnt) or {}
            assert entry["state"] == "running"
            assert entry["pid"] in daemons_serving(mnt)
            proc = subprocess.run(["umount", str(mnt)], capture_output=True, text=True,
                                  timeout=30, check=False)
            assert proc.returncode == 0, proc.stderr
            poll(lambda: not daemons_serving(mnt), 10, "the daemon to exit after umount")
            assert (stack["upper"] / "f").read_text() == "upper"
        finally:
            end_daemons(mnt)


# --- overlayd status ----------------------------------------------------------------------------

@needs_fuse
@needs_runtime_dir
@pytest.mark.mounted
def test_status_lists_mounts_layers_and_pids(stack: dict[str, Path], tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    lowers = [stack["lower1"], stack["lower2"]]
    # What a daemon killed by -9 leaves once its mount is cleared: the next daemon removes it.
    directory = runtime_dir()
    assert directory is not None
    os.makedirs(directory, exist_ok=True)
    stale = Path(directory, state_file_name(os.fsencode(tmp_path / "gone")))
    stale.write_text(json.dumps({"pid": os.getpid(), "start_time": -1,
                                 "mountpoint": str(tmp_path / "gone")}))
    with (overlayd_mounted(stack["mnt"], writable(stack)) as rw_daemon,
          overlayd_mounted(ro, overlay_options(lowers)) as ro_daemon):
        assert not stale.exists()
        rw, ro_entry = status_of(stack["mnt"]), status_of(ro)
        assert rw is not None
        assert ro_entry is not None
        assert rw == {
            "mountpoint": str(stack["mnt"]), "pid": rw_daemon.proc.pid, "state": "running",
            "lowerdirs": [str(p) for p in lowers], "upperdir": str(stack["upper"]),
            "workdir": str(stack["work"]), "writable": True, "fsync": True,
            "redirect_dir": "off", "log_file": None}
        assert (ro_entry["pid"], ro_entry["upperdir"], ro_entry["writable"]) == (
            ro_daemon.proc.pid, None, False)

        table = subprocess.run(overlayd_argv("status"), capture_output=True, text=True,
                               timeout=30, check=True).stdout.splitlines()
        assert table[0].split() == ["MOUNTPOINT", "PID", "STATE", "UPPERDIR", "LOWERDIRS"]
        lowers_text = ":".join(str(p) for p in lowers)
        assert [str(stack["mnt"]), str(rw_daemon.proc.pid), "running", str(stack["upper"]),
                lowers_text] in [row.split() for row in table]
        assert [str(ro), str(ro_daemon.proc.pid), "running", "-", lowers_text] in [
            row.split() for row in table]

        # A stopped daemon (status never touches the mount, which would hang).
        os.kill(ro_daemon.proc.pid, signal.SIGSTOP)
        try:
            poll(lambda: (status_of(ro) or {}).get("state") == "stopped", 10, "state stopped")
        finally:
            os.kill(ro_daemon.proc.pid, signal.SIGCONT)
        state_file = Path(directory, state_file_name(os.fsencode(ro)))
        assert json.loads(state_file.read_text())["pid"] == ro_daemon.proc.pid
        # Without a state file (another user's daemon, seen by root), the command line tells.
        state_file.unlink()
        assert status_of(ro) == ro_entry
    # Gone with their daemons, state files too.
    assert status_of(stack["mnt"]) is None
    assert status_of(ro) is None
    assert not state_file.exists()


def test_status_usage_errors() -> None:
    for argv in (["status", "/mnt"], ["umount", "--json", "/mnt"], ["status", "--config", "x"]):
        proc = subprocess.run(overlayd_argv(*argv), capture_output=True, text=True, timeout=30,
                              check=False)
        assert proc.returncode == 2, argv
        assert len(proc.stderr.splitlines()) == 1
