"""Tier 1: resolving names through a layer stack and listing merged directories, on temp dirs.

Layers are plain directories under tmp_path, given to layers.resolve/list_merged as
``(index, dir fd)`` top first, exactly as the daemon does.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from overlayd.constants import OPAQUE_MARKER, OPAQUE_XATTRS, WHITEOUT_PREFIX
from overlayd.layers import list_merged, open_dir_at, resolve
from overlayd.ondisk import (
    fd_path,
    has_oci_whiteout,
    is_hidden_name,
    is_opaque_dir,
    is_private_xattr,
    is_whiteout,
    whiteout_target,
)

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root (mknod of char 0/0, trusted.*)")

Stack = list[tuple[int, int]]
OpenStack = Callable[..., Stack]


@pytest.fixture
def open_stack() -> Iterator[OpenStack]:
    """open_stack(dir, dir, ...) -> [(0, fd), (1, fd), ...], closed after the test."""
    fds: list[int] = []

    def open_(*dirs: Path) -> Stack:
        stack = []
        for index, d in enumerate(dirs):
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fds.append(fd)
            stack.append((index, fd))
        return stack

    yield open_
    for fd in fds:
        os.close(fd)


def layers(tmp_path: Path, n: int) -> list[Path]:
    dirs = [tmp_path / f"l{i}" for i in range(n)]
    for d in dirs:
        d.mkdir()
    return dirs


def char_whiteout(path: Path) -> None:
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(0, 0))


def fake_stat(mode: int, rdev: int = 0) -> os.stat_result:
    return os.stat_result((mode, 1, 1, 1, 0, 0, 0, 0, 0, 0), {"st_rdev": rdev})


# --- resolve ----------------------------------------------------------------------------------


def test_top_layer_wins(tmp_path: Path, open_stack: OpenStack) -> None:
    top, bottom = layers(tmp_path, 2)
    (top / "f").write_bytes(b"top")
    (bottom / "f").write_bytes(b"bottom!")
    found = resolve(open_stack(top, bottom), b"f")
    assert found is not None
    assert found.layers == (0,)
    assert found.st.st_ino == (top / "f").stat().st_ino
    assert found.st.st_size == 3
    assert not found.is_dir


def test_name_only_below(tmp_path: Path, open_stack: OpenStack) -> None:
    top, middle, bottom = layers(tmp_path, 3)
    (bottom / "f").write_bytes(b"x")
    found = resolve(open_stack(top, middle, bottom), b"f")
    assert found is not None
    assert found.layers == (2,)
    assert found.st.st_ino == (bottom / "f").stat().st_ino


def test_absent_name(tmp_path: Path, open_stack: OpenStack) -> None:
    assert resolve(open_stack(*layers(tmp_path, 2)), b"nothing") is None


def test_directories_merge(tmp_path: Path, open_stack: OpenStack) -> None:
    top, middle, bottom = layers(tmp_path, 3)
    for d in (top, bottom):
        (d / "d").mkdir()
    found = resolve(open_stack(top, middle, bottom), b"d")
    assert found is not None
    assert found.layers == (0, 2)
    assert found.is_dir
    assert found.st.st_ino == (top / "d").stat().st_ino


@needs_root
def test_char_whiteout_hides_lower(tmp_path: Path, open_stack: OpenStack) -> None:
    top, bottom = layers(tmp_path, 2)
    char_whiteout(top / "f")
    (bottom / "f").write_bytes(b"x")
    (bottom / "g").write_bytes(b"x")
    dirs = open_stack(top, bottom)
    assert resolve(dirs, b"f") is None
    assert list_merged(dirs) == [b"g"]


@needs_root
def test_char_whiteout_ends_directory_merge(tmp_path: Path, open_stack: OpenStack) -> None:
    top, middle, bottom = layers(tmp_path, 3)
    (top / "d").mkdir()
    char_whiteout(middle / "d")
    (bottom / "d").mkdir()
    found = resolve(open_stack(top, middle, bottom), b"d")
    assert found is not None
    assert found.layers == (0,)


@needs_root
def test_char_device_not_0_0_is_no_whiteout(tmp_path: Path, open_stack: OpenStack) -> None:
    top, bottom = layers(tmp_path, 2)
    os.mknod(top / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    (bottom / "null").write_bytes(b"x")
    dirs = open_stack(top, bottom)
    found = resolve(dirs, b"null")
    assert found is not None
    assert found.layers == (0,)
    assert stat.S_ISCHR(found.st.st_mode)
    assert list_merged(dirs) == [b"null"]


def test_oci_whiteout_hides_lower(tmp_path: Path, open_stack: OpenStack) -> None:
    top, middle, bottom = layers(tmp_path, 3)
    (middle / ".wh.f").write_bytes(b"")
    (bottom / "f").write_bytes(b"x")
    (bottom / "d").mkdir()
    (middle / ".wh.d").write_bytes(b"")
    (bottom / "g").write_bytes(b"x")
    dirs = open_stack(top, middle, bottom)
    assert resolve(dirs, b"f") is None
    assert resolve(dirs, b"d") is None
    assert list_merged(dirs) == [b"g"]
    assert has_oci_whiteout(dirs[1][1], b"f")
    assert not has_oci_whiteout(dirs[2][1], b"f")


def test_oci_whiteout_ends_directory_merge(tmp_path: Path, open_stack: OpenStack) -> None:
    top, middle, bottom = layers(tmp_path, 3)
    (top / "d").mkdir()
    (middle / ".wh.d").write_bytes(b"")
    (bottom / "d").mkdir()
    found = resolve(open_stack(top, middle, bottom), b"d")
    assert found is not None
    assert found.layers == (0,)


def test_oci_whiteout_does_not_hide_layers_above(tmp_path: Path, open_stack: OpenStack) -> None:
    top, bottom = layers(tmp_path, 2)
    (top / "f").write_bytes(b"x")
    (bottom / ".wh.f").write_bytes(b"")
    found = resolve(open_stack(top, bottom), b"f")
    assert found is not None
    assert found.layers == (0,)


@pytest.mark.parametrize("name", [b".wh.f", OPAQUE_MARKER, b".wh.", b".wh..wh.plnk"])
def test_whiteout_names_never_resolve(tmp_path: Path, open_stack: OpenStack,
                                      name: bytes) -> None:
    (top,) = layers(tmp_path, 1)
    (top / os.fsdecode(name)).write_bytes(b"")
    assert resolve(open_stack(top), name) is None
    assert list_merged(open_stack(top)) == []


def test_same_layer_oci_whiteout_hides_only_lower_names(tmp_path: Path,
                                                        open_stack: OpenStack) -> None:
    # OCI image spec: "Whiteout files MUST only apply to resources in lower/parent layers.
    # Files that are present in the same layer as a whiteout file can only be hidden by whiteout
    # files in subsequent layers." The code agrees for files.
    top, bottom = layers(tmp_path, 2)
    (top / "x").write_bytes(b"top")
    (top / ".wh.x").write_bytes(b"")
    (bottom / "x").write_bytes(b"bottom")
    (bottom / "y").write_bytes(b"")
    dirs = open_stack(top, bottom)
    assert sorted(list_merged(dirs)) == [b"x", b"y"]
    found = resolve(dirs, b"x")
    assert found is not None
    assert found.layers == (0,)
    assert found.st.st_ino == (top / "x").stat().st_ino


def test_same_layer_oci_whiteout_stops_directory_merge(tmp_path: Path,
                                                       open_stack: OpenStack) -> None:
    top, bottom = layers(tmp_path, 2)
    (top / "d").mkdir()
    (top / ".wh.d").write_bytes(b"")
    (bottom / "d").mkdir()
    (bottom / "d" / "old").write_bytes(b"")
    found = resolve(open_stack(top, bottom), b"d")
    assert found is not None
    assert found.layers == (0,)


@pytest.mark.parametrize("fmt", [*OPAQUE_XATTRS, OPAQUE_MARKER], ids=os.fsdecode)
def test_opaque_directory_stops_merge(tmp_path: Path, open_stack: OpenStack,
                                      fmt: bytes) -> None:
    if fmt.startswith(b"trusted.") and not ROOT:
        pytest.skip("trusted.* xattrs need root")
    top, middle, bottom = layers(tmp_path, 3)
    for d in (top, middle, bottom):
        (d / "d").mkdir()
    (top / "d" / "a").write_bytes(b"")
    (middle / "d" / "b").write_bytes(b"")
    (bottom / "d" / "c").write_bytes(b"")
    if fmt == OPAQUE_MARKER:
        (middle / "d" / os.fsdecode(OPAQUE_MARKER)).write_bytes(b"")
    else:
        os.setxattr(middle / "d", fmt, b"y")
    dirs = open_stack(top, middle, bottom)
    assert not is_opaque_dir(fd_path(dirs[0][1], b"d"))
    assert is_opaque_dir(fd_path(dirs[1][1], b"d"))
    found = resolve(dirs, b"d")
    assert found is not None
    assert found.layers == (0, 1)
    sub = [(i, open_dir_at(fd, b"d")) for i, fd in dirs if i in found.layers]
    try:
        assert sorted(list_merged(sub)) == [b"a", b"b"]
    finally:
        for _i, fd in sub:
            os.close(fd)


@pytest.mark.parametrize("fmt", OPAQUE_XATTRS, ids=os.fsdecode)
def test_opaque_top_directory(tmp_path: Path, open_stack: OpenStack, fmt: bytes) -> None:
    if fmt.startswith(b"trusted.") and not ROOT:
        pytest.skip("trusted.* xattrs need root")
    top, bottom = layers(tmp_path, 2)
    for d in (top, bottom):
        (d / "d").mkdir()
    os.setxattr(top / "d", fmt, b"y")
    found = resolve(open_stack(top, bottom), b"d")
    assert found is not None
    assert found.layers == (0,)


@pytest.mark.parametrize("value", [b"n", b"x", b"", b"yes"])
def test_opaque_xattr_needs_value_y(tmp_path: Path, open_stack: OpenStack, value: bytes) -> None:
    top, bottom = layers(tmp_path, 2)
    for d in (top, bottom):
        (d / "d").mkdir()
    os.setxattr(top / "d", b"user.overlay.opaque", value)
    dirs = open_stack(top, bottom)
    assert not is_opaque_dir(fd_path(dirs[0][1], b"d"))
    found = resolve(dirs, b"d")
    assert found is not None
    assert found.layers == (0, 1)


def test_opaque_marker_given_dir_fd(tmp_path: Path, open_stack: OpenStack) -> None:
    top, _ = layers(tmp_path, 2)
    (top / "d").mkdir()
    (top / "e").mkdir()
    (top / "d" / os.fsdecode(OPAQUE_MARKER)).write_bytes(b"")
    ((_, fd),) = open_stack(top)
    d_fd = open_dir_at(fd, b"d")
    e_fd = open_dir_at(fd, b"e")
    try:
        assert is_opaque_dir(fd_path(fd, b"d"), d_fd)
        assert not is_opaque_dir(fd_path(fd, b"e"), e_fd)
    finally:
        os.close(d_fd)
        os.close(e_fd)


def test_non_directory_below_directory_ends_merge(tmp_path: Path,
                                                  open_stack: OpenStack) -> None:
    top, middle, bottom = layers(tmp_path, 3)
    (top / "d").mkdir()
    (middle / "d").write_bytes(b"file")
    (bottom / "d").mkdir()
    found = resolve(open_stack(top, middle, bottom), b"d")
    assert found is not None
    assert found.layers == (0,)
    assert found.is_dir


def test_symlink_below_directory_ends_merge(tmp_path: Path, open_stack: OpenStack) -> None:
    top, middle, bottom = layers(tmp_path, 3)
    (top / "d").mkdir()
    (middle / "d").symlink_to(bottom / "d")
    (bottom / "d").mkdir()
    found = resolve(open_stack(top, middle, bottom), b"d")
    assert found is not None
    assert found.layers == (0,)


def test_file_over_directory(tmp_path: Path, open_stack: OpenStack) -> None:
    top, bottom = layers(tmp_path, 2)
    (top / "d").write_bytes(b"file")
    (bottom / "d").mkdir()
    found = resolve(open_stack(top, bottom), b"d")
    assert found is not None
    assert found.layers == (0,)
    assert stat.S_ISREG(found.st.st_mode)


def test_symlink_to_directory_is_not_followed(tmp_path: Path, open_stack: OpenStack) -> None:
    top, bottom = layers(tmp_path, 2)
    (tmp_path / "target").mkdir()
    (top / "d").symlink_to(tmp_path / "target")
    (bottom / "d").mkdir()
    found = resolve(open_stack(top, bottom), b"d")
    assert found is not None
    assert found.layers == (0,)
    assert stat.S_ISLNK(found.st.st_mode)
    assert not found.is_dir


def test_longest_name_without_whiteout_room(tmp_path: Path, open_stack: OpenStack) -> None:
    # ".wh." + a 252..255-byte name exceeds NAME_MAX: no OCI whiteout can exist for it.
    top, bottom = layers(tmp_path, 2)
    name = "n" * 255
    (bottom / name).write_bytes(b"x")
    found = resolve(open_stack(top, bottom), os.fsencode(name))
    assert found is not None
    assert found.layers == (1,)


# --- list_merged ------------------------------------------------------------------------------


def test_list_merged_each_name_once_top_first(tmp_path: Path, open_stack: OpenStack) -> None:
    top, middle, bottom = layers(tmp_path, 3)
    for name in ("a", "b", "shared"):
        (top / name).write_bytes(b"")
    for name in ("c", "shared", "d"):
        (middle / name).mkdir()
    for name in ("e", "shared", "a", "c"):
        (bottom / name).write_bytes(b"")
    (bottom / "link").symlink_to("nowhere")
    names = list_merged(open_stack(top, middle, bottom))
    assert len(names) == len(set(names))
    assert set(names) == {b"a", b"b", b"shared", b"c", b"d", b"e", b"link"}
    # Top layer's names first, then each lower layer's new names.
    assert set(names[:3]) == {b"a", b"b", b"shared"}
    assert set(names[3:5]) == {b"c", b"d"}
    assert set(names[5:]) == {b"e", b"link"}


def test_list_merged_whiteout_hides_only_layers_below(tmp_path: Path,
                                                      open_stack: OpenStack) -> None:
    top, middle, bottom = layers(tmp_path, 3)
    (top / "x").write_bytes(b"")
    (middle / ".wh.x").write_bytes(b"")
    (middle / ".wh.y").write_bytes(b"")
    (middle / ".wh.z").write_bytes(b"")
    (middle / "z").write_bytes(b"")
    (bottom / "x").write_bytes(b"")
    (bottom / "y").write_bytes(b"")
    (bottom / "z").write_bytes(b"")
    (bottom / "w").write_bytes(b"")
    assert sorted(list_merged(open_stack(top, middle, bottom))) == [b"w", b"x", b"z"]


def test_list_merged_rewinds_cached_fd(tmp_path: Path, open_stack: OpenStack) -> None:
    (top,) = layers(tmp_path, 1)
    (top / "a").write_bytes(b"")
    dirs = open_stack(top)
    assert list_merged(dirs) == [b"a"]
    assert list_merged(dirs) == [b"a"]
    assert os.listdir(dirs[0][1]) == ["a"]


def test_list_merged_shows_fifos(tmp_path: Path, open_stack: OpenStack) -> None:
    (top,) = layers(tmp_path, 1)
    os.mkfifo(top / "fifo")
    assert list_merged(open_stack(top)) == [b"fifo"]


def test_list_merged_non_utf8_names(tmp_path: Path, open_stack: OpenStack) -> None:
    top, bottom = layers(tmp_path, 2)
    raw = b"caf\xe9"
    with open(os.path.join(os.fsencode(bottom), raw), "wb"):
        pass
    with open(os.path.join(os.fsencode(top), WHITEOUT_PREFIX + b"\xff"), "wb"):
        pass
    with open(os.path.join(os.fsencode(bottom), b"\xff"), "wb"):
        pass
    dirs = open_stack(top, bottom)
    assert list_merged(dirs) == [raw]
    found = resolve(dirs, raw)
    assert found is not None
    assert found.layers == (1,)
    assert resolve(dirs, b"\xff") is None


# --- ondisk helpers ---------------------------------------------------------------------------


def test_is_whiteout() -> None:
    assert is_whiteout(fake_stat(stat.S_IFCHR | 0o600, 0))
    assert not is_whiteout(fake_stat(stat.S_IFCHR | 0o600, os.makedev(1, 3)))
    assert not is_whiteout(fake_stat(stat.S_IFBLK | 0o600, 0))
    assert not is_whiteout(fake_stat(stat.S_IFREG | 0o600, 0))
    assert not is_whiteout(fake_stat(stat.S_IFIFO | 0o600, 0))


@needs_root
def test_is_whiteout_on_disk(tmp_path: Path) -> None:
    char_whiteout(tmp_path / "w")
    (tmp_path / "f").write_bytes(b"")
    assert is_whiteout(os.lstat(tmp_path / "w"))
    assert not is_whiteout(os.lstat(tmp_path / "f"))


@pytest.mark.parametrize(("name", "target"), [
    (b".wh.foo", b"foo"),
    (b".wh..hidden", b".hidden"),
    (b".wh..wh.plnk", b".wh.plnk"),
    (OPAQUE_MARKER, None),
    (b"foo", None),
    (b"wh.foo", None),
    (b".whfoo", None),
    (b".wh.", b""),
])
def test_whiteout_target(name: bytes, target: bytes | None) -> None:
    assert whiteout_target(name) == target


@pytest.mark.parametrize(("name", "hidden"), [
    (b".wh.foo", True), (OPAQUE_MARKER, True), (b"foo", False), (b".whfoo", False),
])
def test_is_hidden_name(name: bytes, hidden: bool) -> None:
    assert is_hidden_name(name) is hidden


@pytest.mark.parametrize(("name", "private"), [
    (b"trusted.overlay.opaque", True),
    (b"trusted.overlay.origin", True),
    (b"trusted.overlay.redirect", True),
    (b"user.overlay.opaque", True),
    (b"user.fuseoverlayfs.opaque", True),
    (b"user.foo", False),
    (b"user.overlayfoo", False),
    (b"trusted.overlay", False),
    (b"trusted.foo", False),
    (b"security.selinux", False),
    (b"system.posix_acl_access", False),
])
def test_is_private_xattr(name: bytes, private: bool) -> None:
    assert is_private_xattr(name) is private


def test_fd_path(tmp_path: Path, open_stack: OpenStack) -> None:
    ((_, fd),) = open_stack(tmp_path)
    assert fd_path(fd) == b"/proc/self/fd/%d" % fd
    assert fd_path(fd, b"x") == b"/proc/self/fd/%d/x" % fd
    (tmp_path / "x").write_bytes(b"hello")
    with open(fd_path(fd, b"x"), "rb") as f:
        assert f.read() == b"hello"


def test_relative_redirect_continues_at_the_other_name(tmp_path: Path,
                                                       open_stack: OpenStack) -> None:
    top, mid, bottom = layers(tmp_path, 3)
    (top / "new").mkdir()
    os.setxattr(top / "new", "user.overlay.redirect", b"old")
    (mid / "old").mkdir()
    (bottom / "old").mkdir()
    (bottom / "new").mkdir()  # not merged: the redirect points elsewhere
    stack = open_stack(top, mid, bottom)
    found = resolve(stack, b"new", [fd for _, fd in stack])
    assert found is not None
    assert found.layers == (0, 1, 2)
    assert found.locations == ((1, (False, (b"old",))), (2, (False, (b"old",))))
    # Not following: the same name below.
    plain = resolve(stack, b"new", [fd for _, fd in stack], follow=False)
    assert plain is not None
    assert (plain.layers, plain.locations) == ((0, 2), ())


def test_absolute_redirect_walks_from_the_layer_roots(tmp_path: Path,
                                                      open_stack: OpenStack) -> None:
    top, bottom = layers(tmp_path, 2)
    (top / "a").mkdir()
    (top / "a" / "moved").mkdir()
    os.setxattr(top / "a" / "moved", "user.overlay.redirect", b"/x/y/orig")
    (bottom / "x" / "y" / "orig").mkdir(parents=True)
    stack = open_stack(top, bottom)
    roots = [fd for _, fd in stack]
    a_fd = os.open(top / "a", os.O_RDONLY | os.O_DIRECTORY)
    try:
        found = resolve([(0, a_fd)], b"moved", roots)  # the parent is upper-only
    finally:
        os.close(a_fd)
    assert found is not None
    assert found.layers == (0, 1)
    assert found.locations == ((1, (True, (b"x", b"y", b"orig"))),)


def test_redirect_to_nothing_leaves_the_upper_alone(tmp_path: Path,
                                                    open_stack: OpenStack) -> None:
    top, bottom = layers(tmp_path, 2)
    (top / "d").mkdir()
    os.setxattr(top / "d", "user.overlay.redirect", b"/gone/away")
    (bottom / "d").mkdir()
    stack = open_stack(top, bottom)
    found = resolve(stack, b"d", [fd for _, fd in stack])
    assert found is not None
    assert (found.layers, found.locations) == ((0,), ())
