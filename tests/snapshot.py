"""Snapshots of a mounted tree, comparable across mounts, and their differences.

``snapshot`` walks a tree with ``os.scandir`` on bytes paths, never following a symlink, and
records what the overlay must reproduce for every path: type, mode, owner, size, nlink, mtime,
content hash, link target, device number, user.* xattrs, the directory listing (duplicates kept),
and which paths share an inode (by label, not by number, so two mounts compare). Directory sizes
and atimes are not recorded: they are filesystem-specific. Single-threaded; the tree must not
change during the walk.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import stat
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

ROOT_KEY = b"."
_CHUNK = 1 << 20

_KINDS = {
    stat.S_IFDIR: "dir",
    stat.S_IFREG: "reg",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "chr",
    stat.S_IFBLK: "blk",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "sock",
}


@dataclass(frozen=True)
class Entry:
    """What one path of a tree shows; None where a field does not apply to its type."""

    kind: int  # stat.S_IFMT(st_mode)
    perm: int  # stat.S_IMODE(st_mode): permission bits with setuid, setgid, sticky
    uid: int
    gid: int
    nlink: int
    mtime_ns: int
    inode_group: bytes  # the smallest path sharing this path's (st_dev, st_ino)
    size: int | None = None  # regular files and symlinks
    sha256: str | None = None  # regular files
    target: bytes | None = None  # symlinks
    rdev: tuple[int, int] | None = None  # devices: (major, minor)
    xattrs: tuple[tuple[bytes, bytes], ...] = ()  # user.* only, sorted; not for symlinks
    names: tuple[bytes, ...] | None = None  # directories: readdir's names, sorted, duplicates kept
    error: str | None = None  # the first failing call on this path, e.g. "getxattr: ENODATA"


FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Entry))


def _join(base: bytes, rel: bytes) -> bytes:
    return base if rel == ROOT_KEY else base + b"/" + rel


def _child(rel: bytes, name: bytes) -> bytes:
    return name if rel == ROOT_KEY else rel + b"/" + name


def _failure(call: str, exc: OSError) -> str:
    code = exc.errno
    return f"{call}: {errno.errorcode.get(code, str(code)) if code is not None else exc}"


def _sha256(path: bytes) -> str:
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        while chunk := os.read(fd, _CHUNK):
            digest.update(chunk)
    finally:
        os.close(fd)
    return digest.hexdigest()


def _user_xattrs(path: bytes) -> tuple[tuple[bytes, bytes], ...]:
    found = []
    for name in os.listxattr(path, follow_symlinks=False):
        if name.startswith("user."):
            value = os.getxattr(path, name, follow_symlinks=False)
            found.append((os.fsencode(name), value))
    return tuple(sorted(found))


def _record(path: bytes) -> tuple[Entry, tuple[int, int] | None, list[bytes]]:
    """The entry for *path* without its inode label, its inode key, and its children's names."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        return (Entry(kind=0, perm=0, uid=-1, gid=-1, nlink=0, mtime_ns=0, inode_group=b"",
                      error=_failure("lstat", exc)), None, [])
    kind = stat.S_IFMT(st.st_mode)
    size = st.st_size if kind in (stat.S_IFREG, stat.S_IFLNK) else None
    rdev = (os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in (stat.S_IFCHR,
                                                                    stat.S_IFBLK) else None
    sha256: str | None = None
    target: bytes | None = None
    xattrs: tuple[tuple[bytes, bytes], ...] = ()
    names: tuple[bytes, ...] | None = None
    children: list[bytes] = []
    error: str | None = None
    call = ""
    try:
        if kind == stat.S_IFREG:
            call = "read"
            sha256 = _sha256(path)
        elif kind == stat.S_IFLNK:
            call = "readlink"
            target = os.readlink(path)
        elif kind == stat.S_IFDIR:
            call = "scandir"
            with os.scandir(path) as it:
                children = [entry.name for entry in it]
            names = tuple(sorted(children))
        if kind != stat.S_IFLNK:
            call = "xattrs"
            xattrs = _user_xattrs(path)
    except OSError as exc:
        error = _failure(call, exc)
    entry = Entry(kind=kind, perm=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
                  nlink=st.st_nlink, mtime_ns=st.st_mtime_ns, inode_group=b"", size=size,
                  sha256=sha256, target=target, rdev=rdev, xattrs=xattrs, names=names,
                  error=error)
    return entry, (st.st_dev, st.st_ino), children


def snapshot(root: Path) -> dict[bytes, Entry]:
    """Every path under *root* (itself as b"."), relative, as bytes, mapped to what it shows."""
    base = os.fsencode(root)
    entries: dict[bytes, Entry] = {}
    inodes: dict[tuple[int, int], list[bytes]] = {}
    pending = [ROOT_KEY]
    while pending:
        rel = pending.pop()
        entry, key, children = _record(_join(base, rel))
        entries[rel] = entry
        if key is not None:
            inodes.setdefault(key, []).append(rel)
        # A name listed twice is kept in ``names`` and walked once.
        pending.extend(_child(rel, name) for name in sorted(set(children), reverse=True))
    for paths in inodes.values():
        label = min(paths)
        for rel in paths:
            entries[rel] = dataclasses.replace(entries[rel], inode_group=label)
    return entries


def _show(field: str, value: object) -> str:
    if field == "kind" and isinstance(value, int):
        return _KINDS.get(value, oct(value))
    if field == "perm" and isinstance(value, int):
        return f"{value:04o}"
    if field == "rdev" and isinstance(value, tuple):
        return f"{value[0]}:{value[1]}"
    return repr(value)


def describe(entry: Entry) -> str:
    """One line: the fields of *entry* that apply to it."""
    parts = []
    for field in FIELDS:
        value = getattr(entry, field)
        if value is not None and value != ():
            parts.append(f"{field}={_show(field, value)}")
    return " ".join(parts)


def diff_snapshots(a: dict[bytes, Entry], b: dict[bytes, Entry], *,
                   ignore: Collection[str] = ()) -> list[str]:
    """Differences between two snapshots, one line per (path, field), sorted by path; [] if equal.

    *ignore* names Entry fields to leave out of the comparison.
    """
    unknown = set(ignore) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown Entry fields: {sorted(unknown)}")
    fields = [field for field in FIELDS if field not in ignore]
    out = []
    for path in sorted(a.keys() | b.keys()):
        if path not in b:
            out.append(f"{path!r}: only in a: {describe(a[path])}")
        elif path not in a:
            out.append(f"{path!r}: only in b: {describe(b[path])}")
        else:
            for field in fields:
                va, vb = getattr(a[path], field), getattr(b[path], field)
                if va != vb:
                    out.append(f"{path!r}: {field}: a={_show(field, va)} b={_show(field, vb)}")
    return out
