"""overlayd.containerd: snapshot chains and layer directories, on fake snapshotter roots written
with tests/boltwrite.py and, when containerd is installed, against a real containerd."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from overlayd.containerd import Snapshot, layer_dirs, snapshot_chain
from overlayd.errors import UsageError
from tests.boltwrite import Tree, write_db
from tests.mounting import stop_process

VIEW, ACTIVE, COMMITTED = 1, 2, 3


def uvarint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def snap(id_: int, kind: int, parent: bytes | None = None) -> Tree:
    """A snapshot bucket as containerd's snapshots/storage writes it."""
    tree: Tree = {
        b"id": uvarint(id_),
        b"kind": bytes([kind]),
        b"createdat": b"\x01\x00\x00\x00\x0e\xe2\x9d\xe6\x01+\xd1\x8eG\xff\xff",
        b"updatedat": b"\x01\x00\x00\x00\x0e\xe2\x9d\xe6\x01+\xd1\x8eG\xff\xff",
        b"labels": {b"containerd.io/snapshot.ref": b"sha256:%064x" % id_},
    }
    if parent is not None:
        tree[b"parent"] = parent
    if kind == COMMITTED:
        tree[b"size"] = uvarint(8192)
        tree[b"inodes"] = uvarint(3)
    return tree


def fake_root(tmp_path: Path, snapshots: Tree) -> bytes:
    root = tmp_path / "io.containerd.snapshotter.v1.overlayfs"
    root.mkdir()
    write_db(root / "metadata.db", {b"v1": {b"snapshots": snapshots, b"parents": {}}})
    return os.fsencode(root)


L1, L2, L3 = b"default/2/sha256:aaa", b"default/4/sha256:bbb", b"default/6/sha256:ccc"
STANDARD: Tree = {
    L1: snap(1, COMMITTED),
    L2: snap(2, COMMITTED, L1),
    L3: snap(3, COMMITTED, L2),
    b"default/7/container-rw": snap(4, ACTIVE, L3),
    b"default/8/view-top": snap(5, VIEW, L3),
    b"default/9/view-base": snap(6, VIEW, L1),
    b"default/10/scratch": snap(7, ACTIVE),
    b"default/11/empty-view": snap(8, VIEW),
    b"k8s.io/1/sha256:ddd": snap(9, COMMITTED),  # another namespace, the same id space
}


def fs(root: bytes, n: int) -> bytes:
    return root + b"/snapshots/%d/fs" % n


def test_chains_of_each_kind(tmp_path: Path) -> None:
    root = fake_root(tmp_path, STANDARD)
    assert snapshot_chain(root, 1) == Snapshot(1, L1.decode(), "committed", ())
    assert snapshot_chain(root, 3) == Snapshot(3, L3.decode(), "committed", (2, 1))
    assert snapshot_chain(root, 4) == Snapshot(4, "default/7/container-rw", "active", (3, 2, 1))
    assert snapshot_chain(root, 5).parents == (3, 2, 1)
    assert snapshot_chain(root, 6) == Snapshot(6, "default/9/view-base", "view", (1,))
    assert snapshot_chain(root, 7) == Snapshot(7, "default/10/scratch", "active", ())
    assert snapshot_chain(root, 9).key == "k8s.io/1/sha256:ddd"


def test_layer_dirs_match_containerd_mounts(tmp_path: Path) -> None:
    root = fake_root(tmp_path, STANDARD)

    def dirs(n: int) -> tuple[tuple[bytes, ...], bytes | None, bytes | None]:
        return layer_dirs(root, snapshot_chain(root, n))

    # active: overlay with upperdir/workdir, the parents below.
    assert dirs(4) == ((fs(root, 3), fs(root, 2), fs(root, 1)), fs(root, 4),
                       root + b"/snapshots/4/work")
    # view: the parents only (its own fs is unused); one parent: containerd's ro bind of it.
    assert dirs(5) == ((fs(root, 3), fs(root, 2), fs(root, 1)), None, None)
    assert dirs(6) == ((fs(root, 1),), None, None)
    # view without parent: containerd's ro bind of its own (empty) fs.
    assert dirs(8) == ((fs(root, 8),), None, None)
    # committed: its own fs on top of its parents'.
    assert dirs(3) == ((fs(root, 3), fs(root, 2), fs(root, 1)), None, None)
    assert dirs(1) == ((fs(root, 1),), None, None)
    # active without parent: a read-write bind for containerd, nothing to overlay here.
    with pytest.raises(UsageError, match=r"active without a parent.*snapshots/7/fs"):
        dirs(7)


def test_long_chain_many_snapshots(tmp_path: Path) -> None:
    """Ids above 127 (multi-byte uvarints), enough snapshots for branch pages, a deep chain."""
    snapshots: Tree = {}
    parent = None
    for n in range(1, 601):
        key = b"default/%d/sha256:%064x" % (n * 3, n)
        snapshots[key] = snap(n, COMMITTED, parent)
        parent = key if n % 2 else parent  # every other snapshot continues the chain
    root = fake_root(tmp_path, snapshots)
    top = snapshot_chain(root, 599)
    assert top.parents == tuple(range(597, 0, -2))
    assert len(layer_dirs(root, top)[0]) == 300


@pytest.mark.parametrize(("snapshots", "ask", "message"), [
    ({}, 1, "no such snapshot id"),
    (STANDARD, 99, "no such snapshot id"),
    ({b"default/1/a": snap(1, COMMITTED, b"default/0/gone")}, 1,
     "parent 'default/0/gone' of 'default/1/a' is missing from metadata.db"),
    ({b"a": snap(1, COMMITTED, b"b"), b"b": snap(2, COMMITTED, b"a")}, 1, "loops"),
    ({b"a": snap(1, COMMITTED), b"b": snap(1, ACTIVE)}, 1, "two snapshots have this id"),
    ({b"a": snap(1, 7)}, 1, "unknown kind"),
    ({b"a": snap(1, COMMITTED, b"b"), b"b": {b"kind": b"\x03"}}, 1, "has no valid id"),
])
def test_bad_metadata(tmp_path: Path, snapshots: Tree, ask: int, message: str) -> None:
    root = fake_root(tmp_path, snapshots)
    with pytest.raises(UsageError, match=message) as excinfo:
        snapshot_chain(root, ask)
    assert "\n" not in str(excinfo.value)


def test_no_metadata_db(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"no metadata\.db"):
        snapshot_chain(os.fsencode(tmp_path), 1)


def test_no_snapshots_bucket(tmp_path: Path) -> None:
    write_db(tmp_path / "metadata.db", {b"other": {}})
    with pytest.raises(UsageError, match="holds no snapshots"):
        snapshot_chain(os.fsencode(tmp_path), 1)


def test_damaged_metadata_db(tmp_path: Path) -> None:
    root = fake_root(tmp_path, STANDARD)
    db = Path(os.fsdecode(root)) / "metadata.db"
    db.write_bytes(db.read_bytes()[:8192 + 100])
    with pytest.raises(UsageError, match=r"metadata\.db is unreadable or changed while read: "):
        snapshot_chain(root, 1)


# --- a real containerd -----------------------------------------------------------------------

CONTAINERD_CONFIG = """\
version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.internal.v1.tracing",
  "io.containerd.tracing.processor.v1.otlp",
]
[grpc]
  address = "{sock}"
"""
START_TIMEOUT = 30.0

needs_containerd = pytest.mark.skipif(
    shutil.which("containerd") is None or shutil.which("ctr") is None or os.geteuid() != 0,
    reason="needs root and containerd + ctr (Debian package containerd)")


@contextlib.contextmanager
def running_containerd(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A containerd child on temporary root/state/socket: (socket, root), stopped after."""
    # The socket path must fit in sun_path (108 bytes): keep state and socket under a short dir.
    short = Path(tempfile.mkdtemp(prefix="ovd-ctrd-"))
    root, sock = tmp_path / "root", short / "containerd.sock"
    config = tmp_path / "config.toml"
    config.write_text(CONTAINERD_CONFIG.format(root=root, state=short / "state", sock=sock))
    log = (tmp_path / "containerd.log").open("wb")
    proc = subprocess.Popen(["containerd", "--config", str(config)], stdin=subprocess.DEVNULL,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"containerd exited {proc.returncode}: "
                            f"{(tmp_path / 'containerd.log').read_text()[-2000:]}")
            if sock.exists() and subprocess.run(
                    ["ctr", "--address", str(sock), "version"], capture_output=True,
                    check=False).returncode == 0:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"containerd did not answer on {sock} in {START_TIMEOUT}s")
            time.sleep(0.05)
        yield str(sock), root
    finally:
        stop_process(proc, 10)
        log.close()
        shutil.rmtree(short, ignore_errors=True)


def parse_mount(line: str) -> tuple[str, str, dict[str, str], list[str]]:
    """`mount -t TYPE SOURCE TARGET -o OPTS` as ctr prints it: type, source, key=value options,
    flag options."""
    words = shlex.split(line)
    assert words[:2] == ["mount", "-t"], line
    assert words[5] == "-o", line
    options = dict(o.split("=", 1) for o in words[6].split(",") if "=" in o)
    flags = [o for o in words[6].split(",") if "=" not in o]
    return words[2], words[3], options, flags


@needs_containerd
def test_against_real_containerd(tmp_path: Path) -> None:
    with running_containerd(tmp_path) as (sock, root):
        def ctr(*args: str, namespace: str = "default") -> str:
            done = subprocess.run(["ctr", "--address", sock, "--namespace", namespace,
                                   "snapshots", "--snapshotter", "overlayfs", *args],
                                  capture_output=True, text=True, check=False)
            assert done.returncode == 0, f"ctr {' '.join(args)}: {done.stderr}"
            return done.stdout

        def mounts(key: str, namespace: str = "default") -> tuple[str, str, dict[str, str],
                                                                  list[str]]:
            lines = ctr("mounts", str(tmp_path / "x"), key, namespace=namespace).splitlines()
            assert len(lines) == 1, lines
            return parse_mount(lines[0])

        snaproot = root / "io.containerd.snapshotter.v1.overlayfs"
        broot = os.fsencode(snaproot)

        def snapshot_id(fs_dir: str) -> int:
            path = Path(fs_dir)
            assert path.name == "fs", fs_dir
            assert path.parent.parent == snaproot / "snapshots", fs_dir
            return int(path.parent.name)

        # Three committed layers, each prepared on the last, with a file written in between.
        ids: list[int] = []
        parent: tuple[str, ...] = ()
        for n in (1, 2, 3):
            ctr("prepare", f"layer{n}-active", *parent)
            kind, source, options, flags = mounts(f"layer{n}-active")
            upper = source if kind == "bind" else options["upperdir"]
            ids.append(snapshot_id(upper))
            (Path(upper) / f"file{n}").write_text(f"layer {n}\n")
            if n == 1:
                # No parent: containerd bind-mounts fs read-write; we refuse, naming that fs.
                assert (kind, flags) == ("bind", ["rw", "rbind"])
                chain = snapshot_chain(broot, ids[0])
                assert chain.kind == "active"
                with pytest.raises(UsageError, match=f"bind-mounts {re.escape(source)} read-write"):
                    layer_dirs(broot, chain)
            ctr("commit", f"layer{n}", f"layer{n}-active")
            parent = (f"layer{n}",)

        # An active snapshot on top: the overlay containerd would mount.
        ctr("prepare", "container", "layer3")
        kind, _source, options, _flags = mounts("container")
        assert kind == "overlay"
        top = snapshot_id(options["upperdir"])
        chain = snapshot_chain(broot, top)
        assert chain.kind == "active"
        assert chain.key.startswith("default/")
        assert chain.key.endswith("/container")
        assert chain.parents == (ids[2], ids[1], ids[0])
        lowers, upper_dir, work_dir = layer_dirs(broot, chain)
        assert [os.fsdecode(p) for p in lowers] == options["lowerdir"].split(":")
        assert upper_dir == os.fsencode(options["upperdir"])
        assert work_dir == os.fsencode(options["workdir"])

        # Committed snapshots: ids kept through commit, kind and chain as containerd has them.
        for n, id_ in enumerate(ids):
            committed = snapshot_chain(broot, id_)
            assert committed.kind == "committed"
            assert committed.key.endswith(f"/layer{n + 1}")
            assert committed.parents == tuple(reversed(ids[:n]))

        # A view of layer3 (ids are handed out in creation order: the next one after "container").
        ctr("view", "view-top", "layer3")
        kind, _source, options, _flags = mounts("view-top")
        assert kind == "overlay"
        assert "upperdir" not in options
        view = snapshot_chain(broot, top + 1)
        assert (view.kind, view.key.endswith("/view-top")) == ("view", True)
        lowers, upper_dir, work_dir = layer_dirs(broot, view)
        assert [os.fsdecode(p) for p in lowers] == options["lowerdir"].split(":")
        assert (upper_dir, work_dir) == (None, None)
        # ... which is also what the committed layer3 gives as read-only layers.
        assert layer_dirs(broot, snapshot_chain(broot, ids[2]))[0] == lowers

        # A view with a single parent: containerd bind-mounts the parent's fs read-only.
        ctr("view", "view-base", "layer1")
        kind, source, _options, flags = mounts("view-base")
        assert (kind, flags) == ("bind", ["ro", "rbind"])
        assert layer_dirs(broot, snapshot_chain(broot, top + 2)) == (
            (os.fsencode(source),), None, None)

        # Another namespace shares the id space.
        ctr("prepare", "other-rw", namespace="other")
        kind, source, _options, _flags = mounts("other-rw", namespace="other")
        other = snapshot_chain(broot, snapshot_id(source))
        assert other.id == top + 3
        assert other.key.startswith("other/")
        assert other.key.endswith("/other-rw")
