"""Layer stacks named by where container engines keep them (shared/LAYOUTS.md).

Pure and synchronous. A *stack spec* names the layers of one mount:

- ``overlay2:DIR``: Docker's overlay2 layer directory ``.../overlay2/<id>``. Its ``lower`` file
  names the layers below through the ``l/`` short links; a layer marked ``committed`` is an image
  layer (read-only, its ``diff/`` on top), any other one a container layer (``diff/`` the upper,
  ``work/`` the workdir), as moby's overlay2 driver mounts them (Driver.Get).
- ``containerd:ROOT/snapshots/N``: a snapshot of containerd's overlayfs snapshotter, its parents
  read from ``ROOT/metadata.db``; ``containerd:ROOT/snapshots/N:M:K`` gives the chain (N, then
  its parent M, ...) without reading the database.
- ``L1:L2:...``: plain layer directories, top first (``\\:`` escapes a colon), read-only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from overlayd.errors import UsageError
from overlayd.options import shown, split_escaped

OVERLAY2 = "overlay2:"
CONTAINERD = "containerd:"


@dataclass(frozen=True)
class LayerStack:
    """The layers of one mount: lower directories top first, and the upper and work
    directories when the stack is writable (a container layer, an active snapshot)."""

    spec: str
    lowerdirs: tuple[bytes, ...]
    upperdir: bytes | None = None
    workdir: bytes | None = None

    @property
    def layers(self) -> tuple[bytes, ...]:
        """Every layer directory, top first (the upper one included)."""
        return self.lowerdirs if self.upperdir is None else (self.upperdir, *self.lowerdirs)

    def read_only(self) -> LayerStack:
        """The same layers mounted read-only: the upper one becomes the top lower layer,
        as moby mounts a committed layer."""
        return LayerStack(self.spec, self.layers)

    def mount_options(self) -> str:
        """The stack as ``-o`` mount options (commas and colons in paths escaped)."""
        def esc(path: bytes) -> str:
            return os.fsdecode(path).replace("\\", "\\\\").replace(",", "\\,")

        opts = ["lowerdir=" + ":".join(esc(d).replace(":", "\\:") for d in self.lowerdirs)]
        if self.upperdir is not None and self.workdir is not None:
            opts += ["upperdir=" + esc(self.upperdir), "workdir=" + esc(self.workdir)]
        return ",".join(opts)


def resolve_stack(spec: str) -> LayerStack:
    """The layers *spec* names (see the module docstring). Checks that they exist."""
    if "\0" in spec:
        raise UsageError(f"layer spec {spec!r} contains a NUL character")
    if spec.startswith(OVERLAY2):
        stack = overlay2_stack(os.fsencode(spec[len(OVERLAY2):]), spec)
    elif spec.startswith(CONTAINERD):
        stack = containerd_stack(spec[len(CONTAINERD):], spec)
    else:
        parts = split_escaped(spec, ":")
        if not spec or any(not p for p in parts):
            raise UsageError(f"layer spec {spec!r} has an empty element")
        stack = LayerStack(spec, tuple(os.fsencode(os.path.abspath(p)) for p in parts))
    for d in stack.layers:
        if not os.path.isdir(d):
            raise UsageError(f"{spec}: layer {shown(d)} is not a directory")
    return stack


def _read_small(path: bytes, what: str) -> str | None:
    try:
        with open(path, "rb") as f:
            data = f.read(65536)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UsageError(f"{what} {shown(path)}: {e.strerror}") from None
    try:
        return data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise UsageError(f"{what} {shown(path)}: not an overlay2 file (not ASCII)") from None


def overlay2_stack(layer_dir: bytes, spec: str) -> LayerStack:
    """Docker overlay2: ``DIR/lower`` is ``l/SHORT:l/SHORT...`` (top first, relative to the
    overlay2 directory); each ``l/SHORT`` links to ``../<id>/diff``. No ``lower`` file: a base
    layer, mounted alone (moby then returns its diff/ without an overlay)."""
    layer_dir = os.path.abspath(layer_dir).rstrip(b"/") or b"/"
    diff = os.path.join(layer_dir, b"diff")
    if not os.path.isdir(diff):
        raise UsageError(f"{spec}: no diff/ directory in {shown(layer_dir)} "
                         f"(expected an overlay2 layer directory, .../overlay2/<id>)")
    home = os.path.dirname(layer_dir)
    real_home = os.path.realpath(home)
    lowers: list[bytes] = []
    lower = _read_small(os.path.join(layer_dir, b"lower"), "overlay2 lower file")
    for entry in (lower.split(":") if lower else []):
        # moby joins each entry to its home and cleans it; l/ holds the short links.
        if not entry.startswith("l/") or "/" in entry[2:] or entry in ("l/", "l/.", "l/.."):
            raise UsageError(f"{spec}: lower file entry {entry!r} is not l/<short id>")
        link = os.path.join(home, os.fsencode(entry))
        target = os.path.realpath(link)
        # A link must lead to a sibling layer's diff/: never let a crafted tree point the
        # mount at an arbitrary host directory.
        if (os.path.basename(target) != b"diff"
                or os.path.dirname(os.path.dirname(target)) != real_home):
            raise UsageError(f"{spec}: {shown(link)} does not lead to a layer's diff/ in "
                             f"{shown(home)}")
        lowers.append(target)
    committed = os.path.lexists(os.path.join(layer_dir, b"committed"))
    if not lowers or committed:
        return LayerStack(spec, (diff, *lowers))
    return LayerStack(spec, tuple(lowers), diff, os.path.join(layer_dir, b"work"))


def containerd_stack(rest: str, spec: str) -> LayerStack:
    """containerd's overlayfs snapshotter: ROOT/snapshots/<n>/fs, work/ beside it for an active
    snapshot. With one id, its kind and parents come from ROOT/metadata.db."""
    path, _, chain = rest.partition(":")
    snap_dir = os.path.abspath(os.fsencode(path)).rstrip(b"/")
    snapshots = os.path.dirname(snap_dir)
    top = os.path.basename(snap_dir)
    if os.path.basename(snapshots) != b"snapshots" or not top.isdigit():
        raise UsageError(f"{spec}: expected ROOT/snapshots/<id> of containerd's overlayfs "
                         f"snapshotter, got {shown(snap_dir)}")
    root = os.path.dirname(snapshots)
    ids = [int(top)]
    for item in chain.split(":") if chain else []:
        if not (item.isascii() and item.isdigit()):
            raise UsageError(f"{spec}: snapshot id {item!r} is not a number")
        ids.append(int(item))

    def fs(n: int) -> bytes:
        return os.path.join(snapshots, b"%d" % n, b"fs")

    if chain:
        # An explicit chain: what a view or committed snapshot mounts (read-only).
        return LayerStack(spec, tuple(fs(n) for n in ids))
    from overlayd import containerd

    snap = containerd.snapshot_chain(root, ids[0])
    lowers, upper, work = containerd.layer_dirs(root, snap)
    return LayerStack(spec, tuple(lowers), upper, work)
