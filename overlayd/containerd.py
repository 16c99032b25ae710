"""containerd's overlayfs snapshotter: a snapshot's parent chain and its layer directories.

The snapshotter (containerd's snapshots/overlay and snapshots/storage) keeps each snapshot's
files in ``ROOT/snapshots/<id>/fs`` (and, while active, an overlay workdir in ``.../work``), and
its metadata in the bbolt database ``ROOT/metadata.db``: bucket ``v1`` > ``snapshots`` holds one
bucket per snapshot, named by its snapshotter key (``namespace/sequence/name``, as containerd's
metadata layer maps names), with ``id`` (uvarint), ``kind`` (1 view, 2 active, 3 committed) and
``parent`` (the parent's key). Ids come from the ``snapshots`` bucket's sequence, so they are
unique per snapshotter ROOT, across namespaces.

The database is read without containerd's lock (see overlayd.bbolt); reading it while containerd
commits can fail, which is reported as "changed while read". Synchronous, no threads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from overlayd.bbolt import BoltError, Bucket, open_db
from overlayd.errors import UsageError

KINDS = {1: "view", 2: "active", 3: "committed"}
# The kernel's overlayfs takes at most 500 lower layers; a longer chain is a damaged database.
MAX_CHAIN = 4096
# Reads of metadata.db torn by a concurrent commit are retried this many times in all.
READ_ATTEMPTS = 3


@dataclass(frozen=True)
class Snapshot:
    """A snapshot of a containerd overlayfs snapshotter and its parents' ids, nearest first."""

    id: int
    key: str
    kind: str  # "view", "active" or "committed"
    parents: tuple[int, ...]


def _uvarint(data: bytes) -> int | None:
    """The uvarint *data* starts with, as Go's binary.Uvarint (which containerd's readID uses,
    ignoring trailing bytes); None when there is none or it overflows 64 bits."""
    value = 0
    for i, byte in enumerate(data[:10]):
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value if value < 1 << 64 else None
    return None


def _id_of(bucket: Bucket) -> int | None:
    raw = bucket.get(b"id")
    return None if raw is None else _uvarint(raw)


def _key_text(key: bytes) -> str:
    return key.decode("utf-8", "backslashreplace")


def _read_chain(db_path: bytes, snapshot: int) -> Snapshot:
    """The chain as read from *db_path*; BoltError when the read may be torn by a commit, so
    that a snapshot or parent missing only because of that is not reported as such."""
    with open_db(db_path) as db:
        try:
            chain = _chain_in(db.root, db_path, snapshot)
        except UsageError:
            db.check_unchanged()
            raise
        db.check_unchanged()
        return chain


def _chain_in(top: Bucket, db_path: bytes, snapshot: int) -> Snapshot:
    v1 = top.bucket(b"v1")
    snapshots = v1.bucket(b"snapshots") if v1 is not None else None
    if snapshots is None:
        raise UsageError(f"containerd snapshot {snapshot}: no such snapshot "
                         f"({os.fsdecode(db_path)} holds no snapshots)")
    found: tuple[bytes, Bucket] | None = None
    for key, value in snapshots.items():
        if isinstance(value, Bucket) and _id_of(value) == snapshot:
            if found is not None:
                raise UsageError(
                    f"containerd snapshot {snapshot}: two snapshots have this id "
                    f"({_key_text(found[0])!r} and {_key_text(key)!r})")
            found = (key, value)
    if found is None:
        raise UsageError(f"containerd snapshot {snapshot}: no such snapshot id in "
                         f"{os.fsdecode(db_path)}")
    key, bucket = found
    kind_raw = bucket.get(b"kind")
    kind = KINDS.get(kind_raw[0]) if kind_raw is not None and len(kind_raw) == 1 else None
    if kind is None:
        raise UsageError(f"containerd snapshot {snapshot} ({_key_text(key)!r}): "
                         f"unknown kind {kind_raw!r}")
    parents: list[int] = []
    seen = {key}
    child, parent_key = key, bucket.get(b"parent")
    while parent_key:
        if parent_key in seen or len(parents) >= MAX_CHAIN:
            raise UsageError(f"containerd snapshot {snapshot}: parent chain loops at "
                             f"{_key_text(parent_key)!r}")
        seen.add(parent_key)
        parent = snapshots.bucket(parent_key)
        if parent is None:
            raise UsageError(f"containerd snapshot {snapshot}: parent "
                             f"{_key_text(parent_key)!r} of {_key_text(child)!r} "
                             f"is missing from metadata.db")
        parent_id = _id_of(parent)
        if parent_id is None:
            raise UsageError(f"containerd snapshot {snapshot}: parent "
                             f"{_key_text(parent_key)!r} has no valid id")
        parents.append(parent_id)
        child, parent_key = parent_key, parent.get(b"parent")
    return Snapshot(snapshot, _key_text(key), kind, tuple(parents))


def _read_chain_retrying(db_path: bytes, snapshot: int) -> Snapshot:
    """_read_chain, read again when containerd committed meanwhile (the read may be torn)."""
    for _ in range(READ_ATTEMPTS - 1):
        try:
            return _read_chain(db_path, snapshot)
        except BoltError:
            pass
    return _read_chain(db_path, snapshot)


def snapshot_chain(root: bytes, snapshot: int) -> Snapshot:
    """Snapshot *snapshot* of the overlayfs snapshotter at *root* and its parent chain.

    UsageError, one line, when root has no metadata.db, there is no such snapshot, a parent is
    missing, or the database cannot be read (damaged, or changed by containerd while read, in
    each of a few attempts)."""
    db_path = os.path.join(root, b"metadata.db")
    try:
        return _read_chain_retrying(db_path, snapshot)
    except FileNotFoundError as e:
        raise UsageError(f"{os.fsdecode(root)}: no metadata.db (not a containerd overlayfs "
                         f"snapshotter root?)") from e
    except OSError as e:
        raise UsageError(f"{os.fsdecode(db_path)}: {e.strerror}") from e
    except BoltError as e:
        raise UsageError(f"metadata.db is unreadable or changed while read: {e} "
                         f"(try again)") from e


def fs_dir(root: bytes, snapshot_id: int) -> bytes:
    return os.path.join(root, b"snapshots", str(snapshot_id).encode(), b"fs")


def work_dir(root: bytes, snapshot_id: int) -> bytes:
    return os.path.join(root, b"snapshots", str(snapshot_id).encode(), b"work")


def layer_dirs(root: bytes, snap: Snapshot) -> tuple[tuple[bytes, ...], bytes | None, bytes | None]:
    """(lowerdirs top first, upperdir or None, workdir or None) to mount *snap*.

    The same layers containerd's overlay snapshotter mounts (its ``mounts()``):

    - active: upper ``<id>/fs``, work ``<id>/work``, lowers the parents' ``fs``;
    - view: read-only, lowers the parents' ``fs``; a view's own ``fs`` is an unused empty
      directory, except for a view without parent, which containerd bind-mounts read-only (and
      so do we, as the single lower layer). A view with one parent is a read-only bind of the
      parent's ``fs`` for containerd, one lower layer for us: the same files;
    - committed (containerd mounts only active and view snapshots): read-only, lowers its own
      ``fs`` then the parents', which is what a view of it would show.

    An active snapshot without a parent is a read-write bind mount of its ``fs`` for containerd:
    with nothing to overlay, it is refused here (UsageError) rather than given as an overlay
    without lower layers, which neither the kernel nor overlayd mounts."""
    parents = tuple(fs_dir(root, p) for p in snap.parents)
    if snap.kind == "active":
        if not parents:
            raise UsageError(
                f"containerd snapshot {snap.id} is active without a parent: containerd "
                f"bind-mounts {os.fsdecode(fs_dir(root, snap.id))} read-write; there is no "
                f"layer to overlay")
        return parents, fs_dir(root, snap.id), work_dir(root, snap.id)
    if snap.kind == "view":
        return parents or (fs_dir(root, snap.id),), None, None
    return (fs_dir(root, snap.id), *parents), None, None
