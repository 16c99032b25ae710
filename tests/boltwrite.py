"""A minimal bbolt database writer, for tests only: builds files overlayd.bbolt must read.

It writes a whole database at once from nested dicts (a dict value is a bucket), laid out as
bbolt lays out a fresh file: meta pages 0 and 1, an empty freelist page 2, then the B+tree pages.
Leaves are packed greedily up to the page size (or ``max_keys`` elements, to force deep trees
with few keys); a leaf element larger than a page gets overflow pages; branch levels are added
until one root page remains. A nested bucket without sub-buckets whose page fits in a quarter of
a page is stored inline, as bbolt does; others get their own pages. It does not model a freelist,
free pages, or bbolt's fill factor: only what a reader sees.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

MAGIC = 0xED0CDAED
VERSION = 2
BRANCH, LEAF, META, FREELIST = 0x01, 0x02, 0x04, 0x10
BUCKET_FLAG = 0x01
HEADER = struct.Struct("<QHHI")
ELEMENT_SIZE = 16

Tree = dict[bytes, "bytes | Tree"]


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) % (1 << 64)
    return h


@dataclass
class Layout:
    """What was written, so tests can check they exercise what they mean to."""

    page_size: int
    hwm: int = 3
    depth: dict[int, int] = field(default_factory=dict)  # tree root pgid -> levels
    inline_buckets: int = 0
    paged_buckets: int = 0
    overflow_pages: int = 0
    branch_pages: int = 0
    newest_slot: int = 0
    roots: list[int] = field(default_factory=list)  # root bucket pgid per write_tree call


def _leaf_bytes(items: list[tuple[int, bytes, bytes]], pgid: int, overflow: int) -> bytes:
    head = HEADER.pack(pgid, LEAF, len(items), overflow)
    elements, data = bytearray(), bytearray()
    base = HEADER.size + ELEMENT_SIZE * len(items)
    for i, (flags, key, value) in enumerate(items):
        pos = base + len(data) - (HEADER.size + ELEMENT_SIZE * i)
        elements += struct.pack("<IIII", flags, pos, len(key), len(value))
        data += key + value
    return head + bytes(elements) + bytes(data)


def _branch_bytes(items: list[tuple[bytes, int]], pgid: int, overflow: int) -> bytes:
    head = HEADER.pack(pgid, BRANCH, len(items), overflow)
    elements, data = bytearray(), bytearray()
    base = HEADER.size + ELEMENT_SIZE * len(items)
    for i, (key, child) in enumerate(items):
        pos = base + len(data) - (HEADER.size + ELEMENT_SIZE * i)
        elements += struct.pack("<IIQ", pos, len(key), child)
        data += key
    return head + bytes(elements) + bytes(data)


class Writer:
    def __init__(self, page_size: int = 4096, max_keys: int | None = None) -> None:
        assert max_keys is None or max_keys >= 2
        self.page_size = page_size
        self.max_keys = max_keys
        self.pages: dict[int, bytes] = {}
        self.layout = Layout(page_size)

    def _pages_for(self, size: int) -> int:
        return max(1, -(-size // self.page_size))

    def _chunks(self, sizes: list[int]) -> list[tuple[int, int]]:
        """Split elements of the given sizes into (start, end) runs that fill a page: at least
        two elements a page, as bbolt (so each branch level shrinks), a page overflowing when
        they do not fit."""
        runs, start, used = [], 0, HEADER.size
        for i, size in enumerate(sizes):
            full = used + size > self.page_size or (
                self.max_keys is not None and i - start >= self.max_keys)
            if i - start >= 2 and full:
                runs.append((start, i))
                start, used = i, HEADER.size
            used += size
        runs.append((start, len(sizes)))
        return runs

    def _alloc(self, size: int) -> tuple[int, int]:
        count = self._pages_for(size)
        pgid = self.layout.hwm
        self.layout.hwm += count
        self.layout.overflow_pages += count - 1
        return pgid, count - 1

    def _store(self, pgid: int, data: bytes) -> None:
        self.pages[pgid] = data.ljust(self._pages_for(len(data)) * self.page_size, b"\0")

    def write_tree(self, items: list[tuple[int, bytes, bytes]]) -> int:
        """Write a B+tree of leaf elements (sorted by key); its root page id."""
        sizes = [ELEMENT_SIZE + len(k) + len(v) for _, k, v in items]
        level: list[tuple[bytes, int]] = []
        for start, end in self._chunks(sizes):
            chunk = items[start:end]
            pgid, overflow = self._alloc(HEADER.size + sum(sizes[start:end]))
            self._store(pgid, _leaf_bytes(chunk, pgid, overflow))
            level.append((chunk[0][1] if chunk else b"", pgid))
        depth = 1
        while len(level) > 1:
            sizes = [ELEMENT_SIZE + len(k) for k, _ in level]
            upper: list[tuple[bytes, int]] = []
            for start, end in self._chunks(sizes):
                children = level[start:end]
                pgid, overflow = self._alloc(HEADER.size + sum(sizes[start:end]))
                self._store(pgid, _branch_bytes(children, pgid, overflow))
                self.layout.branch_pages += 1
                upper.append((children[0][0], pgid))
            level = upper
            depth += 1
        self.layout.depth[level[0][1]] = depth
        return level[0][1]

    def _elements(self, tree: Tree) -> list[tuple[int, bytes, bytes]]:
        out = []
        for key in sorted(tree):
            value = tree[key]
            if isinstance(value, dict):
                out.append((BUCKET_FLAG, key, self.bucket_value(value)))
            else:
                out.append((0, key, value))
        return out

    def bucket_value(self, tree: Tree) -> bytes:
        """The value a parent stores for the nested bucket *tree*: inline or on its own pages."""
        items = self._elements(tree)
        inline = _leaf_bytes(items, 0, 0)
        has_buckets = any(flags & BUCKET_FLAG for flags, _, _ in items)
        if not has_buckets and len(inline) <= self.page_size // 4:
            self.layout.inline_buckets += 1
            return struct.pack("<QQ", 0, 0) + inline
        self.layout.paged_buckets += 1
        return struct.pack("<QQ", self.write_tree(items), 0)

    def write_root(self, tree: Tree) -> int:
        """Write the top-level bucket (always on its own pages, as bbolt's); its root page."""
        root = self.write_tree(self._elements(tree))
        self.layout.roots.append(root)
        return root

    def meta(self, slot: int, root: int, txid: int) -> bytes:
        fields = struct.pack("<IIIIQQQQQ", MAGIC, VERSION, self.page_size, 0, root, 0, 2,
                             self.layout.hwm, txid)
        meta = fields + struct.pack("<Q", fnv1a64(fields))
        return (HEADER.pack(slot, META, 0, 0) + meta).ljust(self.page_size, b"\0")

    def image(self, metas: list[tuple[int, int]]) -> bytes:
        """The whole file; *metas* gives (root pgid, txid) for meta slots 0 and 1."""
        out = bytearray()
        for slot, (root, txid) in enumerate(metas):
            out += self.meta(slot, root, txid)
        out += HEADER.pack(2, FREELIST, 0, 0).ljust(self.page_size, b"\0")
        for pgid in range(3, self.layout.hwm):
            if pgid in self.pages:
                out += self.pages[pgid]
        assert len(out) == self.layout.hwm * self.page_size
        return bytes(out)


def build(tree: Tree, *, page_size: int = 4096, max_keys: int | None = None,
          previous: Tree | None = None, txid: int = 7) -> tuple[bytes, Layout]:
    """A database whose last committed transaction (*txid*) holds *tree*; the other meta page
    (txid - 1) holds *previous*, or the same tree when None."""
    writer = Writer(page_size, max_keys)
    root = writer.write_root(tree)
    old = writer.write_root(previous) if previous is not None else root
    newest = txid % 2
    metas = [(0, 0), (0, 0)]
    metas[newest] = (root, txid)
    metas[1 - newest] = (old, txid - 1)
    writer.layout.newest_slot = newest
    return writer.image(metas), writer.layout


def write_db(path: str | os.PathLike[str], tree: Tree, *, page_size: int = 4096,
             max_keys: int | None = None, previous: Tree | None = None) -> Layout:
    data, layout = build(tree, page_size=page_size, max_keys=max_keys, previous=previous)
    with open(path, "wb") as f:
        f.write(data)
    return layout
