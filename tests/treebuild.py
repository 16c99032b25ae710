"""A deterministic three-layer overlay stack for the kernel comparison tests.

``build_three_layer_stack`` writes the layers with the kernel's own on-disk formats only (char
device 0/0 whiteouts, ``trusted.overlay.opaque=y``), so a privileged kernel mount of the same
directories is the reference. No ``.wh.`` files and no ``user.overlay.*`` xattrs: a privileged
kernel mount does not honour them. Needs root (chown, mknod, trusted.* xattrs). Every mode, owner
and mtime is set explicitly, so the result does not depend on the umask or the clock.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

OPAQUE_XATTR = "trusted.overlay.opaque"

# Fixed times: layer k (0 = top) gets BASE_NS + k * LAYER_STEP_NS + i * ENTRY_STEP_NS for its
# i-th path in sorted order, so every entry of every layer has its own mtime.
BASE_NS = 1_600_000_000_123_456_789
LAYER_STEP_NS = 10_000_000_000_000
ENTRY_STEP_NS = 1_000_003_001

ROOT = (0, 0)
ALICE = (1000, 1000)
ROOT_USERS = (0, 100)
NOBODY = (65534, 65534)

SPARSE_SIZE = 8 * 1024 * 1024
SPARSE_DATA_OFFSET = 4 * 1024 * 1024
SPARSE_DATA = bytes(range(256)) * 16  # 4 KiB

DEEP_LEVELS = 24  # deep/d00/.../d23/leaf in the bottom layer
DEEP_TOP_LEVELS = 12  # deep/d00/.../d11/mid_top in the top layer: the chain is merged halfway

LONG_NAME = b"long-" + b"x" * 250  # 255 bytes, NAME_MAX

# Merged-view paths that exist in some layer but must be absent (ENOENT) from the mount.
HIDDEN: tuple[bytes, ...] = (
    b"hidden_dir",  # whiteout in l2 over a whole directory of l3
    b"hidden_dir/a",
    b"merged/gone.txt",  # whiteout in l1 over a file of l3
    b"opaque/lower_only",  # l1's opaque/ hides l3's entries
    b"opq_mid/lower_only",  # l2's opaque opq_mid/ hides l3's entries below it
    b"links/b",  # whiteout in l2 over one name of a 3-name hard link in l3
    b"redir/old",  # l2's whiteout ends the lookup below l1's redir/
    b"dir_file_dir/old",  # l2's file ends the lookup below l1's dir_file_dir/
    b"recreated_old_only",
    b"orphan_whiteout",  # a whiteout with nothing below still hides its own name
    b"odd/with space",  # whiteout in l2 with an odd name
)

# Merged-view paths that must be present (a guard against a vacuous comparison).
VISIBLE: tuple[bytes, ...] = (
    b"merged/from1.txt",
    b"merged/from2.txt",
    b"merged/from3.txt",
    b"merged/sub/deep1",
    b"merged/sub/deep2",
    b"merged/sub/deep3",
    b"opaque/both",
    b"opaque/top_only",
    b"opq_mid/mid_only",
    b"opq_mid/top_only",
    b"links/a",
    b"other/c",
    b"redir/new",
    b"dir_file_dir/new",
    b"file_to_dir/inner",
    b"dir_to_file",
    b"dir_to_symlink",
    b"odd/" + LONG_NAME,
    b"odd/\xff\xfe",
    b"empty_lower",
    b"fifo",
)

# Directories marked opaque in some layer (their private xattr must not show through the mount).
OPAQUE_DIRS: tuple[bytes, ...] = (b"opaque", b"opq_mid")


def _at(layer: Path, rel: str | bytes) -> bytes:
    name = os.fsencode(rel)
    return os.fsencode(layer) + b"/" + name if name else os.fsencode(layer)


def _own(path: bytes, owner: tuple[int, int], mode: int | None) -> None:
    # chown first: it clears setuid/setgid on files, and the mode is meant to survive.
    os.chown(path, owner[0], owner[1], follow_symlinks=False)
    if mode is not None:
        os.chmod(path, mode)


def _xattrs(path: bytes, xattrs: Mapping[str, bytes] | None) -> None:
    for name, value in sorted((xattrs or {}).items()):
        os.setxattr(path, name, value, follow_symlinks=False)


def _dir(layer: Path, rel: str | bytes, *, mode: int = 0o755, owner: tuple[int, int] = ROOT,
         xattrs: Mapping[str, bytes] | None = None, opaque: bool = False) -> None:
    _parent(layer, rel)
    path = _at(layer, rel)
    if not os.path.isdir(path):
        os.mkdir(path)
    _own(path, owner, mode)
    _xattrs(path, xattrs)
    if opaque:
        os.setxattr(path, OPAQUE_XATTR, b"y", follow_symlinks=False)


def _parent(layer: Path, rel: str | bytes) -> None:
    parent = os.path.dirname(os.fsencode(rel))
    if parent and not os.path.isdir(_at(layer, parent)):
        _dir(layer, parent)


def _file(layer: Path, rel: str | bytes, data: bytes | None = None, *, mode: int = 0o644,
          owner: tuple[int, int] = ROOT, xattrs: Mapping[str, bytes] | None = None) -> None:
    """A regular file; its default content names the layer and the path, so every file differs."""
    _parent(layer, rel)
    path = _at(layer, rel)
    if data is None:
        data = b"%s:%s\n" % (os.fsencode(layer.name), os.fsencode(rel))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    _own(path, owner, mode)
    _xattrs(path, xattrs)


def _symlink(layer: Path, rel: str | bytes, target: str | bytes, *,
             owner: tuple[int, int] = ROOT) -> None:
    _parent(layer, rel)
    path = _at(layer, rel)
    os.symlink(os.fsencode(target), path)
    _own(path, owner, None)


def _link(layer: Path, existing: str | bytes, rel: str | bytes) -> None:
    _parent(layer, rel)
    os.link(_at(layer, existing), _at(layer, rel), follow_symlinks=False)


def _whiteout(layer: Path, rel: str | bytes) -> None:
    """The kernel's whiteout: a char device 0/0 with mode 0 (as ovl_whiteout makes it)."""
    _parent(layer, rel)
    path = _at(layer, rel)
    os.mknod(path, stat.S_IFCHR, os.makedev(0, 0))
    _own(path, ROOT, 0)


def _node(layer: Path, rel: str | bytes, kind: int, major: int, minor: int, *, mode: int,
          owner: tuple[int, int] = ROOT) -> None:
    _parent(layer, rel)
    path = _at(layer, rel)
    os.mknod(path, kind | mode, os.makedev(major, minor))
    _own(path, owner, mode)


def _fifo(layer: Path, rel: str | bytes, *, mode: int, owner: tuple[int, int] = ROOT) -> None:
    _parent(layer, rel)
    path = _at(layer, rel)
    os.mkfifo(path, mode)
    _own(path, owner, mode)


def _sparse(layer: Path, rel: str | bytes) -> None:
    _parent(layer, rel)
    path = _at(layer, rel)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.truncate(fd, SPARSE_SIZE)
        os.pwrite(fd, SPARSE_DATA, SPARSE_DATA_OFFSET)
    finally:
        os.close(fd)
    _own(path, ROOT, 0o644)


def _build_bottom(l3: Path) -> None:
    _dir(l3, "")
    # A directory in all three layers; mode, owner and xattrs of the merged one come from l1.
    _dir(l3, "merged", mode=0o700, owner=ALICE, xattrs={"user.layer": b"l3", "user.only3": b"3"})
    _file(l3, "merged/from3.txt")
    _file(l3, "merged/shadowed.txt", mode=0o600, owner=ALICE)
    _file(l3, "merged/shadowed_twice.txt")
    _file(l3, "merged/gone.txt")
    _file(l3, "merged/sub/deep3")
    # A whole directory hidden by a whiteout in l2.
    _file(l3, "hidden_dir/a")
    _file(l3, "hidden_dir/b/c")
    # Contents hidden by an opaque directory above.
    _file(l3, "opaque/lower_only")
    _file(l3, "opaque/both")
    _file(l3, "opq_mid/lower_only")
    # Type changes across layers.
    _file(l3, "file_to_dir", mode=0o755)
    _file(l3, "dir_to_file/x")
    _file(l3, "dir_to_symlink/y")
    _file(l3, "dir_file_dir/old")
    _file(l3, "redir/old")
    _file(l3, "recreated")
    _file(l3, "recreated_old_only")
    # Hard links: 3 names in two dirs (links/b whited out in l2); 2 names, one shadowed in l1.
    _file(l3, "links/a", mode=0o640, owner=ROOT_USERS, xattrs={"user.linked": b"abc"})
    _link(l3, "links/a", "links/b")
    _link(l3, "links/a", "other/c")
    _file(l3, "links/p", mode=0o444, owner=NOBODY)
    _link(l3, "links/p", "links/q")
    # Special modes.
    _dir(l3, "sgid_dir", mode=0o2775, owner=ROOT_USERS)
    _file(l3, "sgid_dir/inside", owner=ROOT_USERS)
    _file(l3, "bin/suidtool", b"#!/bin/sh\nexit 0\n", mode=0o4755)
    _file(l3, "bin/sgidtool", b"#!/bin/sh\nexit 1\n", mode=0o2755, owner=ROOT_USERS)
    # Odd names.
    _file(l3, b"odd/with space")
    _file(l3, b"odd/new\nline", owner=ALICE)
    _file(l3, b"odd/\xff\xfe", mode=0o600)
    _file(l3, b"odd/-dash")
    _file(l3, "odd/ünïcødé-名前.txt")
    # A deep chain; its upper half is merged with l1's.
    chain = "deep/" + "/".join(f"d{i:02d}" for i in range(DEEP_LEVELS))
    _file(l3, chain + "/leaf")
    _dir(l3, "empty_lower")
    _node(l3, "dev_char", stat.S_IFCHR, 1, 3, mode=0o666)
    _node(l3, "dev_block", stat.S_IFBLK, 7, 200, mode=0o660, owner=(0, 6))
    # Symlinks: relative, absolute, dangling, to a directory, owned by someone else.
    _symlink(l3, "sym/rel", "../merged/from3.txt")
    _symlink(l3, "sym/abs", "/etc/hostname")
    _symlink(l3, "sym/dangling", "no/such/target", owner=ALICE)
    _symlink(l3, "sym/to_dir", "../merged")
    _sparse(l3, "sparse")


def _build_middle(l2: Path) -> None:
    _dir(l2, "", mode=0o711, owner=ALICE)
    _dir(l2, "merged", mode=0o775, owner=NOBODY, xattrs={"user.layer": b"l2"})
    _file(l2, "merged/from2.txt", mode=0o600, owner=ROOT_USERS)
    _file(l2, "merged/shadowed.txt", mode=0o640, owner=NOBODY)
    _file(l2, "merged/shadowed_twice.txt")
    _file(l2, "merged/sub/deep2")
    _file(l2, "hl2_one", mode=0o755, xattrs={"user.hl": b"2"})
    _link(l2, "hl2_one", "merged/hl2_two")
    _whiteout(l2, "hidden_dir")
    _dir(l2, "opq_mid", opaque=True, xattrs={"user.opq": b"mid"})
    _file(l2, "opq_mid/mid_only")
    _file(l2, "file_to_dir/inner")
    _file(l2, "dir_to_file", mode=0o600, owner=ALICE)
    _file(l2, "dir_file_dir")
    _whiteout(l2, "redir")
    _whiteout(l2, "recreated")
    _whiteout(l2, "recreated_old_only")
    _whiteout(l2, "links/b")
    _dir(l2, "shared_tmp", mode=0o1777)
    _file(l2, "shared_tmp/alice_file", mode=0o600, owner=ALICE)
    _whiteout(l2, b"odd/with space")
    _file(l2, b"odd/tab\there")
    _dir(l2, "empty_mid", mode=0o750, owner=ROOT_USERS)
    _file(l2, "empty_file", b"")
    _fifo(l2, "fifo", mode=0o620, owner=ALICE)


def _build_top(l1: Path) -> None:
    _dir(l1, "")
    _dir(l1, "merged", mode=0o755, owner=ROOT_USERS,
         xattrs={"user.layer": b"l1", "user.bin": b"\x00\x01\xff", "user.empty": b""})
    _file(l1, "merged/from1.txt", mode=0o755)
    _file(l1, "merged/shadowed_twice.txt", mode=0o600, owner=ALICE)
    _whiteout(l1, "merged/gone.txt")
    _dir(l1, "merged/sub", mode=0o2755, owner=ALICE)
    _file(l1, "merged/sub/deep1")
    _dir(l1, "opaque", opaque=True, mode=0o750)
    _file(l1, "opaque/both")
    _file(l1, "opaque/top_only")
    _file(l1, "opq_mid/top_only")
    _symlink(l1, "dir_to_symlink", "merged")
    _file(l1, "dir_file_dir/new")
    _file(l1, "redir/new")
    _file(l1, "recreated", b"recreated on top\n", mode=0o600)
    _file(l1, "links/q", b"shadows a hard-link name\n")
    _file(l1, "top_links/x", xattrs={"user.foo": b"bar"})
    _link(l1, "top_links/x", "top_links/y")
    _whiteout(l1, "orphan_whiteout")
    _file(l1, b"odd/" + LONG_NAME)
    _file(l1, b"odd/\xc3(", mode=0o600)
    _dir(l1, b"odd/dir \xe9\n", owner=ALICE, xattrs={"user.odd": b"\xe9"})
    _file(l1, "odd/ünïcødé-名前.txt", "top ünïcødé\n".encode())
    chain = "deep/" + "/".join(f"d{i:02d}" for i in range(DEEP_TOP_LEVELS))
    _file(l1, chain + "/mid_top")
    _file(l1, "xattr_file", mode=0o600,
          xattrs={"user.foo": b"foo", "user.bar": b"x" * 300, "user.zz": b"\n"})
    _symlink(l1, "sym_top", b"odd/\xff\xfe")


def _fix_times(layer: Path, level: int) -> None:
    """Give every entry its fixed mtime: non-directories first, then directories deepest first."""
    base = os.fsencode(layer)
    others: list[bytes] = []
    dirs: list[bytes] = [b""]
    for top, dirnames, filenames in os.walk(base):
        rel = os.path.relpath(top, base)
        prefix = b"" if rel == b"." else rel + b"/"
        for name in dirnames:
            full = os.path.join(top, name)
            (others if os.path.islink(full) else dirs).append(prefix + name)
        others.extend(prefix + name for name in filenames)
    order = {rel: i for i, rel in enumerate(sorted(others + dirs))}
    dirs.sort(key=lambda rel: (-rel.count(b"/"), rel == b"", rel))
    for rel in others + dirs:
        ns = BASE_NS + level * LAYER_STEP_NS + order[rel] * ENTRY_STEP_NS
        os.utime(_at(layer, rel), ns=(ns, ns), follow_symlinks=False)


def build_three_layer_stack(root: Path) -> list[Path]:
    """Create root/l1 (top), root/l2, root/l3 (bottom) and return them top first."""
    root.mkdir(parents=True, exist_ok=True)
    layers = [root / "l1", root / "l2", root / "l3"]
    for layer in layers:
        layer.mkdir()
    l1, l2, l3 = layers
    _build_bottom(l3)
    _build_middle(l2)
    _build_top(l1)
    for level, layer in enumerate(layers):
        _fix_times(layer, level)
    return layers
