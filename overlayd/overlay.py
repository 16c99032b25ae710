"""The merged tree: the synchronous core behind the FUSE adapter.

``Overlay`` owns the layers' root fds, the inode table and the open handles, and answers every
operation in terms of nodes, names (bytes) and stat results. It never imports pyfuse3 and never
awaits: the adapter (fs.py) calls it from the trio thread, one request at a time.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass

from overlayd.constants import (
    SYNTHETIC_INO_BASE,
    XINO_SHIFT,
)
from overlayd.errors import OverlayError, ReadOnly
from overlayd.inodes import ROOT_INODE, InodeTable, Node
from overlayd.layers import DirStack, Found, Layer, list_merged, open_dir_at, resolve
from overlayd.ondisk import fd_path, is_private_xattr
from overlayd.options import MountOptions

log = logging.getLogger(__name__)

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT


@dataclass
class Handle:
    """An open file: the real fd and the node it was opened through."""

    fd: int
    node: Node


@dataclass
class DirHandle:
    """An open directory: the merged listing snapshotted at opendir."""

    node: Node
    names: list[bytes]


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
        root = Node(ROOT_INODE, None, b"", tuple(layer.index for layer in layers), True)
        root.fds = {layer.index: layer.fd for layer in layers}
        self.table = InodeTable(root)
        self.handles: dict[int, Handle] = {}
        self.dir_handles: dict[int, DirHandle] = {}
        self._next_dh = 1
        self._synthetic: dict[tuple[int, int], int] = {}

    def close(self) -> None:
        for handle in self.handles.values():
            os.close(handle.fd)
        self.handles.clear()
        self.dir_handles.clear()
        for node in list(self.table):
            if node is not self.table.root:
                node.close_fds()
        self.table.root.fds = {}
        for layer in self.layers:
            os.close(layer.fd)

    # -- nodes -------------------------------------------------------------------------------

    def node(self, ino: int) -> Node:
        node = self.table.get(ino)
        if node is None:
            # The kernel asked about an inode it never looked up or already forgot.
            raise OverlayError(f"unknown inode {ino}", errno.ESTALE)
        return node

    def ino_for(self, layer: int, st: os.stat_result) -> int:
        """The inode number of a real object: its own, tagged with its filesystem (xino)."""
        fsidx = self.layers[layer].fsidx
        if st.st_ino < (1 << XINO_SHIFT) and (fsidx or st.st_ino != ROOT_INODE):
            return (fsidx << XINO_SHIFT) | st.st_ino
        key = (st.st_dev, st.st_ino)
        ino = self._synthetic.get(key)
        if ino is None:
            ino = SYNTHETIC_INO_BASE + len(self._synthetic) + 1
            self._synthetic[key] = ino
        return ino

    def dir_fd(self, node: Node, layer: int) -> int:
        """The open real directory of *node* in *layer* (opened on first use, then cached)."""
        fd = node.fds.get(layer)
        if fd is None:
            assert node.parent is not None
            assert node.is_dir
            fd = open_dir_at(self.dir_fd(node.parent, layer), node.name)
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
        found = resolve(self.dir_stack(parent), name)
        if found is None:
            return None
        return self._node_for(parent, name, found), found.st

    def _node_for(self, parent: Node, name: bytes, found: Found) -> Node:
        ino = self.ino_for(found.layers[0], found.st)
        node = self.table.get(ino)
        if node is not None and node.is_dir == found.is_dir:
            return node  # the same object (a directory, or one name of a hard-linked file)
        return Node(ino, parent, name, found.layers, found.is_dir)

    def remember(self, node: Node) -> None:
        self.table.remember(node)

    def forget(self, ino: int, nlookup: int) -> None:
        self.table.forget(ino, nlookup)

    # -- reading -----------------------------------------------------------------------------

    def stat(self, node: Node) -> os.stat_result:
        if node.parent is None:
            return os.fstat(self.layers[node.top].fd)
        return os.stat(node.name, dir_fd=self.dir_fd(node.parent, node.top),
                       follow_symlinks=False)

    def nlink(self, node: Node, st: os.stat_result) -> int:
        # The kernel's ovl_getattr: a merged directory reports nlink 1 ("seems to pacify find");
        # everything else reports its real link count.
        return 1 if node.is_dir and len(node.layers) > 1 else st.st_nlink

    def readlink(self, node: Node) -> bytes:
        assert node.parent is not None
        return os.readlink(node.name, dir_fd=self.dir_fd(node.parent, node.top))

    def xattr_path(self, node: Node) -> bytes:
        if node.parent is None:
            return fd_path(self.layers[node.top].fd)
        return fd_path(self.dir_fd(node.parent, node.top), node.name)

    def getxattr(self, node: Node, name: bytes) -> bytes:
        if is_private_xattr(name):
            raise OverlayError("private xattr", errno.ENODATA)
        return os.getxattr(self.xattr_path(node), name, follow_symlinks=False)

    def listxattr(self, node: Node) -> list[bytes]:
        names = os.listxattr(self.xattr_path(node), follow_symlinks=False)
        return [n for n in map(os.fsencode, names) if not is_private_xattr(n)]

    def statfs(self) -> os.statvfs_result:
        return os.fstatvfs(self.layers[0].fd)

    def open(self, node: Node, flags: int) -> Handle:
        if node.is_dir:
            raise OverlayError("is a directory", errno.EISDIR)
        if flags & WRITE_FLAGS:
            self._need_writable()
        assert node.parent is not None
        fd = os.open(node.name, (flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY))
                     | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dir_fd(node.parent, node.top))
        handle = Handle(fd, node)
        self.handles[fd] = handle
        return handle

    def handle(self, fh: int) -> Handle:
        try:
            return self.handles[fh]
        except KeyError:
            raise OverlayError(f"unknown file handle {fh}", errno.EBADF) from None

    def read(self, fh: int, offset: int, size: int) -> bytes:
        return os.pread(self.handle(fh).fd, size, offset)

    def release(self, fh: int) -> None:
        handle = self.handles.pop(fh, None)
        if handle is not None:
            os.close(handle.fd)

    def opendir(self, node: Node) -> int:
        names = list_merged(self.dir_stack(node))
        dh = self._next_dh
        self._next_dh += 1
        self.dir_handles[dh] = DirHandle(node, names)
        return dh

    def dir_handle(self, dh: int) -> DirHandle:
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
