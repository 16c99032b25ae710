"""overlayd.bbolt against databases written by tests/boltwrite.py, intact and damaged."""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlayd.bbolt import Bolt, BoltError, Bucket, open_db
from tests.boltwrite import HEADER, Tree, build, fnv1a64, write_db

Dumped = dict[bytes, "bytes | Dumped"]


def dump(bucket: Bucket) -> Dumped:
    return {k: v if isinstance(v, bytes) else dump(v) for k, v in bucket.items()}


def read_all(path: Path) -> Dumped:
    with open_db(path) as db:
        return dump(db.root)


def check_lookups(bucket: Bucket, tree: Tree) -> None:
    """Every key found by get/bucket as in *tree*, and absent neighbours not found."""
    for key, value in tree.items():
        if isinstance(value, dict):
            assert bucket.get(key) is None
            child = bucket.bucket(key)
            assert child is not None
            check_lookups(child, value)
        else:
            assert bucket.get(key) == value
            assert bucket.bucket(key) is None
        assert bucket.get(key + b"\0") is None or key + b"\0" in tree
    assert bucket.get(b"") is None or b"" in tree
    assert bucket.get(b"\xff" * 300) is None


def sample_tree() -> Tree:
    return {
        b"v1": {
            b"small": {b"a": b"1", b"b": b"2"},  # inline
            b"large": {b"k%04d" % i: b"x" * (i % 50) for i in range(400)},  # own pages, branches
            b"nested": {b"inner": {b"deeper": {b"leaf": b"value"}}},
            b"empty": {},
            b"plain": b"value",
        },
        b"overflow": {b"big": bytes(range(256)) * 40, b"after": b"tail"},
    }


def test_reads_nested_inline_and_paged_buckets(tmp_path: Path) -> None:
    tree = sample_tree()
    layout = write_db(tmp_path / "db", tree)
    assert layout.inline_buckets >= 3
    assert layout.paged_buckets >= 3
    assert layout.branch_pages >= 1
    assert layout.overflow_pages >= 2
    assert read_all(tmp_path / "db") == tree
    with open_db(tmp_path / "db") as db:
        check_lookups(db.root, tree)
        assert db.root.bucket(b"missing") is None
        assert db.meta.txid == 7


def test_items_in_key_order(tmp_path: Path) -> None:
    tree: Tree = {bytes([b]) * n: b"v" for b in (0, 1, 0x7F, 0x80, 0xFF) for n in (1, 2, 5)}
    write_db(tmp_path / "db", tree, max_keys=2)
    with open_db(tmp_path / "db") as db:
        assert [k for k, _ in db.root.items()] == sorted(tree)


@pytest.mark.parametrize("page_size", [1024, 4096, 16384])
@pytest.mark.parametrize("max_keys", [None, 3])
def test_many_keys_deep_trees(tmp_path: Path, page_size: int, max_keys: int | None) -> None:
    tree: Tree = {b"b": {b"key-%06d" % (i * 7919 % 5000): b"%d" % i for i in range(5000)}}
    layout = write_db(tmp_path / "db", tree, page_size=page_size, max_keys=max_keys)
    assert max(layout.depth.values()) >= (4 if max_keys else 2)
    with open_db(tmp_path / "db") as db:
        assert db.page_size == page_size
        bucket = db.root.bucket(b"b")
        assert bucket is not None
        assert list(bucket.items()) == sorted(tree[b"b"].items())  # type: ignore[union-attr]
        check_lookups(db.root, tree)
        assert bucket.get(b"key-") is None
        assert bucket.get(b"key-999999") is None


def test_large_keys_and_values_overflow(tmp_path: Path) -> None:
    tree: Tree = {b"b": {b"K" * 5000: b"V" * 20000, b"a": b"", b"z" * 3000: {b"in": b"x"}}}
    layout = write_db(tmp_path / "db", tree, page_size=1024)
    assert layout.overflow_pages >= 20
    assert read_all(tmp_path / "db") == tree


def test_newest_valid_meta_wins(tmp_path: Path) -> None:
    data, layout = build({b"new": {}}, previous={b"old": {}})
    path = tmp_path / "db"
    path.write_bytes(data)
    assert read_all(path) == {b"new": {}}

    # Damage the newest meta's checksum: the previous transaction is read.
    corrupt = bytearray(data)
    corrupt[layout.newest_slot * layout.page_size + HEADER.size + 60] ^= 0x01
    path.write_bytes(bytes(corrupt))
    with open_db(path) as db:
        assert db.meta.txid == 6
        assert dump(db.root) == {b"old": {}}

    # Damage both: no valid meta.
    corrupt[(1 - layout.newest_slot) * layout.page_size + HEADER.size + 24] ^= 0x01
    path.write_bytes(bytes(corrupt))
    with pytest.raises(BoltError, match="no valid meta page"):
        open_db(path)


def test_first_meta_damaged_finds_second(tmp_path: Path) -> None:
    """With meta page 0 unreadable the page size comes from meta page 1, found by trying."""
    for page_size in (4096, 16384):
        data, layout = build({b"b": {b"k": b"v"}}, page_size=page_size, txid=7)
        assert layout.newest_slot == 1
        corrupt = bytearray(data)
        corrupt[HEADER.size] ^= 0xFF  # meta 0's magic
        path = tmp_path / f"db{page_size}"
        path.write_bytes(bytes(corrupt))
        assert read_all(path) == {b"b": {b"k": b"v"}}


@pytest.mark.parametrize(("offset", "value", "message"), [
    (16, struct.pack("<I", 0xDEADC0DE), "bad magic"),
    (20, struct.pack("<I", 1), "unsupported bbolt version"),
    (16 + 56, b"\0" * 8, "checksum"),
])
def test_bad_meta_fields(tmp_path: Path, offset: int, value: bytes, message: str) -> None:
    data, layout = build({b"b": {}})
    corrupt = bytearray(data)
    for slot in (0, 1):
        at = slot * layout.page_size + offset
        corrupt[at:at + len(value)] = value
    (tmp_path / "db").write_bytes(bytes(corrupt))
    with pytest.raises(BoltError, match=message):
        open_db(tmp_path / "db")


def test_not_a_database(tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "text").write_bytes(b"hello world\n" * 1000)
    for name in ("empty", "text"):
        with pytest.raises(BoltError):
            open_db(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        open_db(tmp_path / "missing")


def test_page_cycle_and_bucket_cycle(tmp_path: Path) -> None:
    """A branch page naming itself, and a bucket whose root is an ancestor's, are errors."""
    tree: Tree = {b"b": {b"k%03d" % i: b"v" * 20 for i in range(200)}}
    data, layout = build(tree)
    ps = layout.page_size
    root = layout.roots[0]
    # The root bucket's only element is bucket "b"; its value holds b's root page id.
    with open_db_bytes(tmp_path, data) as db:
        b = db.root.bucket(b"b")
        assert b is not None
    branch_pgid = next(p for p, d in layout.depth.items() if d == 2)
    cyclic = bytearray(data)
    # First branch element's child -> the branch page itself.
    struct.pack_into("<Q", cyclic, branch_pgid * ps + HEADER.size + 8, branch_pgid)
    (tmp_path / "cyc").write_bytes(bytes(cyclic))
    with pytest.raises(BoltError, match=r"reached twice|not a branch|deeper"):
        read_all(tmp_path / "cyc")
    with open_db(tmp_path / "cyc") as db:
        bucket = db.root.bucket(b"b")
        assert bucket is not None
        with pytest.raises(BoltError, match="deeper than"):
            bucket.get(b"k000")

    # Bucket "b" pointing at the root bucket's own page.
    selfref = bytearray(data)
    _flags, pos, ksize, _vsize = struct.unpack_from("<IIII", selfref, root * ps + HEADER.size)
    struct.pack_into("<Q", selfref, root * ps + HEADER.size + pos + ksize, root)
    (tmp_path / "self").write_bytes(bytes(selfref))
    with open_db(tmp_path / "self") as db, pytest.raises(BoltError, match="contains itself"):
        db.root.bucket(b"b")


def open_db_bytes(tmp_path: Path, data: bytes) -> Bolt:
    path = tmp_path / "bytes.db"
    path.write_bytes(data)
    return open_db(path)


def test_page_id_out_of_range(tmp_path: Path) -> None:
    data, layout = build({b"b": {b"k": b"v"}})
    corrupt = bytearray(data)
    slot = layout.newest_slot * layout.page_size + HEADER.size
    # Rewrite the newest meta's root page id beyond the high-water mark, with a good checksum.
    fields = bytearray(corrupt[slot:slot + 56])
    struct.pack_into("<Q", fields, 16, 1000)

    corrupt[slot:slot + 64] = bytes(fields) + struct.pack("<Q", fnv1a64(bytes(fields)))
    (tmp_path / "db").write_bytes(bytes(corrupt))
    with pytest.raises(BoltError, match="out of range"):
        read_all(tmp_path / "db")


FIXTURE_OK = [HealthCheck.function_scoped_fixture]  # each example rewrites its own file
FUZZ_TREE: Tree = {
    b"v1": {
        b"snapshots": {b"default/%d/sha256:%064x" % (i, i): {b"id": bytes([i]), b"kind": b"\x03"}
                       for i in range(1, 40)},
        b"inline": {b"a": b"1"},
        b"big": {b"blob": b"B" * 6000},
    },
}
FUZZ_DATA, FUZZ_LAYOUT = build(FUZZ_TREE, page_size=1024, max_keys=4)


def read_everything(path: Path) -> None:
    """Walk every bucket and look up every original key: may succeed or raise BoltError."""
    with open_db(path) as db:
        dump(db.root)
        check_lookups_loosely(db.root, FUZZ_TREE)


def check_lookups_loosely(bucket: Bucket, tree: Tree) -> None:
    for key, value in tree.items():
        bucket.get(key)
        child = bucket.bucket(key)
        if child is not None and isinstance(value, dict):
            check_lookups_loosely(child, value)


def test_fuzz_baseline(tmp_path: Path) -> None:
    assert FUZZ_LAYOUT.branch_pages
    assert FUZZ_LAYOUT.inline_buckets
    assert FUZZ_LAYOUT.overflow_pages
    (tmp_path / "db").write_bytes(FUZZ_DATA)
    assert read_all(tmp_path / "db") == FUZZ_TREE


@settings(max_examples=300, deadline=None, suppress_health_check=FIXTURE_OK)
@given(edits=st.lists(st.tuples(st.integers(0, len(FUZZ_DATA) - 1), st.integers(0, 255)),
                      min_size=1, max_size=8))
def test_fuzz_corruption_gives_bolterror_only(tmp_path: Path,
                                              edits: list[tuple[int, int]]) -> None:
    corrupt = bytearray(FUZZ_DATA)
    for at, byte in edits:
        corrupt[at] = byte
    path = tmp_path / "fuzz.db"
    path.write_bytes(bytes(corrupt))
    with contextlib.suppress(BoltError):
        read_everything(path)


@settings(max_examples=200, deadline=None, suppress_health_check=FIXTURE_OK)
@given(edits=st.lists(st.tuples(st.integers(0, len(FUZZ_DATA) // 8 - 1),
                                st.integers(0, (1 << 64) - 1)), min_size=1, max_size=4))
def test_fuzz_word_corruption_gives_bolterror_only(tmp_path: Path,
                                                   edits: list[tuple[int, int]]) -> None:
    """Whole aligned 64-bit words replaced: page ids, positions and sizes turn large."""
    corrupt = bytearray(FUZZ_DATA)
    for word, value in edits:
        struct.pack_into("<Q", corrupt, word * 8, value)
    path = tmp_path / "fuzz.db"
    path.write_bytes(bytes(corrupt))
    with contextlib.suppress(BoltError):
        read_everything(path)


@settings(max_examples=100, deadline=None, suppress_health_check=FIXTURE_OK)
@given(length=st.integers(0, len(FUZZ_DATA) - 1))
def test_truncation_gives_bolterror(tmp_path: Path, length: int) -> None:
    path = tmp_path / "short.db"
    path.write_bytes(FUZZ_DATA[:length])
    with pytest.raises(BoltError):
        read_everything(path)


def test_reads_without_the_writers_lock(tmp_path: Path) -> None:
    """containerd holds an exclusive flock on metadata.db while it runs; reading must not wait."""
    path = tmp_path / "db"
    write_db(path, {b"b": {b"k": b"v"}})
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert read_all(path) == {b"b": {b"k": b"v"}}
    finally:
        os.close(fd)


def test_check_unchanged_sees_a_commit(tmp_path: Path) -> None:
    """A meta page with a newer txid written after open (a commit) fails check_unchanged."""
    data, layout = build({b"b": {b"k": b"v"}}, txid=7)
    path = tmp_path / "db"
    path.write_bytes(data)
    with open_db(path) as db:
        db.check_unchanged()
        assert db.root.bucket(b"b") is not None
        older = (1 - layout.newest_slot) * layout.page_size + HEADER.size
        fields = bytearray(data[older:older + 56])
        struct.pack_into("<Q", fields, 48, 8)  # txid
        with path.open("r+b") as f:
            f.seek(older)
            f.write(bytes(fields) + struct.pack("<Q", fnv1a64(bytes(fields))))
        with pytest.raises(BoltError, match=r"committed to while read \(transaction 7, now 8\)"):
            db.check_unchanged()
    with open_db(path) as db:
        assert db.meta.txid == 8
        db.check_unchanged()
