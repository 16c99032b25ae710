"""`overlayd diff`: what a layer changed, in `docker diff`'s format.

Pure and synchronous. One line per path: ``A /path`` added, ``C /path`` changed, ``D /path``
deleted. The rules are those of moby's archive.ChangesDirs (what `docker diff` computes by
comparing the merged view below a layer with the merged view including it), read here from the
layer alone instead of from two mounts:

- a name the lower view lacks is added, and so is everything below an added directory;
- a name the lower view has is changed when its type, mode, owner or device number differ, or,
  for non-directories, its size or mtime (directories' sizes and mtimes are not a measure of
  change, moby#9874), or its ``security.capability``;
- a name of the lower view that the new view lacks is deleted (a whiteout, a name under an
  opaque directory that the layer did not re-create); below a deleted directory nothing more is
  listed; a directory replaced by a non-directory lists its former children as deleted;
- every directory above a change is changed, even when its own attributes are the same.

Whiteouts and opaque directories are read in every format (layertree). Lines come in walk
order: parents first, names in byte order (moby's order varies from run to run).
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from overlayd.constants import CAPABILITY
from overlayd.errors import CommandParser, UsageError
from overlayd.layers import DirStack, Found, list_merged, open_dir_at, resolve
from overlayd.layertree import Entry, Kind, Stack, descend, entries
from overlayd.ondisk import fd_path
from overlayd.options import shown
from overlayd.stores import CONTAINERD, OVERLAY2, resolve_stack

ADDED, CHANGED, DELETED = "A", "C", "D"


@dataclass(frozen=True, slots=True)
class Change:
    kind: str  # ADDED, CHANGED or DELETED
    path: bytes  # absolute in the merged view

    def line(self) -> bytes:
        return self.kind.encode() + b" " + self.path + b"\n"


def _capability(parent_fd: int, name: bytes) -> bytes | None:
    try:
        return os.getxattr(fd_path(parent_fd, name), CAPABILITY, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOENT):
            return None
        raise


def _differs(old: os.stat_result, new: os.stat_result) -> bool:
    """moby's statDifferent."""
    if (old.st_mode != new.st_mode or old.st_uid != new.st_uid or old.st_gid != new.st_gid
            or old.st_rdev != new.st_rdev):
        return True
    if stat.S_ISDIR(old.st_mode):
        return False
    # sameFsTime: equal, or the same second where one side has no nanoseconds (a tar round trip).
    same_time = old.st_mtime_ns == new.st_mtime_ns or (
        old.st_mtime_ns // 10**9 == new.st_mtime_ns // 10**9
        and (old.st_mtime_ns % 10**9 == 0 or new.st_mtime_ns % 10**9 == 0))
    return not same_time or old.st_size != new.st_size


class _Differ:
    def __init__(self, roots: Sequence[int]) -> None:
        self.roots = roots

    def directory(self, upper_fd: int, parts: tuple[bytes, ...], old: DirStack | None,
                  opaque: bool) -> Iterator[Change]:
        """The changes below one directory of the layer: *old* is the lower view's directory
        at the same path (None when it has none); *opaque*: the layer hides it."""
        mine = {e.name: e for e in entries(upper_fd, parts)}
        names = set(mine)
        if opaque and old is not None:
            # Only under an opaque directory can a name the layer does not mention be gone.
            names.update(list_merged(old))
        for name in sorted(names):
            entry = mine.get(name)
            path = b"/" + b"/".join((*parts, name))
            found = resolve(old, name, self.roots) if old is not None else None
            if entry is None or entry.kind is Kind.WHITEOUT:
                if found is not None:
                    yield Change(DELETED, path)
                continue
            yield from self.entry(upper_fd, entry, path, old, found)

    def entry(self, upper_fd: int, entry: Entry, path: bytes, old: DirStack | None,
              found: Found | None) -> Iterator[Change]:
        if entry.redirect is not None:
            # A merged directory renamed with redirect_dir=on: its contents come from another
            # path of the layers below, which this walk does not follow.
            raise UsageError(f"{shown(path)} is a renamed merged directory (a redirect xattr): "
                             f"overlayd diff does not follow redirects")
        own: str | None = None
        if found is None:
            own = ADDED
        elif _differs(found.st, entry.st) or (
                stat.S_ISREG(entry.st.st_mode)
                and _capability(upper_fd, entry.disk_name) != self._old_capability(old, found,
                                                                                  entry.name)):
            own = CHANGED
        below: list[Change] = []
        old_dirs: list[tuple[int, int]] = []
        try:
            if found is not None and found.is_dir and old is not None:
                old_dirs = descend(old, entry.name, found, self.roots)
            if entry.kind is Kind.DIR:
                fd = open_dir_at(upper_fd, entry.disk_name)
                try:
                    below = list(self.directory(fd, entry.parts, old_dirs or None, entry.opaque))
                finally:
                    os.close(fd)
            elif old_dirs:
                # A directory replaced by a non-directory: its children are gone.
                below = [Change(DELETED, path + b"/" + n) for n in sorted(list_merged(old_dirs))]
        finally:
            for _, fd in old_dirs:
                os.close(fd)
        if own is None and below:
            own = CHANGED
        if own is not None:
            yield Change(own, path)
        if own == ADDED:
            # Below an added directory, everything is added (nothing was there before).
            yield from (Change(ADDED, c.path) for c in below if c.kind != DELETED)
        else:
            yield from below

    def _old_capability(self, old: DirStack | None, found: Found, name: bytes) -> bytes | None:
        if old is None or found.locations:
            return None
        parent = dict(old).get(found.layers[0])
        return None if parent is None else _capability(parent, name)


def changes(upper: bytes, lowers: Sequence[bytes]) -> Iterator[Change]:
    """What the layer *upper* changes in the stack *lowers* (top first)."""
    with Stack(lowers) as stack:
        fd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            root: DirStack | None = list(enumerate(stack.fds)) or None
            yield from _Differ(stack.fds).directory(fd, (), root, False)
        finally:
            os.close(fd)


def main_diff(argv: Sequence[str]) -> int:
    parser = CommandParser(
        prog="overlayd diff",
        description="List what a layer changed, in docker diff's format: A (added), "
                    "C (changed), D (deleted), one path per line.")
    parser.add_argument("layer", metavar="UPPERDIR|SPEC",
                        help="the layer directory, or overlay2:DIR or containerd:ROOT/snapshots/N "
                             "(the stack's top layer against the layers below it)")
    parser.add_argument("--lowerdir", metavar="L1:L2",
                        help="the layers below UPPERDIR, top first (without it, everything is "
                             "added, as for a base layer)")
    args = parser.parse_args(argv)
    if args.layer.startswith((OVERLAY2, CONTAINERD)):
        if args.lowerdir is not None:
            raise UsageError(f"--lowerdir: {args.layer} names the layers below already")
        layers = resolve_stack(args.layer).layers
        upper, lowers = layers[0], list(layers[1:])
    else:
        upper = os.fsencode(args.layer)
        if not os.path.isdir(upper):
            raise UsageError(f"{shown(upper)} is not a directory")
        lowers = [] if args.lowerdir is None else list(resolve_stack(args.lowerdir).layers)
    out = sys.stdout.buffer
    for change in changes(upper, lowers):
        out.write(change.line())
    out.flush()
    return 0
