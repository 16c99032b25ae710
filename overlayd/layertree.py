"""One layer directory read as the overlay reads it, for the container tools (diff, export, du).

Pure and synchronous, never used by the daemon's request path. :func:`walk` visits a layer's
objects with directory fds and bytes names, telling whiteouts (char 0/0 or ``.wh.NAME``), opaque
directories (every xattr format, or ``.wh..wh..opq``) and redirects; :class:`Stack` looks a path
up through a stack of layers with the daemon's own resolution rules (layers.resolve).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from overlayd.constants import OPAQUE_MARKER, WHITEOUT_PREFIX
from overlayd.layers import DirStack, Found, list_merged, open_dir_at, resolve, walk_dirs
from overlayd.ondisk import (
    ALL_FORMATS,
    XattrFormat,
    dir_marks,
    fd_path,
    is_whiteout,
    xattr_from_disk,
)


class Kind(enum.Enum):
    WHITEOUT = "whiteout"  # the name is deleted: hides it in every layer below
    DIR = "dir"
    OTHER = "other"  # regular file, symlink, device, fifo, socket


@dataclass(frozen=True, slots=True)
class Entry:
    """One object of a layer, as the overlay reads it.

    *parts* name it from the layer's root (for a ``.wh.NAME`` whiteout: NAME, the name it
    deletes); *disk_name* is the name on disk. *parent_fd* is the containing directory, open
    only until the walk moves on.
    """

    parts: tuple[bytes, ...]
    kind: Kind
    st: os.stat_result
    parent_fd: int
    disk_name: bytes
    opaque: bool = False  # directories: the layers below are hidden
    redirect: bytes | None = None  # directories: renamed from there (redirect_dir)
    oci: bool = False  # written in the OCI format: a ``.wh.NAME`` file, a ``.wh..wh..opq`` marker

    @property
    def path(self) -> bytes:
        """The absolute path in the merged view, ``/a/b``."""
        return b"/" + b"/".join(self.parts)

    @property
    def name(self) -> bytes:
        return self.parts[-1]


def entries(dir_fd: int, parts: tuple[bytes, ...] = (), fmt: XattrFormat = ALL_FORMATS,
            onerror: Callable[[tuple[bytes, ...], OSError], None] | None = None
            ) -> Iterator[Entry]:
    """The objects of the one directory *dir_fd* (reached by *parts*), names in byte order.
    ``.wh..wh..opq`` is not an entry: it makes its directory opaque. A ``.wh.NAME`` file is a
    WHITEOUT entry named NAME. With *onerror*, an entry that cannot be read (its stat, or a
    directory's marks) is reported to it with its parts and left out; the others still come."""
    for disk_name in sorted(os.fsencode(n) for n in os.listdir(dir_fd)):
        if disk_name == OPAQUE_MARKER:
            continue
        try:
            entry = _entry(dir_fd, parts, disk_name, fmt)
        except OSError as e:
            if onerror is None:
                raise
            onerror((*parts, disk_name), e)
            continue
        if entry is not None:
            yield entry


def _entry(dir_fd: int, parts: tuple[bytes, ...], disk_name: bytes, fmt: XattrFormat
           ) -> Entry | None:
    try:
        st = os.stat(disk_name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None  # removed while listed
    if disk_name.startswith(WHITEOUT_PREFIX):
        target = disk_name[len(WHITEOUT_PREFIX):]
        return Entry((*parts, target), Kind.WHITEOUT, st, dir_fd, disk_name, oci=True)
    if is_whiteout(st):
        return Entry((*parts, disk_name), Kind.WHITEOUT, st, dir_fd, disk_name)
    if stat.S_ISDIR(st.st_mode):
        opaque, redirect = _marks(dir_fd, disk_name, fmt)
        oci = opaque and os.path.lexists(fd_path(dir_fd, disk_name) + b"/" + OPAQUE_MARKER)
        return Entry((*parts, disk_name), Kind.DIR, st, dir_fd, disk_name, opaque, redirect,
                     oci)
    return Entry((*parts, disk_name), Kind.OTHER, st, dir_fd, disk_name)


def walk(root_fd: int, fmt: XattrFormat = ALL_FORMATS, parts: tuple[bytes, ...] = (),
         onerror: Callable[[tuple[bytes, ...], OSError], None] | None = None
         ) -> Iterator[Entry]:
    """Every object below the directory *root_fd*, parents before children, names in byte order
    in each directory (as Go's filepath.Walk, which docker diff uses); see :func:`entries`.
    Symlinks are never followed. With *onerror*, a directory or an entry that cannot be read
    is reported to it (with its parts) and the walk goes on without it, instead of failing."""
    try:
        for entry in entries(root_fd, parts, fmt, onerror):
            yield entry
            if entry.kind is not Kind.DIR:
                continue
            try:
                fd = open_dir_at(root_fd, entry.disk_name)
            except FileNotFoundError:
                continue
            except OSError as e:
                if onerror is None:
                    raise
                onerror(entry.parts, e)
                continue
            try:
                yield from walk(fd, fmt, entry.parts, onerror)
            finally:
                os.close(fd)
    except OSError as e:
        if onerror is None:
            raise
        onerror(parts, e)


def _marks(parent_fd: int, name: bytes, fmt: XattrFormat) -> tuple[bool, bytes | None]:
    try:
        return dir_marks(fd_path(parent_fd, name), None, fmt)
    except OSError as e:
        # Name the directory, not /proc/self/fd/N (checked_redirect's errors name none).
        raise OSError(e.errno, e.strerror, os.fsdecode(name)) from None


def shown_xattrs(parent_fd: int, name: bytes, fmt: XattrFormat = ALL_FORMATS
                 ) -> dict[bytes, bytes]:
    """The object's xattrs as the merged view shows them: the overlay's private ones left out,
    escaped ones (``trusted.overlay.overlay.X``) unescaped."""
    path = fd_path(parent_fd, name)
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    shown: dict[bytes, bytes] = {}
    for xname in sorted(os.fsencode(n) for n in names):
        as_shown = xattr_from_disk(xname, fmt)
        if as_shown is None:
            continue
        try:
            shown[as_shown] = os.getxattr(path, xname, follow_symlinks=False)
        except OSError as e:
            if e.errno != errno.ENODATA:
                raise
    return shown


class Stack:
    """A stack of layer directories, top first, looked up as the overlay would merge them."""

    def __init__(self, dirs: Sequence[bytes], fmt: XattrFormat = ALL_FORMATS) -> None:
        self.fmt = fmt
        self.fds: list[int] = []
        try:
            for d in dirs:
                self.fds.append(os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def lookup(self, parts: Sequence[bytes]) -> Found | None:
        """The object at *parts* in the merged view of the stack; None when it has none."""
        if not parts:
            return None if not self.fds else Found(tuple(range(len(self.fds))),
                                                   os.fstat(self.fds[0]))
        with self.opendir(parts[:-1]) as dirs:
            return None if dirs is None else resolve(dirs, parts[-1], self.fds, fmt=self.fmt)

    def listdir(self, parts: Sequence[bytes]) -> list[bytes] | None:
        """The merged listing of the directory at *parts*; None when it is not a directory."""
        with self.opendir(parts) as dirs:
            return None if dirs is None else list_merged(dirs)

    @contextlib.contextmanager
    def opendir(self, parts: Sequence[bytes]) -> Iterator[list[tuple[int, int]] | None]:
        """The merged directory at *parts* as (layer index, fd) pairs, top first, open for the
        with block; None when the merged view has no directory there."""
        dirs: list[tuple[int, int]] | None = list(enumerate(self.fds))
        opened: list[int] = []
        try:
            for part in parts:
                assert dirs is not None
                found = resolve(dirs, part, self.fds, fmt=self.fmt)
                if found is None or not found.is_dir:
                    dirs = None
                    break
                dirs = descend(dirs, part, found, self.fds)
                opened.extend(fd for _, fd in dirs)
            yield dirs
        finally:
            for fd in opened:
                os.close(fd)


def descend(dirs: DirStack, name: bytes, found: Found, roots: Sequence[int]
            ) -> list[tuple[int, int]]:
    """The merged directory *found* (*name* resolved in *dirs*) as newly opened (layer index,
    fd) pairs, following redirects as the resolution did. The caller closes the fds."""
    where = dict(found.locations)
    parents = dict(dirs)
    opened: list[tuple[int, int]] = []
    try:
        for index in found.layers:
            if index in where:
                absolute, lparts = where[index]
                base = roots[index] if absolute else parents[index]
                fd = walk_dirs(base, lparts)
                if fd is None or fd == base:
                    continue
            else:
                fd = open_dir_at(parents[index], name)
            opened.append((index, fd))
    except BaseException:
        for _, fd in opened:
            os.close(fd)
        raise
    return opened
