"""Kernel comparison of the write path: the same changes through the kernel's overlay and
overlayd give the same errno at every step, the same merged tree, the same upper layer on disk,
and each upper layer reads the same when mounted by the other implementation. Two scenarios:
the default (redirect_dir=off: merged directories cannot move) and redirect_dir=on."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import needs_fuse, needs_kernel_overlay
from tests.differences import CHANGED, normalize
from tests.mounting import KERNEL_PINNED, kernel_mounted, overlay_options, overlayd_mounted
from tests.snapshot import diff_snapshots, snapshot
from tests.write_scenario import REDIRECT_STEPS, STEPS, Run, Step, build_lowers, run_steps

pytestmark = [pytest.mark.kernel, pytest.mark.mounted, needs_kernel_overlay, needs_fuse]

MARKS = ("trusted.overlay.opaque", "trusted.overlay.redirect")


@dataclasses.dataclass(frozen=True)
class Scenario:
    steps: list[Step]
    options: str  # added to both mounts' options
    kernel_pins: str  # the kernel's semantics pinned (its module defaults may differ)
    # What the scenario must show, so that it cannot pass by doing nothing:
    errnos: frozenset[str]  # outcomes among its steps
    marked: frozenset[str]  # upper directories with an opaque or redirect xattr
    whiteouts: frozenset[bytes]  # some of the whiteouts it leaves


SCENARIOS = {
    "default": Scenario(
        STEPS, "", KERNEL_PINNED,
        frozenset({"ok", "ENOENT", "ENOTEMPTY", "EXDEV", "EEXIST", "ENODATA", "EISDIR",
                   "ENOTDIR", "EINVAL", "EPERM"}),
        frozenset({"emptydir", "srv/data", "movedst", "emptyup"}),
        frozenset({b"opt/app", b"var", b"etc/hosts", b"etc/motd"})),
    "redirect_dir=on": Scenario(
        REDIRECT_STEPS, ",redirect_dir=on",
        KERNEL_PINNED.replace("redirect_dir=off", "redirect_dir=on"),
        frozenset({"ok", "EINVAL", "ENOTEMPTY"}),
        frozenset({"etc", "opt", "srv/etc3", "movedst"}),
        frozenset({b"usr/share", b"srv/etc3/motd"})),
}


def overlay_marks(root: Path) -> dict[str, dict[str, bytes]]:
    """The opaque and redirect xattrs of every directory under *root*."""
    found: dict[str, dict[str, bytes]] = {}
    for dirpath, _dirs, _files in os.walk(root):
        for mark in MARKS:
            try:
                value = os.getxattr(dirpath, mark)
            except OSError:
                continue
            found.setdefault(os.path.relpath(dirpath, root), {})[mark] = value
    return found


@contextlib.contextmanager
def mounted(kind: str, mnt: Path, opts: str, scenario: Scenario) -> Iterator[None]:
    if kind == "kernel":
        with kernel_mounted(mnt, opts + scenario.options + "," + scenario.kernel_pins):
            yield
    else:
        with overlayd_mounted(mnt, opts + scenario.options):
            yield


@dataclasses.dataclass
class ScenarioRun(Run):
    scenario: Scenario


def run(kind: str, base: Path, since_ns: int, scenario: Scenario) -> ScenarioRun:
    base.mkdir()
    lowers = build_lowers(base)
    for name in ("upper", "work", "mnt"):
        (base / name).mkdir()
    opts = overlay_options(lowers, base / "upper", base / "work")
    with mounted(kind, base / "mnt", opts, scenario):
        outcomes = run_steps(base / "mnt", scenario.steps)
        merged = normalize(snapshot(base / "mnt"), since_ns)
    upper = normalize(snapshot(base / "upper"), since_ns)
    return ScenarioRun(base, lowers, outcomes, merged, upper, overlay_marks(base / "upper"),
                       scenario)


@pytest.fixture(scope="module", params=list(SCENARIOS))
def runs(request: pytest.FixtureRequest,
         tmp_path_factory: pytest.TempPathFactory) -> dict[str, ScenarioRun]:
    scenario = SCENARIOS[request.param]
    base = tmp_path_factory.mktemp("write")
    since = time.time_ns() - 1_000_000_000
    return {kind: run(kind, base / kind, since, scenario) for kind in ("kernel", "overlayd")}


def test_same_outcome_at_every_step(runs: dict[str, ScenarioRun]) -> None:
    kernel, ours = runs["kernel"].outcomes, runs["overlayd"].outcomes
    assert len(kernel) == len(ours)
    differ = [f"{title}: kernel {k}, overlayd {o}"
              for (title, k), (_, o) in zip(kernel, ours, strict=True) if k != o]
    assert differ == []
    # The scenario exercises failures as well as successes.
    assert {o for _, o in kernel} >= runs["kernel"].scenario.errnos


def test_same_merged_tree(runs: dict[str, ScenarioRun]) -> None:
    assert diff_snapshots(runs["kernel"].merged, runs["overlayd"].merged) == []


def test_same_upper_layer_on_disk(runs: dict[str, ScenarioRun]) -> None:
    assert diff_snapshots(runs["kernel"].upper, runs["overlayd"].upper) == []
    assert runs["kernel"].marks == runs["overlayd"].marks
    assert set(runs["overlayd"].marks) >= runs["overlayd"].scenario.marked


def test_upper_whiteouts_are_kernel_whiteouts(runs: dict[str, ScenarioRun]) -> None:
    upper = runs["overlayd"].upper
    whiteouts = {p for p, e in upper.items() if e.kind == stat.S_IFCHR and e.rdev == (0, 0)}
    assert whiteouts >= runs["overlayd"].scenario.whiteouts


def test_workdir_left_clean(runs: dict[str, ScenarioRun]) -> None:
    assert os.listdir(runs["overlayd"].base / "work" / "work") == []


@pytest.mark.parametrize(("writer", "reader"), [("overlayd", "kernel"), ("kernel", "overlayd")])
def test_cross_mount(runs: dict[str, ScenarioRun], writer: str, reader: str) -> None:
    """The upper one implementation wrote reads the same through the other."""
    written = runs[writer]
    mnt = written.base / "mnt"
    opts = overlay_options(written.lowers, written.base / "upper", written.base / "work")
    with mounted(reader, mnt, opts, written.scenario):
        view = snapshot(mnt)
    since = min(e.mtime_ns for e in written.merged.values() if e.mtime_ns != CHANGED) + 1
    since = max(since, time.time_ns() - 3600 * 10**9)
    assert diff_snapshots(normalize(view, since), written.merged) == []


def test_read_only_mount_refuses_like_the_kernel(tmp_path: Path) -> None:
    """Without an upper layer, every step fails with the kernel's errno (EROFS for changes)."""
    outcomes = {}
    for kind in ("kernel", "overlayd"):
        base = tmp_path / kind
        base.mkdir()
        lowers = build_lowers(base)
        (base / "mnt").mkdir()
        with mounted(kind, base / "mnt", overlay_options(lowers), SCENARIOS["default"]):
            outcomes[kind] = run_steps(base / "mnt")
    assert outcomes["kernel"] == outcomes["overlayd"]
    refused = [title for title, outcome in outcomes["overlayd"] if outcome == "EROFS"]
    assert len(refused) >= 30, outcomes["overlayd"]
