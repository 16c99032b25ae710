"""``overlayd du``: per-layer and per-stack usage, the visible/hidden split, and sharing between
stacks by inode and by content.

The same three-layer image is written as a Docker overlay2 home and as a containerd snapshot root
(written twice, or hard-linked); every number the report gives is checked against sizes the test
computes itself with lstat over the layer directories. The merged-view numbers are checked against
a kernel overlay mount of the same stack (root only).
"""

from __future__ import annotations

import json
import os
import random
import stat
import subprocess
from collections.abc import Iterable
from pathlib import Path

import pytest

from overlayd import du
from overlayd.du import Usage, human, main_du, measure
from overlayd.errors import UsageError
from overlayd.stores import resolve_stack
from tests.conftest import needs_kernel_overlay, needs_root
from tests.mounting import KERNEL_PINNED, kernel_mounted, overlay_options
from tests.treebuild import build_three_layer_stack

OPAQUE_XATTR = "trusted.overlay.opaque"

# The image's regular files: layer (0 = base) -> path -> size. Every size is distinct, so that
# each piece of content has exactly one copy per store.
FILES = {
    0: {"bin/sh": 20000, "etc/passwd": 1000, "etc/old": 5000, "usr/lib/big": 300000,
        "usr/share/doc/readme": 700},
    1: {"etc/passwd": 1200, "usr/share/new": 1500},
    2: {"app/data": 50000},
}
SYMLINK = ("link", b"bin/sh")  # in the base layer: 6 apparent bytes
HARDLINK = ("bin/sh2", "bin/sh")  # in the base layer: one inode, counted once

# Top first, as the stacks list them: what the merged view shows, as (layer, path) with layer
# 0 = base. Everything else in the layers is hidden.
VISIBLE = {
    (2, ""), (0, "bin"), (0, "bin/sh"), (0, "bin/sh2"), (0, "link"), (1, "etc"),
    (1, "etc/passwd"), (2, "usr"), (2, "usr/lib"), (1, "usr/share"), (1, "usr/share/new"),
    (2, "app"), (2, "app/data"),
}
HIDDEN_APPARENT = 1000 + 5000 + 300000 + 700  # etc/passwd and etc/old of the base, big, readme
VISIBLE_APPARENT = 20000 + 6 + 1200 + 1500 + 50000


def content(layer: int, path: str) -> bytes:
    """The bytes of an image file: the same in every store, different for each file."""
    return random.Random(f"{layer}:{path}").randbytes(FILES[layer][path])


def whiteout(path: Path, oci: bool) -> None:
    if oci:
        (path.parent / (".wh." + path.name)).write_bytes(b"")
    else:
        os.mknod(path, 0o600 | 0o020000, os.makedev(0, 0))


def build_image(layers: list[Path], oci: bool = True, link_from: list[Path] | None = None
                ) -> None:
    """Write the image into *layers* (base first). With *link_from*, the regular files are
    hard links to the files of those layers instead of new copies."""
    for level, layer in enumerate(layers):
        layer.mkdir(parents=True, exist_ok=True)
        for rel in FILES[level]:
            target = layer / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if link_from is not None:
                os.link(link_from[level] / rel, target)
            else:
                target.write_bytes(content(level, rel))
    base, middle, top = layers
    os.symlink(SYMLINK[1], base / SYMLINK[0])
    os.link(base / HARDLINK[1], base / HARDLINK[0])
    whiteout(middle / "etc/old", oci=False)
    os.setxattr(middle / "usr/share", OPAQUE_XATTR, b"y")
    (top / "usr/lib").mkdir(parents=True)
    whiteout(top / "usr/lib/big", oci=oci)


def docker_home(root: Path, oci: bool = True) -> Path:
    """A fake /var/lib/docker/overlay2 with the image's layers id1 (base) to id3, committed."""
    home = root / "overlay2"
    (home / "l").mkdir(parents=True)
    ids = ["id1", "id2", "id3"]
    build_image([home / i / "diff" for i in ids], oci=oci)
    for n, i in enumerate(ids):
        short = f"SHORT{n + 1}".ljust(26, "X")
        (home / i / "link").write_text(short)
        (home / "l" / short).symlink_to(f"../{i}/diff")
        (home / i / "committed").write_text("")
        lowers = [f"l/SHORT{k}".ljust(28, "X") for k in range(n, 0, -1)]
        if lowers:
            (home / i / "lower").write_text(":".join(lowers))
    return home


def containerd_root(root: Path, link_from: list[Path] | None = None) -> Path:
    """A fake overlayfs snapshotter root holding the image as snapshots 1 (base) to 3."""
    snaps = root / "snapshots"
    build_image([snaps / str(n) / "fs" for n in (1, 2, 3)], link_from=link_from)
    return root


def docker_layers(home: Path) -> list[Path]:
    """The image's layers in *home*, base first."""
    return [home / i / "diff" for i in ("id1", "id2", "id3")]


def objects(layer: Path) -> dict[str, os.stat_result]:
    """Every object of *layer* by relative path ("" the root), by lstat."""
    found = {"": os.lstat(layer)}
    for dirpath, dirnames, filenames in os.walk(layer):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            found[str(path.relative_to(layer))] = os.lstat(path)
    return found


def usage(stats: Iterable[os.stat_result]) -> Usage:
    """du's and Docker's measures of a set of objects, each inode once."""
    seen: dict[tuple[int, int], os.stat_result] = {}
    for st in stats:
        seen.setdefault((st.st_dev, st.st_ino), st)
    return Usage(len(seen),
                 sum(st.st_size for st in seen.values() if not stat.S_ISDIR(st.st_mode)),
                 sum(st.st_blocks * 512 for st in seen.values()))


def regular(stats: Iterable[os.stat_result]) -> dict[tuple[int, int], os.stat_result]:
    return {(st.st_dev, st.st_ino): st for st in stats
            if stat.S_ISREG(st.st_mode) and st.st_size > 0}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main_du(list(argv)) == 0
    return capsys.readouterr().out


@pytest.fixture
def stores(tmp_path: Path) -> tuple[Path, Path]:
    """The image in a Docker home and, copied, in a containerd root."""
    return docker_home(tmp_path / "docker"), containerd_root(tmp_path / "containerd")


def specs(home: Path, croot: Path) -> list[str]:
    return [f"overlay2:{home}/id3", f"containerd:{croot}/snapshots/3:2:1"]


def test_one_stack_visible_and_hidden_exact(stores: tuple[Path, Path]) -> None:
    home, _ = stores
    layers = docker_layers(home)
    report = measure([resolve_stack(f"overlay2:{home}/id3")])
    stack = report.stacks[0]
    per_layer = [objects(layer) for layer in layers]
    every = [(level, rel) for level, objs in enumerate(per_layer) for rel in objs]
    assert set(every) >= VISIBLE
    visible = usage(per_layer[level][rel] for level, rel in VISIBLE)
    hidden = usage(per_layer[level][rel] for level, rel in every if (level, rel) not in VISIBLE)
    assert stack.view == visible
    assert stack.hidden == hidden
    assert stack.view.apparent == VISIBLE_APPARENT
    assert stack.hidden.apparent == HIDDEN_APPARENT
    assert stack.usage == usage(st for objs in per_layer for st in objs.values())
    assert stack.usage.disk == stack.view.disk + stack.hidden.disk
    # Alone, nothing is shared, and nothing needs hashing.
    assert (stack.shared, stack.duplicate, stack.unique) == (0, 0, stack.usage.disk)
    assert report.stored_twice == 0
    assert report.hashed == Usage()
    assert report.warnings == []


def test_layers_hard_links_whiteouts_opaque(stores: tuple[Path, Path]) -> None:
    home, _ = stores
    report = measure([resolve_stack(f"overlay2:{home}/id3")])
    # Top first, as the stack lists them.
    assert [ly.path for ly in report.layers] == [
        os.fsencode(p) for p in reversed(docker_layers(home))]
    top, middle, base = report.layers
    assert (top.whiteouts, middle.whiteouts, base.whiteouts) == (1, 1, 0)
    assert (top.opaque, middle.opaque, base.opaque) == (0, 1, 0)
    for layer, path in zip(report.layers, reversed(docker_layers(home)), strict=True):
        assert layer.usage == usage(objects(path).values())
    # bin/sh and bin/sh2 are one inode: 20000 bytes once.
    base_objects = objects(docker_layers(home)[0])
    assert base.usage.inodes == len(base_objects) - 1
    assert base.usage.apparent == sum(FILES[0].values()) + len(SYMLINK[1])


def test_docker_and_containerd_copies_share_content_not_inodes(
        stores: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    home, croot = stores
    data = json.loads(run(capsys, "--json", *specs(home, croot)))
    docker = [objects(p) for p in docker_layers(home)]
    ctrd = [objects(croot / "snapshots" / str(n) / "fs") for n in (1, 2, 3)]
    d_files = regular(st for objs in docker for st in objs.values())
    c_files = regular(st for objs in ctrd for st in objs.values())
    assert len(d_files) == len(c_files) == sum(len(f) for f in FILES.values())
    d_usage = usage(st for objs in docker for st in objs.values())
    c_usage = usage(st for objs in ctrd for st in objs.values())

    d_stack, c_stack = data["stacks"]
    assert d_stack["spec"] == f"overlay2:{home}/id3"
    assert d_stack["layers"] == [str(p) for p in reversed(docker_layers(home))]
    assert d_stack["usage"] == vars(d_usage)
    assert c_stack["usage"] == vars(c_usage)
    assert d_stack["view"]["apparent"] == c_stack["view"]["apparent"] == VISIBLE_APPARENT
    assert d_stack["hidden"]["apparent"] == c_stack["hidden"]["apparent"] == HIDDEN_APPARENT
    d_dup = sum(st.st_blocks * 512 for st in d_files.values())
    c_dup = sum(st.st_blocks * 512 for st in c_files.values())
    assert (d_stack["shared"], d_stack["duplicate"], d_stack["unique"]) == (
        0, d_dup, d_usage.disk - d_dup)
    assert (c_stack["shared"], c_stack["duplicate"], c_stack["unique"]) == (
        0, c_dup, c_usage.disk - c_dup)

    by_size = {st.st_size: st for st in c_files.values()}
    assert data["stored_twice"] == sum(
        min(st.st_blocks, by_size[st.st_size].st_blocks) * 512 for st in d_files.values())
    assert data["stored_twice"] > 0
    assert data["hashed"] == {"inodes": len(d_files) + len(c_files),
                              "apparent": 2 * sum(st.st_size for st in d_files.values()),
                              "disk": d_dup + c_dup}
    assert data["total"] == {"inodes": d_usage.inodes + c_usage.inodes,
                             "apparent": d_usage.apparent + c_usage.apparent,
                             "disk": d_usage.disk + c_usage.disk}
    assert data["stacks_disk"] == d_usage.disk + c_usage.disk
    assert [ly["stacks"] for ly in data["layers"]] == [[1]] * 3 + [[2]] * 3
    for layer in data["layers"]:
        path = Path(layer["path"])
        assert layer["usage"] == vars(usage(objects(path).values()))
        assert layer["duplicate"] == sum(st.st_blocks * 512
                                         for st in regular(objects(path).values()).values())
    assert data["warnings"] == []


def test_no_hash_reads_no_file(stores: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    home, croot = stores

    def refuse(*args: object) -> bytes:
        raise AssertionError("read a file with --no-hash")

    monkeypatch.setattr(du, "_digest", refuse)
    data = json.loads(run(capsys, "--json", "--no-hash", *specs(home, croot)))
    assert data["stored_twice"] is None
    assert data["hashed"] is None
    assert all(s["duplicate"] == 0 and s["unique"] == s["usage"]["disk"] for s in data["stacks"])
    out = run(capsys, "--no-hash", *specs(home, croot))
    assert "stored twice: not measured (--no-hash)" in out


def test_hard_linked_stores_share_inodes(tmp_path: Path) -> None:
    home = docker_home(tmp_path / "docker")
    croot = containerd_root(tmp_path / "containerd", link_from=docker_layers(home))
    report = measure([resolve_stack(s) for s in specs(home, croot)])
    d_files = regular(st for p in docker_layers(home) for st in objects(p).values())
    linked = sum(st.st_blocks * 512 for st in d_files.values())
    for stack in report.stacks:
        assert stack.shared == linked
        assert stack.duplicate == 0
        assert stack.unique == stack.usage.disk - linked
    # Each inode once: the files are counted once, not once per store.
    assert report.total.disk == report.stacks_disk - linked
    assert report.stored_twice == 0
    assert report.hashed == Usage()  # no size occurs under two inodes


def test_a_layer_in_two_stacks_is_listed_once(stores: tuple[Path, Path]) -> None:
    home, croot = stores
    report = measure([resolve_stack(s) for s in
                      [*specs(home, croot), f"overlay2:{home}/id2", str(home / "id1/diff")]])
    assert len(report.layers) == 6
    assert [ly.stacks for ly in report.layers] == [[0], [0, 2], [0, 2, 3], [1], [1], [1]]
    id2, id1 = report.stacks[2], report.stacks[3]
    assert (id2.shared, id2.duplicate, id2.unique) == (id2.usage.disk, 0, 0)
    assert id1.usage == report.layers[2].usage
    assert report.total.disk == sum(ly.usage.disk for ly in report.layers)
    # A one-layer stack shows all of it.
    assert (id1.view, id1.hidden) == (id1.usage, Usage())


def test_table_human_and_bytes(stores: tuple[Path, Path],
                               capsys: pytest.CaptureFixture[str]) -> None:
    home, croot = stores
    report = measure([resolve_stack(s) for s in specs(home, croot)])
    out = run(capsys, *specs(home, croot))
    lines = out.splitlines()
    assert lines[0].split() == ["#", "LAYERS", "INODES", "APPARENT", "DISK", "VIEW", "HIDDEN",
                                "SHARED", "DUPLICATE", "UNIQUE", "STACK"]
    d = report.stacks[0]
    assert lines[1].split() == ["1", "3", str(d.usage.inodes), human(d.usage.apparent),
                                human(d.usage.disk), human(d.view.disk), human(d.hidden.disk),
                                "0", human(d.duplicate), human(d.unique), specs(home, croot)[0]]
    assert all(len(line) == len(lines[0]) - len("STACK") + len(spec)
               for line, spec in zip(lines[1:3], specs(home, croot), strict=True))
    assert f"on disk:      {human(report.total.disk)} in {report.total.inodes} inodes" in out
    assert f"stored twice: {human(report.stored_twice or 0)} " in out
    assert "DUPLICATE: the same content in another stack" in out
    assert "SHARED:" not in out  # nothing shared by inode: no note about it

    exact = run(capsys, "--bytes", *specs(home, croot)).splitlines()
    assert exact[1].split()[3:10] == [str(n) for n in (
        d.usage.apparent, d.usage.disk, d.view.disk, d.hidden.disk, d.shared, d.duplicate,
        d.unique)]
    layer_rows = exact[exact.index("") + 2:exact.index("") + 8]
    assert [row.split()[-1] for row in layer_rows] == [os.fsdecode(ly.path)
                                                        for ly in report.layers]
    # The middle layer: root, etc, etc/passwd, the etc/old whiteout, usr, usr/share (opaque),
    # usr/share/new.
    assert layer_rows[1].split()[:7] == ["1", "7", "1", "1",
                                         str(report.layers[1].usage.apparent),
                                         str(report.layers[1].usage.disk),
                                         str(report.layers[1].duplicate)]


@pytest.mark.parametrize(("n", "shown"), [
    (0, "0"), (1023, "1023"), (1024, "1.0K"), (1025, "1.1K"), (10239, "10K"), (10241, "11K"),
    (1023 * 1024 + 1, "1.0M"), (1024**2, "1.0M"), (5 * 1024**3 + 1, "5.1G"),
    (123 * 1024**2, "123M")])
def test_human_rounds_up_like_du(n: int, shown: str) -> None:
    assert human(n) == shown


def test_unreadable_file_warns_once(stores: tuple[Path, Path],
                                    capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    home, croot = stores

    def denied(dir_fd: int, name: bytes, key: tuple[int, int]) -> bytes:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(du, "_digest", denied)
    assert main_du(["--json", *specs(home, croot)]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    warnings = captured.err.splitlines()
    assert len(warnings) == 1
    assert warnings[0].startswith(f"overlayd du: warning: cannot read {home}/id")
    assert "Permission denied and 15 more; counted what stat gives" in warnings[0]
    assert data["warnings"] == [warnings[0].removeprefix("overlayd du: warning: ")]
    # Counted from stat all the same; nothing is known to be duplicated.
    assert data["stacks"][0]["usage"] == vars(
        usage(st for p in docker_layers(home) for st in objects(p).values()))
    assert data["stored_twice"] == 0


@pytest.mark.parametrize("spec", [
    "{tmp}/missing", "{tmp}/a:{tmp}/missing", "{tmp}/a:", "overlay2:{tmp}/a",
    "containerd:{tmp}/a", "containerd:{tmp}/snapshots/x", "containerd:{tmp}/snapshots/3:two"])
def test_bad_specs_are_usage_errors(tmp_path: Path, spec: str) -> None:
    (tmp_path / "a").mkdir()
    with pytest.raises(UsageError):
        main_du([str(tmp_path / "a"), spec.format(tmp=tmp_path)])


def test_no_arguments_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match=r"^du: the following arguments are required: STACK"):
        main_du([])


def mount_usage(mnt: Path) -> Usage:
    """du's and Docker's measures of a mounted tree, read through the mount."""
    return usage(objects(mnt).values())


def du_bytes(path: Path, *flags: str) -> int:
    out = subprocess.run(["du", "-s", *flags, str(path)], check=True, capture_output=True,
                         text=True).stdout
    return int(out.split()[0])


@needs_root
@needs_kernel_overlay
@pytest.mark.kernel
@pytest.mark.parametrize("tree", ["image", "three_layer_stack"])
def test_view_matches_a_kernel_mount(tmp_path: Path, tree: str) -> None:
    if tree == "image":
        # The kernel reads no .wh. files: the image with char 0/0 whiteouts only.
        layers = list(reversed(docker_layers(docker_home(tmp_path / "docker", oci=False))))
    else:
        layers = build_three_layer_stack(tmp_path / "stack")
    report = measure([resolve_stack(":".join(str(p) for p in layers))])
    view = report.stacks[0].view
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with kernel_mounted(mnt, overlay_options(layers) + "," + KERNEL_PINNED):
        assert mount_usage(mnt) == view
        assert du_bytes(mnt, "-B1") == view.disk
    assert report.stacks[0].hidden.disk == report.stacks[0].usage.disk - view.disk
    if tree == "image":
        assert view.apparent == VISIBLE_APPARENT
        assert report.stacks[0].hidden.apparent == HIDDEN_APPARENT



def test_files_at_layer_roots_and_oci_opaque_markers(tmp_path: Path) -> None:
    """Hashing reopens files at a layer's root as well as below it (the root fd stays the
    layer's); a ``.wh..wh..opq`` marker is an inode of its layer, its directory opaque."""
    upper, lower, other = (tmp_path / n for n in ("upper", "lower", "other"))
    for layer in (upper, lower, other):
        (layer / "d").mkdir(parents=True)
    data = random.Random(1).randbytes(3000)
    (lower / "d" / "old").write_bytes(b"o" * 5000)
    (upper / "d" / ".wh..wh..opq").write_bytes(b"")
    (upper / "d" / "new").write_bytes(b"n" * 100)
    (upper / "top").write_bytes(data)
    (other / "top").write_bytes(data)
    (other / "d" / "new").write_bytes(b"n" * 100)
    report = measure([resolve_stack(f"{upper}:{lower}"), resolve_stack(str(other))])
    up = report.layers[0]
    assert (up.opaque, up.whiteouts) == (1, 0)
    assert up.usage == usage(objects(upper).values())  # the marker included
    stack = report.stacks[0]
    assert stack.hidden.apparent == 5000
    assert stack.view.apparent == 3100
    assert report.hashed is not None
    assert report.hashed.inodes == 4
    files = regular(objects(upper).values())
    assert stack.duplicate == sum(st.st_blocks * 512 for st in files.values())
    assert report.warnings == []
