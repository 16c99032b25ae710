"""Tier 2: the pyfuse3 adapter in-process, without a mount, with a fake request context."""

from __future__ import annotations

import errno
import logging
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyfuse3
import pytest

from overlayd.fs import DIRECT_WRITES, WRITE_KILL_SUIDGID, Operations
from overlayd.inodes import ROOT_INODE
from overlayd.options import parse_options
from overlayd.overlay import (
    Overlay,
    effective_caps,
    in_initial_user_namespace,
    lacks_fsetid,
    open_layers,
)
from tests.conftest import needs_root
from tests.mounting import poll
from tests.test_kernel_acl import DEFAULT, file_acl

CTX: Any = SimpleNamespace(uid=os.getuid(), gid=os.getgid(), pid=os.getpid(), umask=0o022)


def make_ops(tmp_path: Path, writable: bool) -> Operations:
    lower1, lower2 = tmp_path / "lower1", tmp_path / "lower2"
    upper, work = tmp_path / "upper", tmp_path / "work"
    for d in (lower1, lower2, upper, work):
        d.mkdir()
    (lower2 / "f").write_bytes(b"lower2 f")
    (lower1 / "g").write_bytes(b"lower1 g")
    (lower2 / "d").mkdir()
    (lower1 / "d").mkdir()
    (lower2 / "d" / "x").write_bytes(b"x")
    os.link(lower2 / "f", lower2 / "f2")
    os.setxattr(lower1 / "g", "user.shown", b"1")
    text = f"lowerdir={lower1}:{lower2}"
    if writable:
        text += f",upperdir={upper},workdir={work}"
    opts = parse_options([text])
    return Operations(Overlay(opts, open_layers(opts)))


@pytest.fixture
def ops(tmp_path: Path) -> Iterator[Operations]:
    operations = make_ops(tmp_path, writable=True)
    yield operations
    operations.overlay.table.check_invariants()
    operations.overlay.close()


@pytest.fixture
def ro_ops(tmp_path: Path) -> Iterator[Operations]:
    operations = make_ops(tmp_path, writable=False)
    yield operations
    operations.overlay.close()


async def test_lookup_counts_and_forget(ops: Operations) -> None:
    first = await ops.lookup(ROOT_INODE, b"f", CTX)
    second = await ops.lookup(ROOT_INODE, b"f", CTX)
    assert first.st_ino == second.st_ino
    node = ops.overlay.table.get(first.st_ino)
    assert node is not None
    assert node.lookups == 2
    await ops.forget([(first.st_ino, 1)])
    assert ops.overlay.table.get(first.st_ino) is node
    await ops.forget([(first.st_ino, 1)])
    assert ops.overlay.table.get(first.st_ino) is None
    with pytest.raises(pyfuse3.FUSEError) as excinfo:
        await ops.getattr(first.st_ino, CTX)
    assert excinfo.value.errno == errno.ESTALE


async def test_lower_hard_links_share_one_inode_read_only(ro_ops: Operations) -> None:
    f = await ro_ops.lookup(ROOT_INODE, b"f", CTX)
    f2 = await ro_ops.lookup(ROOT_INODE, b"f2", CTX)
    assert f.st_ino == f2.st_ino
    assert f.st_nlink == 2


async def test_lower_hard_links_break_on_copy_up(ops: Operations, tmp_path: Path) -> None:
    """Writable, as the kernel with index=off: each name is its own inode, so writing through
    one name copies up that name only."""
    f = await ops.lookup(ROOT_INODE, b"f", CTX)
    f2 = await ops.lookup(ROOT_INODE, b"f2", CTX)
    assert f.st_ino != f2.st_ino
    assert (f.st_nlink, f2.st_nlink) == (2, 2)
    again = await ops.lookup(ROOT_INODE, b"f2", CTX)
    assert again.st_ino == f2.st_ino  # stable per name
    info = await ops.open(f2.st_ino, os.O_WRONLY | os.O_APPEND, CTX)
    await ops.write(info.fh, 8, b"!")
    await ops.release(info.fh)
    assert sorted(os.listdir(tmp_path / "upper")) == ["f2"]
    assert (tmp_path / "upper" / "f2").read_bytes() == b"lower2 f!"
    assert (await ops.getattr(f2.st_ino, CTX)).st_nlink == 1
    reader = await ops.open(f.st_ino, os.O_RDONLY, CTX)
    assert await ops.read(reader.fh, 0, 100) == b"lower2 f"
    await ops.release(reader.fh)


async def test_negative_lookup_is_a_cacheable_entry(ops: Operations) -> None:
    attr = await ops.lookup(ROOT_INODE, b"absent", CTX)
    assert attr.st_ino == 0
    assert attr.entry_timeout > 0
    assert len(ops.overlay.table) == 1  # nothing remembered


async def test_merged_dir_reports_nlink_one(ops: Operations) -> None:
    d = await ops.lookup(ROOT_INODE, b"d", CTX)
    assert stat.S_ISDIR(d.st_mode)
    assert d.st_nlink == 1


async def test_private_xattrs_hidden_and_escaped(ops: Operations, tmp_path: Path) -> None:
    os.setxattr(tmp_path / "lower1" / "g", "trusted.overlay.opaque", b"y")
    g = await ops.lookup(ROOT_INODE, b"g", CTX)
    assert await ops.listxattr(g.st_ino, CTX) == [b"user.shown"]
    assert await ops.getxattr(g.st_ino, b"user.shown", CTX) == b"1"
    with pytest.raises(pyfuse3.FUSEError) as excinfo:
        await ops.getxattr(g.st_ino, b"trusted.overlay.opaque", CTX)
    assert excinfo.value.errno == errno.ENODATA
    with pytest.raises(pyfuse3.FUSEError) as excinfo:
        await ops.setxattr(g.st_ino, b"user.fuseoverlayfs.opaque", b"y", CTX)
    assert excinfo.value.errno == errno.EOPNOTSUPP
    assert not (tmp_path / "upper" / "g").exists()  # refused before any copy-up
    # The kernel's escaping for nested overlays: stored as trusted.overlay.overlay.*.
    await ops.setxattr(g.st_ino, b"trusted.overlay.opaque", b"nested", CTX)
    assert os.getxattr(tmp_path / "upper" / "g", "trusted.overlay.overlay.opaque") == b"nested"
    with pytest.raises(OSError, match="No data available"):  # private: not copied up
        os.getxattr(tmp_path / "upper" / "g", "trusted.overlay.opaque")
    assert sorted(await ops.listxattr(g.st_ino, CTX)) == [b"trusted.overlay.opaque",
                                                          b"user.shown"]
    assert await ops.getxattr(g.st_ino, b"trusted.overlay.opaque", CTX) == b"nested"


async def test_unexpected_exception_is_eio_and_logged(
        ops: Operations, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def broken(*_args: object) -> None:
        raise RuntimeError("injected fault")

    monkeypatch.setattr(ops.overlay, "stat", broken)
    with caplog.at_level(logging.ERROR, logger="overlayd.fs"), \
            pytest.raises(pyfuse3.FUSEError) as excinfo:
        await ops.getattr(ROOT_INODE, CTX)
    assert excinfo.value.errno == errno.EIO
    assert "injected fault" in caplog.text
    monkeypatch.undo()
    attr = await ops.getattr(ROOT_INODE, CTX)  # and the next request is served
    assert stat.S_ISDIR(attr.st_mode)


async def test_read_only_refuses_changes(ro_ops: Operations) -> None:
    f = await ro_ops.lookup(ROOT_INODE, b"f", CTX)
    for call in (ro_ops.mkdir(ROOT_INODE, b"new", 0o755, CTX),
                 ro_ops.unlink(ROOT_INODE, b"f", CTX),
                 ro_ops.open(f.st_ino, os.O_WRONLY, CTX)):
        with pytest.raises(pyfuse3.FUSEError) as excinfo:
            await call
        assert excinfo.value.errno == errno.EROFS
    info = await ro_ops.open(f.st_ino, os.O_RDONLY, CTX)
    assert await ro_ops.read(info.fh, 0, 100) == b"lower2 f"
    await ro_ops.release(info.fh)


async def test_open_for_write_copies_up(ops: Operations, tmp_path: Path) -> None:
    f = await ops.lookup(ROOT_INODE, b"f", CTX)
    reader = await ops.open(f.st_ino, os.O_RDONLY, CTX)
    writer = await ops.open(f.st_ino, os.O_WRONLY, CTX)
    assert (tmp_path / "upper" / "f").read_bytes() == b"lower2 f"
    assert await ops.write(writer.fh, 0, b"UPPER") == 5
    await ops.fsync(writer.fh, False)
    # The reader opened before the copy-up now reads the merged view's one version.
    assert await ops.read(reader.fh, 0, 100) == b"UPPER2 f"
    assert (tmp_path / "lower2" / "f").read_bytes() == b"lower2 f"
    after = await ops.getattr(f.st_ino, CTX)
    assert after.st_ino == f.st_ino  # copy-up keeps the inode number
    for fh in (reader.fh, writer.fh):
        await ops.release(fh)
    assert ops.overlay.handles == {}
    assert os.listdir(tmp_path / "work" / "work") == []


@needs_root
async def test_unlink_of_lower_file_writes_whiteout(ops: Operations, tmp_path: Path) -> None:
    await ops.unlink(ROOT_INODE, b"g", CTX)
    st = os.lstat(tmp_path / "upper" / "g")
    assert stat.S_ISCHR(st.st_mode)
    assert st.st_rdev == 0
    assert (await ops.lookup(ROOT_INODE, b"g", CTX)).st_ino == 0
    with pytest.raises(pyfuse3.FUSEError) as excinfo:
        await ops.unlink(ROOT_INODE, b"g", CTX)
    assert excinfo.value.errno == errno.ENOENT


@needs_root
async def test_create_owned_by_caller(ops: Operations, tmp_path: Path) -> None:
    ctx: Any = SimpleNamespace(uid=4321, gid=8765, pid=1, umask=0o022)
    info, attr = await ops.create(ROOT_INODE, b"new", stat.S_IFREG | 0o640, os.O_WRONLY, ctx)
    assert (attr.st_uid, attr.st_gid) == (4321, 8765)
    assert stat.S_IMODE(attr.st_mode) == 0o640
    st = os.lstat(tmp_path / "upper" / "new")
    assert (st.st_uid, st.st_gid) == (4321, 8765)
    await ops.release(info.fh)
    await ops.forget([(attr.st_ino, 1)])


async def test_changes_reach_the_upper_copy_past_an_open_lower_handle(
        ops: Operations, tmp_path: Path) -> None:
    """An open file's fd stands in for its name (Overlay._top_fd), but only in the node's top
    layer: a handle opened below before the copy-up still holds the lower file."""
    g = await ops.lookup(ROOT_INODE, b"g", CTX)
    reader = await ops.open(g.st_ino, os.O_RDONLY, CTX)
    lower = tmp_path / "lower1" / "g"
    before = os.lstat(lower)
    attr = pyfuse3.EntryAttributes()
    attr.st_mode, attr.st_mtime_ns = stat.S_IFREG | 0o600, 10**18
    changed = await ops.setattr(g.st_ino, attr, _fields(update_mode=True, update_mtime=True),
                                None, CTX)
    await ops.setxattr(g.st_ino, b"user.new", b"v", CTX)
    assert (stat.S_IMODE(changed.st_mode), changed.st_mtime_ns) == (0o600, 10**18)
    upper = os.lstat(tmp_path / "upper" / "g")
    assert (stat.S_IMODE(upper.st_mode), upper.st_mtime_ns) == (0o600, 10**18)
    assert os.getxattr(tmp_path / "upper" / "g", "user.new") == b"v"
    after = os.lstat(lower)
    assert (after.st_mode, after.st_mtime_ns) == (before.st_mode, before.st_mtime_ns)
    assert os.listxattr(lower) == ["user.shown"]
    assert (await ops.getattr(g.st_ino, CTX)).st_mtime_ns == 10**18
    await ops.release(reader.fh)


async def test_created_file_answers_xattrs_it_was_given(ops: Operations, tmp_path: Path) -> None:
    """A new file's xattr names are listed at create (through its fd): what the upper
    filesystem gave it, such as the parent's default ACL, is there to read at once."""
    upper = tmp_path / "upper"
    os.setxattr(upper, DEFAULT, file_acl(6, 4, 4, nobody=4))
    info, attr = await ops.create(ROOT_INODE, b"new", stat.S_IFREG | 0o640, os.O_WRONLY, CTX)
    acl = await ops.getxattr(attr.st_ino, b"system.posix_acl_access", CTX)
    assert acl == os.getxattr(upper / "new", "system.posix_acl_access")
    with pytest.raises(pyfuse3.FUSEError) as excinfo:
        await ops.getxattr(attr.st_ino, b"security.capability", CTX)
    assert excinfo.value.errno == errno.ENODATA
    await ops.release(info.fh)
    await ops.forget([(attr.st_ino, 1)])


async def test_debug_log_has_every_request_and_no_data(
        ops: Operations, caplog: pytest.LogCaptureFixture) -> None:
    ops.trace = True  # as -d sets it
    caplog.set_level(logging.DEBUG, logger="overlayd.fs")
    info, attr = await ops.create(ROOT_INODE, b"new", stat.S_IFREG | 0o640, os.O_WRONLY, CTX)
    await ops.write(info.fh, 0, b"secret")
    await ops.setxattr(attr.st_ino, b"user.key", b"value", CTX)
    await ops.release(info.fh)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        f"request create(1, b'new', {stat.S_IFREG | 0o640}, {os.O_WRONLY})",
        f"request write({info.fh}, 0, '<6 bytes>')",
        f"request setxattr({attr.st_ino}, b'user.key', '<5 bytes>')",
        f"request release({info.fh},)",
    ]
    await ops.forget([(attr.st_ino, 1)])


async def test_flush_is_not_implemented(ops: Operations) -> None:
    """ENOSYS to FLUSH makes the kernel stop sending it: one request fewer per close(2)."""
    with pytest.raises(pyfuse3.FUSEError) as excinfo:
        await ops.flush(pyfuse3.FileHandleT(1))
    assert excinfo.value.errno == errno.ENOSYS


@pytest.mark.parametrize(("offset", "size", "keep"), [
    (0, 4096, True),  # whole pages: the kernel's cached copy is complete
    (0, 4096 * 3, True),
    (0, 10240, False),  # tar's records end inside a page
    (5, 4091, False),  # starts inside one
])
async def test_open_drops_cached_pages_after_a_partial_page_write(
        ops: Operations, offset: int, size: int, keep: bool) -> None:
    f = await ops.lookup(ROOT_INODE, b"f", CTX)
    writer = await ops.open(f.st_ino, os.O_RDWR, CTX)  # read-write: its writes go through the cache
    assert writer.keep_cache
    await ops.write(writer.fh, offset, b"x" * size)
    reader = await ops.open(f.st_ino, os.O_RDONLY, CTX)
    assert reader.keep_cache is keep
    again = await ops.open(f.st_ino, os.O_RDONLY, CTX)
    assert again.keep_cache  # dropped once: the kernel then reads whole pages and keeps them
    for fh in (writer.fh, reader.fh, again.fh):
        await ops.release(fh)


@pytest.mark.parametrize(("flags", "direct"), [
    (os.O_WRONLY, True), (os.O_WRONLY | os.O_APPEND, True), (os.O_WRONLY | os.O_TRUNC, True),
    (os.O_RDWR, False), (os.O_RDONLY, False),
])
async def test_write_only_handles_bypass_the_page_cache(ops: Operations, flags: int,
                                                        direct: bool) -> None:
    """FOPEN_DIRECT_IO for a file open for writing only, whether opened or created."""
    assert DIRECT_WRITES  # the patched binding: tests/test_cli.py checks it is the one built
    f = await ops.lookup(ROOT_INODE, b"f", CTX)
    info = await ops.open(f.st_ino, flags, CTX)
    assert info.direct_io is direct
    made, attr = await ops.create(ROOT_INODE, b"new", stat.S_IFREG | 0o644, flags | os.O_CREAT,
                                  CTX)
    assert made.direct_io is direct
    if flags & os.O_ACCMODE != os.O_RDONLY:
        # A direct write leaves no page half written in the kernel: nothing to drop at the next
        # open, unlike a cached one.
        await ops.write(info.fh, 5, b"x" * 10)
        reader = await ops.open(f.st_ino, os.O_RDONLY, CTX)
        assert reader.keep_cache is direct
        await ops.release(reader.fh)
    for fh in (info.fh, made.fh):
        await ops.release(fh)
    await ops.forget([(f.st_ino, 1), (attr.st_ino, 1)])


@pytest.mark.parametrize(("mode", "killed"), [
    (0o4755, 0o0755),
    (0o6775, 0o0775),
    (0o2775, 0o0775),
    (0o2765, 0o2765),  # set-group-ID without group execute stays, as in the kernel's FUSE client
    (0o0755, 0o0755),
])
async def test_direct_write_clears_set_id_bits_when_the_kernel_says(
        ops: Operations, tmp_path: Path, mode: int, killed: int) -> None:
    """The kernel sets WRITE_KILL_SUIDGID on a direct write by a process without CAP_FSETID and
    leaves the clearing to us; a later chmod through us makes us look again."""
    f = await ops.lookup(ROOT_INODE, b"f", CTX)
    info = await ops.open(f.st_ino, os.O_WRONLY, CTX)
    upper = tmp_path / "upper" / "f"
    for _ in range(2):
        await ops.setattr(f.st_ino, _mode_attr(mode), _MODE_ONLY, None, CTX)
        await ops.write(info.fh, 0, b"a", 0)  # CAP_FSETID: nothing cleared
        assert stat.S_IMODE(upper.stat().st_mode) == mode
        await ops.write(info.fh, 1, b"b", WRITE_KILL_SUIDGID)
        assert stat.S_IMODE(upper.stat().st_mode) == killed
    assert upper.read_bytes().startswith(b"ab")
    await ops.release(info.fh)
    await ops.forget([(f.st_ino, 1)])


@pytest.mark.parametrize(("caller", "mode"), [
    ((0, 65534), 0o0755),  # not in our pid namespace: its uid decides
    ((0, 0), 0o4755),
    ((os.getpid(), os.getuid()), 0o4755 if os.geteuid() == 0 else 0o0755),
])
async def test_truncating_open_clears_set_id_bits_for_a_caller_without_cap_fsetid(
        ops: Operations, tmp_path: Path, caller: tuple[int, int], mode: int) -> None:
    f = await ops.lookup(ROOT_INODE, b"f", CTX)
    await ops.setattr(f.st_ino, _mode_attr(0o4755), _MODE_ONLY, None, CTX)
    ctx = SimpleNamespace(uid=caller[1], gid=0, pid=caller[0], umask=0o022)
    info = await ops.open(f.st_ino, os.O_WRONLY | os.O_TRUNC, ctx)
    st = (tmp_path / "upper" / "f").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_size) == (mode, 0)
    await ops.release(info.fh)
    await ops.forget([(f.st_ino, 1)])


@pytest.mark.parametrize("through_handle", [False, True])
@pytest.mark.parametrize("kill", [False, True])
async def test_truncation_clears_set_id_bits_when_the_kernel_says(
        ops: Operations, tmp_path: Path, through_handle: bool, kill: bool) -> None:
    """With FUSE_HANDLE_KILLPRIV_V2 the kernel flags a truncation by a process without
    CAP_FSETID (SetattrFields.kill_suidgid) and leaves the clearing to us."""
    assert ops.killpriv_v2  # the patched binding
    f = await ops.lookup(ROOT_INODE, b"f", CTX)
    await ops.setattr(f.st_ino, _mode_attr(0o6775), _MODE_ONLY, None, CTX)
    info = await ops.open(f.st_ino, os.O_WRONLY, CTX) if through_handle else None
    attr = pyfuse3.EntryAttributes()
    attr.st_size = 3
    await ops.setattr(f.st_ino, attr, _fields(update_size=True, kill_suidgid=kill),
                      info.fh if info else None, CTX)
    st = (tmp_path / "upper" / "f").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_size) == (0o0775 if kill else 0o6775, 3)
    if info:
        await ops.release(info.fh)
    await ops.forget([(f.st_ino, 1)])


@needs_root  # file capabilities
@pytest.mark.parametrize(("uid", "capped", "mode"), [
    (65534, False, 0o0755),
    (65534, True, 0o0755),
    (0, False, 0o0755),  # a chown(-1, -1): root's clears the set-id bits too
    (0, True, 0o4755),  # or a write by root: only the capability goes
])
async def test_a_change_with_nothing_to_set_clears_privileges(
        ops: Operations, tmp_path: Path, uid: int, capped: bool, mode: int) -> None:
    """With FUSE_HANDLE_KILLPRIV_V2 the kernel sends a SETATTR with nothing to set for a
    chown(-1, -1), and before a change to the data that must clear set-id bits or capabilities
    (file_remove_privs), having removed the capabilities itself just before. It copies up, as
    the kernel's overlay does for chown(-1, -1)."""
    lower = tmp_path / "lower1" / "g"
    os.chmod(lower, 0o4755)
    if capped:
        os.setxattr(lower, "security.capability", bytes.fromhex("01000002" + "00" * 16))
    g = await ops.lookup(ROOT_INODE, b"g", CTX)
    ctx = SimpleNamespace(uid=uid, gid=0, pid=0, umask=0o022)  # pid 0: its uid decides
    if capped:
        await ops.removexattr(g.st_ino, b"security.capability", ctx)
    await ops.setattr(g.st_ino, pyfuse3.EntryAttributes(), _fields(), None, ctx)
    upper = tmp_path / "upper" / "g"
    assert stat.S_IMODE(upper.stat().st_mode) == mode
    assert "security.capability" not in os.listxattr(upper)
    assert stat.S_IMODE(lower.stat().st_mode) == 0o4755
    await ops.forget([(g.st_ino, 1)])


def _fields(**update: bool) -> Any:
    names = ("update_mode", "update_uid", "update_gid", "update_size", "update_atime",
             "update_mtime", "kill_suidgid")
    return SimpleNamespace(**{name: update.get(name, False) for name in names})


def _mode_attr(mode: int) -> pyfuse3.EntryAttributes:
    attr = pyfuse3.EntryAttributes()
    attr.st_mode = stat.S_IFREG | mode
    return attr


_MODE_ONLY: Any = SimpleNamespace(update_mode=True, update_uid=False, update_gid=False,
                                  update_size=False, update_atime=False, update_mtime=False)


@pytest.mark.parametrize(("caps", "initial_ns", "offered"),
                         [(0, True, False), (1 << 21, True, True), (None, True, False),
                          (1 << 21, False, False)])
def test_passthrough_is_offered_only_with_cap_sys_admin(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caps: int | None, initial_ns: bool,
        offered: bool) -> None:
    """FUSE_DEV_IOC_BACKING_OPEN needs CAP_SYS_ADMIN in the initial user namespace: without it
    (a rootless daemon, a user namespace's root, or /proc unreadable) FUSE_PASSTHROUGH is not
    offered at INIT (pyfuse3.init reads the attribute)."""
    monkeypatch.setattr("overlayd.fs.effective_caps", lambda: caps)
    monkeypatch.setattr("overlayd.fs.in_initial_user_namespace", lambda: initial_ns)
    operations = make_ops(tmp_path, writable=True)
    try:
        assert operations.passthrough is offered
    finally:
        operations.overlay.close()
    assert effective_caps() is not None  # this process's own, from /proc


def test_initial_user_namespace_is_the_identity_uid_map(tmp_path: Path) -> None:
    uid_map = tmp_path / "uid_map"
    uid_map.write_text("         0          0 4294967295\n")
    assert in_initial_user_namespace(str(uid_map))
    uid_map.write_text("         0       1000          1\n         1     100000      65536\n")
    assert not in_initial_user_namespace(str(uid_map))
    assert not in_initial_user_namespace(str(tmp_path / "missing"))
    # The daemon's own answer is what test_kernel_passthrough relies on: were it False here,
    # passthrough would not be offered and its stopped-daemon write would hang.


@needs_root
def test_lacks_fsetid_asks_proc() -> None:
    """Root with CAP_FSETID has it; nobody, and root without it in its bounding set, lack it;
    a process /proc cannot tell of is judged by its uid."""
    assert not lacks_fsetid(os.getpid(), 0)
    for argv in (["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"],
                 ["setpriv", "--bounding-set=-fsetid"]):
        with subprocess.Popen([*argv, "sleep", "30"]) as proc:
            try:
                poll(lambda: _exe(proc.pid) == "sleep", 10, "setpriv to exec sleep")
                assert lacks_fsetid(proc.pid, 0)
            finally:
                proc.kill()
    assert lacks_fsetid(0, 65534)
    assert not lacks_fsetid(0, 0)


def _exe(pid: int) -> str:
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return ""
