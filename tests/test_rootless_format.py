"""The upper layer's format, chosen at mount time (pure core, no mount): trusted.overlay.* where
it can be written, user.overlay.* (the kernel's userxattr format) with -o userxattr or where it
cannot; char 0/0 whiteouts, and .wh.NAME files only where mknod of 0/0 is refused, said once in
the log. Also: redirects that would climb out of a layer are refused, as the kernel does."""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from overlayd.errors import UsageError
from overlayd.inodes import ROOT_INODE
from overlayd.ondisk import checked_redirect
from overlayd.options import parse_options
from overlayd.overlay import Overlay, open_layers


@pytest.fixture
def layers(tmp_path: Path) -> dict[str, Path]:
    dirs = {name: tmp_path / name for name in ("lower", "upper", "work")}
    for path in dirs.values():
        path.mkdir()
    (dirs["lower"] / "file").write_text("lower\n")
    (dirs["lower"] / "dir").mkdir()
    (dirs["lower"] / "dir" / "inside").write_text("inside\n")
    return dirs


def overlay(layers: dict[str, Path], extra: str = "") -> Overlay:
    opts = parse_options([f"lowerdir={layers['lower']},upperdir={layers['upper']},"
                          f"workdir={layers['work']}{extra}"])
    return Overlay(opts, open_layers(opts))


@pytest.fixture
def opened() -> Iterator[list[Overlay]]:
    made: list[Overlay] = []
    yield made
    for ov in made:
        ov.close()


def remove_and_recreate(ov: Overlay) -> None:
    root = ov.node(ROOT_INODE)
    ov.unlink(root, b"file")
    found = ov.lookup(root, b"dir")
    assert found is not None
    ov.unlink(found[0], b"inside")
    ov.rmdir(root, b"dir")
    ov.mkdir(root, b"dir", 0o755, (os.getuid(), os.getgid()))


@pytest.mark.skipif(os.geteuid() != 0, reason="root writes the trusted format")
def test_root_writes_the_trusted_format(layers: dict[str, Path],
                                        opened: list[Overlay]) -> None:
    opened.append(ov := overlay(layers))
    assert not ov.userxattr
    remove_and_recreate(ov)
    assert os.getxattr(layers["upper"] / "dir", "trusted.overlay.opaque") == b"y"
    assert "user.overlay.opaque" not in os.listxattr(layers["upper"] / "dir")


def test_userxattr_writes_the_user_format(layers: dict[str, Path],
                                          opened: list[Overlay]) -> None:
    opened.append(ov := overlay(layers, ",userxattr"))
    assert ov.userxattr
    assert ov.opts.redirect_dir == "nofollow"  # as the kernel: userxattr follows no redirect
    remove_and_recreate(ov)
    assert os.getxattr(layers["upper"] / "dir", "user.overlay.opaque") == b"y"
    assert not [x for x in os.listxattr(layers["upper"] / "dir") if x.startswith("trusted.")]
    assert os.lstat(layers["upper"] / "file").st_rdev == 0
    assert stat.S_ISCHR(os.lstat(layers["upper"] / "file").st_mode)


@pytest.mark.parametrize("redirect", ["on", "follow", "off"])
def test_userxattr_refuses_following_redirects(redirect: str) -> None:
    with pytest.raises(UsageError, match="conflicting options: userxattr"):
        parse_options([f"lowerdir=/l,userxattr,redirect_dir={redirect}"])
    assert parse_options(["lowerdir=/l,userxattr,redirect_dir=nofollow"]).userxattr


@pytest.mark.skipif(os.geteuid() != 0, reason="root can write trusted.* to tell them apart")
def test_userxattr_ignores_trusted_marks(layers: dict[str, Path],
                                         opened: list[Overlay]) -> None:
    """With userxattr, trusted.overlay.opaque is an ordinary xattr (the kernel's ovl_xattr):
    not a mark, shown through the mount and stored as is."""
    (layers["upper"] / "dir").mkdir()
    os.setxattr(layers["upper"] / "dir", "trusted.overlay.opaque", b"y")
    opened.append(ov := overlay(layers, ",userxattr"))
    root = ov.node(ROOT_INODE)
    node = ov.lookup(root, b"dir")
    assert node is not None
    assert ov.lookup(node[0], b"inside") is not None  # not opaque
    assert b"trusted.overlay.opaque" in ov.listxattr(node[0])
    opened.append(privileged := overlay(layers))
    pnode = privileged.lookup(privileged.node(ROOT_INODE), b"dir")
    assert pnode is not None
    assert privileged.lookup(pnode[0], b"inside") is None  # opaque for a privileged mount


def refusing_whiteouts(real: Callable[..., None]) -> Callable[..., None]:
    """os.mknod as a kernel before 5.8 in a user namespace answers: 0/0 refused."""
    def mknod(path: object, mode: int = 0o600, device: int = 0, **kwargs: object) -> None:
        if stat.S_ISCHR(mode) and device == 0:
            raise PermissionError(errno.EPERM, "Operation not permitted")
        real(path, mode, device, **kwargs)
    return mknod


def test_whiteout_files_where_mknod_is_refused(layers: dict[str, Path], opened: list[Overlay],
                                               monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(os, "mknod", refusing_whiteouts(os.mknod))
    with caplog.at_level(logging.DEBUG, logger="overlayd.overlay"):
        opened.append(ov := overlay(layers, ",userxattr"))
        remove_and_recreate(ov)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings  # said once, at mount time
    assert ".wh.NAME whiteout files" in warnings[0]
    assert "user.overlay.* xattrs, .wh. file whiteouts" in caplog.text
    assert ov.whiteout_files
    assert (layers["upper"] / ".wh.file").is_file()
    assert not os.path.lexists(layers["upper"] / "file")
    root = ov.node(ROOT_INODE)
    assert ov.lookup(root, b"file") is None
    assert b"file" not in ov.listing(ov.opendir(root))[2]
    recreated = ov.lookup(root, b"dir")
    assert recreated is not None
    assert ov.lookup(recreated[0], b"inside") is None  # the lower dir stays hidden
    assert os.getxattr(layers["upper"] / "dir", "user.overlay.opaque") == b"y"
    assert os.listdir(layers["work"] / "work") == []  # the probe left nothing behind


def test_char_whiteouts_where_mknod_allows_them(layers: dict[str, Path],
                                                opened: list[Overlay],
                                                caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="overlayd.overlay"):
        opened.append(ov := overlay(layers, ",userxattr"))
    assert not ov.whiteout_files
    assert "char 0/0 whiteouts" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert os.listdir(layers["work"] / "work") == []


@pytest.mark.parametrize(("value", "code"), [
    (b"../../etc", errno.EINVAL), (b"a/b", errno.EINVAL), (b"..", errno.EACCES),
    (b".", errno.EACCES), (b"/../..", errno.EACCES), (b"/a/../../b", errno.EACCES),
    (b"//a", errno.EINVAL), (b"/a/", errno.EINVAL), (b"/", errno.EINVAL),
    (b"a\0b", errno.EINVAL),
])
def test_redirects_that_climb_out_are_refused(value: bytes, code: int) -> None:
    with pytest.raises(OSError, match="redirect") as excinfo:
        checked_redirect(value)
    assert excinfo.value.errno == code


@pytest.mark.parametrize("value", [b"name", b"/a", b"/a/b/c", b"..name", b"/.hidden"])
def test_ordinary_redirects_pass(value: bytes) -> None:
    assert checked_redirect(value) == value
