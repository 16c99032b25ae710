"""The inode table: FUSE inode numbers to merged-tree nodes, with exact lookup counts.

Pure and synchronous. pyfuse3's contract: every successful lookup, create, mkdir, mknod, symlink,
link and every readdirplus entry the kernel accepted adds one to the inode's lookup count; forget
subtracts. A node leaves the table when its count reaches zero, and only then (the root never
leaves). A node knows where it is in the merged tree (parent node and name) and the layers that
hold it; directory nodes cache one open dir fd per layer, closed when the node leaves.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from overlayd.layers import DirCache, Location

ROOT_INODE = 1  # FUSE's fixed root node id (pyfuse3.ROOT_INODE), kept here for the pure core
KEPT = -1  # Node.fds key of a kept special file's O_PATH fd


class Node:
    """An object of the merged tree."""

    __slots__ = ("aliases", "cache", "cookies", "fds", "final_st", "ino", "is_dir", "layers",
                 "locations", "lookups", "maybe_setid", "name", "next_cookie", "parent",
                 "partial_pages", "unlinked", "xattr_names")

    def __init__(self, ino: int, parent: Node | None, name: bytes, layers: tuple[int, ...],
                 is_dir: bool) -> None:
        self.ino = ino
        self.parent = parent  # a strong reference: a child can always reach its layers' dirs
        self.name = name
        self.layers = layers  # top first; one layer for a non-directory
        self.is_dir = is_dir
        self.lookups = 0
        # Its upper object was removed: the real inode number may be reused by a new object
        # while the kernel still holds this node.
        self.unlinked = False
        self.final_st: os.stat_result | None = None  # its stat when it left the merged view
        # Other names of a hard-linked file met so far, so that removing the name the node
        # is located by can move it to another one.
        self.aliases: list[tuple[Node, bytes]] = []
        # Layer index -> open dir fd (directories); or KEPT -> an O_PATH fd on a special file
        # (FIFO, socket, device) no name leads to any more, which the kernel may hold open
        # without asking us (Overlay._retire).
        self.fds: dict[int, int] = {}
        # What the core learnt of this directory's entries (its DirCache); dropped with the
        # fds, and by every change of the directory.
        self.cache: DirCache | None = None
        # The on-disk names of its xattrs, once listed: most getxattr requests ask for what is
        # not there (security.capability before every write(2), ACLs for every ls -l). Dropped
        # by every xattr change and copy-up made through the core.
        self.xattr_names: frozenset[bytes] | None = None
        # Layers where a redirect puts this directory elsewhere than parent/name.
        self.locations: dict[int, Location] = {}
        # A directory's readdir offsets: each name listed gets the next cookie and keeps it while
        # it stays in the directory, so an offset means the same in every listing, taken by any
        # handle at any time (the kernel's directory cache joins replies to different handles
        # at matching offsets). 1 and 2 are "." and "..".
        self.cookies: dict[bytes, int] = {}
        self.next_cookie = 3
        # A write through us began or ended inside a page: the kernel keeps such pages in its
        # page cache but not up to date, and reads each of them alone later (4 KiB a request).
        self.partial_pages = False
        # Its file may have the set-user-ID or set-group-ID bit: a direct write must look
        # (Overlay.write). False only once seen without them, until a chmod through us.
        self.maybe_setid = True

    def add_alias(self, parent: Node, name: bytes) -> None:
        if (parent is not self.parent or name != self.name) and not any(
                p is parent and n == name for p, n in self.aliases):
            self.aliases.append((parent, name))

    def locate(self, parent: Node, name: bytes) -> None:
        """Be located by *parent*/*name* from now on, keeping the old name as an alias."""
        if parent is self.parent and name == self.name:
            return
        self.aliases = [(p, n) for p, n in self.aliases if p is not parent or n != name]
        if self.parent is not None:
            self.aliases.append((self.parent, self.name))
        self.parent, self.name = parent, name

    def drop_name(self, parent: Node, name: bytes) -> None:
        """The name *parent*/*name* of this node is gone: move to another known name."""
        self.aliases = [(p, n) for p, n in self.aliases if p is not parent or n != name]
        if self.parent is parent and self.name == name and self.aliases:
            self.parent, self.name = self.aliases.pop()

    @property
    def top(self) -> int:
        return self.layers[0]

    def close_fds(self) -> None:
        fds, self.fds = self.fds, {}
        self.cache = None
        for fd in fds.values():
            os.close(fd)

    def __repr__(self) -> str:
        return f"<Node {self.ino} {self.name!r} layers={self.layers} lookups={self.lookups}>"


class InodeTable:
    """Inode number -> Node for every node the kernel knows about."""

    def __init__(self, root: Node) -> None:
        assert root.ino == ROOT_INODE
        self.root = root
        self._nodes: dict[int, Node] = {ROOT_INODE: root}

    def __len__(self) -> int:
        return len(self._nodes)

    def __iter__(self) -> Iterator[Node]:
        return iter(self._nodes.values())

    def get(self, ino: int) -> Node | None:
        return self._nodes.get(ino)

    def remember(self, node: Node) -> None:
        """Count one more kernel reference to *node* (a lookup, create, readdirplus entry...)."""
        known = self._nodes.setdefault(node.ino, node)
        assert known is node, f"two nodes for inode {node.ino}: {known!r} and {node!r}"
        node.lookups += 1

    def forget(self, ino: int, nlookup: int) -> Node | None:
        """Drop *nlookup* references; return the node if it left the table."""
        node = self._nodes.get(ino)
        if node is None:
            return None
        node.lookups -= nlookup
        underflow = node.lookups < 0
        if underflow:
            # The kernel forgot more than we counted: a bookkeeping bug. The kernel holds no
            # reference any more, so the node goes; then the bug is reported.
            node.lookups = 0
        if node.lookups == 0 and node is not self.root:
            del self._nodes[ino]
            node.close_fds()
        if underflow:
            raise AssertionError(f"lookup count of inode {ino} below zero")
        return node if node.lookups == 0 and node is not self.root else None

    def check_invariants(self) -> None:
        assert self._nodes.get(ROOT_INODE) is self.root
        for ino, node in self._nodes.items():
            assert node.ino == ino
            assert node is self.root or node.lookups > 0, node
            assert node.layers, node
            assert node.is_dir or not node.fds or (node.unlinked and list(node.fds) == [KEPT]), node
            assert node.is_dir or len(node.layers) == 1, node
