"""A read-only reader of bbolt (etcd-io/bbolt) database files, in pure Python.

Only what is needed to read containerd's snapshotter metadata: the two meta pages, branch and leaf
pages (with their overflow pages), nested buckets on their own pages and inline buckets. The
format, as bbolt writes it (little-endian throughout):

- every page starts with a 16-byte header: page id (u64), flags (u16: 0x01 branch, 0x02 leaf,
  0x04 meta, 0x10 freelist), element count (u16), overflow (u32: the page continues over that
  many following pages);
- pages 0 and 1 are meta pages: after the header, magic 0xED0CDAED, version 2, page size, flags,
  the root bucket (root page id u64, sequence u64), freelist page id, high-water mark page id,
  txid and an FNV-1a 64 checksum of the fields before it. The valid meta with the highest txid
  is the last committed transaction;
- a branch element is (pos u32, ksize u32, child page id u64), a leaf element is (flags u32, pos
  u32, ksize u32, vsize u32), ``pos`` counting from the element itself; a leaf element with flag
  0x01 is a bucket whose value is its root page id (u64) and sequence (u64), followed, when the
  root page id is 0, by the bucket's own single leaf page ("inline bucket").

Pages are read on demand with ``os.pread``, so a large database costs only the pages a lookup
visits. Every offset, count and page id read from the file is checked before use; anything
inconsistent raises :class:`BoltError`, never IndexError or struct.error, and descent depth and
bucket nesting are bounded, so a cycle in a damaged file ends in a BoltError too.

No lock is taken: bbolt's writer (containerd, while it runs) holds an exclusive flock on the file
for as long as the database is open, so taking it would make the reader wait for containerd to
exit. Reading without it is safe enough because bbolt never overwrites a page reachable from the
last committed meta page: a transaction writes its new pages elsewhere, fsyncs, and only then
writes the other meta page. Pages of the tree we read can only be reused once a later transaction
has committed (freeing them) and another one writes: so a read is known good when the newest meta
is still the one we chose at its end, which :meth:`Bolt.check_unchanged` verifies (a seqlock of
sorts). A reused page met during the read usually shows up as an inconsistent page, a BoltError;
callers report either as "changed while read, try again".
Single-threaded: a :class:`Bolt` and its buckets are not to be shared between threads.
"""

from __future__ import annotations

import bisect
import os
import struct
from collections.abc import Iterator
from types import TracebackType

MAGIC = 0xED0CDAED
VERSION = 2

PAGE_HEADER = struct.Struct("<QHHI")  # id, flags, count, overflow
META = struct.Struct("<IIIIQQQQQQ")  # magic .. txid, checksum
BRANCH_ELEMENT = struct.Struct("<IIQ")  # pos, ksize, pgid
LEAF_ELEMENT = struct.Struct("<IIII")  # flags, pos, ksize, vsize
BUCKET_HEADER = struct.Struct("<QQ")  # root pgid, sequence

BRANCH_PAGE = 0x01
LEAF_PAGE = 0x02
META_PAGE = 0x04
FREELIST_PAGE = 0x10
BUCKET_LEAF_FLAG = 0x01

# Page sizes tried for the second meta page when the first one is unusable (bbolt falls back to
# the OS page size; databases made elsewhere may use another).
FALLBACK_PAGE_SIZES = (4096, 8192, 16384, 32768, 65536)
MIN_PAGE_SIZE = 512
MAX_PAGE_SIZE = 1 << 20
# A B+tree of 2^64 pages is less than 64 levels deep even at 2 keys per page.
MAX_DEPTH = 64
MAX_NESTING = 64
# Pages kept in memory per open database.
CACHE_PAGES = 256

FNV64_OFFSET = 0xCBF29CE484222325
FNV64_PRIME = 0x100000001B3


class BoltError(ValueError):
    """The file is not a bbolt database, or is damaged or was changed while read."""


def fnv1a64(data: bytes) -> int:
    h = FNV64_OFFSET
    for byte in data:
        h = ((h ^ byte) * FNV64_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h


class Meta:
    """One meta page's fields."""

    __slots__ = ("flags", "freelist", "hwm", "page_size", "root", "sequence", "txid")

    def __init__(self, raw: bytes) -> None:
        """Parse and validate the META.size bytes after a meta page's header."""
        (magic, version, page_size, flags, root, sequence, freelist, hwm, txid,
         checksum) = META.unpack(raw)
        if magic != MAGIC:
            raise BoltError(f"bad magic {magic:#010x} (not a bbolt database)")
        if version != VERSION:
            raise BoltError(f"unsupported bbolt version {version}")
        if checksum != fnv1a64(raw[:META.size - 8]):
            raise BoltError("meta page checksum mismatch")
        if not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE or page_size & (page_size - 1):
            raise BoltError(f"bad page size {page_size}")
        self.page_size: int = page_size
        self.flags: int = flags
        self.root: int = root
        self.sequence: int = sequence
        self.freelist: int = freelist
        self.hwm: int = hwm
        self.txid: int = txid


class Page:
    """A branch or leaf page: its bytes (with the overflow pages) and element count."""

    __slots__ = ("count", "data", "flags", "where")

    def __init__(self, data: bytes, where: str, expect_id: int | None) -> None:
        if len(data) < PAGE_HEADER.size:
            raise BoltError(f"{where}: truncated page header")
        pgid, flags, count, _overflow = PAGE_HEADER.unpack_from(data)
        if expect_id is not None and pgid != expect_id:
            raise BoltError(f"{where}: page says it is page {pgid}")
        if flags not in (BRANCH_PAGE, LEAF_PAGE):
            raise BoltError(f"{where}: not a branch or leaf page (flags {flags:#x})")
        size = BRANCH_ELEMENT.size if flags == BRANCH_PAGE else LEAF_ELEMENT.size
        if PAGE_HEADER.size + count * size > len(data):
            raise BoltError(f"{where}: {count} elements do not fit in the page")
        self.data = data
        self.flags: int = flags
        self.count: int = count
        self.where = where

    @property
    def is_leaf(self) -> bool:
        return self.flags == LEAF_PAGE

    def _slice(self, start: int, length: int, what: str) -> bytes:
        if start + length > len(self.data):
            raise BoltError(f"{self.where}: {what} runs past the end of the page")
        return self.data[start:start + length]

    def branch(self, index: int) -> tuple[bytes, int]:
        """The key and child page id of branch element *index*."""
        at = PAGE_HEADER.size + index * BRANCH_ELEMENT.size
        pos, ksize, child = BRANCH_ELEMENT.unpack_from(self.data, at)
        return self._slice(at + pos, ksize, f"key {index}"), child

    def leaf(self, index: int) -> tuple[int, bytes, bytes]:
        """The flags, key and value of leaf element *index*."""
        at = PAGE_HEADER.size + index * LEAF_ELEMENT.size
        flags, pos, ksize, vsize = LEAF_ELEMENT.unpack_from(self.data, at)
        kv = self._slice(at + pos, ksize + vsize, f"element {index}")
        return flags, kv[:ksize], kv[ksize:]

    def key(self, index: int) -> bytes:
        return self.leaf(index)[1] if self.is_leaf else self.branch(index)[0]


class _Keys:
    """A page's keys as a sequence, for bisect."""

    def __init__(self, page: Page) -> None:
        self.page = page

    def __len__(self) -> int:
        return self.page.count

    def __getitem__(self, index: int) -> bytes:
        return self.page.key(index)


class Bolt:
    """An open bbolt database, read as of its last committed transaction."""

    def __init__(self, fd: int, name: str) -> None:
        self._fd = fd
        self.name = name
        self._cache: dict[int, Page] = {}
        self.file_size = os.fstat(fd).st_size
        self.meta = self._choose_meta()
        self.page_size = self.meta.page_size
        if self.meta.hwm * self.page_size > self.file_size:
            raise BoltError(f"{name}: truncated (high-water mark page {self.meta.hwm} "
                            f"is past the end of the file)")
        self.root = Bucket(self, self.meta.root, self.meta.sequence, None, frozenset(), 0)

    def _meta_at(self, offset: int) -> Meta:
        raw = self._pread(PAGE_HEADER.size + META.size, offset)
        if len(raw) < PAGE_HEADER.size + META.size:
            raise BoltError("truncated meta page")
        _pgid, flags, _count, _overflow = PAGE_HEADER.unpack_from(raw)
        if not flags & META_PAGE:
            raise BoltError(f"not a meta page (flags {flags:#x})")
        return Meta(raw[PAGE_HEADER.size:])

    def _choose_meta(self) -> Meta:
        problems: list[str] = []
        metas: list[Meta] = []
        try:
            first = self._meta_at(0)
        except BoltError as e:
            problems.append(f"meta page 0: {e}")
            sizes: tuple[int, ...] = (os.sysconf("SC_PAGE_SIZE"), *FALLBACK_PAGE_SIZES)
        else:
            metas.append(first)
            sizes = (first.page_size,)
        for size in dict.fromkeys(sizes):
            try:
                second = self._meta_at(size)
            except BoltError as e:
                if len(sizes) == 1:
                    problems.append(f"meta page 1: {e}")
                continue
            if metas and second.page_size != metas[0].page_size:
                problems.append("meta page 1: page size differs from meta page 0")
                continue
            metas.append(second)
            break
        else:
            if len(sizes) > 1:
                problems.append("meta page 1: not found")
        if not metas:
            raise BoltError(f"{self.name}: no valid meta page ({'; '.join(problems)})")
        return max(metas, key=lambda m: m.txid)

    def check_unchanged(self) -> None:
        """BoltError unless the transaction we read is still the last committed one: call after
        reading, to know that no page read was being rewritten meanwhile."""
        try:
            now = self._choose_meta()
        except BoltError as e:
            raise BoltError(f"{self.name}: committed to while read ({e})") from e
        if now.txid != self.meta.txid:
            raise BoltError(f"{self.name}: committed to while read (transaction "
                            f"{self.meta.txid}, now {now.txid})")

    def _pread(self, length: int, offset: int) -> bytes:
        try:
            return os.pread(self._fd, length, offset)
        except OSError as e:
            raise BoltError(f"{self.name}: read at {offset}: {e.strerror}") from e

    def page(self, pgid: int) -> Page:
        """Branch or leaf page *pgid*, with its overflow pages."""
        cached = self._cache.get(pgid)
        if cached is not None:
            return cached
        where = f"{self.name}: page {pgid}"
        if not 2 <= pgid < self.meta.hwm:
            raise BoltError(f"{where}: page id out of range (high-water mark {self.meta.hwm})")
        offset = pgid * self.page_size
        header = self._pread(PAGE_HEADER.size, offset)
        if len(header) < PAGE_HEADER.size:
            raise BoltError(f"{where}: truncated")
        overflow = PAGE_HEADER.unpack(header)[3]
        if pgid + overflow >= self.meta.hwm:
            raise BoltError(f"{where}: {overflow} overflow pages run past the high-water mark")
        length = (overflow + 1) * self.page_size
        data = self._pread(length, offset)
        if len(data) < length:
            raise BoltError(f"{where}: truncated")
        page = Page(data, where, pgid)
        if len(self._cache) >= CACHE_PAGES:
            self._cache.clear()
        self._cache[pgid] = page
        return page

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self._cache.clear()

    def __enter__(self) -> Bolt:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class Bucket:
    """A bucket: a B+tree of keys to values or to nested buckets."""

    def __init__(self, db: Bolt, root: int, sequence: int, inline: Page | None,
                 ancestors: frozenset[int], nesting: int) -> None:
        self._db = db
        self._root = root
        self._inline = inline
        self._ancestors = ancestors
        self._nesting = nesting
        self.sequence = sequence

    def _root_page(self) -> Page:
        return self._inline if self._inline is not None else self._db.page(self._root)

    def _child(self, name: bytes, value: bytes) -> Bucket:
        where = f"{self._db.name}: bucket {name!r}"
        if len(value) < BUCKET_HEADER.size:
            raise BoltError(f"{where}: bucket value too short")
        if self._nesting + 1 > MAX_NESTING:
            raise BoltError(f"{where}: buckets nested too deep")
        root, sequence = BUCKET_HEADER.unpack_from(value)
        inline = None
        if root == 0:
            inline = Page(value[BUCKET_HEADER.size:], f"{where} (inline)", None)
            if not inline.is_leaf:
                raise BoltError(f"{where}: inline bucket is not a leaf page")
        elif root in self._ancestors or root == self._root:
            raise BoltError(f"{where}: bucket contains itself (page {root})")
        ancestors = self._ancestors | {self._root} if self._inline is None else self._ancestors
        return Bucket(self._db, root, sequence, inline, ancestors, self._nesting + 1)

    def _find(self, key: bytes) -> tuple[int, bytes] | None:
        """The flags and value stored under *key*, or None."""
        page = self._root_page()
        for _ in range(MAX_DEPTH):
            keys = _Keys(page)
            if page.is_leaf:
                i = bisect.bisect_left(keys, key)
                if i < page.count:
                    flags, found, value = page.leaf(i)
                    if found == key:
                        return flags, value
                return None
            if page.count == 0:
                raise BoltError(f"{page.where}: empty branch page")
            # The last child whose first key is <= key (the first child when none is).
            i = max(bisect.bisect_right(keys, key) - 1, 0)
            page = self._db.page(page.branch(i)[1])
        raise BoltError(f"{self._db.name}: tree deeper than {MAX_DEPTH} levels (a cycle?)")

    def get(self, key: bytes) -> bytes | None:
        """The value stored under *key*; None when there is none or it is a bucket."""
        found = self._find(key)
        if found is None or found[0] & BUCKET_LEAF_FLAG:
            return None
        return found[1]

    def bucket(self, name: bytes) -> Bucket | None:
        """The nested bucket *name*, or None when there is none (or it is a plain value)."""
        found = self._find(name)
        if found is None or not found[0] & BUCKET_LEAF_FLAG:
            return None
        return self._child(name, found[1])

    def items(self) -> Iterator[tuple[bytes, bytes | Bucket]]:
        """Every key with its value or nested bucket, in key order."""
        seen: set[int] = set() if self._inline is not None else {self._root}
        last: bytes | None = None
        for page in self._leaves(self._root_page(), seen, 0):
            for i in range(page.count):
                flags, key, value = page.leaf(i)
                if last is not None and key <= last:
                    raise BoltError(f"{page.where}: keys out of order")
                last = key
                yield key, (self._child(key, value) if flags & BUCKET_LEAF_FLAG else value)

    def _leaves(self, page: Page, seen: set[int], depth: int) -> Iterator[Page]:
        if page.is_leaf:
            yield page
            return
        if depth + 1 >= MAX_DEPTH:
            raise BoltError(f"{self._db.name}: tree deeper than {MAX_DEPTH} levels (a cycle?)")
        for i in range(page.count):
            child = page.branch(i)[1]
            if child in seen:
                raise BoltError(f"{page.where}: page {child} is reached twice")
            seen.add(child)
            yield from self._leaves(self._db.page(child), seen, depth + 1)


def open_db(path: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> Bolt:
    """Open the bbolt database at *path* for reading (a context manager closing it).

    OSError when it cannot be opened; BoltError when it is not a valid bbolt database."""
    name = os.fsdecode(path)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return Bolt(fd, name)
    except BaseException:
        os.close(fd)
        raise
