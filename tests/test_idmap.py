"""Id mapping as fuse-overlayfs defines it (uidmapping=, gidmapping=: ON-DISK:SHOWN:LENGTH
triples; squash_to_root, squash_to_uid=, squash_to_gid=): the parser and the mapping (pure), then
a mount as root pinning the ids stat shows and the ids written on disk by create and chown."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from overlayd.errors import UsageError
from overlayd.idmap import OVERFLOW_ID, IdMap, map_acl, parse_mapping
from overlayd.options import parse_options
from tests.conftest import needs_fuse, needs_root
from tests.mounting import overlay_options, overlayd_mounted


def test_mapping_triples() -> None:
    assert parse_mapping("uidmapping", "0:100000:65536") == ((0, 100000, 65536),)
    # podman's form: a leading separator; empty items are skipped (fuse-overlayfs's strtok).
    assert parse_mapping("uidmapping", ":0:1000:1:1:100000:65536") == (
        (0, 1000, 1), (1, 100000, 65536))


@pytest.mark.parametrize("text", ["", "0:1", "0:1:2:3", "a:1:1", "0:1:0", "-1:0:1",
                                  "0:4294967295:2", "\u0663:1:1", "+1:0:1"])
def test_bad_mappings_refused(text: str) -> None:
    with pytest.raises(UsageError, match="uidmapping"):
        parse_mapping("uidmapping", text)


def test_shown_and_disk_ids() -> None:
    m = IdMap(((1000, 0, 1000), (0, 5000, 1)))
    assert [m.shown(i) for i in (1000, 1500, 1999, 0, 2000, 1, 70000)] == [
        0, 500, 999, 5000, OVERFLOW_ID, OVERFLOW_ID, OVERFLOW_ID]
    assert [m.disk(i) for i in (0, 999, 5000, 1000, 5001)] == [
        1000, 1999, 0, OVERFLOW_ID, OVERFLOW_ID]
    assert IdMap().shown(70000) == 70000
    assert IdMap().disk(70000) == 70000
    # An overlap: the range given last wins, as fuse-overlayfs's prepended list.
    assert IdMap(((0, 0, 10), (5, 100, 10))).shown(5) == 100


def test_squash_options() -> None:
    opts = parse_options(["lowerdir=/l,squash_to_root"])
    assert (opts.uidmap.squash, opts.gidmap.squash) == (0, 0)
    assert opts.squashed
    opts = parse_options(["lowerdir=/l,squash_to_root,squash_to_uid=12,squash_to_gid=34"])
    assert (opts.uidmap.squash, opts.gidmap.squash) == (12, 34)
    assert opts.uidmap.shown(999) == 12
    assert not parse_options(["lowerdir=/l"]).squashed
    for bad in ("x", "\u00b2", "-1", "4294967296"):
        with pytest.raises(UsageError, match="squash_to_uid"):
            parse_options([f"lowerdir=/l,squash_to_uid={bad}"])


def test_podman_options_accepted() -> None:
    opts = parse_options(["lowerdir=/l,upperdir=/u,workdir=/w,,uidmapping=:0:100000:65536,"
                          "gidmapping=:0:100000:65536"])
    assert opts.uidmap.ranges == ((0, 100000, 65536),)
    assert opts.gidmap.shown(100) == 100100


ACL = "system.posix_acl_access"
UNDEFINED = 0xFFFFFFFF


def acl(*named: tuple[int, int]) -> bytes:
    """An access ACL: owner, group and other entries, the mask, and named (tag, id) entries."""
    entries = sorted([(0x01, 6, UNDEFINED), *[(tag, 4, ident) for tag, ident in named],
                      (0x04, 4, UNDEFINED), (0x10, 4, UNDEFINED), (0x20, 4, UNDEFINED)],
                     key=lambda entry: entry[0])  # in tag order, as the kernel wants them
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def test_acl_ids_mapped_both_ways() -> None:
    m = IdMap(((1000, 0, 1000),))
    g = IdMap(((2000, 0, 1000),))
    on_disk = acl((0x02, 9), (0x02, 1500), (0x08, 2100))
    shown = acl((0x02, OVERFLOW_ID), (0x02, 500), (0x08, 100))
    assert map_acl(on_disk, m, g, to_disk=False) == shown
    assert map_acl(acl((0x02, 500), (0x08, 100)), m, g, to_disk=True) == acl(
        (0x02, 1500), (0x08, 2100))
    assert map_acl(b"\x02\x00\x00\x00junk", m, g, to_disk=True) == b"\x02\x00\x00\x00junk"


def ids(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid


@pytest.fixture
def layers(tmp_path: Path) -> dict[str, Path]:
    dirs = {name: tmp_path / name for name in ("lower", "upper", "work", "mnt")}
    for path in dirs.values():
        path.mkdir()
    for name, owner in (("mapped", (1000, 1000)), ("inside", (1500, 1600)),
                        ("root", (0, 0)), ("outside", (70000, 70000))):
        (dirs["lower"] / name).write_text(name)
        os.chown(dirs["lower"] / name, *owner)
    (dirs["lower"] / "acl").write_text("acl")
    os.setxattr(dirs["lower"] / "acl", ACL, acl((0x02, 1500), (0x08, 1600)))
    return dirs


MAPPING = "uidmapping=1000:0:1000:0:5000:1,gidmapping=1000:0:1000:0:5000:1"


@pytest.mark.mounted
@needs_root
@needs_fuse
def test_mapped_mount_shows_and_writes_mapped_ids(layers: dict[str, Path]) -> None:
    mnt, upper = layers["mnt"], layers["upper"]
    opts = overlay_options([layers["lower"]], upper, layers["work"]) + "," + MAPPING
    with overlayd_mounted(mnt, opts):
        assert ids(mnt / "mapped") == (0, 0)
        assert ids(mnt / "inside") == (500, 600)
        assert ids(mnt / "root") == (5000, 5000)
        assert ids(mnt / "outside") == (OVERFLOW_ID, OVERFLOW_ID)
        # Created by root (shown id 0): on disk the id that shows as 0.
        (mnt / "new").write_text("new")
        os.mkdir(mnt / "newdir")
        os.symlink("new", mnt / "newlink")
        assert ids(mnt / "new") == (0, 0)
        assert ids(upper / "new") == (1000, 1000)
        assert ids(upper / "newdir") == (1000, 1000)
        assert ids(upper / "newlink") == (1000, 1000)
        # chown takes shown ids.
        os.chown(mnt / "new", 500, 600)
        assert ids(mnt / "new") == (500, 600)
        assert ids(upper / "new") == (1500, 1600)
        os.chown(mnt / "inside", 5000, 5000)  # copy-up, then the owner that shows as 5000
        assert ids(mnt / "inside") == (5000, 5000)
        assert ids(upper / "inside") == (0, 0)
        os.chown(mnt / "newdir", 3000, 3000)  # unmapped: the overflow id, as fuse-overlayfs
        assert ids(upper / "newdir") == (OVERFLOW_ID, OVERFLOW_ID)
        assert ids(layers["lower"] / "inside") == (1500, 1600)
        # The mount's root too (podman chowns it first; it is changed through its fd).
        os.chown(mnt, 500, 600)
        os.utime(mnt, ns=(10**18, 10**18))
        assert ids(mnt) == (500, 600)
        assert ids(upper) == (1500, 1600)
        assert os.stat(upper).st_mtime_ns == 10**18
        # ACLs name ids too: shown mapped, written back unmapped.
        assert os.getxattr(mnt / "acl", ACL) == acl((0x02, 500), (0x08, 600))
        os.setxattr(mnt / "acl", ACL, acl((0x02, 700), (0x08, 5000)))
        assert os.getxattr(upper / "acl", ACL) == acl((0x02, 1700), (0x08, 0))
        assert os.getxattr(mnt / "acl", ACL) == acl((0x02, 700), (0x08, 5000))


@pytest.mark.mounted
@needs_root
@needs_fuse
@pytest.mark.parametrize(("option", "shown"), [
    ("squash_to_root", (0, 0)),
    ("squash_to_uid=1234,squash_to_gid=2345", (1234, 2345)),
])
def test_squashed_mount_shows_one_owner(layers: dict[str, Path], option: str,
                                        shown: tuple[int, int]) -> None:
    mnt, upper = layers["mnt"], layers["upper"]
    opts = overlay_options([layers["lower"]], upper, layers["work"]) + "," + option
    with overlayd_mounted(mnt, opts):
        for name in ("mapped", "inside", "root", "outside"):
            assert ids(mnt / name) == shown
        (mnt / "new").write_text("new")
        assert ids(mnt / "new") == shown
        assert ids(upper / "new") == (0, 0)  # the creator's ids: no range maps them
        os.chown(mnt / "new", 42, 43)
        assert ids(upper / "new") == (42, 43)
        assert ids(mnt / "new") == shown
