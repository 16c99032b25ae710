"""overlayd against a real Docker engine (Debian's docker.io, dockerd 20.10, overlay2).

A private dockerd (tests/engines.py) builds, with nothing pulled: a base image imported from a
busybox-static rootfs, a second layer committed from a container that deletes a file, re-creates
a directory (opaque) and adds files, and a container ``ctr`` that changes the layers below in
every way `docker diff` distinguishes; ``ctr`` committed is a third image layer. Then:

- ``overlayd mount --layers-from overlay2:DIR`` of ``ctr``'s layer shows what ``docker export``
  puts in its tarball, and so does the read-only mount of the image's top layer (minus what the
  container's init layer adds);
- ``overlayd diff overlay2:DIR`` prints exactly ``docker diff``'s lines;
- the layer tarballs of ``docker save``, imported by ``overlayd import`` and stacked under the
  kernel's overlay, show the image's tree; ``overlayd export`` of the committed layer has the
  entries of Docker's own layer tarball, modulo the differences documented there.

Run as root with dockerd, docker and busybox-static installed; skips, saying which is missing,
otherwise. One dockerd for the module; the whole module takes about 5 s.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from overlayd.stores import resolve_stack
from tests.conftest import needs_fuse, needs_kernel_overlay
from tests.engines import (
    BUSYBOX,
    Dockerd,
    Listing,
    find_docker,
    listing_differences,
    mounts_under,
    no_mtime,
    rootfs_tar,
    tar_listing,
    tar_name,
    tree_listing,
    without,
)
from tests.mounting import command_mounted, kernel_mounted, overlayd_argv

FOUND = find_docker()

pytestmark = [
    pytest.mark.slow,
    pytest.mark.kernel,
    needs_kernel_overlay,
    pytest.mark.skipif(FOUND is None,
                       reason="needs dockerd and docker (apt-get install docker.io)"),
    pytest.mark.skipif(not os.access(BUSYBOX, os.X_OK),
                       reason=f"needs {BUSYBOX} (apt-get install busybox-static)"),
]

# The second image layer: a file deleted (a whiteout over the base layer), a directory deleted
# and re-created (opaque), a file changed, a directory added.
LAYER2 = ("rm /var/gone/file && rm -rf /var/keep/opq && mkdir /var/keep/opq"
          " && echo new > /var/keep/opq/n && echo l2 > /etc/motd && mkdir /newdir"
          " && echo x > /newdir/f")

# The container: every kind of change docker diff tells apart.
CONTAINER = " && ".join([
    "rm /data/a.txt",                         # a lower file deleted
    "rm -rf /data/tree",                      # a lower directory tree deleted
    "rm -rf /srv/redo", "mkdir /srv/redo",    # a lower directory re-created: opaque in the layer
    "echo new > /srv/redo/new",
    "echo b=2 >> /etc/nested/deep/conf",      # a file changed, three directories down
    "chmod 755 /opt/tool",                    # mode only
    "chmod 700 /etc/nested",                  # a directory's mode
    "chown 1000:1000 /data/b.txt",            # owner only
    ": >> /etc/group",                        # copied up, unchanged: no change
    "echo again > /var/gone/file",            # re-created over a whiteout of the layer below
    "mkdir -p /added/sub", "echo f > /added/sub/f",  # a new tree, with a hard link,
    "ln /added/sub/f /added/hard",            # a symlink and a fifo
    "ln -s /etc/motd /added/link", "mkfifo /added/fifo",
    "rm /newdir/f",                           # a file of layer 2 deleted
    "rm /var/keep/opq/n",                     # ... and one in layer 2's opaque directory
    "rm /usr/lib/libx.so",                    # one name of a lower hard link (liby's two
])                                            # names stay)

# `docker diff ctr`, as dockerd 20.10 prints it here (sorted). Since moby#37313 (June 2018)
# overlay2's Changes() is always the naive ChangesDirs of the two mounted views, whatever
# "Native Overlay Diff" says (native diff is used for the layer *tarballs* only): so the
# re-created /srv/redo is "C" with its old children "D" (archive.OverlayChanges would print
# "D /srv/redo"), /var/gone/file is "A" (OverlayChanges, which stats each lower layer and ignores
# whiteouts, would print "C"), /etc/group, copied up but unchanged, is absent, and every
# directory above a change is "C" (/var, /etc: OverlayChanges lists only directories whose own
# stat changed and direct parents of added or deleted names).
DOCKER_DIFF = {
    "A /added", "A /added/fifo", "A /added/hard", "A /added/link", "A /added/sub",
    "A /added/sub/f", "A /srv/redo/new", "A /var/gone/file",
    "C /data", "C /data/b.txt", "C /etc", "C /etc/nested", "C /etc/nested/deep",
    "C /etc/nested/deep/conf", "C /newdir", "C /opt", "C /opt/tool", "C /srv", "C /srv/redo",
    "C /usr", "C /usr/lib", "C /var", "C /var/gone", "C /var/keep", "C /var/keep/opq",
    "D /data/a.txt", "D /data/tree", "D /newdir/f", "D /srv/redo/old1", "D /srv/redo/old2",
    "D /usr/lib/libx.so", "D /var/keep/opq/n",
}

# The hard-link groups of ctr's tree (and of the image committed from it).
LOWER_LINK = frozenset({"usr/lib/liby.so", "usr/lib/liby.so.1"})
LINKS = {frozenset({"added/sub/f", "added/hard"}), LOWER_LINK}

# What the container's init layer adds (moby daemon/initlayer): left out when an image is
# compared with a container made from it.
INIT_PATHS = (".dockerenv", "dev", "proc", "sys", "etc/hostname", "etc/hosts", "etc/resolv.conf",
              "etc/mtab")


@dataclass
class World:
    docker: Dockerd
    base_tar: bytes
    ctr: str  # the changed container (stopped)
    ctr_layer: Path  # its overlay2 directory
    image: str  # ctr committed
    image_layer: Path  # the image's top overlay2 directory
    saved: dict[str, bytes]  # docker save's files by name
    layers: list[str]  # manifest.json's layer tarballs, base first
    native_diff: bool  # docker info's "Native Overlay Diff"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    assert FOUND is not None
    home = tmp_path_factory.mktemp("docker")
    docker = Dockerd(home, *FOUND)
    try:
        docker.start()
        base_tar = rootfs_tar()
        docker.docker("import", "-", "ovd/base", stdin=base_tar)
        docker.docker("run", "--network", "none", "--name", "l2", "ovd/base", "sh", "-c", LAYER2)
        docker.docker("commit", "l2", "ovd/two")
        docker.docker("run", "--network", "none", "--name", "ctr", "ovd/two", "sh", "-c",
                      CONTAINER)
        docker.docker("commit", "ctr", "ovd/three")
        with tarfile.open(fileobj=io.BytesIO(docker.docker("save", "ovd/three"))) as tar:
            saved = {}
            for m in tar:
                f = tar.extractfile(m) if m.isreg() else None
                if f is not None:
                    saved[tar_name(m.name)] = f.read()
        (manifest,) = json.loads(saved["manifest.json"])
        status = dict(json.loads(docker.docker_text("info", "-f", "{{json .DriverStatus}}")))
        yield World(docker, base_tar, "ctr", docker.layer_dir("ctr"), "ovd/three",
                    docker.layer_dir("ovd/three"), saved, manifest["Layers"],
                    status.get("Native Overlay Diff") == "true")
    finally:
        docker.stop()
        left = mounts_under(home)
        assert not left, f"dockerd left mounts behind: {left}"


@contextlib.contextmanager
def layers_mounted(mnt: Path, spec: str) -> Iterator[None]:
    mnt.mkdir()
    with command_mounted(mnt, overlayd_argv("mount", "-f", "--layers-from", spec, str(mnt))):
        yield


def assert_same(expected: Listing, got: Listing) -> None:
    differences = listing_differences(expected, got)
    assert not differences, "\n".join(differences)


# --- mount ------------------------------------------------------------------------------------


@needs_fuse
@pytest.mark.mounted
def test_container_layer_mount_shows_what_docker_export_does(world: World,
                                                             tmp_path: Path) -> None:
    exported, export_links = tar_listing(world.docker.docker("export", world.ctr))
    with layers_mounted(tmp_path / "mnt", f"overlay2:{world.ctr_layer}"):
        mounted, mount_links = tree_listing(tmp_path / "mnt")
    assert_same(exported, mounted)
    # A lower hard link keeps its two names, one whose other name the container deleted is a
    # single name now, one made in the container's layer has two. Deliberate difference
    # (README, tests/differences.py): in a writable mount overlayd gives the names of a lower
    # hard link inodes of their own, with different st_ino, where the kernel's report the
    # origin's number; so docker export (through the kernel) stores liby.so as a link, and a
    # tar of overlayd's mount would store it twice. The bytes and attributes are the same.
    assert export_links == LINKS
    assert mount_links == LINKS - {LOWER_LINK}
    assert mounted["srv/redo/new"].sha256 is not None
    assert "data/tree" not in mounted
    assert "srv/redo/old1" not in mounted


@needs_fuse
@pytest.mark.mounted
def test_image_layer_mount_shows_what_a_new_container_exports(world: World,
                                                              tmp_path: Path) -> None:
    docker = world.docker
    created = docker.docker_text("create", "--network", "none", world.image)
    try:
        exported, export_links = tar_listing(docker.docker("export", created))
    finally:
        docker.docker("rm", created)
    with layers_mounted(tmp_path / "mnt", f"overlay2:{world.image_layer}"):
        mounted, mount_links = tree_listing(tmp_path / "mnt")
        # A committed layer is mounted read-only, as moby mounts it.
        with pytest.raises(OSError, match="Read-only file system"):
            (tmp_path / "mnt" / "etc" / "motd").write_text("x")
    # The init layer's directories that the image has too (/etc) show the init layer's mtime.
    expected = no_mtime(without(exported, [p for p in INIT_PATHS if p not in mounted]),
                        [p for p in INIT_PATHS if p in mounted] + ["etc"])
    assert_same(expected, no_mtime(mounted, ["etc"]))
    assert export_links == mount_links == LINKS


# --- diff -------------------------------------------------------------------------------------


def test_diff_prints_docker_diffs_lines(world: World) -> None:
    theirs = world.docker.docker_text("diff", world.ctr).splitlines()
    done = subprocess.run(overlayd_argv("diff", f"overlay2:{world.ctr_layer}"),
                          capture_output=True, check=True)
    ours = done.stdout.decode().splitlines()
    assert len(set(ours)) == len(ours), "a line printed twice"
    # The re-created directory is opaque in the layer, so "C /srv/redo" shows the naive rule.
    assert os.getxattr(world.ctr_layer / "diff" / "srv" / "redo", "trusted.overlay.opaque") == b"y"
    assert set(theirs) == DOCKER_DIFF, "dockerd's own rules are not the ones documented here"
    assert set(ours) == set(theirs)
    # Parents come before their children (docker's order varies from run to run).
    paths = [line[2:] for line in ours]
    for i, path in enumerate(paths):
        parent = path.rsplit("/", 1)[0]
        assert not parent or parent not in paths[i:], f"{path} before its parent"


# --- OCI layer tarballs -----------------------------------------------------------------------


def needs_oci() -> None:
    pytest.importorskip("overlayd.oci", reason="overlayd export/import not there yet")


def whiteouts_timeless(items: Listing) -> Listing:
    """*items* without the whiteouts' mtimes: each unpacker's mknod time (dockerd's
    ApplyDiff does not set it from the tar header either)."""
    return {p: replace(i, mtime=None) if (i.kind, i.rdev) == ("chr", (0, 0)) else i
            for p, i in items.items()}


def opaque_dirs(layer: Path) -> set[str]:
    """The directories of a layer (kernel format) marked opaque."""
    found = set()
    for parent, dirs, _ in os.walk(layer):
        for d in dirs:
            path = os.path.join(parent, d)
            with contextlib.suppress(OSError):
                if os.getxattr(path, "trusted.overlay.opaque", follow_symlinks=False) == b"y":
                    found.add(os.path.relpath(path, layer))
    return found


def kernel_listing(mnt: Path, lowers: list[Path]) -> tuple[Listing, set[frozenset[str]]]:
    mnt.mkdir()
    with kernel_mounted(mnt, "index=off,lowerdir=" + ":".join(map(str, lowers))):
        return tree_listing(mnt)


@needs_fuse
@pytest.mark.mounted
def test_saved_layers_imported_and_stacked_show_the_image(world: World, tmp_path: Path) -> None:
    needs_oci()
    imported = []
    for i, name in enumerate(world.layers):
        src = tmp_path / f"layer{i}.tar"
        src.write_bytes(world.saved[name])
        dest = tmp_path / f"layer{i}"
        dest.mkdir()
        subprocess.run(overlayd_argv("import", str(src), str(dest), "--whiteouts", "kernel"),
                       check=True, capture_output=True)
        imported.append(dest)
    # Each imported layer is the directory dockerd unpacked from the same tarball: whiteouts
    # as char 0/0 devices, opaque directories marked, times to the second.
    docker_layers = resolve_stack(f"overlay2:{world.image_layer}").layers[::-1]
    assert len(docker_layers) == len(imported)
    for dest, layer in zip(imported, docker_layers, strict=True):
        assert_same(whiteouts_timeless(tree_listing(Path(os.fsdecode(layer)))[0]),
                    whiteouts_timeless(tree_listing(dest)[0]))
        assert opaque_dirs(dest) == opaque_dirs(Path(os.fsdecode(layer)))
    assert opaque_dirs(imported[-1]) == {"srv/redo"}
    assert tree_listing(imported[-1])[0]["data/tree"].rdev == (0, 0)
    # Stacked: the image's tree.
    ours, our_links = kernel_listing(tmp_path / "kernel", imported[::-1])
    with layers_mounted(tmp_path / "mnt", f"overlay2:{world.image_layer}"):
        docker_tree, docker_links = tree_listing(tmp_path / "mnt")
    assert_same(docker_tree, ours)
    assert our_links == docker_links == LINKS


def saved_layer(world: World) -> bytes:
    return world.saved[world.layers[-1]]


@dataclass(frozen=True)
class TarEntry:
    kind: bytes
    mode: int
    uid: int
    gid: int
    size: int
    linkname: str
    mtime: int | None


def tar_entries(data: bytes) -> dict[str, TarEntry]:
    """A tarball's entries by name. The mode is the permission bits: Docker's headers (Go's
    tar.FileInfoHeader) also carry the file type's bits (0o40000 for a directory, ...), which
    overlayd leaves out; the typeflag says the type in both."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {tar_name(m.name): TarEntry(m.type, stat.S_IMODE(m.mode), m.uid, m.gid, m.size,
                                           tar_name(m.linkname) if m.islnk() else m.linkname,
                                           int(m.mtime))
                for m in tar}


def test_export_has_the_entries_of_dockers_layer_tarball(world: World, tmp_path: Path) -> None:
    needs_oci()
    if not world.native_diff:
        # A kernel with redirect_dir on makes overlay2 build layer tarballs from the naive
        # changes (ExportChanges): each deleted child listed, no opaque markers, no unchanged
        # copies; not a tarball of the layer's directory.
        pytest.skip("dockerd uses the naive diff for layer tarballs on this kernel")
    out = tmp_path / "layer.tar"
    subprocess.run(overlayd_argv("export", str(world.image_layer / "diff"), "-o", str(out)),
                   check=True, capture_output=True)
    ours, theirs = tar_entries(out.read_bytes()), tar_entries(saved_layer(world))
    # Differences by design, each harmless to an extractor:
    # - overlayd writes the layer's root as "./"; Docker's TarWithOptions leaves it out.
    assert ours.pop("", None) is not None
    for name, entry in theirs.items():
        base = name.rsplit("/", 1)[-1]
        if base.startswith(".wh."):
            # - a whiteout: Docker (overlayWhiteoutConverter) keeps the char device's mtime and
            #   owner with mode 0600; an opaque marker gets its directory's permission bits,
            #   owner and mtime 0. overlayd writes both as mode 0, owner 0:0, and the whiteout's
            #   or the directory's mtime. Only the name and type carry meaning (image-spec).
            # - Docker's whiteouts after the first carry a stale linkname, the first whiteout's
            #   original name (e.g. "data/a.txt", not even in the tarball): the kernel (since
            #   5.8, "ovl: share inode for whiteout") makes every whiteout a hard link of one
            #   0/0 inode, moby's tarAppender marks the later ones as links, and the converter
            #   turns them into regular files without clearing Linkname. Readers ignore the
            #   linkname of a regular file.
            assert (entry.kind, entry.size) == (tarfile.REGTYPE, 0), name
            theirs[name] = replace(entry, mode=0, uid=0, gid=0, mtime=None, linkname="")
            if name in ours:
                ours[name] = replace(ours[name], mtime=None)
    differences = [f"{n}: docker {theirs.get(n)} overlayd {ours.get(n)}"
                   for n in sorted(ours.keys() | theirs.keys()) if ours.get(n) != theirs.get(n)]
    assert not differences, "\n".join(differences)
    # What the committed layer holds, as docker commit's tarball gave it.
    assert theirs["srv/redo/.wh..wh..opq"].kind == tarfile.REGTYPE
    assert theirs["data/.wh.tree"].kind == tarfile.REGTYPE
    assert theirs["added/hard"].kind == tarfile.LNKTYPE or theirs["added/sub/f"].kind == (
        tarfile.LNKTYPE)
    assert "etc/group" in theirs  # copied up unchanged: in the layer, not in docker diff


def test_manifest_layers_are_the_overlay2_chain(world: World) -> None:
    """docker save's layer tarballs, base first, are the image's overlay2 layers: the base one
    is the rootfs this test imported, entry for entry."""
    base, _ = tar_listing(world.saved[world.layers[0]])
    ours, _ = tar_listing(world.base_tar)
    assert_same(ours, base)
    assert len(world.layers) == 3
