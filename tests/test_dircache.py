"""Tier 2: the core's directory cache never shows what the layers do not hold.

The core caches, per directory, the merged listing and every name it resolved (overlay.py
``_cached_resolve``, layers.py ``DirCache``), trusting that only its own changes touch the upper
layer. This differential test applies random changes through one long-lived core and, after each,
compares its view with that of a core opened afresh, without any cache, read-only on the same
layers stacked as lowers (upper first): what the first one cached must be what the layers say.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlayd import overlay as overlay_module
from overlayd.errors import OverlayError
from overlayd.inodes import Node
from overlayd.options import parse_options
from overlayd.overlay import Overlay, open_layers

OWNER = (os.getuid(), os.getgid())
NAMES = (b"a", b"b", b"d", b"e")
# A path is up to two names deep: d/a, e/b...
PATHS = [(n,) for n in NAMES] + [(p, n) for p in (b"d", b"e") for n in NAMES]

View = dict[bytes, tuple[int, int, bytes]]


def build_lowers(root: Path) -> tuple[Path, Path, Path, Path]:
    lower1, lower2 = root / "lower1", root / "lower2"
    upper, work = root / "upper", root / "work"
    for d in (lower1, lower2, upper, work):
        d.mkdir()
    (lower2 / "a").write_bytes(b"lower2 a")
    (lower2 / "d").mkdir()
    (lower2 / "d" / "a").write_bytes(b"d/a")
    (lower2 / "d" / "b").mkdir()
    (lower1 / "d").mkdir()
    (lower1 / "d" / "e").symlink_to("a")
    (lower1 / "e").mkdir()
    (lower1 / "e" / "b").write_bytes(b"e/b")
    os.mknod(lower1 / "b", stat.S_IFCHR, os.makedev(0, 0))  # hides nothing: lower2 has no b
    return lower1, lower2, upper, work


def listed(ov: Overlay, node: Node) -> list[bytes]:
    """The names a read of *node* from the start gets, through an open handle."""
    dh = ov.opendir(node)
    try:
        return list(ov.listing(dh)[2])
    finally:
        ov.releasedir(dh)


def view(ov: Overlay) -> View:
    """Every path of the merged tree: (type, permission bits, bytes or link target)."""
    out: View = {}

    def walk(node: Node, prefix: bytes) -> None:
        for name in listed(ov, node):
            hit = ov.lookup(node, name)
            assert hit is not None, (prefix, name)
            child, st_ = hit
            path = prefix + name
            content = b""
            if stat.S_ISLNK(st_.st_mode):
                content = ov.readlink(child)
            elif stat.S_ISREG(st_.st_mode):
                handle = ov.open(child, os.O_RDONLY)
                try:
                    content = ov.read(handle.fh, 0, 1 << 16)
                finally:
                    ov.release(handle.fh)
            out[path] = (stat.S_IFMT(st_.st_mode), stat.S_IMODE(st_.st_mode), content)
            if child.is_dir:
                walk(child, path + b"/")

    walk(ov.table.root, b"")
    return out


@pytest.fixture
def layers(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    return build_lowers(tmp_path)


def fresh_view(lower1: Path, lower2: Path, upper: Path) -> View:
    opts = parse_options([f"lowerdir={upper}:{lower1}:{lower2}"])
    ov = Overlay(opts, open_layers(opts))
    try:
        return view(ov)
    finally:
        ov.close()


OPS = st.one_of(
    st.tuples(st.just("create"), st.sampled_from(PATHS)),
    st.tuples(st.just("mkdir"), st.sampled_from(PATHS)),
    st.tuples(st.just("symlink"), st.sampled_from(PATHS)),
    st.tuples(st.just("unlink"), st.sampled_from(PATHS)),
    st.tuples(st.just("rmdir"), st.sampled_from(PATHS)),
    st.tuples(st.just("chmod"), st.sampled_from(PATHS)),
    st.tuples(st.just("write"), st.sampled_from(PATHS)),
    st.tuples(st.just("rename"), st.sampled_from(PATHS), st.sampled_from(PATHS)),
    st.tuples(st.just("link"), st.sampled_from(PATHS), st.sampled_from(PATHS)),
    st.tuples(st.just("look"), st.sampled_from(PATHS)),
)


def parent_of(ov: Overlay, path: tuple[bytes, ...]) -> tuple[Node, bytes]:
    node = ov.table.root
    for part in path[:-1]:
        hit = ov.lookup(node, part)
        if hit is None:
            raise OverlayError("no parent", errno.ENOENT)
        node = hit[0]
        ov.remember(node)  # as the kernel does for every entry it was given
    return node, path[-1]


def apply(ov: Overlay, op: tuple[object, ...]) -> None:
    kind = op[0]
    path = op[1]
    assert isinstance(path, tuple)
    parent, name = parent_of(ov, path)
    if kind == "create":
        handle, node, _ = ov.create(parent, name, 0o644, os.O_WRONLY, OWNER)
        ov.remember(node)
        ov.release(handle.fh)
    elif kind == "mkdir":
        ov.remember(ov.mkdir(parent, name, 0o755, OWNER)[0])
    elif kind == "symlink":
        ov.remember(ov.symlink(parent, name, b"a", OWNER)[0])
    elif kind == "unlink":
        ov.unlink(parent, name)
    elif kind == "rmdir":
        ov.rmdir(parent, name)
    elif kind in ("chmod", "write", "look"):
        hit = ov.lookup(parent, name)
        if hit is None:
            raise OverlayError("no such entry", errno.ENOENT)
        node = hit[0]
        ov.remember(node)
        if kind == "chmod":
            ov.setattr(node, mode=0o600)
        elif kind == "write" and not node.is_dir and stat.S_ISREG(hit[1].st_mode):
            handle = ov.open(node, os.O_WRONLY | os.O_APPEND)
            try:
                ov.write(handle.fh, hit[1].st_size, b"+")
            finally:
                ov.release(handle.fh)
    elif kind == "rename":
        other = op[2]
        assert isinstance(other, tuple)
        new_parent, new_name = parent_of(ov, other)
        ov.rename(parent, name, new_parent, new_name, 0)
    elif kind == "link":
        other = op[2]
        assert isinstance(other, tuple)
        hit = ov.lookup(parent, name)
        if hit is None:
            raise OverlayError("no such entry", errno.ENOENT)
        ov.remember(hit[0])
        new_parent, new_name = parent_of(ov, other)
        ov.remember(ov.link(hit[0], new_parent, new_name)[0])


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(OPS, min_size=1, max_size=12))
def test_cached_view_matches_a_fresh_core(tmp_path_factory: pytest.TempPathFactory,
                                          ops: list[tuple[object, ...]]) -> None:
    lower1, lower2, upper, work = build_lowers(tmp_path_factory.mktemp("cache"))
    opts = parse_options([f"lowerdir={lower1}:{lower2},upperdir={upper},workdir={work}"])
    ov = Overlay(opts, open_layers(opts))
    try:
        assert view(ov) == fresh_view(lower1, lower2, upper)
        for op in ops:
            # An error is fine; what the core shows afterwards is what is checked.
            with contextlib.suppress(OSError, OverlayError):
                apply(ov, op)
            assert view(ov) == fresh_view(lower1, lower2, upper), op
    finally:
        ov.close()


def test_negative_entry_forgotten_by_create(layers: tuple[Path, Path, Path, Path]) -> None:
    """A name looked up and missing, then created: the cache must not keep the miss."""
    lower1, lower2, upper, work = layers
    opts = parse_options([f"lowerdir={lower1}:{lower2},upperdir={upper},workdir={work}"])
    ov = Overlay(opts, open_layers(opts))
    try:
        root = ov.table.root
        listed(ov, root)  # the cache knows every name
        assert ov.lookup(root, b"new") is None
        handle, node, _ = ov.create(root, b"new", 0o644, os.O_WRONLY, OWNER)
        ov.remember(node)
        ov.release(handle.fh)
        hit = ov.lookup(root, b"new")
        assert hit is not None
        assert hit[0] is node
        assert b"new" in listed(ov, root)
    finally:
        ov.close()


@pytest.mark.parametrize("list_to_look_up", [8, 1000])  # listed at the first lookup / probed
def test_deep_stack_lookups_list_once_and_agree_with_probing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, list_to_look_up: int) -> None:
    """Ten lowers: a lookup in a directory that spans LIST_TO_LOOK_UP layers or more lists it
    (overlay.py _cached_resolve); the answers must be those of probing layer by layer."""
    monkeypatch.setattr(overlay_module, "LIST_TO_LOOK_UP", list_to_look_up)
    lowers = [tmp_path / f"l{k}" for k in range(10)]  # l0 is the top
    for k, layer in enumerate(lowers):
        layer.mkdir()
        (layer / f"f{k}").write_bytes(b"%d" % k)
        (layer / "d").mkdir()
        (layer / "d" / f"x{k}").write_bytes(b"x")
    os.mknod(lowers[3] / "f7", stat.S_IFCHR, os.makedev(0, 0))  # hides l7's f7
    (lowers[5] / ".wh.f8").write_bytes(b"")  # the OCI format hides l8's f8
    os.setxattr(lowers[4] / "d", "trusted.overlay.opaque", b"y")  # d merges l0..l4 only
    opts = parse_options(["lowerdir=" + ":".join(str(p) for p in lowers)])
    ov = Overlay(opts, open_layers(opts))
    try:
        root = ov.table.root
        for k in range(10):
            hit = ov.lookup(root, b"f%d" % k)
            if k in (7, 8):
                assert hit is None
            else:
                assert hit is not None
                assert hit[1].st_size == 1
        assert ov.lookup(root, b"missing") is None
        assert ov.lookup(root, b".wh.f8") is None
        listed = root.cache is not None and root.cache.names is not None
        assert listed == (list_to_look_up == 8)
        hit = ov.lookup(root, b"d")
        assert hit is not None
        d = hit[0]
        ov.remember(d)
        assert d.layers == (0, 1, 2, 3, 4)
        shown = [ov.lookup(d, b"x%d" % k) is not None for k in range(10)]
        assert shown == [k <= 4 for k in range(10)]
    finally:
        ov.close()


def test_readdir_cookies_stay_with_their_names(layers: tuple[Path, Path, Path, Path]) -> None:
    """An offset means the same in every listing of a directory (the kernel's directory cache
    joins reads of different handles at matching offsets): a name keeps its cookie while it
    stays, a new name and a name made anew get higher ones, so they are listed last."""
    lower1, lower2, upper, work = layers
    opts = parse_options([f"lowerdir={lower1}:{lower2},upperdir={upper},workdir={work}"])
    ov = Overlay(opts, open_layers(opts))
    try:
        root = ov.table.root
        dh = ov.opendir(root)
        _, cookies, names = ov.listing(dh)
        before = dict(zip(names, cookies, strict=True))
        assert sorted(names) == [b"a", b"d", b"e"]
        assert cookies == sorted(cookies)
        assert cookies[0] == 3  # 1 and 2: "." and ".."
        handle, _, _ = ov.create(root, b"0new", 0o644, os.O_WRONLY, OWNER)
        ov.release(handle.fh)
        ov.unlink(root, b"a")
        _, cookies, names = ov.listing(dh)
        after = dict(zip(names, cookies, strict=True))
        assert after == {**{n: c for n, c in before.items() if n != b"a"},
                         b"0new": max(before.values()) + 1}
        assert names[-1] == b"0new"  # last, though it sorts first
        handle, _, _ = ov.create(root, b"a", 0o644, os.O_WRONLY, OWNER)
        ov.release(handle.fh)
        _, cookies, names = ov.listing(ov.opendir(root))
        assert names[-2:] == [b"0new", b"a"]
        assert cookies[-1] == max(before.values()) + 2  # a made anew: a new cookie
    finally:
        ov.close()
