"""The differential fuzzer's operations as Python statements, and the reproducer script they make.

Every change the fuzzer (tests/test_kernel_fuzz.py) makes, to a lower layer while building it or
to a mount while comparing, is one line of plain Python over the variables ``L`` (a layer's root)
or ``M`` (a mountpoint), as bytes: ``os.mkdir(M + b'/d/n', 0o755)``. The fuzzer executes exactly
these lines (``run_statement``), so the script ``Script.render`` prints for a failing example is
what ran, not a description of it. The helpers the lines call (``put``, ``write``, ``rename2``,
``getdents``...) are plain functions defined here and copied into the script by their source.

A rendered script builds the stack in a fresh temp directory, mounts it with the target named on
its command line (kernel, overlayd, fuse-overlayfs, or none: a plain directory, no mount), runs
every step printing its outcome ("ok" and what it showed, or the errno's name), prints the merged
tree, and unmounts. Diff its output for two targets to see the difference.

Single-threaded; no pyfuse3, no mount here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import inspect
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


# -- the helpers the statements call (each copied into the script by its source) ------------------

def put(path: bytes, data: bytes) -> None:
    """Create *path* (it must not exist) holding *data*."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def sparse(path: bytes, data: bytes, offset: int, size: int) -> None:
    """Create *path*, *size* bytes long, holding *data* at *offset* and holes elsewhere."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.pwrite(fd, data, offset)
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def write(path: bytes, flags: int, data: bytes, offset: int | None) -> int:
    """Open *path* for writing with *flags* (never waiting on a fifo) and write *data* at
    *offset*, or where the flags put it if None."""
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | flags, 0o644)
    try:
        return os.write(fd, data) if offset is None else os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def read(path: bytes) -> bytes:
    """All of *path* (never waiting on a fifo)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def rename2(root: bytes, old: bytes, new: bytes, flags: int) -> None:
    """renameat2(2) of *old* to *new*, both relative to *root*; flags 1 NOREPLACE, 2 EXCHANGE."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if libc.renameat2(fd, old, fd, new, ctypes.c_uint(flags)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), old, None, new)
    finally:
        os.close(fd)


def getdents(fd: int, size: int) -> list[bytes]:
    """The names one getdents64(2) call on the directory *fd* returns into *size* bytes, in
    order: a few entries for a small *size*, so that a listing is read in several calls."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    buf = ctypes.create_string_buffer(size)
    got = libc.syscall(217, fd, buf, size)  # SYS_getdents64 on x86_64
    if got < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    names, pos = [], 0
    while pos < got:
        reclen = int.from_bytes(buf.raw[pos + 16:pos + 18], "little")
        names.append(buf.raw[pos + 19:pos + reclen].split(b"\0", 1)[0])
        pos += reclen
    return names


def getdents_rest(fd: int) -> list[bytes]:
    """Every name the directory *fd* still has to give, read a few at a time."""
    names = []
    while batch := getdents(fd, 80):
        names.extend(batch)
    return names


HELPERS: tuple[Callable[..., Any], ...] = (put, sparse, write, read, rename2, getdents,
                                           getdents_rest)


# -- running a statement ----------------------------------------------------------------------

@functools.lru_cache(maxsize=4096)
def _compiled(code: str) -> Any:
    return compile(code, "<fuzz step>", "exec")


def namespace(**variables: object) -> dict[str, Any]:
    """The globals a statement runs with: os, stat, the helpers and *variables* (M, L, H, D)."""
    ns: dict[str, Any] = {"os": os, "stat": stat, **{fn.__name__: fn for fn in HELPERS}}
    ns.update(variables)
    return ns


def run_statement(code: str, ns: dict[str, Any]) -> object:
    """Run *code* in *ns*: ("ok", [the values it passed to show()]) or the errno's name."""
    shown: list[object] = []
    ns["show"] = shown.append
    try:
        exec(_compiled(code), ns)
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))
    return ("ok", shown)


# -- literals as the statements spell them --------------------------------------------------------

def path_at(var: str, rel: str) -> str:
    """``M + b'/d/n'``: *rel* under the root variable *var*; the root itself for ""."""
    return f"{var} + {('/' + rel).encode()!r}" if rel else var


def octal(mode: int) -> str:
    return f"{mode:#o}"


_FLAG_NAMES = ("O_RDONLY", "O_WRONLY", "O_RDWR", "O_CREAT", "O_EXCL", "O_TRUNC", "O_APPEND",
               "O_NONBLOCK", "O_DIRECTORY", "O_CLOEXEC", "O_NOFOLLOW")


def open_flags(flags: int) -> str:
    """``os.O_RDWR | os.O_CREAT``: *flags* by name (flags 0 is O_RDONLY)."""
    names = [f"os.{name}" for name in _FLAG_NAMES
             if getattr(os, name) and flags & getattr(os, name) == getattr(os, name)]
    access = flags & os.O_ACCMODE
    if access == os.O_RDONLY:
        names.insert(0, "os.O_RDONLY")
    left = flags & ~functools.reduce(lambda a, b: a | b, (getattr(os, n) for n in _FLAG_NAMES))
    if left:
        names.append(hex(left))
    return " | ".join(names)


# -- the script ------------------------------------------------------------------------------------

@dataclass
class Script:
    """The lower stack (statements per layer, top first) and the steps run on the mount."""

    layers: list[list[str]]
    steps: list[tuple[str, str]] = field(default_factory=list)  # (label, statement)
    kernel_options: str = ""  # appended to the kernel's mount options

    def add(self, label: str, code: str) -> None:
        self.steps.append((label, code))

    def render(self) -> str:
        out = [_PREAMBLE.rstrip("\n"), ""]
        out += [inspect.getsource(fn).rstrip("\n") + "\n\n" for fn in HELPERS]
        out.append(_RUNTIME.replace("@KERNEL_OPTIONS@", repr(self.kernel_options))
                   .replace("@LAYERS@", str(len(self.layers))).rstrip("\n"))
        out.append("")
        for level, statements in enumerate(self.layers):
            out.append(f"L = LAYERS[{level}]  # {'top' if level == 0 else 'below'}")
            out.append("os.mkdir(L)")
            out += statements
        out += ["", "M = mount()", "H, D = {}, {}  # open files and directories by number",
                "try:"]
        for number, (label, code) in enumerate(self.steps, 1):
            out.append(f"    with step({number}, {label!r}):")
            out += [f"        {line}" for line in code.splitlines()]
        out += ["    tree(M)", "finally:", "    for fd in [*H.values(), *D.values()]:",
                "        os.close(fd)", "    unmount(M)",
                'if TARGET != "none":', '    print("# the upper layer")',
                "    tree(UPPER, every_xattr=True)", ""]
        return "\n".join(out)


def render_steps(steps: Sequence[tuple[str, str]]) -> str:
    """The steps alone, one statement per line: short enough for a failure message."""
    return "\n".join(f"{code}  # {n}: {label}" for n, (label, code) in enumerate(steps, 1))


_PREAMBLE = '''\
#!/usr/bin/env python3
"""A reproducer printed by overlayd's differential fuzzer (tests/test_kernel_fuzz.py).

Builds the lower layers in a fresh temp directory, mounts them with TARGET (kernel, overlayd,
fuse-overlayfs, or none: the steps run on an empty plain directory), runs each step printing its
outcome, prints the merged tree, unmounts; the directory is left for inspection (its path is
printed first). As root, from the overlayd checkout:
    .venv/bin/python repro.py kernel > k.txt; .venv/bin/python repro.py overlayd > o.txt
    diff k.txt o.txt
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import os
import stat
import subprocess
import sys
import tempfile
import time
'''

_RUNTIME = '''\
TARGET = sys.argv[1] if len(sys.argv) > 1 else "kernel"
BASE = os.fsencode(tempfile.mkdtemp(prefix="overlayd-repro."))
LAYERS = [BASE + b"/l%d" % i for i in range(@LAYERS@)]
UPPER, WORK, MNT = BASE + b"/upper", BASE + b"/work", BASE + b"/mnt"
OPTIONS = "lowerdir=%s,upperdir=%s,workdir=%s" % (
    ":".join(map(os.fsdecode, LAYERS)), os.fsdecode(UPPER), os.fsdecode(WORK))
KERNEL_OPTIONS = @KERNEL_OPTIONS@
STARTED_NS = time.time_ns() - 1_000_000_000


def mount() -> bytes:
    for d in (UPPER, WORK, MNT):
        os.mkdir(d)
    mnt = os.fsdecode(MNT)
    if TARGET == "kernel":
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        OPTIONS + "," + KERNEL_OPTIONS, mnt], check=True)
    elif TARGET == "overlayd":
        subprocess.run([sys.executable, "-m", "overlayd", "mount", "-o", OPTIONS, mnt],
                       check=True)
    elif TARGET == "fuse-overlayfs":
        subprocess.run(["fuse-overlayfs", "-o", OPTIONS, mnt], check=True)
    elif TARGET != "none":
        sys.exit(f"unknown target {TARGET!r}: kernel, overlayd, fuse-overlayfs or none")
    print(f"# {TARGET} at {mnt}")
    return MNT


def unmount(mnt: bytes) -> None:
    if TARGET == "kernel":
        subprocess.run(["umount", mnt], check=True)
    elif TARGET != "none":
        subprocess.run(["fusermount3", "-u", mnt], check=True)


@contextlib.contextmanager
def step(number, label):
    shown = []
    globals()["show"] = shown.append
    try:
        yield
    except OSError as e:
        print(f"{number} {label}: {errno.errorcode.get(e.errno, e.errno)}")
    else:
        print(f"{number} {label}: ok", *map(brief, shown))


def brief(value):
    if isinstance(value, bytes) and len(value) > 40:
        return f"<{len(value)} bytes sha256 {hashlib.sha256(value).hexdigest()[:12]}>"
    return repr(value)


def tree(root, every_xattr=False):
    """Every path under *root*: type, mode, owner, nlink, size, mtime (or "recent": set while
    this ran), content or target, user xattrs (every xattr if *every_xattr*)."""
    def failed(e: OSError) -> None:
        print(f"  {os.fsdecode(os.path.relpath(e.filename, root))}: listing fails with "
              f"{errno.errorcode.get(e.errno, e.errno)}")

    for dirpath, dirnames, filenames in os.walk(root, onerror=failed):
        dirnames.sort()
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        for name in [b"", *sorted(filenames + links)]:
            path = os.path.join(dirpath, name) if name else dirpath
            st = os.lstat(path)
            mtime = st.st_mtime_ns if st.st_mtime_ns < STARTED_NS else "recent"
            what = f"size={st.st_size} mtime={mtime}"
            if stat.S_ISREG(st.st_mode):
                what += " data=" + brief(read(path))
            elif stat.S_ISLNK(st.st_mode):
                what += f" -> {os.readlink(path)!r}"
            elif stat.S_ISCHR(st.st_mode):
                what += f" rdev={os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
            if not stat.S_ISLNK(st.st_mode):
                what += "".join(f" {x}={os.getxattr(path, x)!r}" for x in
                                sorted(os.listxattr(path))
                                if every_xattr or x.startswith("user."))
            print(f"  {os.fsdecode(os.path.relpath(path, root))}: {stat.filemode(st.st_mode)} "
                  f"{st.st_uid}:{st.st_gid} nlink={st.st_nlink} {what}")

'''

