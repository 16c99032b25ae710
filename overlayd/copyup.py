"""Copy-up and atomic publication through the workdir.

Pure and synchronous, dir-fd relative throughout. An object is built under a temporary name in
``workdir/work/`` (data with holes kept, owner, mode, xattrs, times), fsynced when asked, and only
then renamed into the upper layer: no reader ever sees a partial file there, and a crash leaves
only temporaries in the workdir, which :func:`clean_workdir` removes at the next mount.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import stat
from collections.abc import Callable, Sequence

from overlayd.constants import OPAQUE_VALUE, WORK_SUBDIR
from overlayd.ondisk import ALL_FORMATS, XattrFormat, fd_path, xattr_from_disk
from overlayd.syscalls import RENAME_NOREPLACE, renameat2

log = logging.getLogger(__name__)

TEMP_PREFIX = b"#overlayd."
_counter = itertools.count()

COPY_CHUNK = 1 << 20
# copy_file_range refuses some pairs of files (other filesystems, old kernels): fall back.
_NO_COPY_RANGE = (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS)


def temp_name() -> bytes:
    return TEMP_PREFIX + b"%d.%d" % (os.getpid(), next(_counter))


def open_workdir(workdir_fd: int) -> int:
    """Open (creating) ``workdir/work`` and remove what a crashed overlayd left in it."""
    # The kernel makes work/ with mode 0 (only root, which bypasses modes, uses it); an
    # unprivileged daemon must be able to use its own.
    with contextlib.suppress(FileExistsError):
        os.mkdir(WORK_SUBDIR, 0o000 if os.geteuid() == 0 else 0o700, dir_fd=workdir_fd)
    fd = os.open(WORK_SUBDIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                 dir_fd=workdir_fd)
    clean_workdir(fd)
    return fd


def clean_workdir(work_fd: int) -> None:
    """Remove our own leftovers (never the kernel's) from the work directory."""
    for name in os.listdir(work_fd):
        bname = os.fsencode(name)
        if bname.startswith(TEMP_PREFIX):
            log.info("removing leftover %r from the workdir", bname)
            remove_tree(work_fd, bname)


def remove_tree(dir_fd: int, name: bytes) -> None:
    """Remove *name* in *dir_fd*, recursively if it is a directory."""
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                 dir_fd=dir_fd)
    try:
        for child in os.listdir(fd):
            remove_tree(fd, os.fsencode(child))
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


def copy_data(src_fd: int, dst_fd: int, size: int) -> None:
    """Copy *size* bytes, leaving holes where the source has them (SEEK_DATA/SEEK_HOLE)."""
    offset = 0
    while offset < size:
        try:
            data = os.lseek(src_fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break  # only a hole remains
            raise
        hole = min(os.lseek(src_fd, data, os.SEEK_HOLE), size)
        _copy_range(src_fd, dst_fd, data, hole)
        offset = hole
    os.ftruncate(dst_fd, size)


def _copy_range(src_fd: int, dst_fd: int, start: int, end: int) -> None:
    pos = start
    while pos < end:
        try:
            n = os.copy_file_range(src_fd, dst_fd, min(end - pos, 1 << 30), pos, pos)
        except OSError as e:
            if e.errno not in _NO_COPY_RANGE:
                raise
            n = 0
        if n == 0:
            break
        pos += n
    while pos < end:  # fallback, or a source that shrank under us
        chunk = os.pread(src_fd, min(COPY_CHUNK, end - pos), pos)
        if not chunk:
            break
        written = os.pwrite(dst_fd, chunk, pos)
        pos += written


def copy_xattrs(src_path: bytes, dst_path: bytes, fmt: XattrFormat = ALL_FORMATS) -> None:
    """Copy every xattr but the overlay's private ones, escaped ones included (as the kernel)."""
    try:
        names = os.listxattr(src_path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return
        raise
    for name in names:
        if xattr_from_disk(os.fsencode(name), fmt) is None:
            continue
        try:
            value = os.getxattr(src_path, name, follow_symlinks=False)
        except OSError as e:
            if e.errno == errno.ENODATA:
                continue
            raise
        os.setxattr(dst_path, name, value, follow_symlinks=False)


def build_copy(src_dir_fd: int, name: bytes, st: os.stat_result, work_fd: int, tmp: bytes,
               *, data: bool, fsync: bool, xattrs: Sequence[tuple[bytes, bytes]] = (),
               fmt: XattrFormat = ALL_FORMATS) -> None:
    """Build a copy of the object *name* (stat *st*) as *tmp* in the work directory.

    Order matters: owner first (chown clears setuid bits and capabilities), then xattrs (writing
    user.* needs write permission), then the mode, then the times. A directory keeps mode 0700
    until it is published (moving a directory needs write permission on it): see copy_up.
    """
    fd = -1
    try:
        if stat.S_ISREG(st.st_mode):
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600,
                         dir_fd=work_fd)
            if data and st.st_size:
                src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                              dir_fd=src_dir_fd)
                try:
                    copy_data(src, fd, st.st_size)
                finally:
                    os.close(src)
        elif stat.S_ISDIR(st.st_mode):
            os.mkdir(tmp, 0o700, dir_fd=work_fd)
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(name, dir_fd=src_dir_fd), tmp, dir_fd=work_fd)
        else:  # fifo, socket, device
            os.mknod(tmp, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev, dir_fd=work_fd)
        os.chown(tmp, st.st_uid, st.st_gid, dir_fd=work_fd, follow_symlinks=False)
        copy_xattrs(fd_path(src_dir_fd, name), fd_path(work_fd, tmp), fmt)
        for xname, value in xattrs:
            os.setxattr(fd_path(work_fd, tmp), xname, value, follow_symlinks=False)
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            os.chmod(tmp, stat.S_IMODE(st.st_mode), dir_fd=work_fd)
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=work_fd,
                 follow_symlinks=False)
        if fd >= 0 and fsync:
            os.fsync(fd)
    finally:
        if fd >= 0:
            os.close(fd)


def copy_up(src_dir_fd: int, name: bytes, st: os.stat_result, work_fd: int, dst_dir_fd: int,
            *, data: bool = True, fsync: bool = True,
            xattrs: Sequence[tuple[bytes, bytes]] = (), fmt: XattrFormat = ALL_FORMATS) -> None:
    """Copy the lower object *name* into the upper directory *dst_dir_fd*, atomically, adding
    *xattrs* to the copy."""
    tmp = temp_name()
    parent = os.fstat(dst_dir_fd)
    try:
        build_copy(src_dir_fd, name, st, work_fd, tmp, data=data, fsync=fsync, xattrs=xattrs,
                   fmt=fmt)
        renameat2(work_fd, tmp, dst_dir_fd, name, RENAME_NOREPLACE)
    except BaseException:
        discard(work_fd, tmp)
        raise
    if stat.S_ISDIR(st.st_mode):
        os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=dst_dir_fd)
    # A copy-up is no change of the parent directory: keep its times, as the kernel does
    # (ovl_set_timestamps after publishing the copy).
    os.utime(dst_dir_fd, ns=(parent.st_atime_ns, parent.st_mtime_ns))


def build_in_work(work_fd: int, make: Callable[[int, bytes], None]) -> bytes:
    """Run *make(work_fd, tmp)* under a fresh temporary name; return the name."""
    tmp = temp_name()
    try:
        make(work_fd, tmp)
    except BaseException:
        discard(work_fd, tmp)
        raise
    return tmp


def discard(work_fd: int, tmp: bytes) -> None:
    """Remove the workdir's *tmp* (a tree too); a failure is logged, not raised."""
    try:
        remove_tree(work_fd, tmp)
    except FileNotFoundError:
        pass
    except OSError:
        log.exception("cannot remove %r from the workdir", tmp)


def set_opaque(path: bytes, xattr_name: bytes) -> None:
    os.setxattr(path, xattr_name, OPAQUE_VALUE, follow_symlinks=False)
