"""The merged tree: the synchronous core behind the FUSE adapter.

``Overlay`` owns the layers' root fds, the inode table and the open handles, and answers every
operation in terms of nodes, names (bytes) and stat results. It never imports pyfuse3 and never
awaits: the adapter (fs.py) calls it from the trio thread, one request at a time.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from overlayd import copyup
from overlayd.constants import (
    INO_XATTRS,
    LINK_INO_BASE,
    OPAQUE_XATTRS,
    PAGE_SIZE,
    REDIRECT_XATTRS,
    SYNTHETIC_INO_BASE,
    TRUSTED_PROBE,
    WHITEOUT_PREFIX,
    WHITEOUT_PROBE,
    XINO_SHIFT,
)
from overlayd.errors import OverlayError, ReadOnly
from overlayd.idmap import ACL_XATTRS, map_acl
from overlayd.inodes import KEPT, ROOT_INODE, InodeTable, Node
from overlayd.layers import (
    DirCache,
    DirStack,
    Found,
    Layer,
    Place,
    list_merged,
    lstat_at,
    open_dir_at,
    resolve,
    walk_dirs,
)
from overlayd.ondisk import (
    ALL_FORMATS,
    USER_FORMAT,
    fd_path,
    has_oci_whiteout,
    is_whiteout,
    read_redirect,
    xattr_from_disk,
    xattr_to_disk,
)
from overlayd.options import MountOptions
from overlayd.syscalls import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    fallocate,
    renameat2,
)

log = logging.getLogger(__name__)

# Layers a directory must span for a lookup in it to list it whole rather than probe each layer.
LIST_TO_LOOK_UP = 8

T = TypeVar("T")
# Makes a new object at a name in a directory fd; returns an fd on it if it opened one.
Make = Callable[[int, bytes], "int | None"]

CAP_FSETID = 4  # linux/capability.h
SETID = stat.S_ISUID | stat.S_ISGID
SPECIAL = frozenset({stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK})
# Open flags not passed on to the real file. O_DIRECT is the kernel's business: it already
# bypasses its page cache for such a file's I/O and hands us buffers of no alignment, which an
# O_DIRECT fd refuses (EINVAL: dd iflag=direct failed).
NOT_PASSED = os.O_NOCTTY | os.O_DIRECT
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT


@dataclass
class Handle:
    """An open file: the real fd, the layer it is open in and the node it was opened through."""

    fh: int
    fd: int
    node: Node
    layer: int
    # Its writes bypass the kernel's page cache (FOPEN_DIRECT_IO), and with it the kernel's
    # clearing of set-id bits before a write: Overlay.write does that instead.
    direct: bool = False


def open_layers(opts: MountOptions) -> list[Layer]:
    """Open the layers' roots, top first: the upper layer (if any), then the lowers."""
    paths = ([opts.upperdir] if opts.upperdir is not None else []) + list(opts.lowerdirs)
    layers: list[Layer] = []
    devs: list[int] = []
    try:
        for index, path in enumerate(paths):
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            dev = os.fstat(fd).st_dev
            if dev not in devs:
                devs.append(dev)
            is_upper = index == 0 and opts.upperdir is not None
            layers.append(Layer(index, path, fd, dev, devs.index(dev), is_upper))
    except BaseException:
        for layer in layers:
            os.close(layer.fd)
        raise
    return layers


class Overlay:
    """The merged view of a layer stack."""

    def __init__(self, opts: MountOptions, layers: list[Layer]) -> None:
        self.opts = opts
        self.layers = layers
        self.upper = layers[0] if layers[0].upper else None
        self.roots = [layer.fd for layer in layers]
        root = Node(ROOT_INODE, None, b"", tuple(layer.index for layer in layers), True)
        root.fds = {layer.index: layer.fd for layer in layers}
        self.table = InodeTable(root)
        self.handles: dict[int, Handle] = {}
        # A node's latest handle, while open: its fd reaches the node's object without a path
        # walk (fchown, fstat...), as long as the handle is open in the node's top layer.
        self._latest: dict[Node, Handle] = {}
        self.dir_handles: dict[int, Node] = {}  # open directories
        self._next_fh = 1
        # Real objects whose inode number is not the xino one: copied-up objects keep their
        # origin's (as the kernel's do), and numbers that do not fit or that a removed node
        # still holds get a synthetic one.
        self._remap: dict[tuple[int, int], int] = {}
        self._next_synthetic = SYNTHETIC_INO_BASE
        # Inode numbers of the names of lower hard links in a writable mount (see _node_for).
        self._link_inos: dict[int, dict[tuple[int, bytes], int]] = {}
        self._link_owners: set[int] = set()
        # Inodes whose attributes the kernel may cache although a change made them stale
        # (a copied-up directory becomes merged): the adapter tells the kernel after each request.
        self.stale_attrs: list[int] = []
        # Who makes new upper objects: an object made with the owner asked for needs no chown.
        self._euid, self._egid = os.geteuid(), os.getegid()
        self.work_fd = -1
        if self.upper is not None and opts.workdir is not None:
            wfd = os.open(opts.workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                self.work_fd = copyup.open_workdir(wfd)
            finally:
                os.close(wfd)
        # The kernel's format (trusted.overlay.*) where it can be written; its unprivileged one
        # (user.overlay.*, what the kernel reads with -o userxattr) when asked for, when not
        # root, or when the upper filesystem refuses trusted.* (a user namespace's root).
        self.userxattr = opts.userxattr or not self._trusted_writable()
        fmt = 1 if self.userxattr else 0
        self.opaque_xattr = OPAQUE_XATTRS[fmt]
        self.redirect_xattr = REDIRECT_XATTRS[fmt]
        self.ino_xattr = INO_XATTRS[fmt]
        # The marks read and the xattrs hidden: every format we know, or as the kernel with
        # userxattr, user.overlay.* only (an unprivileged daemon cannot see trusted.* anyway).
        self.xattr_format = USER_FORMAT if self.userxattr else ALL_FORMATS
        self.maps_ids = bool(opts.uidmap.ranges or opts.gidmap.ranges)
        self.ids_identity = opts.uidmap.identity and opts.gidmap.identity
        # Whiteouts are char 0/0 wherever mknod allows it (unprivileged too since Linux 5.8);
        # .wh.NAME files, which the kernel does not read, only where it is refused.
        self.whiteout_files = self.work_fd >= 0 and not opts.read_only and not self._can_mknod()
        if self.work_fd >= 0 and not opts.read_only:
            # Debug: a failing `mount` prints exactly one line on stderr.
            log.debug("upper layer format: %s xattrs, %s whiteouts",
                     "user.overlay.*" if self.userxattr else "trusted.overlay.*",
                     ".wh. file" if self.whiteout_files else "char 0/0")
        if self.whiteout_files:
            log.warning("mknod of a 0/0 whiteout is refused here: writing .wh.NAME whiteout "
                        "files instead (the kernel's overlayfs will not read them)")

    def _trusted_writable(self) -> bool:
        """Whether trusted.* xattrs can be written on the upper filesystem: tried on work/."""
        if self.work_fd < 0 or self.opts.read_only:
            return os.geteuid() == 0  # nothing is written: the format only names what we read
        try:
            os.setxattr(self.work_fd, TRUSTED_PROBE, b"")
        except OSError:
            return False
        with contextlib.suppress(OSError):
            os.removexattr(self.work_fd, TRUSTED_PROBE)
        return True

    def _can_mknod(self) -> bool:
        """Whether a 0/0 whiteout can be made: tried in work/ (cleaned at every mount)."""
        try:
            os.mknod(WHITEOUT_PROBE, stat.S_IFCHR, os.makedev(0, 0), dir_fd=self.work_fd)
        except PermissionError:
            return False
        except FileExistsError:
            pass
        os.unlink(WHITEOUT_PROBE, dir_fd=self.work_fd)
        return True

    def close(self) -> None:
        for handle in self.handles.values():
            os.close(handle.fd)
        self.handles.clear()
        self._latest.clear()
        self.dir_handles.clear()
        for node in list(self.table):
            if node is not self.table.root:
                node.close_fds()
        self.table.root.fds = {}
        for layer in self.layers:
            os.close(layer.fd)
        if self.work_fd >= 0:
            os.close(self.work_fd)

    # -- nodes -------------------------------------------------------------------------------

    def node(self, ino: int) -> Node:
        node = self.table.get(ino)
        if node is None:
            # The kernel asked about an inode it never looked up or already forgot.
            raise OverlayError(f"unknown inode {ino}", errno.ESTALE)
        return node

    def ino_for(self, layer: int, st: os.stat_result) -> int:
        """The inode number of a real object: its own, tagged with its filesystem (xino)."""
        key = (st.st_dev, st.st_ino)
        ino = self._remap.get(key) if self._remap else None
        if ino is not None:
            return ino
        fsidx = self.layers[layer].fsidx
        if st.st_ino < (1 << XINO_SHIFT) and (fsidx or st.st_ino != ROOT_INODE):
            ino = (fsidx << XINO_SHIFT) | st.st_ino
            holder = self.table.get(ino)
            if holder is None or not holder.unlinked:
                return ino
        self._next_synthetic += 1
        self._remap[key] = self._next_synthetic
        return self._next_synthetic

    def _retire(self, node: Node, st: os.stat_result, pfd: int = -1, name: bytes = b"") -> None:
        """*node*'s name is about to go (its object has stat *st*; an upper one is *name* in
        *pfd*). If that is its last name, it is unlinked: the kernel may still hold it (an open
        file, a working directory) and asks for its attributes; and an upper object's inode
        number may come back."""
        if node.is_dir or node.top != 0 or st.st_nlink <= 1:
            node.unlinked = True
            node.final_st = st
            if node.top == 0:
                self._remap.pop((st.st_dev, st.st_ino), None)
                if node.lookups and stat.S_IFMT(st.st_mode) in SPECIAL and KEPT not in node.fds:
                    # The kernel opens a FIFO, socket or device itself, without asking us, and
                    # may change it through that fd (fchmod...): keep a way to the inode.
                    node.fds[KEPT] = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
                                             dir_fd=pfd)

    def dir_fd(self, node: Node, layer: int) -> int:
        """The open real directory of *node* in *layer* (opened on first use, then cached)."""
        fd = node.fds.get(layer)
        if fd is None:
            assert node.parent is not None
            assert node.is_dir
            where = node.locations.get(layer) if node.locations else None
            if where is None:
                fd = open_dir_at(self.dir_fd(node.parent, layer), node.name)
            else:
                absolute, parts = where
                base = self.roots[layer] if absolute else self.dir_fd(node.parent, layer)
                opened = walk_dirs(base, parts)
                if opened is None or opened == base:
                    raise OverlayError("redirected directory vanished", errno.ENOENT)
                fd = opened
            node.fds[layer] = fd
        return fd

    def dir_stack(self, node: Node) -> DirStack:
        if not node.is_dir:
            raise OverlayError("not a directory", errno.ENOTDIR)
        stack = []
        for layer in node.layers:
            try:
                stack.append((layer, self.dir_fd(node, layer)))
            except (FileNotFoundError, NotADirectoryError):
                # Changed under us in a lower layer (undefined by the overlayfs contract):
                # show what is still there.
                log.debug("layer %d of %r vanished", layer, node)
        return stack

    def lookup(self, parent: Node, name: bytes) -> tuple[Node, os.stat_result] | None:
        """Resolve *name* in *parent*. The node is not counted: the caller remembers it."""
        if name == b".":
            return parent, self.stat(parent)
        if name == b"..":
            up = parent.parent or parent
            return up, self.stat(up)
        found = self._cached_resolve(parent, name)
        if found is None:
            return None
        return self._node_for(parent, name, found), found.st

    def _resolve(self, parent: Node, name: bytes) -> Found | None:
        return resolve(self.dir_stack(parent), name, self.roots, self.opts.redirect_follow,
                       fmt=self.xattr_format)

    def _cached_resolve(self, parent: Node, name: bytes) -> Found | None:
        """_resolve through the directory's cache (see DirCache): a name met before costs one
        lstat, a name the directory lacks none."""
        cache = parent.cache
        if cache is None:
            if not parent.is_dir:
                raise OverlayError("not a directory", errno.ENOTDIR)
            cache = parent.cache = DirCache()
        try:
            place = cache.found[name]
        except KeyError:
            if cache.present is None and len(parent.layers) >= LIST_TO_LOOK_UP:
                # Probing a name costs two syscalls per layer that lacks it (the name and its
                # .wh. whiteout): in a deep stack, one listing answers every later lookup.
                self._list(parent, cache)
            if cache.present is not None and name not in cache.present:
                found = None
            else:
                found = resolve(self.dir_stack(parent), name, self.roots,
                                self.opts.redirect_follow, cache.layer_names, self.xattr_format)
            cache.found[name] = _place(found)
            return found
        if place is None:
            return None
        layers, fmt, locations = place
        st = lstat_at(self.dir_fd(parent, layers[0]), name)
        if st is None or stat.S_IFMT(st.st_mode) != fmt:
            # Changed behind our back (undefined for overlayfs): believe the layers.
            found = self._resolve(parent, name)
            cache.found[name] = _place(found)
            return found
        return Found(layers, st, locations)

    @staticmethod
    def _changed(*nodes: Node | None) -> None:
        """Entries of these directories changed (or their place in the tree did): forget
        what the cache knew of them."""
        for node in nodes:
            if node is not None:
                node.cache = None

    def _node_for(self, parent: Node, name: bytes, found: Found) -> Node:
        if found.layers[0] == 0:
            self._recorded_ino(parent, name, found.st)
        ino = self.ino_for(found.layers[0], found.st)
        if found.layers[0] != 0 and found.st.st_nlink > 1 and self.upper is not None \
                and not found.is_dir:
            ino = self._link_ino(ino, parent, name)
        node = self.table.get(ino)
        if node is not None and node.is_dir == found.is_dir:
            # The same object: a directory, or one name of a hard-linked file, which from now
            # on is located by the name just looked up (what a copy-up would copy).
            if not node.is_dir:
                node.locate(parent, name)
            return node
        node = Node(ino, parent, name, found.layers, found.is_dir)
        if found.locations:
            node.locations = dict(found.locations)
        return node

    def _recorded_ino(self, parent: Node, name: bytes, st: os.stat_result) -> None:
        """Learn the inode number an earlier mount recorded on a copied-up object, the first
        time this mount meets the object."""
        key = (st.st_dev, st.st_ino)
        if key in self._remap or self.table.get(self.ino_for(0, st)) is not None:
            return
        try:
            value = os.getxattr(fd_path(self.dir_fd(parent, 0), name), self.ino_xattr,
                                follow_symlinks=False)
        except OSError as e:
            if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
                return
            raise
        if value.isdigit() and (1 < int(value) < SYNTHETIC_INO_BASE
                                or LINK_INO_BASE <= int(value) < 1 << 64) \
                and self.table.get(int(value)) is None:
            self._remap[key] = int(value)

    def _link_ino(self, ino: int, parent: Node, name: bytes) -> int:
        """The inode number of one name of a lower hard link, in a writable mount.

        As the kernel with index=off (ovl_hash_bylower), each name is an inode of its own, so
        that a copy-up through one name breaks the link and the other names keep the lower
        data. The kernel's inodes all report the origin's st_ino; a FUSE node's number is its
        st_ino, so here each name has a number of its own, derived from the origin's, its
        parent's and its name: the same in every mount, whichever name is met first, and
        recorded at copy-up like any other (copy_up).
        """
        names = self._link_inos.setdefault(ino, {})
        link_ino = names.get((parent.ino, name))
        if link_ino is None:
            digest = hashlib.blake2b(b"%d/%d/" % (ino, parent.ino) + name, digest_size=8)
            link_ino = LINK_INO_BASE | (int.from_bytes(digest.digest(), "little")
                                        & (LINK_INO_BASE - SYNTHETIC_INO_BASE - 1))
            if link_ino in self._link_owners or self.table.get(link_ino) is not None:
                self._next_synthetic += 1  # a collision (2**-55 a pair): this mount's own
                link_ino = self._next_synthetic
            self._link_owners.add(link_ino)
            names[(parent.ino, name)] = link_ino
        return link_ino

    def remember(self, node: Node) -> None:
        self.table.remember(node)

    def forget(self, ino: int, nlookup: int) -> None:
        self.table.forget(ino, nlookup)

    # -- reading -----------------------------------------------------------------------------

    def stat(self, node: Node) -> os.stat_result:
        if node.unlinked:
            # No name leads to it any more: an open handle (or a kept fd) still does; else its
            # last stat.
            fd = self._open_fd(node)
            if fd is None:
                fd = node.fds.get(KEPT)
            if fd is not None:
                return os.fstat(fd)
            assert node.final_st is not None
            return node.final_st
        if node.parent is None:
            return os.fstat(self.layers[node.top].fd)
        fd = self._top_fd(node)
        if fd is not None:
            return os.fstat(fd)
        return os.stat(node.name, dir_fd=self.dir_fd(node.parent, node.top),
                       follow_symlinks=False)

    def nlink(self, node: Node, st: os.stat_result) -> int:
        # The kernel's ovl_getattr: a merged directory reports nlink 1 ("seems to pacify find"),
        # even once removed; everything else its real object's link count: 0 for an upper one
        # no name leads to any more, and a removed lower one's own, since a whiteout hides it
        # and it stays (an open FIFO or read-only file, a working directory).
        if node.is_dir and (len(node.layers) > 1 or self.opts.static_nlink):
            return 1
        if node.unlinked and node.top == 0:
            return 0
        return st.st_nlink

    def readlink(self, node: Node) -> bytes:
        assert node.parent is not None
        return os.readlink(node.name, dir_fd=self.dir_fd(node.parent, node.top))

    def xattr_path(self, node: Node) -> bytes:
        if node.parent is None:
            return fd_path(self.layers[node.top].fd)
        return fd_path(self.dir_fd(node.parent, node.top), node.name)

    def _open_fd(self, node: Node) -> int | None:
        """The fd of an open handle on *node*, if any."""
        latest = self._latest.get(node)
        if latest is not None:
            return latest.fd
        for handle in self.handles.values():
            if handle.node is node:
                return handle.fd
        return None

    def _top_fd(self, node: Node) -> int | None:
        """An fd on *node*'s object, from a handle open in its top layer, if there is one."""
        latest = self._latest.get(node)
        if latest is not None and latest.layer == node.top:
            return latest.fd
        return None

    def _unlinked_target(self, node: Node) -> bytes | int:
        """What is left of a node no name leads to: an open handle's fd, else the /proc link
        of its kept O_PATH fd (a special file), to be followed."""
        fd = self._open_fd(node)
        if fd is not None:
            return fd
        if KEPT in node.fds:
            return fd_path(node.fds[KEPT])
        raise OverlayError("no name leads to it", errno.ENOENT)

    def _target(self, node: Node) -> bytes | int:
        """Where the node's attributes and xattrs are changed: its path, or, once no name leads
        to it, what is left of it (the kernel acts on the open inode)."""
        if node.unlinked:
            return self._unlinked_target(node)
        fd = self._top_fd(node)
        return self.xattr_path(node) if fd is None else fd

    def _xattr_call(self, call: Callable[..., T], node: Node, *args: object) -> T:
        target = self._target(node)
        if node.unlinked and isinstance(target, bytes):
            return call(target, *args)  # a /proc link to follow
        return _call_at(call, target, *args)

    def getxattr(self, node: Node, name: bytes) -> bytes:
        disk = xattr_to_disk(name, self.xattr_format)
        if disk is None:
            raise OverlayError("private xattr", errno.ENODATA)
        # Lower objects never change, and upper ones only through the core, or lose an xattr
        # (security.capability to a chown or a write): the names known are a superset.
        names = node.xattr_names
        if names is None:
            names = self._disk_xattrs(node)
        if disk not in names:
            raise OverlayError("no such xattr", errno.ENODATA)
        value = self._xattr_call(os.getxattr, node, disk)
        if disk in ACL_XATTRS and self.maps_ids:
            value = map_acl(value, self.opts.uidmap, self.opts.gidmap, to_disk=False)
        return value

    def _disk_xattrs(self, node: Node) -> frozenset[bytes]:
        names = frozenset(os.fsencode(n) for n in self._xattr_call(os.listxattr, node))
        node.xattr_names = names
        return names

    def listxattr(self, node: Node) -> list[bytes]:
        shown = (xattr_from_disk(n, self.xattr_format) for n in self._disk_xattrs(node))
        return [n for n in shown if n is not None]

    def statfs(self) -> os.statvfs_result:
        return os.fstatvfs(self.layers[0].fd)

    def open(self, node: Node, flags: int, caller: tuple[int, int] = (0, 0)) -> Handle:
        """Open *node*'s file; *caller* (pid, uid) opens it, which matters to O_TRUNC."""
        if node.is_dir:
            raise OverlayError("is a directory", errno.EISDIR)
        if flags & WRITE_FLAGS:
            self.copy_up(node, data=not flags & os.O_TRUNC)
        assert node.parent is not None
        fd = os.open(node.name, (flags & ~(os.O_CREAT | os.O_EXCL | NOT_PASSED))
                     | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dir_fd(node.parent, node.top))
        if flags & os.O_TRUNC and node.maybe_setid:
            # The kernel's truncate clears set-id bits for a caller without CAP_FSETID; its
            # FUSE client forgets to when the open itself truncates (atomic_o_trunc).
            try:
                _kill_setid(fd, node, caller)
            except BaseException:
                os.close(fd)
                raise
        return self._new_handle(fd, node, node.top)

    def _new_handle(self, fd: int, node: Node, layer: int) -> Handle:
        fh = self._next_fh
        self._next_fh += 1
        handle = Handle(fh, fd, node, layer)
        self.handles[fh] = handle
        self._latest[node] = handle
        return handle

    def handle(self, fh: int) -> Handle:
        try:
            return self.handles[fh]
        except KeyError:
            raise OverlayError(f"unknown file handle {fh}", errno.EBADF) from None

    def read(self, fh: int, offset: int, size: int) -> bytes:
        handle = self.handle(fh)
        if handle.layer != handle.node.top:
            self._follow_copy_up(handle)
        return os.pread(handle.fd, size, offset)

    def _follow_copy_up(self, handle: Handle) -> None:
        """A read-only handle opened before its file was copied up reads the upper copy from
        now on: the merged view has one version of the file (a deliberate difference from the
        kernel, whose old handle keeps reading the lower file)."""
        node = handle.node
        if node.unlinked or node.parent is None:
            return
        fd = os.open(node.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=self.dir_fd(node.parent, node.top))
        os.close(handle.fd)
        handle.fd, handle.layer = fd, node.top

    def release(self, fh: int) -> None:
        handle = self.handles.pop(fh, None)
        if handle is not None:
            if self._latest.get(handle.node) is handle:
                del self._latest[handle.node]
            os.close(handle.fd)

    def _list(self, node: Node, cache: DirCache) -> list[bytes]:
        if cache.names is None:
            cache.layer_names = {}
            cache.names = list_merged(self.dir_stack(node), cache.layer_names)
            cache.present = frozenset(cache.names)
        return cache.names

    def opendir(self, node: Node) -> int:
        dh = self._next_fh
        self._next_fh += 1
        self.dir_handles[dh] = node
        return dh

    def listing(self, dh: int) -> tuple[Node, list[int], list[bytes]]:
        """The directory open as *dh*, and its entries now: cookies ascending, and names.

        A read from offset N serves the names whose cookie is above N, from the listing as it is
        when the read is served, not a snapshot of opendir: the kernel keeps listings in its
        page cache (FOPEN_CACHE_DIR), filled by the reads of any handle at the offset the cache
        has reached, and drops them when the directory changed after it began filling them.
        So each part must be at least as new as that beginning, and an offset must mean the
        same to every handle: a name that stays keeps its place, a new one goes last."""
        node = self.dir_node(dh)
        cache = node.cache
        if cache is None:
            cache = node.cache = DirCache()
        if cache.ordered is None:
            names = self._list(node, cache)
            old, cookies = node.cookies, {}
            for name in names:
                cookie = old.get(name)
                if cookie is None:
                    cookie = node.next_cookie
                    node.next_cookie += 1
                cookies[name] = cookie
            node.cookies = cookies  # names gone since lose theirs: a new one is never reused
            entries = sorted(zip(cookies.values(), cookies.keys(), strict=True))
            cache.ordered = ([c for c, _ in entries], [n for _, n in entries])
        return node, *cache.ordered

    def dir_node(self, dh: int) -> Node:
        """The directory open as *dh*."""
        try:
            return self.dir_handles[dh]
        except KeyError:
            raise OverlayError(f"unknown directory handle {dh}", errno.EBADF) from None

    def releasedir(self, dh: int) -> None:
        self.dir_handles.pop(dh, None)

    # -- writing -----------------------------------------------------------------------------

    def _need_writable(self) -> None:
        if not self.opts.writable:
            raise ReadOnly("read-only mount")

    def upper_dir_fd(self, node: Node) -> int:
        """The node's directory in the upper layer, copied up (parents first) if need be."""
        self.copy_up(node)
        return self.dir_fd(node, 0)

    def copy_up(self, node: Node, *, data: bool = True) -> None:
        """Give *node* an upper object: a metadata copy for directories, a full one otherwise."""
        self._need_writable()
        if node.top == 0:
            return
        parent = node.parent
        assert parent is not None  # the root holds the upper layer whenever there is one
        dst = self.upper_dir_fd(parent)
        src = self.dir_fd(parent, node.top)
        st = os.stat(node.name, dir_fd=src, follow_symlinks=False)
        # Record the inode number for later mounts, unless it is this mount's invention or the
        # origin's own while it stays visible under other names (a lower hard link's names in
        # a writable mount have numbers of their own, _link_ino: those are recorded).
        keep = node.ino >= LINK_INO_BASE or (
            node.ino < SYNTHETIC_INO_BASE and (node.is_dir or st.st_nlink == 1))
        if self.userxattr and not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            keep = False  # user.* xattrs exist on files and directories only (EPERM else)
        extra = [(self.ino_xattr, b"%d" % node.ino)] if keep else []
        try:
            copyup.copy_up(src, node.name, st, self.work_fd, dst, data=data,
                           fsync=self.opts.fsync, xattrs=extra, fmt=self.xattr_format)
        finally:
            self._changed(parent, node)
            node.xattr_names = None
        new = os.stat(node.name, dir_fd=dst, follow_symlinks=False)
        self._remap[(new.st_dev, new.st_ino)] = node.ino
        node.layers = (0, *node.layers) if node.is_dir else (0,)
        # What the kernel cached came from the lower object: a directory's nlink becomes 1
        # (merged), a lower hard link's its own, the ctime the copy's.
        self.stale_attrs.append(node.ino)
        log.debug("copied up %r", node)

    def _copy_up_named(self, node: Node, *, data: bool = True) -> None:
        """copy_up for a change made through an inode: one that no name leads to any more
        cannot be copied up (its name may hold another object by now)."""
        if node.unlinked:
            self._need_writable()
            if node.top != 0:
                # The kernel tries the copy-up and its rename meets the whiteout now at the
                # name: EEXIST (seen on 6.18).
                raise OverlayError("a lower file no name leads to", errno.EEXIST)
            return
        self.copy_up(node, data=data)

    def _at(self, parent: Node, name: bytes, *, locate: bool = True) -> Node:
        """The node named *name* in *parent*; with *locate*, located by that name (a hard-linked
        file has several, and a copy-up must copy the name asked for)."""
        hit = self.lookup(parent, name)
        if hit is None:
            raise OverlayError("no such entry", errno.ENOENT)
        node = hit[0]
        if locate:
            node.locate(parent, name)
        return node

    def _lower_positive(self, parent: Node, name: bytes) -> bool:
        """Whether a lower layer shows *name* in *parent* (removing it then needs a whiteout)."""
        lower = [(i, fd) for i, fd in self.dir_stack(parent) if i != 0]
        return bool(lower) and resolve(lower, name, self.roots, self.opts.redirect_follow,
                                       fmt=self.xattr_format) is not None

    def _make_whiteout(self, dir_fd: int, name: bytes) -> None:
        if not self.whiteout_files:
            try:
                os.mknod(name, stat.S_IFCHR, os.makedev(0, 0), dir_fd=dir_fd)
                return
            except PermissionError:
                # Allowed at mount time, refused now (a security module's policy): say so once.
                self.whiteout_files = True
                log.warning("mknod of a 0/0 whiteout refused: writing .wh.NAME whiteout files "
                            "from now on (the kernel's overlayfs will not read them)")
        # The OCI format, for kernels before 5.8 in a user namespace.
        os.close(os.open(WHITEOUT_PREFIX + name,
                         os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600,
                         dir_fd=dir_fd))

    def _new_object(self, parent: Node, name: bytes, make: Make,
                    owner: tuple[int, int] | None, is_dir: bool,
                    umask: int = 0, setid: int = 0) -> os.stat_result:
        """Publish a new object at *name*, replacing an upper whiteout atomically; *setid*: the
        set-id bits of the mode a file is made with."""
        pfd = self.upper_dir_fd(parent)
        if self.lookup(parent, name) is not None:
            raise OverlayError("exists", errno.EEXIST)
        try:
            return self._publish(pfd, name, make, owner, is_dir, umask, setid)
        finally:
            self._changed(parent)

    def _publish(self, pfd: int, name: bytes, make: Make, owner: tuple[int, int] | None,
                 is_dir: bool, umask: int, setid: int = 0) -> os.stat_result:
        """*make* makes the object, and returns an fd on it if it opened one. *umask*: the
        caller's, under which *make* runs, as the kernel's overlay makes the object (its
        ovl_create_upper leaves the umask to an upper filesystem with POSIX ACLs): the upper
        filesystem applies the parent's default ACL if it has one, else the umask. The mount
        has POSIX ACLs too (Operations.enable_acl), so the kernel sends the mode unmasked, and
        the umask beside it. The daemon's own umask is 0 (modes given in full)."""
        pst = os.fstat(pfd)
        sgid = bool(pst.st_mode & stat.S_ISGID)
        made: list[int] = []  # the fd make returned

        def build(dir_fd: int, n: bytes) -> None:
            if umask:
                old = os.umask(umask)
                try:
                    fd = make(dir_fd, n)
                finally:
                    os.umask(old)
            else:
                fd = make(dir_fd, n)
            if fd is not None:
                made.append(fd)
            if owner is None:
                return
            # A setgid directory hands its group down, as the upper filesystem would.
            uid, gid = owner[0], pst.st_gid if sgid else owner[1]
            if dir_fd == pfd and (uid, gid) == (self._euid, pst.st_gid if sgid else self._egid):
                return  # made with that owner already (our fsuid, and the group it hands down)
            self._chown(n, uid, gid, dir_fd=dir_fd)
            if is_dir and sgid:
                mode = os.stat(n, dir_fd=dir_fd).st_mode
                os.chmod(n, stat.S_IMODE(mode) | stat.S_ISGID, dir_fd=dir_fd)
            elif setid:
                _restore_setid(dir_fd, n, setid)

        try:
            # Made in place first: the name is almost always free (the lookup just said so),
            # and make refuses (EEXIST) what is there, a whiteout too.
            build(pfd, name)
        except FileExistsError:
            existing = lstat_at(pfd, name)
            if existing is None or not is_whiteout(existing):
                raise OverlayError("exists in upper", errno.EEXIST) from None
            self._build_over_whiteout(pfd, name, build, is_dir)
        else:
            if has_oci_whiteout(pfd, name):
                # Over a .wh. whiteout (ours where mknod is refused, or an OCI layer's): a
                # directory is opaque, as one made over a char 0/0 whiteout, before the
                # whiteout goes.
                if is_dir:
                    copyup.set_opaque(fd_path(pfd, name), self.opaque_xattr)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(WHITEOUT_PREFIX + name, dir_fd=pfd)
        if made:
            return os.fstat(made[0])
        return os.stat(name, dir_fd=pfd, follow_symlinks=False)

    def _build_over_whiteout(self, pfd: int, name: bytes, build: Callable[[int, bytes], None],
                             is_dir: bool) -> None:
        """The kernel's ovl_create_over_whiteout: build in the workdir, exchange with the
        whiteout, drop the whiteout. A directory made over a whiteout is opaque."""
        def build_over(dir_fd: int, n: bytes) -> None:
            build(dir_fd, n)
            if is_dir:
                copyup.set_opaque(fd_path(dir_fd, n), self.opaque_xattr)

        default_acl = _default_acl(pfd)
        if default_acl is None:
            tmp = copyup.build_in_work(self.work_fd, build_over)
            renameat2(self.work_fd, tmp, pfd, name, RENAME_EXCHANGE)
            os.unlink(tmp, dir_fd=self.work_fd)
            return
        # ovl_create_over_whiteout also gives the object the ACLs that the parent's default
        # ACL hands down (posix_acl_create), umask or not: build it inside a workdir directory
        # holding that default ACL, and the upper filesystem does.
        def holder(dir_fd: int, n: bytes) -> None:
            os.mkdir(n, 0o700, dir_fd=dir_fd)
            os.setxattr(fd_path(dir_fd, n), ACL_XATTRS[1], default_acl)

        tmp = copyup.build_in_work(self.work_fd, holder)
        try:
            hfd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.work_fd)
            try:
                build_over(hfd, name)
                renameat2(hfd, name, pfd, name, RENAME_EXCHANGE)
            finally:
                os.close(hfd)
        finally:
            copyup.discard(self.work_fd, tmp)  # and the whiteout, exchanged into it

    def _published(self, parent: Node, name: bytes, st: os.stat_result) -> Node:
        is_dir = stat.S_ISDIR(st.st_mode)
        return Node(self.ino_for(0, st), parent, name, (0,), is_dir)

    def create(self, parent: Node, name: bytes, mode: int, flags: int,
               owner: tuple[int, int], umask: int = 0) -> tuple[Handle, Node, os.stat_result]:
        fds: list[int] = []
        oflags = ((flags & ~(os.O_TRUNC | NOT_PASSED)) | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                  | os.O_CLOEXEC)

        def make(dir_fd: int, n: bytes) -> int:
            fds.append(os.open(n, oflags, stat.S_IMODE(mode), dir_fd=dir_fd))
            return fds[-1]

        try:
            st = self._new_object(parent, name, make, owner, False, umask, mode & SETID)
            # Listed now, through the fd at hand: the kernel asks for security.capability
            # before the first write, and a path through /proc costs more than this.
            xattr_names = frozenset(os.fsencode(n) for n in os.listxattr(fds[0]))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        node = self._published(parent, name, st)
        node.maybe_setid = bool(st.st_mode & SETID)
        node.xattr_names = xattr_names
        return self._new_handle(fds[0], node, 0), node, st

    def mkdir(self, parent: Node, name: bytes, mode: int,
              owner: tuple[int, int], umask: int = 0) -> tuple[Node, os.stat_result]:
        def make(dir_fd: int, n: bytes) -> None:
            os.mkdir(n, stat.S_IMODE(mode), dir_fd=dir_fd)

        st = self._new_object(parent, name, make, owner, True, umask)
        return self._published(parent, name, st), st

    def symlink(self, parent: Node, name: bytes, target: bytes,
                owner: tuple[int, int]) -> tuple[Node, os.stat_result]:
        def make(dir_fd: int, n: bytes) -> None:
            os.symlink(target, n, dir_fd=dir_fd)

        st = self._new_object(parent, name, make, owner, False)
        return self._published(parent, name, st), st

    def mknod(self, parent: Node, name: bytes, mode: int, rdev: int,
              owner: tuple[int, int], umask: int = 0) -> tuple[Node, os.stat_result]:
        def make(dir_fd: int, n: bytes) -> None:
            os.mknod(n, mode, rdev, dir_fd=dir_fd)

        st = self._new_object(parent, name, make, owner, False, umask, mode & SETID)
        return self._published(parent, name, st), st

    def link(self, node: Node, parent: Node, name: bytes) -> tuple[Node, os.stat_result]:
        if node.is_dir:
            raise OverlayError("hard link to a directory", errno.EPERM)
        self.copy_up(node)  # as the kernel with index=off: the link is made to the upper copy
        assert node.parent is not None
        src_fd = self.dir_fd(node.parent, 0)

        def make(dir_fd: int, n: bytes) -> None:
            os.link(node.name, n, src_dir_fd=src_fd, dst_dir_fd=dir_fd, follow_symlinks=False)

        st = self._new_object(parent, name, make, None, False)
        node.add_alias(parent, name)
        return node, st

    def unlink(self, parent: Node, name: bytes) -> None:
        node = self._at(parent, name, locate=False)
        if node.is_dir:
            raise OverlayError("is a directory", errno.EISDIR)
        self._remove(parent, name, node)
        node.drop_name(parent, name)

    def rmdir(self, parent: Node, name: bytes) -> None:
        node = self._at(parent, name, locate=False)
        if not node.is_dir:
            raise OverlayError("not a directory", errno.ENOTDIR)
        if list_merged(self.dir_stack(node)):
            raise OverlayError("directory not empty", errno.ENOTEMPTY)
        self._remove(parent, name, node)

    def _remove(self, parent: Node, name: bytes, node: Node) -> None:
        try:
            self._remove_name(parent, name, node)
        finally:
            self._changed(parent, node)

    def _remove_name(self, parent: Node, name: bytes, node: Node) -> None:
        pfd = self.upper_dir_fd(parent)
        lower = self._lower_positive(parent, name)
        self._retire(node, self.stat(node) if node.top != 0 else
                     os.stat(name, dir_fd=pfd, follow_symlinks=False), pfd, name)
        if node.top != 0:
            self._make_whiteout(pfd, name)  # only below: a whiteout is all the upper needs
        elif lower and self.whiteout_files:
            # A .wh. file cannot take the object's place: move the object out, then whiteout.
            tmp = copyup.temp_name()
            renameat2(pfd, name, self.work_fd, tmp)
            self._make_whiteout(pfd, name)
            copyup.remove_tree(self.work_fd, tmp)
        elif lower:
            # The kernel's ovl_remove_and_whiteout: exchange the upper object with a fresh
            # whiteout, then drop the object (for a directory: its leftover whiteouts too).
            tmp = copyup.build_in_work(self.work_fd, self._make_whiteout)
            renameat2(self.work_fd, tmp, pfd, name, RENAME_EXCHANGE)
            copyup.remove_tree(self.work_fd, tmp)
        elif node.is_dir:
            self._clear_dir(node)
            os.rmdir(name, dir_fd=pfd)
        else:
            os.unlink(name, dir_fd=pfd)
        if node.is_dir:
            node.close_fds()

    def _clear_dir(self, node: Node) -> None:
        """Empty the upper directory of a merged-empty node: only whiteouts can be left in it."""
        fd = self.dir_fd(node, 0)
        for child in os.listdir(fd):
            copyup.remove_tree(fd, os.fsencode(child))

    def rename(self, old_parent: Node, old_name: bytes, new_parent: Node, new_name: bytes,
               flags: int) -> None:
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise OverlayError("unsupported rename flags", errno.EINVAL)
        src = self._at(old_parent, old_name)
        hit = self.lookup(new_parent, new_name)
        dst = hit[0] if hit is not None else None
        try:
            self._rename(old_parent, old_name, new_parent, new_name, flags, src, dst)
        finally:
            self._changed(old_parent, new_parent, src, dst)

    def _rename(self, old_parent: Node, old_name: bytes, new_parent: Node, new_name: bytes,
                flags: int, src: Node, dst: Node | None) -> None:
        if flags & RENAME_NOREPLACE and dst is not None:
            raise OverlayError("target exists", errno.EEXIST)
        if flags & RENAME_EXCHANGE and dst is None:
            raise OverlayError("no target to exchange with", errno.ENOENT)
        moving = [src, dst] if flags & RENAME_EXCHANGE else [src]
        redirected = [n for n in moving
                      if n is not None and n.is_dir and (n.top != 0 or len(n.layers) > 1)]
        if redirected and not self.opts.redirect_create:
            # redirect_dir=off, the kernel's default: a directory with lower parts cannot move;
            # callers such as mv fall back to copying.
            raise OverlayError("merged or lower directory", errno.EXDEV)
        if dst is src and old_parent is new_parent and old_name == new_name:
            return
        opfd = self.upper_dir_fd(old_parent)
        npfd = self.upper_dir_fd(new_parent)
        self.copy_up(src)
        samedir = old_parent is new_parent
        if flags & RENAME_EXCHANGE:
            assert dst is not None
            dst = self._at(new_parent, new_name)
            self.copy_up(dst)
            for node in redirected:
                self._set_redirect(node, samedir)
            renameat2(opfd, old_name, npfd, new_name, RENAME_EXCHANGE)
            for node, parent, name in ((src, new_parent, new_name), (dst, old_parent, old_name)):
                node.parent, node.name = parent, name
                if node in redirected:
                    self._relocate(node)
                elif node.is_dir and len(parent.layers) > 1:
                    copyup.set_opaque(self.xattr_path(node), self.opaque_xattr)
            return
        for node in redirected:
            self._set_redirect(node, samedir)
        if dst is not None:
            if dst.is_dir and not src.is_dir:
                raise OverlayError("target is a directory", errno.EISDIR)
            if src.is_dir and not dst.is_dir:
                raise OverlayError("target is not a directory", errno.ENOTDIR)
            if dst.is_dir:
                if list_merged(self.dir_stack(dst)):
                    raise OverlayError("target directory not empty", errno.ENOTEMPTY)
                if dst.top == 0:
                    self._clear_dir(dst)
        if src.is_dir:
            if len(new_parent.layers) > 1 and src not in redirected:
                # As the kernel's ovl_rename: a directory moved into a merged directory is
                # made opaque, so lower entries of the same name never merge into it.
                copyup.set_opaque(self.xattr_path(src), self.opaque_xattr)
            there = lstat_at(npfd, new_name)
            if there is not None and is_whiteout(there):
                os.unlink(new_name, dir_fd=npfd)  # a directory cannot replace a device
        if dst is not None:
            self._retire(dst, self.stat(dst) if dst.top != 0 else
                         os.stat(new_name, dir_fd=npfd, follow_symlinks=False), npfd, new_name)
        if self._lower_positive(old_parent, old_name):
            try:
                if self.whiteout_files:
                    raise OSError(errno.EPERM, "whiteouts are files here")
                renameat2(opfd, old_name, npfd, new_name, RENAME_WHITEOUT)
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EINVAL):
                    raise
                renameat2(opfd, old_name, npfd, new_name)
                self._make_whiteout(opfd, old_name)
        else:
            renameat2(opfd, old_name, npfd, new_name)
        if dst is not None:
            dst.drop_name(new_parent, new_name)
            if dst.is_dir:
                dst.close_fds()
        src.parent, src.name = new_parent, new_name
        if src in redirected:
            self._relocate(src)

    def _set_redirect(self, node: Node, samedir: bool) -> None:
        """Before moving the merged directory *node*, record where its lower parts are (the
        kernel's ovl_set_redirect): its name for a move within one directory, else its absolute
        path, built from the names and redirects of its ancestors."""
        current = read_redirect(self.xattr_path(node), self.xattr_format)
        if current is not None and (samedir or current.startswith(b"/")):
            return  # still says where the lower parts are
        if samedir:
            value = node.name
        else:
            parts: list[bytes] = []
            walker: Node | None = node
            while walker is not None and walker.parent is not None:
                own = (read_redirect(self.xattr_path(walker), self.xattr_format)
                       if walker.top == 0 else None)
                parts.append(own if own is not None else walker.name)
                if own is not None and own.startswith(b"/"):
                    break
                walker = walker.parent
            value = b"/".join(reversed(parts))
            if not value.startswith(b"/"):
                value = b"/" + value
        os.setxattr(self.xattr_path(node), self.redirect_xattr, value, follow_symlinks=False)

    def _relocate(self, node: Node) -> None:
        """After a redirected move: where the directory's lower parts are, seen from its new
        place (the fds already open stay valid; the locations serve reopening)."""
        assert node.parent is not None
        found = self._resolve(node.parent, node.name)
        if found is not None:
            node.layers = found.layers
            node.locations = dict(found.locations)

    # -- ids (fuse-overlayfs's uidmapping/gidmapping/squash_to_*: overlayd.idmap) ----------------

    def shown_owner(self, st: os.stat_result) -> tuple[int, int]:
        """The owner *st* (on disk) shows through the mount."""
        if self.ids_identity:  # every reply's attributes come through here: the usual case first
            return st.st_uid, st.st_gid
        return self.opts.uidmap.shown(st.st_uid), self.opts.gidmap.shown(st.st_gid)

    def disk_owner(self, uid: int, gid: int) -> tuple[int, int]:
        """The on-disk owner for the ids *uid*, *gid* given to the mount."""
        return self.opts.uidmap.disk(uid), self.opts.gidmap.disk(gid)

    def _chown(self, target: bytes | int, uid: int, gid: int, dir_fd: int | None = None,
               follow: bool = False) -> None:
        try:
            if dir_fd is None:
                _call_at(os.chown, target, uid, gid)
            else:
                os.chown(target, uid, gid, dir_fd=dir_fd, follow_symlinks=follow)
        except PermissionError:
            if not self.opts.squashed:
                raise
            # As fuse-overlayfs: with squashed ids, the owner on disk is not what is shown,
            # and a chown the upper filesystem refuses is no error.

    def setattr(self, node: Node, *, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, size: int | None = None, atime_ns: int | None = None,
                mtime_ns: int | None = None, fh: int | None = None,
                kill_setid: bool = False, clear_privs: tuple[int, int] | None = None,
                uncapped: bool = False) -> os.stat_result:
        """Change *node*'s attributes; *uid* and *gid* are shown ids (mapped to disk here);
        *fh*: the caller's open file, when it changes them through one (fchown, futimens...).
        With FUSE_HANDLE_KILLPRIV_V2 the kernel leaves the clearing of set-id bits to us:
        *kill_setid*: a truncation by a caller without CAP_FSETID, which clears them;
        *clear_privs*: the caller (pid, uid) of a change with nothing to set, and *uncapped*:
        the kernel removed the file's capabilities just before; see _clear_privs."""
        self._copy_up_named(node, data=size != 0)
        handle = self.handles.get(fh) if fh is not None else None
        if handle is not None and (handle.node is not node or handle.layer != 0):
            handle = None  # opened below, before the copy-up
        # What is changed: an fd (the caller's open file, as ftruncate gives; or, once no name
        # leads to the node, an open handle; or the root), else a name in its upper parent,
        # changed with the *at() calls, without following a symlink there.
        fd: int | None = None
        dir_fd, name, follow = 0, b"", False
        if handle is not None:
            fd = handle.fd
        elif node.unlinked:
            left = self._unlinked_target(node)
            if isinstance(left, int):
                fd = left
            else:
                name, follow = left, True  # a /proc link to a kept special file
        elif node.parent is None:
            fd = self.layers[0].fd
        else:
            fd = self._top_fd(node)  # an open file's fd spares the path walks
            if fd is None:
                dir_fd, name = self.dir_fd(node.parent, 0), node.name
        if clear_privs is not None:
            self._clear_privs(name if fd is None else fd, None if fd is not None else dir_fd,
                              follow, clear_privs, uncapped)
        if uid is not None or gid is not None:
            self._chown(name if fd is None else fd,
                        -1 if uid is None else self.opts.uidmap.disk(uid),
                        -1 if gid is None else self.opts.gidmap.disk(gid),
                        dir_fd=None if fd is not None else dir_fd, follow=follow)
        if mode is not None:
            if fd is not None:
                os.chmod(fd, stat.S_IMODE(mode))
            elif stat.S_ISLNK(self.stat(node).st_mode):
                raise OverlayError("chmod of a symlink", errno.EOPNOTSUPP)
            else:
                os.chmod(name, stat.S_IMODE(mode), dir_fd=dir_fd)
            node.maybe_setid = bool(mode & SETID)
        if size is not None:
            # The caller's open file, else one opened for writing (an unlinked node's fd is
            # reopened through /proc, which follows to the open file).
            wfd = handle.fd if handle is not None else (
                os.open(fd_path(fd), os.O_WRONLY | os.O_CLOEXEC) if fd is not None else
                os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd))
            try:
                if kill_setid and node.maybe_setid:
                    _kill_setid(wfd, node)
                os.ftruncate(wfd, size)
            finally:
                if handle is None:
                    os.close(wfd)
        if atime_ns is not None or mtime_ns is not None:
            if atime_ns is None or mtime_ns is None:
                st = self.stat(node) if fd is None else os.fstat(fd)
                atime_ns = st.st_atime_ns if atime_ns is None else atime_ns
                mtime_ns = st.st_mtime_ns if mtime_ns is None else mtime_ns
            if fd is None:
                os.utime(name, ns=(atime_ns, mtime_ns), dir_fd=dir_fd, follow_symlinks=follow)
            else:
                os.utime(fd, ns=(atime_ns, mtime_ns))
        return self.stat(node) if fd is None else os.fstat(fd)

    def _clear_privs(self, target: bytes | int, dir_fd: int | None, follow: bool,
                     caller: tuple[int, int], uncapped: bool) -> None:
        """The kernel's FUSE client asks, with a change that has nothing to set, to clear the
        set-id bits, for one of two reasons it does not tell apart: chown(-1, -1), which clears
        them whoever calls (and which the kernel's overlay passes on to the upper file), or
        file_remove_privs before a change to the data (fallocate, a write through the page
        cache or passthrough), which keeps them for a caller with CAP_FSETID, and then only
        asks when the file had capabilities, which it removed just before (*uncapped*). So a
        chown(-1, -1) on the upper file does it, but for that one case. (A chown(-1, -1) by root
        keeps the set-id bits of a file with capabilities: a documented difference.)"""
        if uncapped and not lacks_fsetid(*caller):
            return
        self._chown(target, -1, -1, dir_fd=dir_fd, follow=follow)

    def setxattr(self, node: Node, name: bytes, value: bytes, flags: int = 0) -> None:
        """As the kernel's ovl_xattr_set: copy up, then setxattr with *flags* (XATTR_CREATE,
        XATTR_REPLACE) on the upper object, so a flagged call that fails has copied up."""
        disk = xattr_to_disk(name, self.xattr_format)
        if disk is None:
            raise OverlayError("private xattr", errno.EOPNOTSUPP)
        if disk in ACL_XATTRS and self.maps_ids:
            value = map_acl(value, self.opts.uidmap, self.opts.gidmap, to_disk=True)
        self._copy_up_named(node)
        node.xattr_names = None
        self._xattr_call(os.setxattr, node, disk, value, flags)

    def removexattr(self, node: Node, name: bytes) -> None:
        disk = xattr_to_disk(name, self.xattr_format)
        if disk is None:
            raise OverlayError("private xattr", errno.EOPNOTSUPP)
        self.getxattr(node, name)  # ENODATA before any copy-up, as the kernel answers
        self._copy_up_named(node)
        node.xattr_names = None
        self._xattr_call(os.removexattr, node, disk)

    def write(self, fh: int, offset: int, data: bytes, kill_setid: bool = False) -> int:
        """Write *data* at *offset*; *kill_setid*: the writer lacks CAP_FSETID (the kernel
        tells so for a direct write, and with FUSE_HANDLE_KILLPRIV_V2 for a cached one too)."""
        handle = self.handle(fh)
        if kill_setid and handle.node.maybe_setid:
            _kill_setid(handle.fd, handle.node)
        if not handle.direct and (offset | len(data)) % PAGE_SIZE:
            handle.node.partial_pages = True
        return os.pwrite(handle.fd, data, offset)

    def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        # The kernel only sends it for a file open for writing, which open copied up.
        fallocate(self.handle(fh).fd, mode, offset, length)

    def fsync(self, fh: int, datasync: bool) -> None:
        fd = self.handle(fh).fd
        if not self.opts.fsync:
            return  # volatile / fsync=0: as the kernel's ovl_fsync, durability is traded away
        if datasync:
            os.fdatasync(fd)
        else:
            os.fsync(fd)

    def fsyncdir(self, node: Node) -> None:
        if self.opts.fsync and 0 in node.layers and self.upper is not None:
            os.fsync(self.dir_fd(node, 0))


def _restore_setid(dir_fd: int, name: bytes, setid: int) -> None:
    """Give back the set-id bits *setid* a new file was made with, which the chown to its owner
    cleared: the kernel's overlay makes it as its owner, which keeps them. (What the caller may
    not have, mode_strip_sgid's case, the kernel's VFS took from the mode before asking us.)"""
    mode = os.stat(name, dir_fd=dir_fd).st_mode
    if setid & ~mode:
        os.chmod(name, stat.S_IMODE(mode) | setid, dir_fd=dir_fd)


def _kill_setid(fd: int, node: Node, caller: tuple[int, int] | None = None) -> None:
    """Clear the set-user-ID bit, and the set-group-ID bit of a group-executable file, before a
    write or truncation by a process without CAP_FSETID (*caller* (pid, uid) is asked when
    given; None: known to lack it). That is the kernel's FUSE client's rule before a cached
    write (fuse_setattr without handle_killpriv), so all paths agree. The kernel's overlay also
    clears set-group-ID without group execute when the writer is not in the file's group;
    FUSE's rule keeps it."""
    mode = os.fstat(fd).st_mode
    kill = mode & stat.S_ISUID
    if mode & (stat.S_ISGID | stat.S_IXGRP) == stat.S_ISGID | stat.S_IXGRP:
        kill |= stat.S_ISGID
    if kill and (caller is None or lacks_fsetid(*caller)):
        os.fchmod(fd, stat.S_IMODE(mode) & ~kill)
        mode &= ~kill
    node.maybe_setid = bool(mode & SETID)


def lacks_fsetid(pid: int, uid: int) -> bool:
    """Whether process *pid* lacks CAP_FSETID in our user namespace, as /proc tells; when it
    cannot (the process is gone, or pid 0: not in our pid namespace), whether *uid* is not
    root's."""
    try:
        if pid > 0 and os.readlink(f"/proc/{pid}/ns/user") == os.readlink("/proc/self/ns/user"):
            caps = effective_caps(pid)
            if caps is not None:
                return not caps >> CAP_FSETID & 1
    except OSError:
        pass
    return uid != 0


def effective_caps(pid: int | str = "self") -> int | None:
    """Process *pid*'s effective capability set, in its user namespace, as /proc tells; None
    when it cannot."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return None


def in_initial_user_namespace(uid_map: str = "/proc/self/uid_map") -> bool:
    """Whether this process is in the initial user namespace, whose uid map is the identity
    over every id; False when /proc cannot tell."""
    try:
        with open(uid_map, "rb") as f:
            return f.read().split() == [b"0", b"0", b"4294967295"]
    except OSError:
        return False


def _default_acl(dir_fd: int) -> bytes | None:
    """The directory's default POSIX ACL, if it has one."""
    try:
        return os.getxattr(dir_fd, ACL_XATTRS[1])
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.EOPNOTSUPP):
            return None
        raise


def _call_at(call: Callable[..., T], target: bytes | int, *args: object, **kwargs: object) -> T:
    """*call* on a path without following a symlink there, or on an fd (the root's, an open
    file's), where follow_symlinks does not apply."""
    if isinstance(target, int):
        return call(target, *args, **kwargs)
    return call(target, *args, follow_symlinks=False, **kwargs)


def _place(found: Found | None) -> Place | None:
    if found is None:
        return None
    return found.layers, stat.S_IFMT(found.st.st_mode), found.locations

