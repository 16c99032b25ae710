"""The overlay's on-disk formats: whiteouts, opaque directories and private xattrs.

Pure and synchronous. Every object is named by a directory fd and a bytes name; xattrs are read
through ``/proc/self/fd/DIRFD/NAME`` without following the last component, which works for every
file type (symlinks included) without ever joining a name into a host path.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from overlayd.constants import (
    ESCAPE,
    ESCAPED_XATTR_PREFIXES,
    OPAQUE_MARKER,
    OPAQUE_VALUE,
    OPAQUE_XATTRS,
    PRIVATE_XATTR_PREFIXES,
    REDIRECT_XATTRS,
    WHITEOUT_PREFIX,
)


@dataclass(frozen=True)
class XattrFormat:
    """Which private xattrs a mount reads and hides: the opaque and redirect marks it honours,
    the prefixes never shown through the mount, and those escaped when set through it."""

    opaque: tuple[bytes, ...]
    redirect: tuple[bytes, ...]
    private: tuple[bytes, ...]
    escaped: tuple[bytes, ...]


# Every format we know, read on every mount by default: layers written by the kernel (privileged
# or with userxattr) and by fuse-overlayfs keep their meaning.
ALL_FORMATS = XattrFormat(OPAQUE_XATTRS, REDIRECT_XATTRS, PRIVATE_XATTR_PREFIXES,
                          ESCAPED_XATTR_PREFIXES)
# The kernel's -o userxattr: user.overlay.* is the overlay's namespace and trusted.overlay.* is
# an ordinary xattr, neither read as a mark nor hidden nor escaped (ovl_xattr, ovl_is_private_xattr
# with ofs->config.userxattr). fuse-overlayfs's mark stays readable: it is ours to honour.
USER_FORMAT = XattrFormat(
    tuple(x for x in OPAQUE_XATTRS if not x.startswith(b"trusted.")),
    tuple(x for x in REDIRECT_XATTRS if not x.startswith(b"trusted.")),
    tuple(x for x in PRIVATE_XATTR_PREFIXES if not x.startswith(b"trusted.")),
    tuple(x for x in ESCAPED_XATTR_PREFIXES if not x.startswith(b"trusted.")),
)


def fd_path(dir_fd: int, name: bytes | None = None) -> bytes:
    """A path naming *name* inside the directory *dir_fd* (or the directory itself)."""
    base = b"/proc/self/fd/%d" % dir_fd
    return base if name is None else base + b"/" + name


def is_whiteout(st: os.stat_result) -> bool:
    """The kernel's whiteout: a character device with device number 0/0."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_private_xattr(name: bytes, fmt: XattrFormat = ALL_FORMATS) -> bool:
    return name.startswith(fmt.private)


def xattr_to_disk(name: bytes, fmt: XattrFormat = ALL_FORMATS) -> bytes | None:
    """The on-disk name of the xattr *name* set or read through the mount; None if refused."""
    if not name.startswith(fmt.private):
        return name
    for prefix in fmt.escaped:
        if name.startswith(prefix):
            return prefix + ESCAPE + name[len(prefix):]
    return None


def xattr_from_disk(name: bytes, fmt: XattrFormat = ALL_FORMATS) -> bytes | None:
    """The name the on-disk xattr *name* shows through the mount; None if it is private."""
    if not name.startswith(fmt.private):
        return name
    for prefix in fmt.escaped:
        if name.startswith(prefix + ESCAPE):
            return prefix + name[len(prefix) + len(ESCAPE):]
    return None


def is_hidden_name(name: bytes) -> bool:
    """Names that are never shown in the merged view: OCI/AUFS whiteouts and opaque markers."""
    return name.startswith(WHITEOUT_PREFIX)


def whiteout_target(name: bytes) -> bytes | None:
    """For an OCI whiteout file ``.wh.NAME``, the NAME it hides; None for the opaque marker."""
    if name == OPAQUE_MARKER or not name.startswith(WHITEOUT_PREFIX):
        return None
    return name[len(WHITEOUT_PREFIX):]


def has_oci_whiteout(dir_fd: int, name: bytes) -> bool:
    """Whether the directory holds ``.wh.NAME`` (the OCI/AUFS whiteout format)."""
    try:
        os.stat(WHITEOUT_PREFIX + name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            return False  # NAME is 252+ bytes: no whiteout for it can exist
        raise
    return True


def dir_marks(path: bytes, dir_fd_of_dir: int | None = None,
              fmt: XattrFormat = ALL_FORMATS) -> tuple[bool, bytes | None]:
    """Whether the directory at *path* (from :func:`fd_path`) is opaque, and its redirect, in
    every format we read, with one listxattr for both.

    Opaque: ``trusted.overlay.opaque=y`` (the kernel's), ``user.overlay.opaque=y`` (the kernel's
    with userxattr), ``user.fuseoverlayfs.opaque=y`` (fuse-overlayfs) or a ``.wh..wh..opq``
    entry (OCI). Redirect: ``trusted.overlay.redirect`` or ``user.overlay.redirect``.
    *dir_fd_of_dir*, when the directory is already open, saves a path lookup. *fmt* narrows
    the xattrs honoured (USER_FORMAT: the kernel's userxattr).
    """
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        names = []
    opaque = False
    redirect = None
    for xname in names:
        bname = os.fsencode(xname)
        if bname in fmt.opaque or bname in fmt.redirect:
            try:
                value = os.getxattr(path, xname, follow_symlinks=False)
            except OSError as e:
                if e.errno == errno.ENODATA:
                    continue
                raise
            if bname in fmt.opaque:
                opaque = opaque or value == OPAQUE_VALUE
            elif value and redirect is None:
                redirect = checked_redirect(value)
    if not opaque:
        try:
            if dir_fd_of_dir is not None:
                os.stat(OPAQUE_MARKER, dir_fd=dir_fd_of_dir, follow_symlinks=False)
            else:
                os.stat(path + b"/" + OPAQUE_MARKER, follow_symlinks=False)
            opaque = True
        except FileNotFoundError:
            pass
    return opaque, redirect


def checked_redirect(value: bytes) -> bytes:
    """*value* if it is a redirect the kernel would follow, else an OSError as the kernel's
    lookup fails (ovl_get_redirect_xattr: EINVAL; lookup_one_len of "." or "..": EACCES).
    A redirect is attacker-written in a rootless mount: one that climbed out with ".." or hid a
    path in a relative name would make the daemon read outside the layers."""
    if b"\0" in value:
        raise OSError(errno.EINVAL, "invalid redirect")
    if value.startswith(b"/"):
        parts = value[1:].split(b"/")
        if any(part == b"" for part in parts):
            raise OSError(errno.EINVAL, "invalid redirect")
    else:
        if b"/" in value:
            raise OSError(errno.EINVAL, "invalid redirect")
        parts = [value]
    if any(part in (b".", b"..") for part in parts):
        raise OSError(errno.EACCES, "redirect names . or ..")
    return value


def is_opaque_dir(path: bytes, dir_fd_of_dir: int | None = None) -> bool:
    """Whether the directory at *path* is opaque (see :func:`dir_marks`)."""
    return dir_marks(path, dir_fd_of_dir)[0]


def read_redirect(path: bytes, fmt: XattrFormat = ALL_FORMATS) -> bytes | None:
    """The redirect of the directory at *path* (see :func:`dir_marks`)."""
    return dir_marks(path, None, fmt)[1]
