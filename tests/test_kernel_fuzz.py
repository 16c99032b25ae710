"""Differential fuzzing of the write path: random operations on the kernel's overlay and overlayd.

A hypothesis state machine builds a lower stack (1 to 5 layers drawn over a pool of names, with
files, sparse files, directories with and without xattrs, opaque directories, whiteouts,
symlinks, hard links and fifos, a name's type changing from layer to layer), builds it twice,
mounts the kernel's overlayfs on one copy and overlayd on the other, each with its own upper and
work directories, and applies every operation to both mounts. Each operation must have the same
outcome on both (ok with the same result, or the same errno); every few steps and at the end the
merged trees must be equal; a directory read a few entries at a time while it changes must give
what POSIX promises (every name that stayed exactly once, no name that never was there). After
unmounting, the upper directories must be equal too (whiteouts and opaque markers included),
each upper mounted by the other implementation must show the same tree, and overlayd remounted on
its own upper must give every path the st_ino it had.

The documented differences (tests/differences.py) are normalised away before comparing; the
times set on purpose (utime) are fixed values from the past, so they are compared exactly.

Every change is a line of Python (tests/fuzz_script.py) run on both mounts, so a failing example,
once shrunk, is printed (hypothesis ``note``) as a runnable script: the layers built, then each
step; run it with ``kernel`` and with ``overlayd`` and diff the outputs.

Symlink targets are relative and point downwards only (no ``..``), so a path that follows one,
wherever renames move it, never leaves the mount. Every open uses O_NONBLOCK: a fifo is never
waited on.

Sizes: the hypothesis profile (registered in tests/conftest.py): ``ci`` (loaded when CI is set:
100 examples of up to 25 steps, derandomized), ``soak`` (``--hypothesis-profile=soak`` or
OVERLAYD_FUZZ_PROFILE=soak: 600 examples of up to 60 steps, random); otherwise a quick 30 x 25.
OVERLAYD_FUZZ_EXAMPLES and OVERLAYD_FUZZ_STEPS override either; OVERLAYD_FUZZ_KEEP=1 keeps each
example's directories. The test prints how many examples and steps ran (``-rP`` shows it).

The same machine measures another implementation against the kernel (scripts/fuzz-survey, e.g.
fuse-overlayfs): that is a report of differences, not a test of overlayd, so it is no pytest test.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    MultipleResults,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from overlayd.constants import LINK_INO_BASE, SYNTHETIC_INO_BASE
from overlayd.fs import BINDING_FEATURES
from tests.conftest import needs_fuse, needs_kernel_overlay
from tests.differences import normalize, recent_times, whiteouts_unshared
from tests.fuzz_script import (
    Script,
    namespace,
    octal,
    open_flags,
    path_at,
    render_steps,
    run_statement,
)
from tests.mounting import (
    KERNEL_PINNED,
    fuse_overlayfs_mounted,
    is_mounted,
    kernel_mounted,
    overlay_options,
    overlayd_mounted,
)
from tests.snapshot import Entry, diff_snapshots, snapshot
from tests.test_kernel_write import overlay_marks
from tests.treebuild import OPAQUE_XATTR

pytestmark = [pytest.mark.kernel, pytest.mark.mounted, pytest.mark.slow, needs_kernel_overlay,
              needs_fuse]

QUICK_EXAMPLES, QUICK_STEPS = 30, 25  # without the ci or soak profile
KEEP = bool(os.environ.get("OVERLAYD_FUZZ_KEEP"))
CHECK_EVERY = 3  # steps between two comparisons of the merged trees

# Names the lower layers may hold, parents before children.
LAYER_PATHS: tuple[str, ...] = ("a", "b", "d", "d/a", "d/b", "d/x", "d/x/a", "e", "e/a")
DIR_PATHS = frozenset(p for p in LAYER_PATHS if any(q.startswith(p + "/") for q in LAYER_PATHS))
# Names the operations use: the layers' and new ones (e/a/n lies below what may be a file).
PATHS: tuple[str, ...] = (*LAYER_PATHS, "n", "d/n", "d/x/n", "e/n", "e/a/n")
# Relative and downward only: a symlink never leads out of the mount, wherever it is moved.
TARGETS: tuple[str, ...] = ("a", "b", "x/a", "d/a", "nowhere")

# Drawn uniformly, shrunk towards the first (so the simplest stack is a full tree of plain files
# and directories); repeats weigh the draw towards things that exist.
KINDS: tuple[str, ...] = ("file", "absent", "dir", "opaque", "whiteout", "symlink", "link",
                          "fifo", "file_alt", "file", "link", "file_alt", "sparse", "dir_x")
DIR_KINDS: tuple[str, ...] = ("dir", "absent", "opaque", "whiteout", "file", "symlink", "dir",
                              "dir", "opaque", "dir_x", "sparse")
IS_DIR = frozenset({"dir", "dir_x", "opaque"})
IS_FILE = frozenset({"file", "file_alt", "link", "sparse"})

BASE_NS = 1_600_000_000_123_456_789
LAYER_STEP_NS = 10_000_000_000_000
ENTRY_STEP_NS = 1_000_003_001
# utime values: from the past, so normalize() keeps them; None is "now".
TIMES: tuple[tuple[int, int] | None, ...] = (
    (1, 2), (10**18, 10**18 + 123_456_789), (BASE_NS, BASE_NS + 1), None)

# Data as the statements spell it.
DATA: tuple[str, ...] = (repr(b"x"), repr(b"hello\n"), repr(b"\0\0\0"), "bytes(range(256)) * 20")
SIZES: tuple[int, ...] = (0, 3, 10, 5000, 70000)
OFFSETS: tuple[int, ...] = (0, 1, 7, 4096, 65536)
MODES: tuple[int, ...] = (0o644, 0o600, 0o755, 0o4755, 0o2775, 0o1777, 0o000)
UIDS: tuple[int, ...] = (0, 1000, 65534)
GIDS: tuple[int, ...] = (0, 100, 1000)
XATTR_NAMES: tuple[str, ...] = ("user.k", "user.m")
XATTR_VALUES: tuple[bytes, ...] = (b"1", b"", b"long" * 64)
DIRENT_BUFFER = 80  # bytes per getdents64 call: two or three entries, so reads interleave

LayerSpec = tuple[str, ...]  # one kind per LAYER_PATHS entry


# -- the lower stack --------------------------------------------------------------------------

def layer_specs() -> st.SearchStrategy[list[LayerSpec]]:
    """1 to 5 layers, top first, each a kind for every name of LAYER_PATHS."""
    layer = st.tuples(*(st.sampled_from(DIR_KINDS if p in DIR_PATHS else KINDS)
                        for p in LAYER_PATHS))
    return st.lists(layer, min_size=1, max_size=5)


def _ancestors(rel: str) -> list[str]:
    """The directories above *rel*, top first ("d", "d/x" for "d/x/a")."""
    parent = os.path.dirname(rel)
    return list(itertools.accumulate(parent.split("/"), lambda a, b: f"{a}/{b}")) if parent else []


def plan_layer(spec: LayerSpec) -> dict[str, str]:
    """What a layer holds: path -> kind, parents first (a parent left absent is a plain dir)."""
    plan: dict[str, str] = {}
    for rel, kind in zip(LAYER_PATHS, spec, strict=True):
        above = _ancestors(rel)
        if kind == "absent" or any(plan.get(up, "dir") not in IS_DIR for up in above):
            continue  # nothing lies below a non-directory
        for up in above:
            plan.setdefault(up, "dir")
        if kind == "link" and not any(k in IS_FILE for k in plan.values()):
            kind = "file"  # nothing to link to yet
        plan[rel] = kind
    return plan


def dir_layers(plans: Sequence[dict[str, str]], rel: str) -> list[int]:
    """The layers whose directory *rel* makes up the merged directory *rel*, top first."""
    if not rel:
        return list(range(len(plans)))
    found: list[int] = []
    for level in dir_layers(plans, os.path.dirname(rel)):
        kind = plans[level].get(rel, "absent")
        if kind == "absent":
            continue
        if kind not in IS_DIR:
            break  # a whiteout or a non-directory ends the lookup
        found.append(level)
        if kind == "opaque":
            break
    return found


def plan_stack(specs: Sequence[LayerSpec]) -> list[dict[str, str]]:
    """The layers' plans, without whiteouts in directories that are not merged.

    The kernel lists a directory that only one lower layer holds straight from that layer
    (ovl_dir_is_real: no OVL_WHITEOUTS flag), whiteouts included, while lookup hides them; its
    own writes never put a whiteout there. overlayd hides them from the listing too (see
    test_fuzz_regressions.py). That difference shows at mount time in most stacks that have one,
    so the stacks avoid it to let the fuzzer find anything else.
    """
    plans = [plan_layer(spec) for spec in specs]
    for level, plan in enumerate(plans):
        for rel, kind in list(plan.items()):
            parent = os.path.dirname(rel)
            if kind == "whiteout" and parent and dir_layers(plans, parent) == [level]:
                del plan[rel]
    return plans


def layer_statements(level: int, plan: dict[str, str]) -> list[str]:
    """The statements that write one layer (at ``L``) as planned; its content depends only on
    *level* and *plan*."""
    out: list[str] = []
    for index, (rel, kind) in enumerate(plan.items()):
        at = path_at("L", rel)
        if kind == "link":
            source = next(p for p, k in plan.items() if k in IS_FILE)
            out.append(f"os.link({path_at('L', source)}, {at})")
        elif kind in IS_DIR:
            out.append(f"os.mkdir({at}, {octal(0o750 if kind == 'opaque' else 0o755)})")
            if kind == "opaque":
                out.append(f"os.setxattr({at}, {OPAQUE_XATTR!r}, b'y')")
            if kind != "dir":
                out.append(f"os.setxattr({at}, 'user.k', {b'%s%d' % (kind.encode(), level)!r})")
        elif kind == "file":
            data = b"l%d:%s\n" % (level, rel.encode())
            out.append(f"put({at}, {data!r})")
            out.append(f"os.chmod({at}, 0o644)")
        elif kind == "file_alt":
            out.append(f"put({at}, {b'l%d:%s:' % (level, rel.encode())!r} + b'z' * 3000)")
            out.append(f"os.chown({at}, 1000, 1000)")
            out.append(f"os.chmod({at}, 0o600)")
            out.append(f"os.setxattr({at}, 'user.k', {b'v%d' % level!r})")
        elif kind == "sparse":
            out.append(f"sparse({at}, {b'l%d:%s' % (level, rel.encode())!r}, 65536, 200000)")
            out.append(f"os.chmod({at}, 0o640)")
        elif kind == "whiteout":
            out.append(f"os.mknod({at}, stat.S_IFCHR, os.makedev(0, 0))")
            out.append(f"os.chmod({at}, 0)")
        elif kind == "symlink":
            out.append(f"os.symlink({TARGETS[(level + index) % len(TARGETS)].encode()!r}, {at})")
        elif kind == "fifo":
            out.append(f"os.mkfifo({at}, 0o640)")
        else:
            raise AssertionError(kind)
    # Fixed times, deepest first so that a directory's time is set after its children's.
    for order, rel in sorted(enumerate(plan), key=lambda x: (-x[1].count("/"), x[1])):
        ns = BASE_NS + level * LAYER_STEP_NS + order * ENTRY_STEP_NS
        out.append(f"os.utime({path_at('L', rel)}, ns=({ns}, {ns}), follow_symlinks=False)")
    out.append(f"os.utime(L, ns=({BASE_NS}, {BASE_NS}))")
    return out


def build_layer(layer: Path, statements: Sequence[str]) -> None:
    """Run a layer's statements at *layer* (made here); any failure is the harness's own bug."""
    layer.mkdir()
    ns = namespace(L=os.fsencode(layer))
    for code in statements:
        outcome = run_statement(code, ns)
        assert outcome == ("ok", []), f"building {layer}: {code}: {outcome}"


# -- the implementations ------------------------------------------------------------------------

Mounter = Callable[[Path, str], contextlib.AbstractContextManager[object]]
PEERS: dict[str, Mounter] = {
    "overlayd": overlayd_mounted,
    "fuse-overlayfs": fuse_overlayfs_mounted,
}


def kernel_mounter(mnt: Path, options: str) -> contextlib.AbstractContextManager[None]:
    return kernel_mounted(mnt, options + "," + KERNEL_PINNED)


@dataclass
class Side:
    """One implementation's copy of the stack, its mount, and its statements' variables."""

    name: str
    base: Path
    lowers: list[Path]
    mount: Mounter
    ns: dict[str, Any] = field(default_factory=dict)

    @property
    def upper(self) -> Path:
        return self.base / "upper"

    @property
    def work(self) -> Path:
        return self.base / "work"

    @property
    def mnt(self) -> Path:
        return self.base / "mnt"

    def options(self) -> str:
        return overlay_options(self.lowers, self.upper, self.work)

    def run(self, code: str) -> object:
        return run_statement(code, self.ns)


def make_side(name: str, base: Path, layers: Sequence[Sequence[str]], mount: Mounter) -> Side:
    base.mkdir(parents=True)
    lowers = [base / f"l{level}" for level in range(len(layers))]
    for layer, statements in zip(lowers, layers, strict=True):
        build_layer(layer, statements)
    for sub in ("upper", "work", "mnt"):
        (base / sub).mkdir()
    return Side(name, base, lowers, mount,
                namespace(M=os.fsencode(base / "mnt"), H={}, D={}))


def inode_numbers(root: Path) -> dict[bytes, int]:
    """st_ino of every path under *root*, relative (root itself as b".")."""
    base = os.fsencode(root)
    found = {b".": os.lstat(base).st_ino}
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            found[os.path.relpath(path, base)] = os.lstat(path).st_ino
    return found


def listing(dir_fd: int) -> dict[bytes, int] | None:
    """The names in the open directory *dir_fd*, now, with their st_ino (read through a new
    open file, so *dir_fd*'s position stays where it is); None if it is gone. A removed
    directory still opens through /proc and lists as empty, with no "." or "..": the
    " (deleted)" the kernel adds to its /proc link tells it apart (its nlink does not: a
    merged directory of the kernel's overlay reports 1, removed or not)."""
    link = f"/proc/self/fd/{dir_fd}"
    try:
        fd = os.open(link, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if os.readlink(link).endswith(" (deleted)"):
            os.close(fd)
            return None
    except OSError:
        return None
    try:
        names = os.listdir(fd)
        return {os.fsencode(n): os.stat(n, dir_fd=fd, follow_symlinks=False).st_ino
                for n in names}
    except OSError:
        return None
    finally:
        os.close(fd)


def readdir_problems(got: list[bytes], timeline: list[dict[bytes, int] | None]) -> list[str]:
    """What POSIX forbids in *got*, the names a directory handle gave while the directory went
    through *timeline* (its names and st_ino after each step): "." and ".." and every name that
    stayed (same inode all along) exactly once, no name it never had. Nothing is checked once
    the directory is gone."""
    if not timeline or any(t is None for t in timeline):
        return []
    snaps = [t for t in timeline if t is not None]
    stayed = {n for n, ino in snaps[0].items() if all(s.get(n) == ino for s in snaps)}
    ever = set().union(*snaps)
    problems = [f"{n!r} given {got.count(n)} times" for n in sorted(stayed | {b".", b".."})
                if got.count(n) != 1]
    problems += [f"{n!r} given, never there" for n in sorted(set(got) - ever - {b".", b".."})]
    return problems


@dataclass
class DirHandle:
    """A directory held open on both sides, what each side's reads gave, and its history."""

    names: list[list[bytes]]
    timeline: list[list[dict[bytes, int] | None]]


# -- the machine ---------------------------------------------------------------------------------

@dataclass
class Tally:
    """Counts across all examples of one run: what the test prints."""

    examples: int = 0
    rules: int = 0
    operations: int = 0


class Divergence(AssertionError):
    """A difference between the kernel and the implementation under test."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass
class Survey:
    """Survey mode (scripts/fuzz-survey): record each example's first difference instead of
    failing; the example then runs its remaining rules as no-ops. If *want* is set, a difference
    of that class fails the example (so hypothesis shrinks it) and others end it quietly."""

    want: str | None = None
    ignore: frozenset[str] = frozenset()  # Entry fields left out of every tree comparison
    found: dict[str, list[tuple[str, Script]]] = field(default_factory=dict)  # key -> examples


class OverlayPair(RuleBasedStateMachine):
    """The kernel's overlay and an overlay under test on identical stacks, the same operations."""

    root: ClassVar[Path]  # where examples make their directories: set by the test
    peer: ClassVar[str] = "overlayd"
    tally: ClassVar[Tally] = Tally()
    survey: ClassVar[Survey | None] = None

    def __init__(self) -> None:
        super().__init__()
        self.base = Path(tempfile.mkdtemp(prefix="ex", dir=self.root))
        self.mounts = contextlib.ExitStack()
        self.sides: list[Side] = []
        self.since_ns = 0
        self.steps = 0
        self.failed = False  # a check failed: the rest are no-ops, the teardown only unmounts
        self.next_handle = 0
        self.fifo_handles: set[int] = set()
        self.dirs: dict[int, DirHandle] = {}
        self.checked_once = False
        self.script = Script(layers=[], kernel_options=KERNEL_PINNED)

    # -- set-up and tear-down ------------------------------------------------------------------

    # Path arguments: the pool, or (as often) a name the merged tree showed after mounting.
    existing = Bundle("existing")
    paths = st.one_of(st.sampled_from(PATHS), existing)

    @initialize(target=existing, specs=layer_specs())
    def mount_both(self, specs: list[LayerSpec]) -> MultipleResults[str]:
        self.tally.examples += 1
        self.since_ns = time.time_ns() - 1_000_000_000
        self.script.layers = [layer_statements(level, plan)
                              for level, plan in enumerate(plan_stack(specs))]
        for name, mount in (("kernel", kernel_mounter), (self.peer, PEERS[self.peer])):
            side = make_side(name, self.base / name, self.script.layers, mount)
            self.mounts.enter_context(side.mount(side.mnt, side.options()))
            self.sides.append(side)
        shown = self.check_merged("after mounting")
        return multiple(*(os.fsdecode(p) for p, e in shown.items() if p != b"." and not e.error))

    def teardown(self) -> None:
        check = len(self.sides) == 2 and not self.failed
        try:
            try:
                for side in self.sides:
                    for fd in [*side.ns["H"].values(), *side.ns["D"].values()]:
                        with contextlib.suppress(OSError):
                            os.close(fd)
                final = self.check_merged("at the end") if check else {}
                inodes = inode_numbers(self.sides[1].mnt) if check and not self.failed else {}
            finally:
                self.mounts.close()  # both unmounted, whatever happened
            if check and not self.failed:
                self.check_uppers(final)
            if check and not self.failed:
                self.check_remount(inodes)
        finally:
            if not KEEP and not any(is_mounted(side.mnt) for side in self.sides):
                shutil.rmtree(self.base, ignore_errors=True)

    # -- checks --------------------------------------------------------------------------------

    def fail(self, key: str, message: str) -> None:
        """A difference of class *key*: fail the example (with the reproducer noted), or in
        survey mode record it and end the example's checks."""
        self.failed = True
        if self.survey is not None:
            self.survey.found.setdefault(key, []).append((message, self.script))
            if key != self.survey.want:
                return
        # Also on disk at once: a failure that does not replay (flaky) prints no note.
        saved = self.base.with_name(self.base.name + "-repro.py")
        saved.write_text(self.script.render())
        note("Reproducer (save as repro.py; run it with 'kernel' and with "
             f"'{self.peer}', as root, and diff the outputs):\n\n{self.script.render()}")
        raise Divergence(key, f"{message}\n\nsteps (the whole reproducer: {saved}):\n"
                              f"{render_steps(self.script.steps)}")

    def same(self, what: str, code: str) -> None:
        """Run *code* on both mounts; the outcomes must be equal."""
        if self.failed:
            return
        self.steps += 1
        self.tally.operations += 1
        self.script.add(what, code)
        kernel, ours = (side.run(code) for side in self.sides)
        if kernel != ours:
            self.fail(f"{what.split()[0]}: kernel {_kind(kernel)}, {self.peer} {_kind(ours)}",
                      f"{what}: kernel {_short(kernel)}, {self.peer} {_short(ours)}")

    def diff(self, a: dict[bytes, Entry], b: dict[bytes, Entry]) -> list[str]:
        return diff_snapshots(a, b, ignore=self.survey.ignore if self.survey else ())

    def merged(self, side: Side) -> dict[bytes, Entry]:
        return normalize(snapshot(side.mnt), self.since_ns)

    def check_merged(self, when: str) -> dict[bytes, Entry]:
        """Compare the merged trees; the kernel's."""
        kernel, ours = (self.merged(side) for side in self.sides)
        differ = self.diff(kernel, ours)
        if differ:
            self.fail(f"merged tree: {_fields(differ)}",
                      f"merged trees differ {when} (a=kernel, b={self.peer}):\n"
                      + "\n".join(differ))
        return kernel

    def check_uppers(self, final: dict[bytes, Entry]) -> None:
        kernel, ours = self.sides
        # On disk, hard links are real in both: only whiteouts and recent times are normalised.
        kernel_upper, our_upper = (whiteouts_unshared(recent_times(snapshot(side.upper),
                                                                   self.since_ns))
                                   for side in self.sides)
        differ = self.diff(kernel_upper, our_upper)
        if differ:
            self.fail(f"upper on disk: {_fields(differ)}",
                      f"upper dirs differ (a=kernel, b={self.peer}):\n" + "\n".join(differ))
            return
        marks = [overlay_marks(side.upper) for side in self.sides]
        if marks[0] != marks[1]:
            self.fail("upper on disk: overlay marks",
                      f"opaque/redirect marks differ: kernel {marks[0]}, {self.peer} {marks[1]}")
            return
        leftovers = os.listdir(ours.work / "work") if (ours.work / "work").is_dir() else []
        if leftovers:
            self.fail("workdir leftovers", f"{self.peer} left {leftovers} in its workdir")
            return
        # Each upper reads through the other implementation as the merged tree did.
        with kernel.mount(ours.mnt, ours.options()):
            view = self.merged(ours)
        differ = self.diff(final, view)
        if differ:
            self.fail(f"kernel on {self.peer}'s upper: {_fields(differ)}",
                      f"{self.peer}'s upper mounted by the kernel (b) differs from the merged "
                      "tree (a):\n" + "\n".join(differ))
            return
        with ours.mount(kernel.mnt, kernel.options()):
            view = self.merged(kernel)
        differ = self.diff(final, view)
        if differ:
            self.fail(f"{self.peer} on the kernel's upper: {_fields(differ)}",
                      f"the kernel's upper mounted by {self.peer} (b) differs from the merged "
                      "tree (a):\n" + "\n".join(differ))

    def check_remount(self, before: dict[bytes, int]) -> None:
        """Remounted on its own upper, the implementation under test keeps every st_ino."""
        ours = self.sides[1]
        with ours.mount(ours.mnt, ours.options()):
            after = inode_numbers(ours.mnt)
        differ = [f"{p!r}: st_ino {before.get(p)} then {after.get(p)}"
                  for p in sorted(before.keys() | after.keys())
                  if before.get(p) != after.get(p)
                  and not (self.peer == "overlayd" and self.stand_in_ino(before, after, p))]
        if differ:
            self.fail("remount: st_ino", f"{self.peer} remounted on its own upper changed "
                      "inode numbers:\n" + "\n".join(differ))

    @staticmethod
    def stand_in_ino(before: dict[bytes, int], after: dict[bytes, int], path: bytes) -> bool:
        """Whether *path* had, in either mount, a number overlayd made up for this mount: while
        the kernel still holds an unlinked object, a new object that the upper filesystem gives
        the same inode number gets a stand-in (Overlay.ino_for), and a remount gives it its own."""
        return any(SYNTHETIC_INO_BASE <= numbers.get(path, 0) < LINK_INO_BASE
                   for numbers in (before, after))

    def in_upper(self, path: str) -> bool:
        """Whether the kernel's upper layer holds *path* (a whiteout does not count)."""
        try:
            st_ = os.lstat(self.sides[0].upper / path)
        except OSError:
            return False
        return not (stat.S_ISCHR(st_.st_mode) and st_.st_rdev == 0)

    @invariant()
    def merged_trees_agree(self) -> None:
        if len(self.sides) != 2 or self.failed:
            return
        if self.checked_once:
            self.tally.rules += 1  # once after every rule; the first call follows the mounting
        self.checked_once = True
        for number, handle in self.dirs.items():
            for side, timeline in zip(self.sides, handle.timeline, strict=True):
                timeline.append(listing(side.ns["D"][number]))
        if self.steps % CHECK_EVERY == 0:
            self.check_merged(f"after step {self.steps}")

    # -- rules: by name ------------------------------------------------------------------------

    @rule(path=paths, offset=st.sampled_from(OFFSETS), data=st.sampled_from(DATA),
          create=st.booleans(), trunc=st.booleans())
    def write(self, path: str, offset: int, data: str, create: bool, trunc: bool) -> None:
        flags = (os.O_CREAT if create else 0) | (os.O_TRUNC if trunc else 0)
        spelled = open_flags(flags) if flags else "0"
        self.same(f"pwrite {path}",
                  f"show(write({path_at('M', path)}, {spelled}, {data}, {offset}))")

    @rule(path=paths, data=st.sampled_from(DATA))
    def append(self, path: str, data: str) -> None:
        self.same(f"append {path}", f"show(write({path_at('M', path)}, os.O_APPEND, {data}, None))")

    @rule(path=paths, size=st.sampled_from(SIZES))
    def truncate(self, path: str, size: int) -> None:
        self.same(f"truncate {path}", f"os.truncate({path_at('M', path)}, {size})")

    @rule(path=paths, mode=st.sampled_from(MODES))
    def chmod(self, path: str, mode: int) -> None:
        self.same(f"chmod {path}", f"os.chmod({path_at('M', path)}, {octal(mode)})")

    @rule(path=paths, uid=st.sampled_from(UIDS), gid=st.sampled_from(GIDS), follow=st.booleans())
    def chown(self, path: str, uid: int, gid: int, follow: bool) -> None:
        self.same(f"chown {path}",
                  f"os.chown({path_at('M', path)}, {uid}, {gid}, follow_symlinks={follow})")

    @rule(path=paths, times=st.sampled_from(TIMES), follow=st.booleans())
    def utime(self, path: str, times: tuple[int, int] | None, follow: bool) -> None:
        ns = f", ns={times}" if times is not None else ""
        self.same(f"utime {path}",
                  f"os.utime({path_at('M', path)}{ns}, follow_symlinks={follow})")

    @rule(path=paths, name=st.sampled_from(XATTR_NAMES), value=st.sampled_from(XATTR_VALUES),
          follow=st.booleans())
    def setxattr(self, path: str, name: str, value: bytes, follow: bool) -> None:
        self.same(f"setxattr {path}", f"os.setxattr({path_at('M', path)}, {name!r}, {value!r}, "
                                      f"follow_symlinks={follow})")

    @rule(path=paths, name=st.sampled_from(XATTR_NAMES), value=st.sampled_from(XATTR_VALUES),
          flag=st.sampled_from(("XATTR_CREATE", "XATTR_REPLACE")))
    def setxattr_flags(self, path: str, name: str, value: bytes, flag: str) -> None:
        # With a stock pyfuse3, only on objects already in the upper layer: the kernel copies a
        # lower object up before it fails XATTR_CREATE/XATTR_REPLACE, and overlayd can only
        # with our pyfuse3 patch (test_fuzz_regressions.py).
        if "setxattr_flags" not in BINDING_FEATURES and not self.in_upper(path):
            return
        self.same(f"setxattr {flag} {path}",
                  f"os.setxattr({path_at('M', path)}, {name!r}, {value!r}, os.{flag}, "
                  "follow_symlinks=False)")

    @rule(path=paths, name=st.sampled_from(XATTR_NAMES), follow=st.booleans())
    def removexattr(self, path: str, name: str, follow: bool) -> None:
        self.same(f"removexattr {path}",
                  f"os.removexattr({path_at('M', path)}, {name!r}, follow_symlinks={follow})")

    @rule(path=paths, name=st.sampled_from(XATTR_NAMES))
    def getxattr(self, path: str, name: str) -> None:
        self.same(f"getxattr {path}", f"show(os.getxattr({path_at('M', path)}, {name!r}, "
                                      "follow_symlinks=False))")

    @rule(path=paths, mode=st.sampled_from((0o755, 0o700)))
    def mkdir(self, path: str, mode: int) -> None:
        self.same(f"mkdir {path}", f"os.mkdir({path_at('M', path)}, {octal(mode)})")

    @rule(path=paths)
    def rmdir(self, path: str) -> None:
        self.same(f"rmdir {path}", f"os.rmdir({path_at('M', path)})")

    @rule(path=paths)
    def unlink(self, path: str) -> None:
        self.same(f"unlink {path}", f"os.unlink({path_at('M', path)})")

    @rule(old=paths, new=paths, how=st.sampled_from(("rename", "noreplace", "exchange")))
    def rename(self, old: str, new: str, how: str) -> None:
        if how == "rename":
            self.same(f"rename {old} {new}",
                      f"os.rename({path_at('M', old)}, {path_at('M', new)})")
        else:
            flags = {"noreplace": 1, "exchange": 2}[how]  # RENAME_NOREPLACE, RENAME_EXCHANGE
            self.same(f"renameat2-{how} {old} {new}",
                      f"rename2(M, {old.encode()!r}, {new.encode()!r}, {flags})")

    @rule(src=paths, dst=paths, follow=st.booleans())
    def link(self, src: str, dst: str, follow: bool) -> None:
        self.same(f"link {src} {dst}", f"os.link({path_at('M', src)}, {path_at('M', dst)}, "
                                       f"follow_symlinks={follow})")

    @rule(path=paths, dest=st.sampled_from(TARGETS))
    def symlink(self, path: str, dest: str) -> None:
        self.same(f"symlink {path}", f"os.symlink({dest.encode()!r}, {path_at('M', path)})")

    @rule(path=paths)
    def mkfifo(self, path: str) -> None:
        self.same(f"mkfifo {path}", f"os.mkfifo({path_at('M', path)}, 0o640)")

    @rule(path=paths)
    def read(self, path: str) -> None:
        self.same(f"read {path}", f"show(read({path_at('M', path)}))")

    @rule(path=st.sampled_from(("", *PATHS)))
    def listdir(self, path: str) -> None:
        self.same(f"listdir {path}", f"show(sorted(os.listdir({path_at('M', path)})))")

    # -- rules: through open files, opened for writing so that both copy up at open (the
    # documented difference of a read-only handle opened before a copy-up never arises) --------

    handles = Bundle("handles")
    FD_CHANGES = ("os.fchmod", "os.fchown", "os.utime", "os.setxattr", "os.removexattr")

    def same_open(self, what: str, code: str, table: str, number: int) -> bool:
        """Run the open in *code* (it stores a descriptor as table[number]) on both sides;
        whether both opened (else neither holds it)."""
        self.same(what, code)
        opened = [number in side.ns[table] for side in self.sides]
        if all(opened) and not self.failed:
            if stat.S_ISFIFO(os.fstat(self.sides[0].ns[table][number]).st_mode):
                self.fifo_handles.add(number)  # see fd_call
            return True
        for side in self.sides:
            if number in side.ns[table]:
                os.close(side.ns[table].pop(number))
        return False

    @rule(target=handles, path=paths, trunc=st.booleans(), create=st.booleans())
    def open_rdwr(self, path: str, trunc: bool, create: bool) -> MultipleResults[int]:
        flags = (os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_TRUNC if trunc else 0)
                 | (os.O_CREAT if create else 0))
        self.next_handle += 1
        number = self.next_handle
        if self.same_open(f"open fd {number} {path}",
                          f"H[{number}] = os.open({path_at('M', path)}, {open_flags(flags)}, "
                          "0o640)", "H", number):
            return multiple(number)
        return multiple()

    @rule(handle=handles, offset=st.sampled_from(OFFSETS), data=st.sampled_from(DATA))
    def fd_write(self, handle: int, offset: int, data: str) -> None:
        self.same(f"pwrite fd {handle}", f"show(os.pwrite(H[{handle}], {data}, {offset}))")

    @rule(handle=handles)
    def fd_read(self, handle: int) -> None:
        self.same(f"pread fd {handle}", f"show(os.pread(H[{handle}], 1 << 18, 0))")

    @rule(handle=handles, size=st.sampled_from(SIZES))
    def fd_truncate(self, handle: int, size: int) -> None:
        self.same(f"ftruncate fd {handle}", f"os.ftruncate(H[{handle}], {size})")

    @rule(handle=handles)
    def fd_stat(self, handle: int) -> None:
        self.same(f"fstat fd {handle}",
                  f"s = os.fstat(H[{handle}])\n"
                  "show((oct(s.st_mode), s.st_nlink, s.st_uid, s.st_gid, s.st_size))")

    @rule(handle=handles, call=st.sampled_from((
        "os.fchmod({fd}, 0o600)", "os.fchmod({fd}, 0o4755)", "os.fchown({fd}, 1000, 100)",
        "os.utime({fd}, ns=(1, 2))", "os.setxattr({fd}, 'user.k', b'fd')",
        "os.removexattr({fd}, 'user.k')", "show(sorted(os.listxattr({fd})))", "os.fsync({fd})",
        "show(os.lseek({fd}, 0, os.SEEK_END))")))
    def fd_call(self, handle: int, call: str) -> None:
        if handle in self.fifo_handles and call.startswith(self.FD_CHANGES):
            # A lower FIFO removed while open and then changed through its fd: EEXIST here,
            # resurrected by the kernel (a documented difference, tests/differences.py).
            return
        self.same(f"{call.split('(')[0]} fd {handle}", call.format(fd=f"H[{handle}]"))

    @rule(handle=consumes(handles))
    def fd_close(self, handle: int) -> None:
        self.fifo_handles.discard(handle)
        self.same(f"close fd {handle}", f"os.close(H.pop({handle}))")

    # -- rules: a directory read a few entries at a time while it changes ----------------------

    dir_handles = Bundle("dir_handles")

    @rule(target=dir_handles, path=st.sampled_from(("", *PATHS)))
    def opendir(self, path: str) -> MultipleResults[int]:
        self.next_handle += 1
        number = self.next_handle
        if not self.same_open(f"opendir {number} {path}",
                              f"D[{number}] = os.open({path_at('M', path)}, "
                              "os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)", "D", number):
            return multiple()
        self.dirs[number] = DirHandle(names=[[] for _ in self.sides], timeline=[
            [listing(side.ns["D"][number])] for side in self.sides])
        return multiple(number)

    def same_readdir(self, what: str, code: str, handle: int) -> None:
        """Run a read of directory *handle* on both: the same success or errno, and the names
        kept per side for the check at closedir (the order, and whether a name added or removed
        since opendir shows, may differ)."""
        if self.failed:
            return
        self.steps += 1
        self.tally.operations += 1
        self.script.add(what, code)
        outcomes = [side.run(code) for side in self.sides]
        kinds = [_kind(o) for o in outcomes]
        if kinds[0] != kinds[1]:
            self.fail(f"{what.split()[0]}: kernel {kinds[0]}, {self.peer} {kinds[1]}",
                      f"{what}: kernel {_short(outcomes[0])}, {self.peer} {_short(outcomes[1])}")
            return
        for names, out in zip(self.dirs[handle].names, outcomes, strict=True):
            if isinstance(out, tuple):
                names.extend(out[1][0])

    @rule(handle=dir_handles)
    def readdir_some(self, handle: int) -> None:
        self.same_readdir(f"getdents {handle}", f"show(getdents(D[{handle}], {DIRENT_BUFFER}))",
                          handle)

    @rule(handle=consumes(dir_handles))
    def closedir(self, handle: int) -> None:
        self.same_readdir(f"closedir {handle}",
                          f"show(getdents_rest(D[{handle}]))\nos.close(D.pop({handle}))", handle)
        dh = self.dirs.pop(handle)
        if self.failed:
            return
        for side, names, timeline in zip(self.sides, dh.names, dh.timeline, strict=True):
            problems = readdir_problems(names, timeline)
            if problems:
                self.fail(f"readdir while changing: {side.name}",
                          f"directory {handle} read on {side.name} gave {names}, against POSIX: "
                          + "; ".join(problems))
                return


def _kind(outcome: object) -> str:
    return "ok" if isinstance(outcome, tuple) else str(outcome)


def _short(outcome: object) -> str:
    text = repr(outcome)
    return text if len(text) < 300 else text[:300] + "..."


def _fields(differ: list[str]) -> str:
    """The class of a tree difference: which fields differ ("only in a" for missing paths)."""
    kinds = set()
    for line in differ:
        rest = line.split(": ", 1)[1]
        kinds.add(rest.split(":", 1)[0] if rest.startswith("only in") else rest.split(":")[0])
    return ",".join(sorted(kinds))


# -- sizes and the test ------------------------------------------------------------------------

def fuzz_settings() -> settings:
    """The loaded profile's sizes for ci and soak, else the quick ones; env overrides."""
    profile = settings.get_current_profile_name().split("-with-")[0]
    if profile in ("ci", "soak"):
        examples, steps = settings.default.max_examples, settings.default.stateful_step_count
    else:
        examples, steps = QUICK_EXAMPLES, QUICK_STEPS
    return settings(
        max_examples=int(os.environ.get("OVERLAYD_FUZZ_EXAMPLES", examples)),
        stateful_step_count=int(os.environ.get("OVERLAYD_FUZZ_STEPS", steps)),
        deadline=None,
        derandomize=settings.default.derandomize or bool(os.environ.get("CI")),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.filter_too_much],
    )


def machine_for(root: Path, peer: str = "overlayd",
                survey: Survey | None = None) -> type[OverlayPair]:
    """A machine class bound to *root*, *peer* and *survey*, with its own tally."""
    class Machine(OverlayPair):
        pass

    Machine.root, Machine.peer, Machine.tally, Machine.survey = root, peer, Tally(), survey
    return Machine


def test_kernel_and_overlayd_agree_on_random_operations(tmp_path: Path) -> None:
    chosen = fuzz_settings()
    started = time.monotonic()
    machine = machine_for(tmp_path)
    try:
        run_state_machine_as_test(machine, settings=chosen)
    finally:
        tally = machine.tally
        print(f"fuzz: profile {settings.get_current_profile_name()}, "
              f"{chosen.max_examples} examples x up to {chosen.stateful_step_count} steps "
              f"asked; ran {tally.examples} examples, {tally.rules} rules, "
              f"{tally.operations} operations on both mounts, "
              f"in {time.monotonic() - started:.0f}s")
