"""Tier 1: copy-up through the workdir, on temp dirs (no mount).

A few behaviours only matter to an unprivileged daemon; as root those tests run their body in a
forked child that has dropped to uid/gid 65534 (the dirs are handed over as open fds).
"""

from __future__ import annotations

import errno
import os
import pickle
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

from overlayd.copyup import (
    TEMP_PREFIX,
    build_in_work,
    clean_workdir,
    copy_data,
    copy_up,
    open_workdir,
    temp_name,
)
from overlayd.ondisk import fd_path

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root (chown, mknod, trusted.*)")
NOBODY = 65534

MiB = 1 << 20
KiB = 1 << 10


def fd_of(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


@dataclass
class Dirs:
    lower: Path
    upper: Path
    work: Path  # the overlay's workdir= (open_workdir makes work/work)
    lower_fd: int
    upper_fd: int
    workdir_fd: int
    work_fd: int  # workdir/work


@pytest.fixture
def dirs(tmp_path: Path) -> Iterator[Dirs]:
    paths = [tmp_path / n for n in ("lower", "upper", "work")]
    for p in paths:
        p.mkdir()
    fds = [fd_of(p) for p in paths]
    (tmp_path / "work" / "work").mkdir(0o700)
    work_fd = fd_of(tmp_path / "work" / "work")
    yield Dirs(*paths, *fds, work_fd)
    for fd in (*fds, work_fd):
        os.close(fd)


def work_names(d: Dirs) -> list[str]:
    return os.listdir(d.work / "work")


def lstat(path: Path) -> os.stat_result:
    return os.lstat(path)


def do_copy_up(d: Dirs, name: str, **kwargs: bool) -> tuple[os.stat_result, os.stat_result]:
    """Copy lower/NAME up; return (source stat, copy stat)."""
    src = lstat(d.lower / name)
    copy_up(d.lower_fd, os.fsencode(name), src, d.work_fd, d.upper_fd, **kwargs)
    return src, lstat(d.upper / name)


def assert_same_metadata(src: os.stat_result, dst: os.stat_result) -> None:
    assert stat.S_IFMT(dst.st_mode) == stat.S_IFMT(src.st_mode)
    assert stat.S_IMODE(dst.st_mode) == stat.S_IMODE(src.st_mode)
    assert (dst.st_uid, dst.st_gid) == (src.st_uid, src.st_gid)
    assert dst.st_mtime_ns == src.st_mtime_ns
    assert dst.st_atime_ns == src.st_atime_ns
    assert dst.st_ino != src.st_ino


def set_owner_and_times(path: Path, mtime_ns: int = 1_234_567_890_123_456_789) -> None:
    if ROOT:
        os.chown(path, 1234, 5678, follow_symlinks=False)
    os.utime(path, ns=(mtime_ns - 10**9, mtime_ns), follow_symlinks=False)


def xattrs(path: Path) -> dict[str, bytes]:
    return {n: os.getxattr(path, n, follow_symlinks=False)
            for n in os.listxattr(path, follow_symlinks=False)}


# --- copy_data ------------------------------------------------------------------------------


def make_sparse(path: Path, size: int, extents: list[tuple[int, bytes]]) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in extents:
            f.seek(offset)
            f.write(data)


def copy_file(src: Path, dst: Path, size: int | None = None) -> None:
    s = os.open(src, os.O_RDONLY)
    d = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        copy_data(s, d, os.fstat(s).st_size if size is None else size)
    finally:
        os.close(s)
        os.close(d)


def test_copy_data_keeps_holes(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    data = os.urandom(4 * KiB)
    make_sparse(src, 8 * MiB, [(4 * MiB, data)])
    if lstat(src).st_blocks * 512 >= 64 * KiB:
        pytest.skip("this filesystem does not make sparse files")
    copy_file(src, dst)
    st = lstat(dst)
    assert st.st_size == 8 * MiB
    assert st.st_blocks * 512 < 64 * KiB
    assert dst.read_bytes() == src.read_bytes()
    with open(dst, "rb") as f:
        f.seek(4 * MiB)
        assert f.read(4 * KiB) == data


def test_copy_data_without_copy_file_range(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    def exdev(*args: object) -> NoReturn:
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(os, "copy_file_range", exdev)
    src, dst = tmp_path / "src", tmp_path / "dst"
    data = os.urandom(3 * MiB + 17)  # more than one COPY_CHUNK, not a multiple of it
    make_sparse(src, 16 * MiB, [(MiB, data), (12 * MiB, b"tail")])
    copy_file(src, dst)
    assert dst.read_bytes() == src.read_bytes()
    if lstat(src).st_blocks * 512 < 8 * MiB:
        assert lstat(dst).st_blocks * 512 < 8 * MiB


@pytest.mark.parametrize("extents", [
    [],
    [(0, b"head")],
    [(MiB - 4, b"tail")],
    [(0, b"a" * 5000), (MiB // 2, b"b" * 5000), (MiB - 1, b"z")],
], ids=["all-hole", "head", "tail", "several"])
def test_copy_data_shapes(tmp_path: Path, extents: list[tuple[int, bytes]]) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_sparse(src, MiB, extents)
    copy_file(src, dst)
    assert lstat(dst).st_size == MiB
    assert dst.read_bytes() == src.read_bytes()


def test_copy_data_empty(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b"")
    copy_file(src, dst)
    assert dst.read_bytes() == b""


def test_copy_data_stops_at_size(tmp_path: Path) -> None:
    # The source grew after it was stat'ed: the copy has the stat's size.
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b"0123456789")
    copy_file(src, dst, size=4)
    assert dst.read_bytes() == b"0123"


def test_copy_data_source_shrank(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b"0123")
    copy_file(src, dst, size=10)
    assert dst.read_bytes() == b"0123" + b"\0" * 6


# --- copy_up ---------------------------------------------------------------------------------


def test_copy_up_regular_file(dirs: Dirs) -> None:
    f = dirs.lower / "f"
    f.write_bytes(b"hello world")
    os.setxattr(f, "user.mime", b"text/plain")
    os.setxattr(f, "user.empty", b"")
    set_owner_and_times(f)
    f.chmod(0o4750 if ROOT else 0o640)  # after chown, which clears setuid
    src, dst = do_copy_up(dirs, "f")
    assert_same_metadata(src, dst)
    assert stat.S_ISREG(dst.st_mode)
    assert stat.S_IMODE(dst.st_mode) == (0o4750 if ROOT else 0o640)
    if ROOT:
        assert (dst.st_uid, dst.st_gid) == (1234, 5678)
    assert dst.st_mtime_ns == 1_234_567_890_123_456_789
    assert xattrs(dirs.upper / "f") == {"user.mime": b"text/plain", "user.empty": b""}
    assert (dirs.upper / "f").read_bytes() == b"hello world"
    assert (dirs.lower / "f").read_bytes() == b"hello world"
    assert work_names(dirs) == []


@pytest.mark.parametrize("fsync", [True, False])
def test_copy_up_fsync_or_not(dirs: Dirs, fsync: bool) -> None:
    (dirs.lower / "f").write_bytes(b"data")
    do_copy_up(dirs, "f", fsync=fsync)
    assert (dirs.upper / "f").read_bytes() == b"data"


def test_copy_up_without_data(dirs: Dirs) -> None:
    # For open(O_TRUNC) and truncate(0): metadata only, an empty file.
    f = dirs.lower / "f"
    f.write_bytes(b"x" * 10000)
    os.setxattr(f, "user.k", b"v")
    f.chmod(0o604)
    src, dst = do_copy_up(dirs, "f", data=False)
    assert dst.st_size == 0
    assert stat.S_IMODE(dst.st_mode) == 0o604
    assert dst.st_mtime_ns == src.st_mtime_ns
    assert xattrs(dirs.upper / "f") == {"user.k": b"v"}


def test_copy_up_sparse_file_keeps_holes(dirs: Dirs) -> None:
    make_sparse(dirs.lower / "f", 8 * MiB, [(4 * MiB, b"x" * 4 * KiB)])
    if lstat(dirs.lower / "f").st_blocks * 512 >= 64 * KiB:
        pytest.skip("this filesystem does not make sparse files")
    _src, dst = do_copy_up(dirs, "f")
    assert dst.st_size == 8 * MiB
    assert dst.st_blocks * 512 < 64 * KiB


def test_copy_up_symlink(dirs: Dirs) -> None:
    link = dirs.lower / "l"
    link.symlink_to("../some/where")
    set_owner_and_times(link)
    src, dst = do_copy_up(dirs, "l")
    assert stat.S_ISLNK(dst.st_mode)
    assert os.readlink(dirs.upper / "l") == "../some/where"
    assert (dst.st_uid, dst.st_gid) == (src.st_uid, src.st_gid)
    assert dst.st_mtime_ns == src.st_mtime_ns
    assert work_names(dirs) == []


def test_copy_up_fifo(dirs: Dirs) -> None:
    os.mkfifo(dirs.lower / "p", 0o640)
    set_owner_and_times(dirs.lower / "p")
    src, dst = do_copy_up(dirs, "p")
    assert stat.S_ISFIFO(dst.st_mode)
    assert_same_metadata(src, dst)
    assert work_names(dirs) == []


def test_copy_up_directory_is_metadata_only(dirs: Dirs) -> None:
    d = dirs.lower / "d"
    d.mkdir()
    (d / "child").write_bytes(b"not copied")
    os.setxattr(d, "user.tag", b"t")
    set_owner_and_times(d)
    d.chmod(0o2751 if ROOT else 0o751)
    src, dst = do_copy_up(dirs, "d")
    assert stat.S_ISDIR(dst.st_mode)
    assert_same_metadata(src, dst)
    assert stat.S_IMODE(dst.st_mode) == (0o2751 if ROOT else 0o751)
    assert os.listdir(dirs.upper / "d") == []
    assert xattrs(dirs.upper / "d") == {"user.tag": b"t"}
    assert work_names(dirs) == []


@needs_root
@pytest.mark.parametrize(("kind", "rdev"), [
    (stat.S_IFCHR, os.makedev(1, 3)),
    (stat.S_IFBLK, os.makedev(7, 200)),
    (stat.S_IFCHR, os.makedev(0, 0)),
], ids=["char", "block", "char-0-0"])
def test_copy_up_device(dirs: Dirs, kind: int, rdev: int) -> None:
    os.mknod(dirs.lower / "dev", kind | 0o620, rdev)
    set_owner_and_times(dirs.lower / "dev")
    src, dst = do_copy_up(dirs, "dev")
    assert_same_metadata(src, dst)
    assert dst.st_rdev == rdev
    assert work_names(dirs) == []


@needs_root
def test_copy_up_socket(dirs: Dirs) -> None:
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.bind(os.fsdecode(dirs.lower / "sock"))
    set_owner_and_times(dirs.lower / "sock")
    src, dst = do_copy_up(dirs, "sock")
    assert stat.S_ISSOCK(dst.st_mode)
    assert_same_metadata(src, dst)


def test_private_user_xattrs_not_copied(dirs: Dirs) -> None:
    f = dirs.lower / "f"
    f.write_bytes(b"")
    os.setxattr(f, "user.overlay.origin", b"\0\1")
    os.setxattr(f, "user.overlay.opaque", b"y")
    os.setxattr(f, "user.fuseoverlayfs.origin", b"x")
    os.setxattr(f, "user.keep", b"1")
    do_copy_up(dirs, "f")
    assert xattrs(dirs.upper / "f") == {"user.keep": b"1"}


@needs_root
def test_private_trusted_xattrs_not_copied(dirs: Dirs) -> None:
    d = dirs.lower / "d"
    d.mkdir()
    os.setxattr(d, "trusted.overlay.origin", b"\0\xfb\x21")
    os.setxattr(d, "trusted.overlay.opaque", b"y")
    os.setxattr(d, "trusted.other", b"kept")
    do_copy_up(dirs, "d")
    assert xattrs(dirs.upper / "d") == {"trusted.other": b"kept"}


def test_copy_up_keeps_parent_times(dirs: Dirs) -> None:
    # A copy-up is no change of the merged parent directory (the kernel restores its times).
    (dirs.lower / "f").write_bytes(b"x")
    (dirs.lower / "d").mkdir()
    os.utime(dirs.upper, ns=(1_000_000_000_111, 2_000_000_000_222))
    do_copy_up(dirs, "f")
    do_copy_up(dirs, "d")
    st = lstat(dirs.upper)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_000_111, 2_000_000_000_222)
    assert sorted(os.listdir(dirs.upper)) == ["d", "f"]


def test_copy_up_refuses_to_replace(dirs: Dirs) -> None:
    (dirs.lower / "f").write_bytes(b"lower")
    (dirs.upper / "f").write_bytes(b"upper")
    src = lstat(dirs.lower / "f")
    with pytest.raises(FileExistsError):
        copy_up(dirs.lower_fd, b"f", src, dirs.work_fd, dirs.upper_fd)
    assert (dirs.upper / "f").read_bytes() == b"upper"
    assert work_names(dirs) == []


def test_copy_up_refuses_to_replace_dir(dirs: Dirs) -> None:
    (dirs.lower / "d").mkdir()
    (dirs.upper / "d").mkdir()
    (dirs.upper / "d" / "mine").write_bytes(b"")
    with pytest.raises(FileExistsError):
        copy_up(dirs.lower_fd, b"d", lstat(dirs.lower / "d"), dirs.work_fd, dirs.upper_fd)
    assert os.listdir(dirs.upper / "d") == ["mine"]
    assert work_names(dirs) == []


@pytest.mark.parametrize(("name", "make", "fail"), [
    ("f", lambda p: p.write_bytes(b"data"), "chown"),
    ("f", lambda p: p.write_bytes(b"data"), "fsync"),
    ("d", lambda p: p.mkdir(), "chown"),
    ("p", lambda p: os.mkfifo(p), "chown"),
    ("f", lambda p: p.write_bytes(b"data"), "utime"),
])
def test_failure_leaves_no_temp(dirs: Dirs, monkeypatch: pytest.MonkeyPatch, name: str,
                                make: Callable[[Path], object], fail: str) -> None:
    def enospc(*args: object, **kwargs: object) -> NoReturn:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    make(dirs.lower / name)
    src = lstat(dirs.lower / name)
    monkeypatch.setattr(os, fail, enospc)
    with pytest.raises(OSError, match="No space left on device") as excinfo:
        copy_up(dirs.lower_fd, os.fsencode(name), src, dirs.work_fd, dirs.upper_fd)
    assert excinfo.value.errno == errno.ENOSPC
    assert work_names(dirs) == []
    assert os.listdir(dirs.upper) == []


def test_temp_names_unique() -> None:
    names = {temp_name() for _ in range(1000)}
    assert len(names) == 1000
    assert all(n.startswith(TEMP_PREFIX + b"%d." % os.getpid()) for n in names)


def test_build_in_work(dirs: Dirs) -> None:
    def make(work_fd: int, tmp: bytes) -> None:
        os.mkdir(tmp, 0o755, dir_fd=work_fd)

    tmp = build_in_work(dirs.work_fd, make)
    assert tmp.startswith(TEMP_PREFIX)
    assert work_names(dirs) == [os.fsdecode(tmp)]


def test_build_in_work_failure_removes_partial(dirs: Dirs) -> None:
    def make(work_fd: int, tmp: bytes) -> None:
        os.mkdir(tmp, 0o755, dir_fd=work_fd)
        os.mkdir(tmp + b"/sub", dir_fd=work_fd)
        raise OSError(errno.EIO, "boom")

    with pytest.raises(OSError, match="boom"):
        build_in_work(dirs.work_fd, make)
    assert work_names(dirs) == []


# --- the workdir ------------------------------------------------------------------------------


def test_open_workdir_creates_work(tmp_path: Path) -> None:
    if not ROOT:
        pytest.skip("open_workdir's new work/ is mode 000: see test_open_workdir_unprivileged")
    wfd = fd_of(tmp_path)
    try:
        fd = open_workdir(wfd)
        try:
            assert os.path.samestat(os.fstat(fd), os.stat(tmp_path / "work"))
        finally:
            os.close(fd)
        fd = open_workdir(wfd)  # again: work/ exists already
        os.close(fd)
    finally:
        os.close(wfd)
    assert os.listdir(tmp_path) == ["work"]


def test_open_workdir_removes_only_our_leftovers(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "#overlayd.123.0").write_bytes(b"partial copy")
    deep = work / "#overlayd.123.1" / "a" / "b"
    deep.mkdir(parents=True)
    (deep / "f").write_bytes(b"")
    (deep / "l").symlink_to("/nonexistent")
    os.mkfifo(work / "#overlayd.9.9")
    (work / "#overlayd.123.2").symlink_to(tmp_path)  # never followed
    (tmp_path / "keep-me").write_bytes(b"")
    (work / "#3").mkdir()  # the kernel's leftovers are the kernel's business
    (work / "#3" / "x").write_bytes(b"")
    (work / "#overlayd").write_bytes(b"")  # no dot: not one of our temporaries
    (work / "index").mkdir()
    wfd = fd_of(tmp_path)
    try:
        os.close(open_workdir(wfd))
    finally:
        os.close(wfd)
    assert sorted(os.listdir(work)) == ["#3", "#overlayd", "index"]
    assert os.listdir(work / "#3") == ["x"]
    assert sorted(os.listdir(tmp_path)) == ["keep-me", "work"]


def test_clean_workdir_on_empty_dir(dirs: Dirs) -> None:
    clean_workdir(dirs.work_fd)
    assert work_names(dirs) == []


# --- an unprivileged daemon -------------------------------------------------------------------


def run_unprivileged(fn: Callable[[], object]) -> object:
    """Run *fn* as a non-root user: directly when not root, else in a child with uid 65534.

    An OSError in the child is raised again here (same errno); the child never returns into
    pytest.
    """
    if not ROOT:
        return fn()
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(rfd)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                result: tuple[str, object] = ("ok", fn())
            except OSError as e:
                result = ("oserror", (e.errno, e.strerror, repr(e)))
            except BaseException as e:
                result = ("error", repr(e))
            os.write(wfd, pickle.dumps(result))
        finally:
            os._exit(0)
    os.close(wfd)
    chunks = []
    while chunk := os.read(rfd, 65536):
        chunks.append(chunk)
    os.close(rfd)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    kind, value = pickle.loads(b"".join(chunks))
    if kind == "oserror":
        err, strerror, text = value
        raise OSError(err, f"{strerror} (in the unprivileged child: {text})")
    assert kind == "ok", value
    return value


@pytest.fixture
def user_dirs(tmp_path: Path) -> Iterator[tuple[int, int, int]]:
    """(lower, upper, workdir) fds of empty dirs owned by the unprivileged user."""
    paths = [tmp_path / n for n in ("lower", "upper", "work")]
    for p in paths:
        p.mkdir()
        if ROOT:
            os.chown(p, NOBODY, NOBODY)
    fds = [fd_of(p) for p in paths]
    yield fds[0], fds[1], fds[2]
    for fd in fds:
        os.close(fd)


def test_run_unprivileged_really_drops(user_dirs: tuple[int, int, int]) -> None:
    lower, _, _ = user_dirs

    def probe() -> tuple[int, int]:
        fd = os.open("f", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=lower)
        os.close(fd)
        st = os.stat("f", dir_fd=lower)
        return os.geteuid(), st.st_uid

    result = run_unprivileged(probe)
    assert isinstance(result, tuple)
    euid, owner = result
    assert euid != 0
    assert owner == euid
    with pytest.raises(PermissionError):
        run_unprivileged(lambda: os.open("/proc/1/environ", os.O_RDONLY))


def test_open_workdir_unprivileged(user_dirs: tuple[int, int, int]) -> None:
    lower, upper, workdir = user_dirs

    def scenario() -> list[str]:
        work = open_workdir(workdir)
        try:
            fd = os.open("f", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=lower)
            os.close(fd)
            copy_up(lower, b"f", os.stat("f", dir_fd=lower), work, upper)
            return os.listdir(upper)
        finally:
            os.close(work)

    assert run_unprivileged(scenario) == ["f"]


def unprivileged_work(workdir: int) -> int:
    os.mkdir("work", 0o700, dir_fd=workdir)
    return os.open("work", os.O_RDONLY | os.O_DIRECTORY, dir_fd=workdir)


def test_copy_up_unprivileged_plain(user_dirs: tuple[int, int, int]) -> None:
    lower, upper, workdir = user_dirs

    def scenario() -> list[str]:
        work = unprivileged_work(workdir)
        try:
            fd = os.open("f", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=lower)
            os.write(fd, b"data")
            os.close(fd)
            os.setxattr(fd_path(lower, b"f"), "user.k", b"v")
            os.mkdir("d", 0o755, dir_fd=lower)
            for name in (b"f", b"d"):
                copy_up(lower, name, os.stat(name, dir_fd=lower), work, upper)
            assert os.getxattr(fd_path(upper, b"f"), "user.k") == b"v"
            return sorted(os.listdir(upper)) + os.listdir(work)
        finally:
            os.close(work)

    assert run_unprivileged(scenario) == ["d", "f"]


def test_copy_up_unprivileged_read_only_directory(user_dirs: tuple[int, int, int]) -> None:
    lower, upper, workdir = user_dirs

    def scenario() -> tuple[list[str], int, list[str]]:
        work = unprivileged_work(workdir)
        try:
            os.mkdir("d", 0o555, dir_fd=lower)
            copy_up(lower, b"d", os.stat("d", dir_fd=lower), work, upper)
            return (os.listdir(upper), stat.S_IMODE(os.stat("d", dir_fd=upper).st_mode),
                    os.listdir(work))
        finally:
            os.close(work)

    assert run_unprivileged(scenario) == (["d"], 0o555, [])


def test_copy_up_unprivileged_read_only_file_with_xattrs(
        user_dirs: tuple[int, int, int]) -> None:
    lower, upper, workdir = user_dirs

    def scenario() -> tuple[int, bytes]:
        work = unprivileged_work(workdir)
        try:
            fd = os.open("f", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=lower)
            os.close(fd)
            os.setxattr(fd_path(lower, b"f"), "user.k", b"v")
            os.chmod("f", 0o444, dir_fd=lower)
            copy_up(lower, b"f", os.stat("f", dir_fd=lower), work, upper)
            return (stat.S_IMODE(os.stat("f", dir_fd=upper).st_mode),
                    os.getxattr(fd_path(upper, b"f"), "user.k"))
        finally:
            os.close(work)

    assert run_unprivileged(scenario) == (0o444, b"v")
