"""Id mapping as fuse-overlayfs defines it: ``uidmapping=``/``gidmapping=`` and the squash options.

A mapping is a list of ON-DISK:SHOWN:LENGTH triples (fuse-overlayfs's ``host:to:len``), all
colon-separated; empty items are skipped, as its strtok does (podman writes ``:0:100000:65536``).
Ids on disk are shown through the mapping, ids outside every range as the overflow id 65534;
ids given to the mount (chown, the creator of a new object) go the other way. ``squash_to_uid``,
``squash_to_gid`` and ``squash_to_root`` show every object as owned by that id, and a chown
that the upper filesystem refuses is then not an error. Pure; no state.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from overlayd.errors import UsageError

OVERFLOW_ID = 65534  # /proc/sys/kernel/overflow{u,g}id's default, what fuse-overlayfs shows
MAX_ID = 0xFFFFFFFF

Range = tuple[int, int, int]  # on-disk first id, shown first id, length


def parse_mapping(key: str, text: str) -> tuple[Range, ...]:
    """The triples of ``KEY=TEXT``, or a UsageError naming the option."""
    parts = [p for p in text.split(":") if p]
    if not parts or len(parts) % 3:
        raise UsageError(f"option {key}={text!r}: takes ON-DISK:SHOWN:LENGTH triples")
    if not all(p.isascii() and p.isdigit() for p in parts):
        raise UsageError(f"option {key}={text!r}: ids must be numbers")
    numbers = [int(p, 10) for p in parts]
    ranges = []
    for i in range(0, len(numbers), 3):
        disk, shown, length = numbers[i:i + 3]
        if length < 1 or disk < 0 or shown < 0 or max(disk, shown) + length - 1 > MAX_ID:
            raise UsageError(f"option {key}={text!r}: range {disk}:{shown}:{length} is invalid")
        ranges.append((disk, shown, length))
    return tuple(ranges)


@dataclass(frozen=True)
class IdMap:
    """One id space's mapping (uids or gids)."""

    ranges: tuple[Range, ...] = ()
    squash: int | None = None  # every object shown as owned by this id

    @property
    def identity(self) -> bool:
        return not self.ranges and self.squash is None

    def shown(self, disk_id: int) -> int:
        """The id an object owned by *disk_id* on disk shows through the mount."""
        if self.squash is not None:
            return self.squash
        if not self.ranges:
            return disk_id
        # fuse-overlayfs prepends each range to its list: the last one given wins an overlap.
        for disk, shown, length in reversed(self.ranges):
            if disk <= disk_id < disk + length:
                return shown + disk_id - disk
        return OVERFLOW_ID

    def disk(self, shown_id: int) -> int:
        """The on-disk id for *shown_id*, given to the mount by chown or as a creator."""
        if not self.ranges:
            return shown_id
        for disk, shown, length in reversed(self.ranges):
            if shown <= shown_id < shown + length:
                return disk + shown_id - shown
        return OVERFLOW_ID


IDENTITY = IdMap()

# POSIX ACLs as xattrs (linux/posix_acl_xattr.h): a version, then (tag, perm, id) entries; the
# named-user and named-group entries carry ids, mapped like owners.
ACL_XATTRS = (b"system.posix_acl_access", b"system.posix_acl_default")
_ACL_HEADER = struct.Struct("<I")
_ACL_ENTRY = struct.Struct("<HHI")
_ACL_VERSION = 2
_ACL_USER = 0x02
_ACL_GROUP = 0x08


def map_acl(value: bytes, uidmap: IdMap, gidmap: IdMap, *, to_disk: bool) -> bytes:
    """*value*, an ACL xattr, with its ids shown (from disk) or on-disk (*to_disk*); a value
    that is not a well-formed ACL is left for the filesystem to judge."""
    body = len(value) - _ACL_HEADER.size
    if body < 0 or body % _ACL_ENTRY.size or _ACL_HEADER.unpack_from(value)[0] != _ACL_VERSION:
        return value
    out = bytearray(value[:_ACL_HEADER.size])
    for offset in range(_ACL_HEADER.size, len(value), _ACL_ENTRY.size):
        tag, perm, ident = _ACL_ENTRY.unpack_from(value, offset)
        if tag in (_ACL_USER, _ACL_GROUP):
            idmap = uidmap if tag == _ACL_USER else gidmap
            # Squashing shows owners only: the ids an ACL names keep their mapping.
            plain = IdMap(idmap.ranges)
            ident = plain.disk(ident) if to_disk else plain.shown(ident)
        out += _ACL_ENTRY.pack(tag, perm, ident)
    return bytes(out)
