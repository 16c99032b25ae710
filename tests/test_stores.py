"""Layer stacks from container engines' stores: Docker's overlay2 and containerd's snapshotter.

Fake stores are built in temp dirs with the layout of shared/LAYOUTS.md; the mounted tests
compare `overlayd mount --layers-from` with the kernel's overlay mounted by moby's own recipe
(overlay2 Driver.Get) on the same directories.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from overlayd import cli
from overlayd.errors import UsageError
from overlayd.options import kernel_overlay_dirs, parse_options
from overlayd.stores import LayerStack, resolve_stack
from tests.conftest import needs_fuse, needs_kernel_overlay
from tests.mounting import command_mounted, kernel_mounted, overlayd_argv
from tests.snapshot import diff_snapshots, snapshot


def make_overlay2(home: Path) -> dict[str, Path]:
    """A Docker overlay2 home: an image of two committed layers, a container's init layer
    and its read-write layer, as moby lays them out (diff/, link, lower, work/, l/ links)."""
    (home / "l").mkdir(parents=True)
    chain = [("base", "BASE0000000000000000000000"), ("app", "APP00000000000000000000000"),
             ("ctr-init", "INIT0000000000000000000000"), ("ctr", "CTR00000000000000000000000")]
    layers: dict[str, Path] = {}
    below: list[str] = []
    for layer_id, short in chain:
        d = home / layer_id
        (d / "diff").mkdir(parents=True)
        (d / "work").mkdir()
        (d / "link").write_text(short)
        (home / "l" / short).symlink_to(f"../{layer_id}/diff")
        if below:
            (d / "lower").write_text(":".join(f"l/{s}" for s in reversed(below)))
        if layer_id != "ctr":
            (d / "committed").touch()
        below.append(short)
        layers[layer_id] = d
    base, app, init, ctr = (layers[k] / "diff" for k in ("base", "app", "ctr-init", "ctr"))
    for sub in ("etc", "usr/bin", "var/cache"):
        (base / sub).mkdir(parents=True)
    (base / "etc/passwd").write_bytes(b"root:x:0:0\n")
    (base / "etc/motd").write_bytes(b"base\n")
    (base / "usr/bin/sh").write_bytes(b"#!sh\n")
    (base / "var/cache/old").write_bytes(b"cache")
    (app / "usr/bin").mkdir(parents=True)
    (app / "usr/bin/app").write_bytes(b"app")
    (app / "var").mkdir()
    os.mknod(app / "var/cache", 0o600 | 0o020000, 0)  # a whiteout: the app deleted /var/cache
    (init / "etc").mkdir()
    (init / "etc/hostname").write_bytes(b"\n")
    (ctr / "etc").mkdir()
    (ctr / "etc/motd").write_bytes(b"container\n")
    (ctr / "tmp").mkdir()
    return layers


def test_overlay2_container_layer(tmp_path: Path) -> None:
    layers = make_overlay2(tmp_path / "overlay2")
    stack = resolve_stack(f"overlay2:{layers['ctr']}")
    assert stack.upperdir == os.fsencode(layers["ctr"] / "diff")
    assert stack.workdir == os.fsencode(layers["ctr"] / "work")
    assert stack.lowerdirs == tuple(os.fsencode(layers[k] / "diff")
                                    for k in ("ctr-init", "app", "base"))


def test_overlay2_committed_layer_is_read_only_with_its_diff_on_top(tmp_path: Path) -> None:
    layers = make_overlay2(tmp_path / "overlay2")
    stack = resolve_stack(f"overlay2:{layers['app']}/")
    assert stack.upperdir is None
    assert stack.lowerdirs == (os.fsencode(layers["app"] / "diff"),
                               os.fsencode(layers["base"] / "diff"))
    base = resolve_stack(f"overlay2:{layers['base']}")
    assert base.lowerdirs == (os.fsencode(layers["base"] / "diff"),)


def test_read_only_puts_the_upper_on_top() -> None:
    stack = LayerStack("x", (b"/l1", b"/l2"), b"/u", b"/w")
    assert stack.read_only() == LayerStack("x", (b"/u", b"/l1", b"/l2"))
    assert stack.layers == (b"/u", b"/l1", b"/l2")


def test_mount_options_escape_commas_and_colons() -> None:
    stack = LayerStack("x", (b"/a:b", b"/c,d", b"/e\\f"), b"/u,1", b"/w:2")
    opts = parse_options([stack.mount_options()])
    assert opts.lowerdirs == stack.lowerdirs
    assert (opts.upperdir, opts.workdir) == (b"/u,1", b"/w:2")


@pytest.mark.parametrize(("lower", "link_target", "message"), [
    ("l/EVIL", "/etc", "does not lead to a layer's diff/"),
    ("l/EVIL", "../../../outside/diff", "does not lead to a layer's diff/"),
    ("../../etc", None, "is not l/<short id>"),
    ("l/", None, "is not l/<short id>"),
    ("l/a/b", None, "is not l/<short id>"),
])
def test_overlay2_refuses_links_out_of_its_home(tmp_path: Path, lower: str,
                                                link_target: str | None, message: str) -> None:
    home = tmp_path / "overlay2"
    (home / "l").mkdir(parents=True)
    (home / "x/diff").mkdir(parents=True)
    (tmp_path / "outside/diff").mkdir(parents=True)
    (home / "x/lower").write_text(lower)
    if link_target is not None:
        (home / "l/EVIL").symlink_to(link_target)
    with pytest.raises(UsageError, match=message):
        resolve_stack(f"overlay2:{home / 'x'}")


def test_overlay2_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no diff/ directory"):
        resolve_stack(f"overlay2:{tmp_path}")
    (tmp_path / "diff").mkdir()
    (tmp_path / "lower").write_bytes(b"l/\xff")
    with pytest.raises(UsageError, match="not ASCII"):
        resolve_stack(f"overlay2:{tmp_path}")
    (tmp_path / "lower").write_text("l/GONE")
    with pytest.raises(UsageError, match="does not lead"):
        resolve_stack(f"overlay2:{tmp_path}")


def test_containerd_explicit_chain(tmp_path: Path) -> None:
    root = tmp_path / "io.containerd.snapshotter.v1.overlayfs"
    for n in (1, 2, 5):
        (root / "snapshots" / str(n) / "fs").mkdir(parents=True)
    stack = resolve_stack(f"containerd:{root}/snapshots/5:2:1")
    assert stack.lowerdirs == tuple(os.fsencode(root / "snapshots" / n / "fs")
                                    for n in ("5", "2", "1"))
    assert stack.upperdir is None
    with pytest.raises(UsageError, match="not a number"):
        resolve_stack(f"containerd:{root}/snapshots/5:x")
    with pytest.raises(UsageError, match="expected ROOT/snapshots/<id>"):
        resolve_stack(f"containerd:{root}/5:2")
    with pytest.raises(UsageError, match="is not a directory"):
        resolve_stack(f"containerd:{root}/snapshots/5:3")


def test_plain_layer_list(tmp_path: Path) -> None:
    (tmp_path / "a:b").mkdir()
    (tmp_path / "c").mkdir()
    stack = resolve_stack(f"{tmp_path}/a\\:b:{tmp_path}/c")
    assert stack.lowerdirs == (os.fsencode(tmp_path / "a:b"), os.fsencode(tmp_path / "c"))
    with pytest.raises(UsageError, match="empty element"):
        resolve_stack(f"{tmp_path}/c::{tmp_path}/c")


def test_layers_from_refuses_layers_in_options(tmp_path: Path) -> None:
    layers = make_overlay2(tmp_path / "overlay2")
    with pytest.raises(UsageError, match="gives the layers"):
        cli.layers_from_options(f"overlay2:{layers['ctr']}", ["rw,upperdir=/x"])
    ro = cli.layers_from_options(f"overlay2:{layers['ctr']}", ["rw", "ro"])
    assert "upperdir" not in ro
    assert parse_options([ro]).lowerdirs[0] == os.fsencode(layers["ctr"] / "diff")
    with pytest.raises(UsageError, match="goes with mount"):
        cli.parse_argv(["umount", "--layers-from", "x", "/mnt"])


def test_kernel_overlay_dirs_reads_mountinfo() -> None:
    mountinfo = (b"44 27 0:39 / /var/lib/docker/overlay2/x/merged rw,relatime - overlay overlay "
                 b"rw,lowerdir=/a:/b,upperdir=/var/lib/d\\054x/diff,workdir=/w\\040x,uuid=on\n"
                 b"45 27 0:40 / /mnt rw - fuse.overlayd overlayd rw,user_id=0\n")
    assert kernel_overlay_dirs(mountinfo) == [
        (b"/var/lib/docker/overlay2/x/merged", b"upperdir", b"/var/lib/d,x/diff"),
        (b"/var/lib/docker/overlay2/x/merged", b"workdir", b"/w x")]


# --- mounted ----------------------------------------------------------------------------------


def moby_options(layer: Path) -> str:
    """What moby's overlay2 Driver.Get passes to mount(2) for *layer*."""
    home = layer.parent
    lowers = [str(home / entry) for entry in (layer / "lower").read_text().split(":")]
    if (layer / "committed").exists():
        return "index=off,lowerdir=" + ":".join([str(layer / "diff"), *lowers])
    return (f"index=off,lowerdir={':'.join(lowers)},upperdir={layer / 'diff'},"
            f"workdir={layer / 'work'}")


@needs_fuse
@needs_kernel_overlay
@pytest.mark.mounted
@pytest.mark.kernel
@pytest.mark.parametrize("layer", ["ctr", "app"])
def test_layers_from_overlay2_shows_what_the_kernel_shows(tmp_path: Path, layer: str) -> None:
    layers = make_overlay2(tmp_path / "overlay2")
    ours, theirs = tmp_path / "ours", tmp_path / "kernel"
    ours.mkdir()
    theirs.mkdir()
    with kernel_mounted(theirs, moby_options(layers[layer])):
        expected = snapshot(theirs)
    argv = overlayd_argv("mount", "-f", "--layers-from", f"overlay2:{layers[layer]}", str(ours))
    with command_mounted(ours, argv):
        got = snapshot(ours)
        assert diff_snapshots(expected, got) == []
        assert (ours / "etc/motd").read_bytes() == (b"container\n" if layer == "ctr"
                                                    else b"base\n")
        assert not (ours / "var/cache").exists()
        if layer == "ctr":
            (ours / "etc/passwd").write_bytes(b"changed\n")
            assert (layers["ctr"] / "diff/etc/passwd").read_bytes() == b"changed\n"
        else:
            with pytest.raises(OSError, match="Read-only file system") as excinfo:
                (ours / "new").write_bytes(b"")
            assert excinfo.value.errno == errno.EROFS


@needs_fuse
@needs_kernel_overlay
@pytest.mark.mounted
@pytest.mark.kernel
def test_running_container_layer_is_refused(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    layers = make_overlay2(tmp_path / "overlay2")
    running, ours = tmp_path / "running", tmp_path / "ours"
    running.mkdir()
    ours.mkdir()
    with kernel_mounted(running, moby_options(layers["ctr"])):
        assert cli.main(["mount", "--layers-from", f"overlay2:{layers['ctr']}", str(ours)]) == 2
        assert "is the upperdir of the kernel overlay mounted at" in capsys.readouterr().err
        # Read-only, the layer is only read: allowed (the upper changing under it is the
        # caller's risk, as with the kernel).
        argv = overlayd_argv("mount", "-f", "--layers-from", f"overlay2:{layers['ctr']}",
                             "-o", "ro", str(ours))
        with command_mounted(ours, argv):
            assert (ours / "etc/motd").read_bytes() == b"container\n"


@needs_fuse
@pytest.mark.mounted
def test_layers_from_containerd_reads_the_chain_from_metadata_db(tmp_path: Path) -> None:
    from tests.test_containerd import STANDARD, fake_root

    root = Path(os.fsdecode(fake_root(tmp_path, STANDARD)))
    for n in range(1, 10):
        (root / f"snapshots/{n}/fs").mkdir(parents=True)
        (root / f"snapshots/{n}/work").mkdir()
        (root / f"snapshots/{n}/fs/from-{n}").write_bytes(b"%d" % n)
    (root / "snapshots/2/fs/.wh.from-1").touch()  # layer 2 deleted layer 1's file
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    # Snapshot 4 is active on 3 <- 2 <- 1: writable, its fs/ the upper layer.
    argv = overlayd_argv("mount", "-f", "--layers-from", f"containerd:{root}/snapshots/4",
                         str(mnt))
    with command_mounted(mnt, argv):
        assert sorted(os.listdir(mnt)) == ["from-2", "from-3", "from-4"]
        (mnt / "from-3").write_bytes(b"changed")
        assert (root / "snapshots/4/fs/from-3").read_bytes() == b"changed"
        assert (root / "snapshots/3/fs/from-3").read_bytes() == b"3"
