"""A private dockerd for the end-to-end tests, and tree listings comparable across tools.

:class:`Dockerd` runs Debian's dockerd 20.10 as this test's child, with everything it keeps in
one temp dir: ``--data-root``, ``--exec-root`` (its own containerd's socket and state), the API
socket, the pidfile and the libtrust key (``deprecated-key-path``, else /etc/docker/key.json).
Nothing is pulled: images come from ``docker import`` of a tar :func:`rootfs_tar` builds. Its
readiness is polled, never slept for; :meth:`Dockerd.stop` removes the containers, sends SIGTERM,
then SIGKILL, ends whatever it started that is still alive (found by the temp dir in their
command lines: containerd, shims), and unmounts what it left under the temp dir.

:func:`tar_listing` and :func:`tree_listing` turn a tarball and a mounted tree into the same
``{path: Item}`` form (numeric owners, modes, sizes, content hashes, link targets, device
numbers, mtimes in seconds, hard-link groups) so that ``docker export`` and an overlayd mount
compare field by field. Single-threaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from tests.mounting import poll, processes_mentioning

START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
SOCKET_MAX = 100  # sun_path is 108 bytes; containerd's socket sits deepest, at exec/containerd/


def find_docker() -> tuple[str, str] | None:
    """dockerd and the docker CLI shipped with it (Debian's docker.io: /usr/sbin/dockerd,
    /usr/bin/docker), or None. A CLI elsewhere on PATH is used only without the packaged one."""
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        return None
    packaged = Path(dockerd).resolve().parent.parent / "bin" / "docker"
    cli = str(packaged) if os.access(packaged, os.X_OK) else shutil.which("docker")
    return None if cli is None else (dockerd, cli)


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below *root*, deepest first."""
    prefix = os.path.realpath(root)
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return sorted(set(found), key=len, reverse=True)


class Dockerd:
    """A dockerd child process with its state in *home*; ``docker()`` talks to it."""

    def __init__(self, home: Path, dockerd: str, cli: str) -> None:
        self.home = home
        self.dockerd = dockerd
        self.cli = cli
        self.data_root = home / "root"
        self.exec_root = home / "exec"
        self.socket = home / "docker.sock"
        self.log_path = home / "dockerd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.socket}",
                    "DOCKER_CONFIG": str(home / "cli")}
        # Directories dockerd/containerd create at fixed places outside --exec-root: removed
        # afterwards when this run made them and they are empty.
        self._global_dirs = [p for p in (Path("/run/docker/plugins"), Path("/run/docker"),
                                         Path("/run/containerd/s"), Path("/run/containerd"))
                             if not p.exists()]

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> None:
        if len(str(self.exec_root / "containerd" / "containerd.sock")) > SOCKET_MAX:
            raise RuntimeError(f"{self.home} is too long a path for containerd's socket")
        config = self.home / "daemon.json"
        config.write_text(json.dumps({"deprecated-key-path": str(self.home / "key.json")}))
        argv = [self.dockerd, "--config-file", str(config),
                "--data-root", str(self.data_root), "--exec-root", str(self.exec_root),
                "-H", f"unix://{self.socket}", "--pidfile", str(self.home / "docker.pid"),
                "--iptables=false", "--ip6tables=false", "--bridge=none",
                "--storage-driver=overlay2"]
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=logf, start_new_session=True)
        proc = self.proc

        def answers() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"dockerd exited with {proc.returncode}:\n{self.log()}")
            if not self.socket.exists():
                return False
            return subprocess.run([self.cli, "version"], env=self.env, check=False,
                                  capture_output=True).returncode == 0

        poll(answers, START_TIMEOUT, "dockerd's API socket")

    def docker(self, *args: str, stdin: bytes | None = None) -> bytes:
        """Run the docker CLI against this daemon; its stdout, or an error with its stderr."""
        done = subprocess.run([self.cli, *args], env=self.env, input=stdin,
                              capture_output=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)} failed ({done.returncode}):\n"
                               + done.stderr.decode(errors="replace"))
        return done.stdout

    def docker_text(self, *args: str) -> str:
        return self.docker(*args).decode().strip()

    def stop(self) -> None:
        """Remove our containers, end dockerd (SIGTERM, then SIGKILL), end what it left
        running, unmount what it left mounted under home."""
        proc = self.proc
        try:
            if proc is not None and proc.poll() is None:
                try:
                    ids = self.docker_text("ps", "-aq").split()
                    if ids:
                        self.docker("rm", "-f", *ids)
                except RuntimeError:
                    pass
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        finally:
            # containerd (dockerd's child) and shims (reparented) name our temp dir.
            for pid in processes_mentioning(str(self.home)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for point in mounts_under(self.home):
                if subprocess.run(["umount", point], check=False,
                                  capture_output=True).returncode != 0:
                    subprocess.run(["umount", "-l", point], check=False, capture_output=True)
            for d in self._global_dirs:
                with contextlib.suppress(OSError):
                    d.rmdir()

    def layer_dir(self, container_or_image: str) -> Path:
        """The overlay2 directory of a container's read-write layer or an image's top layer."""
        data = json.loads(self.docker_text(
            "inspect", "-f", "{{json .GraphDriver.Data}}", container_or_image))
        upper = Path(data["UpperDir"])
        assert upper.name == "diff", data
        return upper.parent


# --- images -----------------------------------------------------------------------------------

BUSYBOX = "/bin/busybox"
APPLETS = ("sh", "rm", "mkdir", "chmod", "chown", "echo", "cat", "touch", "ln", "mv", "true",
           "mkfifo")
MTIME = 1_700_000_000


def rootfs_tar(busybox: str = BUSYBOX) -> bytes:
    """A small root filesystem: busybox-static (with applet symlinks), and files of every
    kind the tests look at: nested directories, owners other than root, a setuid file, a
    sticky directory, a symlink, hard links, a fifo, a character device."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def add(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", mode: int = 0o644,
                owner: int = 0, link: str = "", dev: tuple[int, int] = (0, 0)) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.uid, info.gid = kind, mode, owner, owner
            info.mtime, info.linkname = MTIME, link
            info.devmajor, info.devminor = dev
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        for d in ("bin", "etc", "etc/nested", "etc/nested/deep", "data", "data/tree",
                  "data/tree/x", "srv", "srv/redo", "opt", "usr", "usr/lib", "var", "var/gone",
                  "var/keep", "var/keep/opq", "home"):
            add(d, tarfile.DIRTYPE, mode=0o755)
        add("tmp", tarfile.DIRTYPE, mode=0o1777)
        add("home/user", tarfile.DIRTYPE, mode=0o750, owner=1000)
        add("home/user/secret", data=b"s\n", mode=0o600, owner=1000)
        with open(busybox, "rb") as f:
            add("bin/busybox", data=f.read(), mode=0o755)
        for applet in APPLETS:
            add(f"bin/{applet}", tarfile.SYMTYPE, link="busybox", mode=0o777)
        add("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:\n")
        add("etc/group", data=b"root:x:0:\nuser:x:1000:\n")
        add("etc/motd", data=b"base\n")
        add("etc/nested/deep/conf", data=b"a=1\n")
        add("etc/nested/deep/keep", data=b"keep\n")
        add("data/a.txt", data=b"a\n")
        add("data/b.txt", data=b"b\n")
        add("data/tree/x/z.txt", data=b"z\n")
        add("srv/redo/old1", data=b"1\n")
        add("srv/redo/old2", data=b"2\n")
        add("opt/tool", data=b"#!/bin/sh\necho tool\n")
        add("opt/link", tarfile.SYMTYPE, link="tool", mode=0o777)
        add("opt/suid", data=b"x", mode=0o4755)
        add("opt/fifo", tarfile.FIFOTYPE, mode=0o600)
        add("opt/null", tarfile.CHRTYPE, mode=0o666, dev=(1, 3))
        add("usr/lib/libx.so.1", data=b"\x7fELF lib\n")
        add("usr/lib/libx.so", tarfile.LNKTYPE, link="usr/lib/libx.so.1")
        add("usr/lib/liby.so.1", data=b"\x7fELF liby\n")
        add("usr/lib/liby.so", tarfile.LNKTYPE, link="usr/lib/liby.so.1")
        add("var/gone/file", data=b"gone\n")
        add("var/keep/opq/old", data=b"old\n")
    return buf.getvalue()


# --- listings ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """What one path shows; None where a field does not apply."""

    kind: str  # dir, reg, symlink, chr, blk, fifo, sock
    perm: int  # permission bits with setuid, setgid, sticky
    uid: int
    gid: int
    mtime: int | None  # seconds (tar headers from docker carry no more)
    size: int | None = None  # regular files
    sha256: str | None = None
    target: str | None = None  # symlinks
    rdev: tuple[int, int] | None = None


Listing = dict[str, Item]

_TAR_KINDS = {tarfile.DIRTYPE: "dir", tarfile.REGTYPE: "reg", tarfile.AREGTYPE: "reg",
              tarfile.SYMTYPE: "symlink", tarfile.CHRTYPE: "chr", tarfile.BLKTYPE: "blk",
              tarfile.FIFOTYPE: "fifo"}
_STAT_KINDS = {stat.S_IFDIR: "dir", stat.S_IFREG: "reg", stat.S_IFLNK: "symlink",
               stat.S_IFCHR: "chr", stat.S_IFBLK: "blk", stat.S_IFIFO: "fifo",
               stat.S_IFSOCK: "sock"}


def tar_name(name: str) -> str:
    """A member name as a path relative to the root, without ./ or a trailing slash."""
    name = name.rstrip("/")
    while name.startswith("./"):
        name = name[2:]
    return "" if name == "." else name


def tar_listing(data: bytes) -> tuple[Listing, set[frozenset[str]]]:
    """A tarball's paths (the root left out) and its hard-link groups."""
    items: Listing = {}
    links: dict[str, str] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar:
            name = tar_name(m.name)
            if not name:
                continue
            if m.type == tarfile.LNKTYPE:
                links[name] = tar_name(m.linkname)
                continue
            sha = None
            if m.isreg():
                f = tar.extractfile(m)
                assert f is not None
                sha = hashlib.sha256(f.read()).hexdigest()
            items[name] = Item(
                _TAR_KINDS[m.type], stat.S_IMODE(m.mode), m.uid, m.gid, int(m.mtime),
                size=m.size if m.isreg() else None, sha256=sha,
                target=m.linkname if m.issym() else None,
                rdev=(m.devmajor, m.devminor) if m.ischr() or m.isblk() else None)
    groups: dict[str, set[str]] = {}
    for name, target in links.items():
        items[name] = items[target]
        groups.setdefault(target, {target}).add(name)
    return items, {frozenset(g) for g in groups.values()}


def tree_listing(root: Path) -> tuple[Listing, set[frozenset[str]]]:
    """A mounted tree's paths (the root left out) and its hard-link groups (names of one
    inode), walked without following symlinks."""
    items: Listing = {}
    inodes: dict[tuple[int, int], set[str]] = {}
    pending = [b""]
    base = os.fsencode(root)
    while pending:
        rel = pending.pop()
        with os.scandir(base + b"/" + rel if rel else base) as it:
            entries = list(it)
        for entry in entries:
            path = rel + b"/" + entry.name if rel else entry.name
            st = entry.stat(follow_symlinks=False)
            kind = _STAT_KINDS[stat.S_IFMT(st.st_mode)]
            full = base + b"/" + path
            sha = target = rdev = None
            if kind == "reg":
                with open(full, "rb") as f:
                    sha = hashlib.sha256(f.read()).hexdigest()
            elif kind == "symlink":
                target = os.fsdecode(os.readlink(full))
            elif kind in ("chr", "blk"):
                rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
            name = os.fsdecode(path)
            items[name] = Item(kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                               int(st.st_mtime), size=st.st_size if kind == "reg" else None,
                               sha256=sha, target=target, rdev=rdev)
            if kind == "dir":
                pending.append(path)
            elif st.st_nlink > 1:
                inodes.setdefault((st.st_dev, st.st_ino), set()).add(name)
    return items, {frozenset(g) for g in inodes.values() if len(g) > 1}


def without(items: Listing, paths: Iterable[str]) -> Listing:
    """*items* without *paths* and everything below them."""
    gone = tuple(paths)
    return {p: i for p, i in items.items()
            if not any(p == g or p.startswith(g + "/") for g in gone)}


def no_mtime(items: Listing, paths: Iterable[str]) -> Listing:
    """*items* with the mtime of *paths* left out."""
    out = dict(items)
    for p in paths:
        if p in out:
            out[p] = replace(out[p], mtime=None)
    return out


def listing_differences(expected: Mapping[str, Item], got: Mapping[str, Item]) -> list[str]:
    """Readable lines for what differs: missing, extra, and changed fields."""
    lines = [f"missing {p}" for p in sorted(expected.keys() - got.keys())]
    lines += [f"extra {p}: {got[p]}" for p in sorted(got.keys() - expected.keys())]
    for p in sorted(expected.keys() & got.keys()):
        a, b = expected[p], got[p]
        if a != b:
            fields = [f"{k}: {getattr(a, k)!r} != {getattr(b, k)!r}"
                      for k in a.__dataclass_fields__ if getattr(a, k) != getattr(b, k)]
            lines.append(f"{p}: " + ", ".join(fields))
    return lines
