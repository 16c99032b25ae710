"""Podman end to end with overlayd as its mount program (``overlay.mount_program=``): a locally
imported image (no network: a root filesystem of the host's dash and its libraries), a
``podman run --rm --network=none`` that writes and reads files in the container, with a storage
root and run root of the test's own. Podman runs as root here (rootless podman would need
/etc/subuid ranges); the options it passes are what containers/storage passes either way.

Skipped with the reason where podman or its runtime cannot run: crun refuses this kind of
machine's hybrid cgroup hierarchy, so the test uses runc."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mounting import processes_mentioning

pytestmark = [pytest.mark.mounted, pytest.mark.slow]

TIMEOUT = 180


def why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root (rootless podman needs /etc/subuid ranges)"
    if shutil.which("podman") is None:
        return "podman is not installed (apt-get install podman)"
    if shutil.which("runc") is None:
        return "runc is not installed (crun refuses hybrid cgroup hierarchies)"
    if shutil.which("dash") is None:
        return "no /bin/dash to build the image's shell from"
    return None


def build_rootfs(tar_path: Path) -> None:
    """A root filesystem holding /bin/sh (the host's dash) and the libraries it needs."""
    dash = os.path.realpath(shutil.which("dash") or "")
    libs = [line.split()[-2] if "=>" in line else line.split()[0]
            for line in subprocess.run(["ldd", dash], capture_output=True, text=True,
                                       check=True).stdout.splitlines()
            if "/" in line]
    with tarfile.open(tar_path, "w") as tar:
        tar.add(dash, "bin/sh")
        for lib in libs:
            tar.add(os.path.realpath(lib), lib.lstrip("/"))
        info = tarfile.TarInfo("tmp")
        info.type = tarfile.DIRTYPE
        info.mode = 0o1777
        tar.addfile(info)


SCRIPT = ("echo hello > /tmp/x; read a < /tmp/x; echo \"read: $a\"; "
          "echo more >> /tmp/x; n=0; while read l; do n=$((n+1)); done < /tmp/x; "
          "echo \"lines: $n\"; "
          "while read dev mnt fstype rest; do "
          "if [ \"$mnt\" = / ]; then echo \"root: $fstype\"; fi; done < /proc/self/mounts")


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path: podman refuses a run root over 50 characters."""
    path = Path(tempfile.mkdtemp(prefix="ovd-podman-"))
    try:
        yield path
    finally:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            mounted = any(str(path) in line for line in f)
        if not mounted:
            shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(why_not() is not None, reason=str(why_not()))
def test_podman_runs_a_container_on_overlayd(short_tmp: Path) -> None:
    tmp_path = short_tmp
    program = tmp_path / "overlayd-mount-program"
    program.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/argv\n"
                       f"exec {sys.executable} -m overlayd \"$@\"\n")
    program.chmod(0o755)
    build_rootfs(tmp_path / "rootfs.tar")
    hard = os.sysconf("SC_OPEN_MAX")
    podman = ["podman", "--root", str(tmp_path / "root"), "--runroot", str(tmp_path / "run"),
              "--storage-driver", "overlay",
              "--storage-opt", f"overlay.mount_program={program}",
              "--cgroup-manager", "cgroupfs", "--events-backend", "file", "--runtime", "runc"]
    try:
        imported = subprocess.run([*podman, "import", str(tmp_path / "rootfs.tar"),
                                   "localhost/overlayd-test:1"], capture_output=True,
                                  text=True, timeout=TIMEOUT, check=False)
        assert imported.returncode == 0, imported.stderr
        # This machine's hard limits are below podman's defaults: ask for what is allowed.
        ran = subprocess.run([*podman, "run", "--rm", "--network=none",
                              "--ulimit", f"nofile={hard}:{hard}",
                              "--ulimit", "nproc=1024:1024",
                              "localhost/overlayd-test:1", "/bin/sh", "-c", SCRIPT],
                             capture_output=True, text=True, timeout=TIMEOUT, check=False)
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.splitlines() == ["read: hello", "lines: 2", "root: fuse.overlayd"]
        # What containers/storage passed (once, for the one container): -o OPTS MERGED, with
        # an empty item and volatile for a --rm container.
        (argv,) = (tmp_path / "argv").read_text().splitlines()
        assert argv.startswith("-o lowerdir=")
        assert ",,volatile " in argv
        assert argv.endswith("/merged")
    finally:
        subprocess.run([*podman, "rm", "--all", "--force"], capture_output=True,
                       timeout=TIMEOUT, check=False)
        # podman's storage keeps a private bind mount of its overlay directory.
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            left = [line.split()[4] for line in f if str(tmp_path) in line.split()[4]]
        for point in reversed(left):
            subprocess.run(["umount", point], capture_output=True, check=False)
    assert processes_mentioning(str(tmp_path)) == set()  # the daemon ended with the container
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        assert not [line for line in f if str(tmp_path) in line]
    for dirpath, _dirs, files in os.walk(tmp_path / "root"):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            assert not (stat.S_ISREG(st.st_mode) and name == "x"), "a container file is left"
