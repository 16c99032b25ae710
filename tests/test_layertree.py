"""layertree: a layer walked as the overlay reads it, and a stack looked up by path."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from overlayd.layertree import Kind, Stack, shown_xattrs, walk


def _walk(root: Path) -> list[tuple[bytes, Kind, bool, bool]]:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return [(e.path, e.kind, e.opaque, e.oci) for e in walk(fd)]
    finally:
        os.close(fd)


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod of a whiteout and trusted.* need root")
def test_walk_reads_every_format(tmp_path: Path) -> None:
    for d in ("k", "u", "f", "oci", "plain/sub"):
        (tmp_path / d).mkdir(parents=True)
    os.setxattr(tmp_path / "k", "trusted.overlay.opaque", b"y")
    os.setxattr(tmp_path / "u", "user.overlay.opaque", b"y")
    os.setxattr(tmp_path / "f", "user.fuseoverlayfs.opaque", b"y")
    (tmp_path / "oci/.wh..wh..opq").touch()
    os.mknod(tmp_path / "gone", stat.S_IFCHR | 0o600, 0)
    (tmp_path / ".wh.also-gone").touch()
    os.mknod(tmp_path / "tty", stat.S_IFCHR | 0o600, os.makedev(5, 0))
    (tmp_path / "plain/sub/file").write_bytes(b"x")
    (tmp_path / "link").symlink_to("plain")
    assert _walk(tmp_path) == [
        (b"/also-gone", Kind.WHITEOUT, False, True),
        (b"/f", Kind.DIR, True, False),
        (b"/gone", Kind.WHITEOUT, False, False),
        (b"/k", Kind.DIR, True, False),
        (b"/link", Kind.OTHER, False, False),
        (b"/oci", Kind.DIR, True, True),
        (b"/plain", Kind.DIR, False, False),
        (b"/plain/sub", Kind.DIR, False, False),
        (b"/plain/sub/file", Kind.OTHER, False, False),
        (b"/tty", Kind.OTHER, False, False),
        (b"/u", Kind.DIR, True, False),
    ]


def test_walk_never_follows_symlinks(tmp_path: Path) -> None:
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside/secret").write_bytes(b"s")
    layer = tmp_path / "layer"
    layer.mkdir()
    (layer / "d").symlink_to(tmp_path / "outside")
    assert [p for p, *_ in _walk(layer)] == [b"/d"]


def test_shown_xattrs_hide_private_and_unescape(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"")
    os.setxattr(f, "user.overlay.opaque", b"y")
    os.setxattr(f, "user.overlay.overlay.nested", b"n")  # user.overlay.nested, escaped
    os.setxattr(f, "user.fuseoverlayfs.origin", b"o")
    os.setxattr(f, "user.mine", b"m")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert shown_xattrs(fd, b"f") == {b"user.mine": b"m", b"user.overlay.nested": b"n"}
    finally:
        os.close(fd)


def test_stack_lookup_and_listing(tmp_path: Path) -> None:
    top, bottom = tmp_path / "top", tmp_path / "bottom"
    for d in ("top/d", "top/opq", "bottom/d/sub", "bottom/opq", "bottom/gone"):
        (tmp_path / d).mkdir(parents=True)
    (bottom / "d/f").write_bytes(b"f")
    (bottom / "opq/hidden").write_bytes(b"h")
    (top / "d/g").write_bytes(b"g")
    (top / ".wh.gone").touch()
    os.setxattr(top / "opq", "user.overlay.opaque", b"y")
    with Stack([os.fsencode(top), os.fsencode(bottom)]) as stack:
        found = stack.lookup([b"d", b"f"])
        assert found is not None
        assert found.layers == (1,)
        d = stack.lookup([b"d"])
        assert d is not None
        assert d.layers == (0, 1)
        assert stack.lookup([b"gone"]) is None
        assert stack.lookup([b"opq", b"hidden"]) is None
        assert stack.lookup([b"d", b"f", b"x"]) is None
        assert sorted(stack.listdir([b"d"]) or []) == [b"f", b"g", b"sub"]
        assert stack.listdir([b"d", b"f"]) is None
        assert sorted(stack.listdir([]) or []) == [b"d", b"opq"]


def test_stack_follows_redirects(tmp_path: Path) -> None:
    top, bottom = tmp_path / "top", tmp_path / "bottom"
    (bottom / "old").mkdir(parents=True)
    (bottom / "old/f").write_bytes(b"f")
    (top / "sub/new").mkdir(parents=True)
    os.setxattr(top / "sub/new", "user.overlay.redirect", b"/old")
    with Stack([os.fsencode(top), os.fsencode(bottom)]) as stack:
        found = stack.lookup([b"sub", b"new", b"f"])
        assert found is not None
        assert found.layers == (1,)
        assert stack.listdir([b"sub", b"new"]) == [b"f"]


def test_walk_reports_unreadable_directories_and_goes_on(tmp_path: Path) -> None:
    (tmp_path / "d/bad").mkdir(parents=True)
    os.setxattr(tmp_path / "d/bad", "user.overlay.redirect", b"..")  # the kernel: EACCES
    (tmp_path / "d/ok").write_bytes(b"after the bad one, in the same directory")
    (tmp_path / "z").write_bytes(b"z")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(PermissionError):
            list(walk(fd))
        errors: list[tuple[tuple[bytes, ...], int | None]] = []
        paths = [e.path for e in walk(fd, onerror=lambda parts, e: errors.append(
            (parts, e.errno)))]
    finally:
        os.close(fd)
    assert paths == [b"/d", b"/d/ok", b"/z"]  # only the entry that cannot be read is left out
    assert errors == [((b"d", b"bad"), errno.EACCES)]
