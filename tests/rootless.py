"""Running overlayd as an ordinary user, for the rootless tests (tests/test_rootless*.py).

A dedicated user (``overlayd-test``, created with useradd when missing, never deleted) runs the
daemon and the operations; the test itself stays root to prepare layers and to check the result
with the kernel's overlay. The venv's interpreter lives under /root, which other users cannot
read, so the user runs the system's python of the same version with PYTHONPATH pointing at a
world-readable copy of the overlayd package and of the modules it imports from the venv.

/dev/fuse: standard distributions ship it with mode 0666 (udev); where it is stricter, the
environment opens it up as udev would and restores the original mode afterwards.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.mounting import FUSERMOUNT, mount_fstype, poll, unmount_fuse

TEST_USER = "overlayd-test"
READY_TIMEOUT = 30.0
TESTS = Path(__file__).resolve().parent
# Imported by the daemon: what the copy must hold.
DAEMON_MODULES = ("overlayd.cli", "overlayd.daemon", "overlayd.fs", "pyfuse3", "trio")


def why_not() -> str | None:
    """Why the rootless tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root to create the test user and check with the kernel's overlay"
    path = shutil.which(FUSERMOUNT)
    if path is None:
        return "needs fusermount3"
    if not os.stat(path).st_mode & stat.S_ISUID:
        return f"{path} is not setuid: an ordinary user cannot mount through it"
    if not os.path.exists("/dev/fuse"):
        return "needs /dev/fuse"
    if system_python() is None:
        return (f"no python{sys.version_info[0]}.{sys.version_info[1]} that other users can run "
                f"(the venv's interpreter is {os.path.realpath(sys.executable)})")
    return None


def system_python() -> str | None:
    """An interpreter of this one's version that every user can run (the compiled pyfuse3
    module is for this ABI)."""
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    for candidate in (f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"):
        try:
            st = os.stat(candidate)
        except OSError:
            continue
        if st.st_mode & stat.S_IXOTH:
            return candidate
    return None


def ensure_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                        "--shell", "/usr/sbin/nologin", TEST_USER], check=True,
                       capture_output=True)
        return pwd.getpwnam(TEST_USER)


def _copy_modules(dest: Path) -> None:
    """Copy overlayd and every top-level module the daemon imports from outside the standard
    library into *dest*."""
    code = ("import sys, sysconfig\n"
            f"for m in {DAEMON_MODULES!r}: __import__(m)\n"
            "std = sysconfig.get_paths()['stdlib']\n"
            "for name, mod in list(sys.modules.items()):\n"
            "    f = getattr(mod, '__file__', None)\n"
            "    if f and '.' not in name and not f.startswith(std):\n"
            "        print(f)\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, cwd=TESTS.parent).stdout
    dest.mkdir()
    for line in out.splitlines():
        source = Path(line)
        if source.name.startswith(("__editable__", "_distutils_hack")):
            continue  # the venv's import hooks: the copy holds the package itself
        top = source.parent if source.name.startswith("__init__.") else source
        target = dest / top.name
        if target.exists():
            continue
        if top.is_dir():
            shutil.copytree(top, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(top, target)
    shutil.copy2(TESTS / "snapshot.py", dest / "snapshot.py")


def _open_up(path: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [*dirnames, *filenames]:
            full = os.path.join(dirpath, name)
            mode = os.lstat(full).st_mode
            if not stat.S_ISLNK(mode):
                os.chmod(full, stat.S_IMODE(mode) | 0o444 | (0o111 if mode & 0o100 else 0))
    os.chmod(path, 0o755)


@dataclass
class UserDaemon:
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Rootless:
    """The test user, its interpreter and environment, and a directory it may use."""

    uid: int
    gid: int
    python: str
    base: Path  # world-traversable; the user's own work goes in base / "home"
    env: dict[str, str]

    def run(self, argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, user=self.uid, group=self.gid, extra_groups=[],
                              env=self.env, cwd=self.base / "home", capture_output=True,
                              text=True, check=False, **kwargs)  # type: ignore[call-overload]

    def python_run(self, script: str, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run([self.python, "-c", script, *args])

    def chown_tree(self, path: Path) -> None:
        for dirpath, dirnames, filenames in os.walk(path):
            os.chown(dirpath, self.uid, self.gid)
            for name in [*dirnames, *filenames]:
                os.chown(os.path.join(dirpath, name), self.uid, self.gid,
                         follow_symlinks=False)

    @contextlib.contextmanager
    def mounted(self, mountpoint: Path, options: str) -> Iterator[UserDaemon]:
        """The user's ``overlayd mount -f`` at *mountpoint*.
        Root cannot enter a FUSE mount made without allow_other: readiness is read from
        /proc/self/mountinfo. The test unmounts as the user; whatever is left is unmounted
        here (-u, -uz) and only this daemon is ended."""
        log_path = self.base / f"{mountpoint.name}.log"
        with open(log_path, "wb") as logf:
            proc = subprocess.Popen(
                [self.python, "-m", "overlayd", "mount", "-f", "-o", options, str(mountpoint)],
                user=self.uid, group=self.gid, extra_groups=[], env=self.env,
                cwd=self.base / "home", stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
        try:
            def ready() -> bool:
                if proc.poll() is not None:
                    raise RuntimeError(f"overlayd exited with {proc.returncode}:\n"
                                       + log_path.read_text(errors="replace"))
                return mount_fstype(mountpoint) == "fuse.overlayd"

            poll(ready, READY_TIMEOUT, f"overlayd at {mountpoint}")
            yield UserDaemon(proc, log_path)
        finally:
            unmount_fuse(mountpoint, proc)

    def unmount(self, mountpoint: Path) -> subprocess.CompletedProcess[str]:
        return self.run([FUSERMOUNT, "-u", str(mountpoint)])


@contextlib.contextmanager
def dev_fuse_mode(mode: int) -> Iterator[None]:
    """/dev/fuse with the permission bits *mode* for the with block (root only), then as it
    was: to let every user open it (unprivileged mounts), or none but root."""
    before = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    try:
        if before != mode:
            os.chmod("/dev/fuse", mode)
        yield
    finally:
        if stat.S_IMODE(os.stat("/dev/fuse").st_mode) != before:
            os.chmod("/dev/fuse", before)


@contextlib.contextmanager
def rootless() -> Iterator[Rootless]:
    """Set up the user, the readable copy of the code and /dev/fuse; undo all but the user."""
    user = ensure_user()
    python = system_python()
    assert python is not None
    base = Path(tempfile.mkdtemp(prefix="overlayd-rootless-"))
    fuse_mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    try:
        with dev_fuse_mode(fuse_mode | 0o666):
            _copy_modules(base / "py")
            _open_up(base)
            (base / "home").mkdir()
            os.chown(base / "home", user.pw_uid, user.pw_gid)
            env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "PYTHONPATH": str(base / "py"),
                   "HOME": str(base / "home"), "PYTHONDONTWRITEBYTECODE": "1",
                   "LANG": "C.UTF-8"}
            yield Rootless(user.pw_uid, user.pw_gid, python, base, env)
    finally:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            left = [line.split()[4] for line in f if str(base) in line]
        if not left:
            shutil.rmtree(base, ignore_errors=True)
