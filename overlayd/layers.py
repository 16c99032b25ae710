"""The layer stack: resolving a name through the layers and listing merged directories.

Pure and synchronous; it never imports pyfuse3. A merged directory is a sequence of real
directories, top layer first, each given as ``(layer index, open dir fd)``. The rules are the
kernel's (fs/overlayfs/namei.c, readdir.c):

- the first layer, top down, holding the name wins;
- a whiteout (char 0/0, or ``.wh.NAME`` beside it) hides the name in every layer below;
- a directory merges with same-named directories below until one is opaque (included, then the
  search stops) or a non-directory is met (excluded, the search stops);
- a non-directory on top ends the search.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from overlayd.constants import OPAQUE_MARKER, WHITEOUT_PREFIX
from overlayd.ondisk import (
    ALL_FORMATS,
    XattrFormat,
    dir_marks,
    fd_path,
    has_oci_whiteout,
    is_whiteout,
)

DirStack = Sequence[tuple[int, int]]


@dataclass(frozen=True)
class Layer:
    """One layer of the stack. Index 0 is the top: the upper layer when there is one."""

    index: int
    path: bytes
    fd: int
    dev: int
    fsidx: int  # index of the layer's filesystem among the stack's distinct filesystems
    upper: bool


# Where a redirected directory lies in a layer: (absolute, components). Absolute paths start at
# the layer's root; relative ones at the parent directory's counterpart in that layer.
Location = tuple[bool, tuple[bytes, ...]]


@dataclass(frozen=True, slots=True)
class Found:
    """A name resolved through a directory stack."""

    layers: tuple[int, ...]  # the layers holding the object, top first (one for non-dirs)
    st: os.stat_result  # the top object's stat
    # Layers where a redirect (trusted.overlay.redirect) put the directory elsewhere than at
    # the same name in the parent's counterpart.
    locations: tuple[tuple[int, Location], ...] = ()

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)


@dataclass
class DirCache:
    """What is known of one merged directory's entries: names resolved (None: not in the
    merged view) and, once listed, its merged listing.

    Valid until the directory changes. Lower layers never change under a mount (overlayfs's
    contract: changing them is undefined behaviour, for the kernel too), and the upper layer
    changes only through the core, which drops the cache of every directory a change touches.
    A name is kept as where it lives, not as its stat (an os.stat_result costs some 600 bytes):
    ``(layers, file type, locations)`` of its Found, or None when the merged view lacks it.
    """

    found: dict[bytes, Place | None] = field(default_factory=dict)
    names: list[bytes] | None = None
    present: frozenset[bytes] | None = None  # set(names), once listed
    # Once listed: layer index -> every name its real directory holds (whiteouts included),
    # so that resolving a name probes only the layers that have it.
    layer_names: dict[int, set[bytes]] | None = None
    # Once read: the listing in readdir order, the names' cookies (Node.cookies) ascending.
    ordered: tuple[list[int], list[bytes]] | None = None


Place = tuple[tuple[int, ...], int, tuple[tuple[int, Location], ...]]


def lstat_at(dir_fd: int, name: bytes) -> os.stat_result | None:
    """The lstat of *name* in *dir_fd*; None when there is no such object."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None


def resolve(dirs: DirStack, name: bytes, roots: Sequence[int] = (),
            follow: bool = True, listed: Mapping[int, set[bytes]] | None = None,
            fmt: XattrFormat = ALL_FORMATS) -> Found | None:
    """Resolve *name* in the merged directory *dirs*; None when the merged view has no such name.

    *roots* are the layers' root fds, by layer index, for absolute redirects; with *follow*,
    a directory's redirect xattr says where to continue in the layers below (the kernel's
    redirect_dir, which it follows by default: redirect_always_follow). *listed* (from
    list_merged) names what each layer's directory holds: a layer without the name or its
    ``.wh.`` whiteout is skipped without a syscall. *fmt*: the opaque and redirect marks read.
    """
    if name.startswith(WHITEOUT_PREFIX):
        return None  # whiteout files and opaque markers are never part of the merged view
    wh_name = WHITEOUT_PREFIX + name if listed is not None else b""
    top: os.stat_result | None = None
    found: list[int] = []
    locations: list[tuple[int, Location]] = []
    where: Location = (False, (name,))
    candidates = list(dirs)
    pos = 0
    while pos < len(candidates):
        index, parent_fd = candidates[pos]
        pos += 1
        absolute, parts = where
        if listed is not None and not absolute and len(parts) == 1 and parts[0] == name:
            held = listed.get(index)
            if held is not None and name not in held and wh_name not in held:
                continue  # listed, and not there: neither the name nor its whiteout
        base = walk_dirs(roots[index] if absolute else parent_fd, parts[:-1])
        if base is None:
            continue
        leaf = parts[-1]
        try:
            # In the last layer to look in, a name's absence is the answer: whether a .wh.
            # whiteout hides it from layers below does not matter, there are none.
            stop, is_dir, st, redirect = _probe(base, leaf, fmt, pos < len(candidates))
            if st is not None and (top is None or is_dir):
                if top is None:
                    top = st
                found.append(index)
                if where != (False, (name,)):
                    locations.append((index, where))
            if stop or st is None:
                if stop:
                    break
                continue
            if not is_dir:
                break  # a non-dir on top ends the search; below a dir it ends the merge
        finally:
            if base != (roots[index] if absolute else parent_fd):
                os.close(base)
        if redirect is not None and follow:
            if redirect.startswith(b"/"):
                where = (True, tuple(p for p in redirect.split(b"/") if p))
                # An absolute redirect continues in every layer below, not only the parent's.
                candidates = candidates[:pos] + [(i, -1) for i in range(index + 1, len(roots))]
            else:
                where = (where[0], (*where[1][:-1], redirect))
    if top is None:
        return None
    return Found(tuple(found), top, tuple(locations))


def walk_dirs(base: int, parts: tuple[bytes, ...]) -> int | None:
    """Open the directory *parts* below *base* (no symlinks followed); None if it is not there.
    Returns *base* itself for no parts; any other fd is the caller's to close."""
    fd = base
    for part in parts:
        try:
            nxt = open_dir_at(fd, part)
        except OSError as e:
            if not is_missing(e):
                raise
            nxt = None
        finally:
            if fd != base:
                os.close(fd)
        if nxt is None:
            return None
        fd = nxt
    return fd


def _probe(dir_fd: int, name: bytes, fmt: XattrFormat = ALL_FORMATS, below: bool = True
           ) -> tuple[bool, bool, os.stat_result | None, bytes | None]:
    """Look at *name* in one layer: (stop the search here, is a directory, its stat, its
    redirect). Without layers *below* to search, an absent name is not looked for further."""
    st = lstat_at(dir_fd, name)
    if st is None:
        return below and has_oci_whiteout(dir_fd, name), False, None, None
    if is_whiteout(st):
        return True, False, None, None
    if not stat.S_ISDIR(st.st_mode):
        return False, False, st, None
    opaque, redirect = dir_marks(fd_path(dir_fd, name), None, fmt)
    # An OCI layer that deleted and re-created a directory holds both NAME and .wh.NAME: the
    # whiteout still hides the layers below (whiteouts apply to lower layers only).
    stop = opaque or has_oci_whiteout(dir_fd, name)
    return stop, True, st, redirect


def list_merged(dirs: DirStack, listed: dict[int, set[bytes]] | None = None) -> list[bytes]:
    """The names of the merged directory *dirs*, top layer's first, without whiteouts.
    With *listed*, also record every name each layer holds (see resolve)."""
    names: list[bytes] = []
    seen: set[bytes] = set()  # names shown, and names hidden by a whiteout above
    for index, dir_fd in dirs:
        hidden: list[bytes] = []
        held: set[bytes] = set()
        if listed is not None:
            listed[index] = held
        # scandir dups the fd and rewinds it, so the cached fd stays usable.
        with os.scandir(dir_fd) as it:
            for entry in it:
                name = os.fsencode(entry.name)
                held.add(name)
                if name.startswith(WHITEOUT_PREFIX):
                    if name != OPAQUE_MARKER:
                        hidden.append(name[len(WHITEOUT_PREFIX):])
                    continue
                if name in seen:
                    continue
                if not (entry.is_dir(follow_symlinks=False) or entry.is_file(follow_symlinks=False)
                        or entry.is_symlink()):
                    # A device, fifo or socket: only a stat tells a whiteout (char 0/0).
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if is_whiteout(st):
                        hidden.append(name)
                        continue
                names.append(name)
                seen.add(name)
        # A layer's whiteouts hide names of the layers below it, never its own.
        seen.update(hidden)
    return names


def open_dir_at(dir_fd: int, name: bytes) -> int:
    """Open the real directory *name* in *dir_fd*, refusing to follow a symlink."""
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                   dir_fd=dir_fd)


def is_missing(e: OSError) -> bool:
    return e.errno in (errno.ENOENT, errno.ENOTDIR)
