"""``overlayd du``: where the bytes of layer stacks go, and what two stores hold twice.

Pure and synchronous, never used by the daemon. Every layer is read once with directory fds and
bytes names (layertree), symlinks never followed; each stack's merged view is walked with the
overlay's own resolution rules (layers.resolve), so "visible" means what a mount would show.

Two measures, because the engines use different ones (shared/LAYOUTS.md, "Why sizes differ"):

- *apparent*: st_size of every non-directory, each inode once: Docker's layer size
  (moby's directory.Size, which ``docker system df`` and the layer store report);
- *disk*: st_blocks * 512 of every inode, directories included, each inode once: ``du``'s and
  containerd's snapshot usage (continuity's fs.DiskUsage).

Sharing between the stacks given: by inode (the same layer directory in two stacks, or hard
links between layers) and by content (regular files of equal sha256 under different inodes, the
same image unpacked by two engines). Only files whose size occurs in two stacks are hashed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from overlayd.constants import OPAQUE_MARKER
from overlayd.errors import CommandParser, UsageError
from overlayd.layers import DirStack, list_merged, resolve, walk_dirs
from overlayd.layertree import Kind, Stack, descend, walk
from overlayd.ondisk import fd_path
from overlayd.options import shown
from overlayd.stores import LayerStack, resolve_stack

# An inode, as du and containerd tell them apart.
Key = tuple[int, int]

HASH_CHUNK = 1 << 20


@dataclass
class Usage:
    """A set of inodes measured: how many, their apparent size (non-directories) and the space
    they take on disk (every inode)."""

    inodes: int = 0
    apparent: int = 0
    disk: int = 0


@dataclass
class LayerUsage:
    path: bytes
    stacks: list[int]  # indices of the stacks using the layer
    usage: Usage
    whiteouts: int = 0
    opaque: int = 0
    duplicate: int = 0  # disk bytes whose content another stack stores under another inode


@dataclass
class StackUsage:
    spec: str
    layers: list[int]  # indices into Report.layers, top first
    usage: Usage  # its layers, each inode once
    view: Usage  # what the merged view shows: du of the mounted stack
    hidden: Usage  # in its layers, not in the view: whiteouts, opaque dirs, names above
    shared: int  # disk bytes of inodes another stack holds too (a shared layer, hard links)
    duplicate: int  # disk bytes whose content another stack holds under another inode
    unique: int  # disk bytes in no other stack given, neither by inode nor by content


@dataclass
class Report:
    layers: list[LayerUsage]
    stacks: list[StackUsage]
    total: Usage  # every layer, each inode once
    stacks_disk: int  # the stacks' disk bytes added up: shared inodes counted in each
    stored_twice: int | None  # what a deduplicating store would save; None: not hashed
    hashed: Usage | None  # the files read to compare content
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Inode:
    apparent: int
    disk: int
    regular: bool
    where: tuple[int, tuple[bytes, ...]]  # (layer index, parts): where to read it


class Problems:
    """Objects that could not be read: counted, the first one kept for a one-line warning."""

    def __init__(self) -> None:
        self.count = 0
        self.first: str | None = None

    def add(self, where: str, e: OSError) -> None:
        self.count += 1
        if self.first is None:
            self.first = f"{where}: {e.strerror or e}"

    def messages(self) -> list[str]:
        if self.first is None:
            return []
        more = f" and {self.count - 1} more" if self.count > 1 else ""
        return [f"cannot read {self.first}{more}; counted what stat gives"]


def _key(st: os.stat_result) -> Key:
    return (st.st_dev, st.st_ino)


def _inode(st: os.stat_result, where: tuple[int, tuple[bytes, ...]]) -> _Inode:
    is_dir = stat.S_ISDIR(st.st_mode)
    return _Inode(0 if is_dir else st.st_size, st.st_blocks * 512, stat.S_ISREG(st.st_mode),
                  where)


def _display(root: bytes, parts: Sequence[bytes]) -> str:
    return shown(b"/".join((root.rstrip(b"/") or b"", *parts)) or b"/")


@dataclass
class _Layer:
    path: bytes
    fd: int
    keys: set[Key] = field(default_factory=set)
    whiteouts: int = 0
    opaque: int = 0


def _walk_layer(index: int, layer: _Layer, inodes: dict[Key, _Inode],
                problems: Problems) -> None:
    """Record every inode of one layer (its root included)."""
    def record(st: os.stat_result, parts: tuple[bytes, ...]) -> None:
        layer.keys.add(_key(st))
        inodes.setdefault(_key(st), _inode(st, (index, parts)))

    def record_marker(dir_path: bytes, parts: tuple[bytes, ...]) -> None:
        # walk() reads a .wh..wh..opq marker as its directory's opaque flag; it is an inode of
        # the layer all the same.
        with contextlib.suppress(FileNotFoundError):
            record(os.stat(dir_path + b"/" + OPAQUE_MARKER, follow_symlinks=False),
                   (*parts, OPAQUE_MARKER))

    record(os.fstat(layer.fd), ())
    record_marker(fd_path(layer.fd), ())
    for entry in walk(layer.fd, onerror=lambda parts, e: problems.add(
            _display(layer.path, parts), e)):
        record(entry.st, (*entry.parts[:-1], entry.disk_name))
        if entry.kind is Kind.WHITEOUT:
            layer.whiteouts += 1
        elif entry.kind is Kind.DIR:
            layer.opaque += entry.opaque
            if entry.oci:
                record_marker(fd_path(entry.parent_fd, entry.disk_name), entry.parts)


def _walk_view(dirs: Sequence[bytes], spec: str, problems: Problems) -> set[Key]:
    """The inodes the merged view of *dirs* shows: each name's top object (a merged directory
    shows its topmost real directory, as the kernel's stat does), the root included."""
    shown_keys: set[Key] = set()
    with Stack(dirs) as stack:
        roots = stack.fds
        shown_keys.add(_key(os.fstat(roots[0])))

        def visit(here: DirStack, parts: tuple[bytes, ...]) -> None:
            listed: dict[int, set[bytes]] = {}
            try:
                names = list_merged(here, listed)
            except OSError as e:
                problems.add(f"{spec}: {_display(b'', parts)}", e)
                return
            for name in names:
                try:
                    found = resolve(here, name, roots, listed=listed, fmt=stack.fmt)
                    if found is None:
                        continue
                    shown_keys.add(_key(found.st))
                    if not found.is_dir:
                        continue
                    below = descend(here, name, found, roots)
                except OSError as e:
                    problems.add(f"{spec}: {_display(b'', (*parts, name))}", e)
                    continue
                try:
                    visit(below, (*parts, name))
                finally:
                    for _, fd in below:
                        os.close(fd)

        visit(list(enumerate(roots)), ())
    return shown_keys


def _measure(keys: Iterable[Key], inodes: dict[Key, _Inode]) -> Usage:
    usage = Usage()
    for key in keys:
        ino = inodes.get(key)
        if ino is None:
            continue
        usage.inodes += 1
        usage.apparent += ino.apparent
        usage.disk += ino.disk
    return usage


def _digest(dir_fd: int, name: bytes, key: Key) -> bytes | None:
    """The sha256 of the regular file *name*; None when it is no longer the inode *key*."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    with os.fdopen(fd, "rb", buffering=0) as f:
        st = os.fstat(f.fileno())
        if _key(st) != key or not stat.S_ISREG(st.st_mode):
            return None
        h = hashlib.sha256()
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
        return h.digest()


def _hash_candidates(candidates: list[Key], inodes: dict[Key, _Inode], layers: list[_Layer],
                     problems: Problems) -> dict[Key, bytes]:
    """Hash the files *candidates*, reopened by their path below their layer's root fd, in
    path order so that each directory is opened once."""
    digests: dict[Key, bytes] = {}
    candidates.sort(key=lambda k: inodes[k].where)
    current: tuple[int, tuple[bytes, ...]] | None = None
    dir_fd: int | None = None
    owned = False  # dir_fd is ours to close (not a layer's root fd)
    try:
        for key in candidates:
            index, parts = inodes[key].where
            layer = layers[index]
            if current != (index, parts[:-1]):
                if owned and dir_fd is not None:
                    os.close(dir_fd)
                dir_fd, owned, current = None, False, (index, parts[:-1])
                try:
                    dir_fd = walk_dirs(layer.fd, parts[:-1])
                except OSError as e:
                    problems.add(_display(layer.path, parts[:-1]), e)
                owned = dir_fd is not None and dir_fd != layer.fd
            if dir_fd is None:
                continue
            try:
                digest = _digest(dir_fd, parts[-1], key)
            except OSError as e:
                problems.add(_display(layer.path, parts), e)
                continue
            if digest is not None:
                digests[key] = digest
    finally:
        if owned and dir_fd is not None:
            os.close(dir_fd)
    return digests


def measure(stacks: Sequence[LayerStack], compare_content: bool = True) -> Report:
    """Measure *stacks* (resolved specs): every layer once, each stack's view and sharing."""
    problems = Problems()
    layers: list[_Layer] = []
    by_dir: dict[Key, int] = {}
    stack_layers: list[list[int]] = []
    inodes: dict[Key, _Inode] = {}
    try:
        for ls in stacks:
            indices: list[int] = []
            for path in ls.layers:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                dir_key = _key(os.fstat(fd))
                if dir_key in by_dir:
                    os.close(fd)
                else:
                    by_dir[dir_key] = len(layers)
                    layers.append(_Layer(path, fd))
                if by_dir[dir_key] not in indices:
                    indices.append(by_dir[dir_key])
            stack_layers.append(indices)
        for index, layer in enumerate(layers):
            _walk_layer(index, layer, inodes, problems)

        stack_keys = [set().union(*(layers[i].keys for i in idx)) for idx in stack_layers]
        stacks_of: dict[Key, set[int]] = defaultdict(set)
        for s, keys in enumerate(stack_keys):
            for key in keys:
                stacks_of[key].add(s)

        # Content: only regular files whose size occurs under two inodes in two stacks.
        groups: list[list[Key]] = []
        hashed: Usage | None = None
        if compare_content:
            by_size: dict[int, list[Key]] = defaultdict(list)
            for key, ino in inodes.items():
                if ino.regular and ino.apparent > 0:
                    by_size[ino.apparent].append(key)
            candidates = [key for same in by_size.values()
                          if len(same) > 1 and len(set().union(*(stacks_of[k] for k in same))) > 1
                          for key in same]
            hashed = _measure(candidates, inodes)
            digests = _hash_candidates(candidates, inodes, layers, problems)
            by_digest: dict[tuple[int, bytes], list[Key]] = defaultdict(list)
            for key, digest in digests.items():
                by_digest[(inodes[key].apparent, digest)].append(key)
            groups = [group for group in by_digest.values()
                      if len(group) > 1 and len(set().union(*(stacks_of[k] for k in group))) > 1]

        # An inode duplicates for stack s when another inode of its group is in another stack.
        duplicate_for: dict[Key, set[int]] = defaultdict(set)
        stored_twice = 0
        for group in groups:
            disks = [inodes[k].disk for k in group]
            stored_twice += sum(disks) - max(disks)
            for key in group:
                for s in stacks_of[key]:
                    if any(stacks_of[other] - {s} for other in group if other != key):
                        duplicate_for[key].add(s)

        report_layers = []
        for index, layer in enumerate(layers):
            users = [s for s, idx in enumerate(stack_layers) if index in idx]
            report_layers.append(LayerUsage(
                layer.path, users, _measure(layer.keys, inodes), layer.whiteouts, layer.opaque,
                sum(inodes[k].disk for k in layer.keys if k in duplicate_for)))

        report_stacks = []
        for s, (ls, keys) in enumerate(zip(stacks, stack_keys, strict=True)):
            view_keys = _walk_view(ls.layers, ls.spec, problems)
            usage = _measure(keys, inodes)
            shared = sum(inodes[k].disk for k in keys if len(stacks_of[k]) > 1)
            duplicate = sum(inodes[k].disk for k in keys
                            if len(stacks_of[k]) == 1 and s in duplicate_for.get(k, ()))
            report_stacks.append(StackUsage(
                ls.spec, stack_layers[s], usage, _measure(view_keys & keys, inodes),
                _measure(keys - view_keys, inodes), shared, duplicate,
                usage.disk - shared - duplicate))

        return Report(report_layers, report_stacks, _measure(inodes, inodes),
                      sum(s.usage.disk for s in report_stacks),
                      stored_twice if compare_content else None, hashed, problems.messages())
    finally:
        for layer in layers:
            os.close(layer.fd)


# -- output ---------------------------------------------------------------------------------

def human(n: int) -> str:
    """A size as ``du -h`` prints it: powers of 1024, rounded up, one decimal below 10."""
    if n < 1024:
        return str(n)
    units = "KMGTPE"
    for exp, unit in enumerate(units, 1):
        base = 1024**exp
        if n >= base * 1024 and unit != units[-1]:
            continue
        tenths = -(-n * 10 // base)
        if tenths < 100:
            return f"{tenths // 10}.{tenths % 10}{unit}"
        whole = -(-n // base)
        if whole < 1024 or unit == units[-1]:
            return f"{whole}{unit}"
        return "1.0" + units[exp]  # rounding up carried it to the next unit
    raise AssertionError("unreachable")


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """Numbers right-aligned, the last column (a name) left as is, as du prints names last."""
    all_rows = [list(header), *(list(r) for r in rows)]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(header) - 1)]
    return ["  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=False)) + "  " + r[-1]
            for r in all_rows]


def format_report(report: Report, exact: bool = False) -> str:
    size = str if exact else human
    lines = _table(
        ("#", "LAYERS", "INODES", "APPARENT", "DISK", "VIEW", "HIDDEN", "SHARED", "DUPLICATE",
         "UNIQUE", "STACK"),
        ((str(s + 1), str(len(st.layers)), str(st.usage.inodes), size(st.usage.apparent),
          size(st.usage.disk), size(st.view.disk), size(st.hidden.disk), size(st.shared),
          size(st.duplicate), size(st.unique), st.spec) for s, st in enumerate(report.stacks)))
    lines.append("")
    lines += _table(
        ("STACKS", "INODES", "WHITEOUTS", "OPAQUE", "APPARENT", "DISK", "DUPLICATE", "LAYER"),
        [(",".join(str(s + 1) for s in ly.stacks), str(ly.usage.inodes), str(ly.whiteouts),
          str(ly.opaque), size(ly.usage.apparent), size(ly.usage.disk), size(ly.duplicate),
          shown(ly.path)) for ly in report.layers])
    lines.append("")
    total = report.total
    counted = (f"; the stacks add up to {size(report.stacks_disk)}"
               if report.stacks_disk != total.disk else "")
    lines.append(f"on disk:      {size(total.disk)} in {total.inodes} inodes, "
                 f"{size(total.apparent)} apparent (each inode once{counted})")
    if report.stored_twice is None:
        lines.append("stored twice: not measured (--no-hash)")
    else:
        lines.append(f"stored twice: {size(report.stored_twice)} (the same content under "
                     f"another inode: what a deduplicating store would save)")
    notes = []
    if any(st.hidden.disk for st in report.stacks):
        notes.append("HIDDEN: in the stack's layers, not in its view (whiteouts, opaque "
                     "directories, names above)")
    if any(st.shared for st in report.stacks):
        notes.append("SHARED: the same inodes in another stack (a shared layer, hard links)")
    if any(st.duplicate for st in report.stacks):
        notes.append("DUPLICATE: the same content in another stack, under other inodes")
    if notes:
        lines += ["", "APPARENT: file sizes (as Docker counts); DISK: blocks (as du and "
                  "containerd count)", "VIEW: what du of the mounted stack counts", *notes]
    return "\n".join(lines) + "\n"


def report_json(report: Report) -> dict[str, Any]:
    data = asdict(report)
    for layer in data["layers"]:
        layer["path"] = os.fsdecode(layer["path"])
        layer["stacks"] = [s + 1 for s in layer["stacks"]]
    for st in data["stacks"]:
        st["layers"] = [os.fsdecode(report.layers[i].path) for i in st["layers"]]
    return data


def _parser() -> CommandParser:
    parser = CommandParser(
        prog="overlayd du",
        description="Disk usage of layer stacks: per layer and per stack, what the merged view "
                    "shows and what it hides, and what the stacks share by inode and by "
                    "content.")
    parser.add_argument("specs", nargs="+", metavar="STACK",
                        help="overlay2:DIR, containerd:ROOT/snapshots/N[:M...], or L1:L2:... "
                             "(a plain directory is a one-layer stack)")
    parser.add_argument("--json", action="store_true", help="print JSON, sizes in bytes")
    parser.add_argument("--bytes", action="store_true", help="exact byte counts in the table")
    parser.add_argument("--no-hash", action="store_true",
                        help="do not compare file content (no file is read)")
    return parser


def main_du(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    stacks = [resolve_stack(spec) for spec in args.specs]
    for ls in stacks:
        if not ls.layers:
            raise UsageError(f"{ls.spec}: no layers")
    report = measure(stacks, compare_content=not args.no_hash)
    for message in report.warnings:
        print(f"overlayd du: warning: {message}", file=sys.stderr)
    if args.json:
        print(json.dumps(report_json(report), indent=1))
    else:
        sys.stdout.write(format_report(report, exact=args.bytes))
    return 0

