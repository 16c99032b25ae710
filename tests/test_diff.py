"""overlayd diff: what a layer changed, in docker diff's format.

The reference is moby's archive.ChangesDirs (what `docker diff` computes), written out here on
two real trees: the kernel's overlay mount of the layers below and the kernel's mount of the
layers including the changed one. overlayd diff reads the layer alone and must print the same
lines. The changes come from the kernel itself (the write scenario, and hypothesis-generated
operations), so the layer holds exactly what the kernel writes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlayd import cli
from overlayd.diff import Change, changes
from overlayd.errors import UsageError
from tests.conftest import needs_kernel_overlay
from tests.mounting import KERNEL_PINNED, kernel_mounted, overlay_options
from tests.write_scenario import STEPS, build_lowers, run_steps

# --- moby's ChangesDirs on two trees -------------------------------------------------------------


def _capability(path: bytes) -> bytes | None:
    try:
        return os.getxattr(path, "security.capability", follow_symlinks=False)
    except OSError:
        return None


def _stat_different(old: os.stat_result, new: os.stat_result) -> bool:
    if (old.st_mode, old.st_uid, old.st_gid, old.st_rdev) != (
            new.st_mode, new.st_uid, new.st_gid, new.st_rdev):
        return True
    if stat.S_ISDIR(old.st_mode):
        return False
    return old.st_mtime_ns != new.st_mtime_ns or old.st_size != new.st_size


def reference(old_root: Path, new_root: Path) -> list[tuple[str, bytes]]:
    """moby's ChangesDirs(new, old), in walk order (parents first, names sorted)."""

    def names(path: bytes | None) -> list[bytes]:
        if path is None or not stat.S_ISDIR(os.lstat(path).st_mode):
            return []
        return os.listdir(path)

    def walk(old: bytes | None, new: bytes | None, rel: bytes) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        old_names, new_names = set(names(old)), set(names(new))
        for name in sorted(old_names | new_names):
            path = rel + b"/" + name
            if name not in new_names:
                out.append(("D", path))
                continue
            assert new is not None
            n = new + b"/" + name
            o = None if old is None or name not in old_names else old + b"/" + name
            own = None
            if o is None:
                own = "A"
            else:
                ost, nst = os.lstat(o), os.lstat(n)
                if _stat_different(ost, nst) or (stat.S_ISREG(nst.st_mode)
                                                  and _capability(o) != _capability(n)):
                    own = "C"
            below = walk(o, n, path)
            if own is None and below:
                own = "C"
            if own is not None:
                out.append((own, path))
            out.extend(below)
        return out

    return walk(os.fsencode(old_root), os.fsencode(new_root), b"")


@contextlib.contextmanager
def views(base: Path, upper: Path, lowers: list[Path]) -> Iterator[tuple[Path, Path]]:
    """The kernel's read-only mounts of the layers below *upper*, and of all of them."""
    old, new = base / "view-old", base / "view-new"
    old.mkdir()
    new.mkdir()
    if len(lowers) == 1:
        # The kernel needs two lower layers for a lower-only mount: add an empty one.
        (base / "empty").mkdir(exist_ok=True)
        lowers_old = [*lowers, base / "empty"]
    else:
        lowers_old = lowers
    with kernel_mounted(old, overlay_options(lowers_old) + ",redirect_dir=off"), \
            kernel_mounted(new, overlay_options([upper, *lowers]) + ",redirect_dir=off"):
        yield old, new


def ours(upper: Path, lowers: list[Path]) -> list[tuple[str, bytes]]:
    return [(c.kind, c.path) for c in changes(os.fsencode(upper), [os.fsencode(p)
                                                                    for p in lowers])]


def changed_by_kernel(base: Path, lowers: list[Path], act: Callable[[Path], object]) -> Path:
    """Run *act* on the kernel's overlay of *lowers* with a fresh upper; return the upper."""
    upper, work, mnt = base / "upper", base / "work", base / "mnt"
    for d in (upper, work, mnt):
        d.mkdir()
    with kernel_mounted(mnt, overlay_options(lowers, upper, work) + "," + KERNEL_PINNED):
        act(mnt)
    return upper


# --- the write scenario ---------------------------------------------------------------------------


@needs_kernel_overlay
@pytest.mark.kernel
def test_write_scenario_matches_docker_diff(tmp_path: Path) -> None:
    lowers = build_lowers(tmp_path)
    upper = changed_by_kernel(tmp_path, lowers, lambda mnt: run_steps(mnt, STEPS))
    with views(tmp_path, upper, lowers) as (old, new):
        expected = reference(old, new)
    got = ours(upper, lowers)
    assert got == expected
    # The scenario adds, changes and deletes, and has changes below unchanged directories.
    kinds = {k for k, _ in got}
    assert kinds == {"A", "C", "D"}
    assert len(got) > 20


# --- generated changes ----------------------------------------------------------------------------

PATHS = ["a", "a/f", "a/g", "a/sub", "a/sub/x", "b", "b/h", "c", "d", "d/e", "d/e/f", "new",
         "new/n"]


def _lower_tree(root: Path) -> list[Path]:
    top, bottom = root / "l1", root / "l2"
    for d in (bottom / "a/sub", bottom / "d/e", top / "a", top / "b"):
        d.mkdir(parents=True, exist_ok=True)
    (bottom / "a/f").write_bytes(b"f")
    (bottom / "a/sub/x").write_bytes(b"x")
    (bottom / "c").write_bytes(b"c")
    (bottom / "d/e/f").write_bytes(b"deep")
    (top / "a/g").write_bytes(b"g")
    (top / "b/h").write_bytes(b"h")
    for layer in (top, bottom):
        for dirpath, dirnames, filenames in os.walk(layer):
            for name in [*dirnames, *filenames, "."]:
                os.utime(os.path.join(dirpath, name), ns=(10**18, 10**18), follow_symlinks=False)
    return [top, bottom]


def _append(path: Path) -> None:
    with path.open("ab") as f:
        f.write(b"+")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


OPS: dict[str, Callable[[Path], object]] = {
    "write": lambda p: p.write_bytes(b"new data"),
    "append": lambda p: _append(p),
    "chmod": lambda p: os.chmod(p, 0o600),
    "chown": lambda p: os.lchown(p, 1000, 1000),
    "touch": lambda p: os.utime(p, ns=(5 * 10**17, 5 * 10**17), follow_symlinks=False),
    "remove": _remove,
    "mkdir": lambda p: p.mkdir(),
    "symlink": lambda p: p.symlink_to("target"),
    "mkfifo": lambda p: os.mkfifo(p),
    "replace-dir": lambda p: (_remove(p), p.mkdir()),
    "replace-by-file": lambda p: (_remove(p), p.write_bytes(b"was something")),
    "setcap": lambda p: os.setxattr(p, "security.capability",
                                    bytes.fromhex("0000000200200000000000000000000000000000")),
}


def _apply(mnt: Path, ops: list[tuple[str, str]]) -> None:
    for op, rel in ops:
        with contextlib.suppress(OSError):  # an operation the tree refuses is no change
            OPS[op](mnt / rel)


@needs_kernel_overlay
@pytest.mark.kernel
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(sorted(OPS)), st.sampled_from(PATHS)),
                    min_size=1, max_size=8))
def test_generated_changes_match_docker_diff(tmp_path_factory: pytest.TempPathFactory,
                                              ops: list[tuple[str, str]]) -> None:
    base = tmp_path_factory.mktemp("diff")
    lowers = _lower_tree(base)
    upper = changed_by_kernel(base, lowers, lambda mnt: _apply(mnt, ops))
    with views(base, upper, lowers) as (old, new):
        expected = reference(old, new)
    assert ours(upper, lowers) == expected


# --- formats the kernel does not write ------------------------------------------------------------


def test_oci_whiteouts_and_opaque_markers(tmp_path: Path) -> None:
    """A layer written by a mount program (fuse-overlayfs, overlayd without mknod): .wh.NAME
    whiteouts and .wh..wh..opq markers; fuse-overlayfs's opaque xattr."""
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    for d in ("etc", "opt/app", "var/log", "srv"):
        (lower / d).mkdir(parents=True)
    (lower / "etc/motd").write_bytes(b"hi")
    (lower / "etc/hosts").write_bytes(b"h")
    (lower / "opt/app/bin").write_bytes(b"bin")
    (lower / "var/log/syslog").write_bytes(b"log")
    (lower / "srv/www").write_bytes(b"www")
    for d in ("etc", "opt/app", "var", "srv"):
        (upper / d).mkdir(parents=True)
        shutil.copystat(lower / d, upper / d)
    (upper / "etc/.wh.motd").touch()
    (upper / "etc/issue").write_bytes(b"new")
    (upper / "opt/app/.wh..wh..opq").touch()
    (upper / "opt/app/conf").write_bytes(b"c")
    (upper / "var/.wh.log").touch()
    (upper / ".wh.nothing").touch()  # a whiteout of a name no layer has: no line
    os.setxattr(upper / "srv", "user.fuseoverlayfs.opaque", b"y")
    assert ours(upper, [lower]) == [
        ("C", b"/etc"), ("A", b"/etc/issue"), ("D", b"/etc/motd"),
        ("C", b"/opt"), ("C", b"/opt/app"), ("D", b"/opt/app/bin"), ("A", b"/opt/app/conf"),
        ("C", b"/srv"), ("D", b"/srv/www"),
        ("C", b"/var"), ("D", b"/var/log"),
    ]


def test_without_lower_layers_everything_is_added(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d/f").write_bytes(b"x")
    (tmp_path / "l").symlink_to("d/f")
    assert ours(tmp_path, []) == [("A", b"/d"), ("A", b"/d/f"), ("A", b"/l")]


def test_a_directory_replaced_by_a_file_lists_its_children_as_deleted(tmp_path: Path) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    (lower / "d/sub").mkdir(parents=True)
    (lower / "d/f").write_bytes(b"x")
    upper.mkdir()
    (upper / "d").write_bytes(b"now a file")
    assert ours(upper, [lower]) == [("C", b"/d"), ("D", b"/d/f"), ("D", b"/d/sub")]


def test_unchanged_copied_up_directory_is_not_listed(tmp_path: Path) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    (lower / "d").mkdir(parents=True)
    (upper / "d").mkdir(parents=True)
    os.utime(upper / "d", ns=(1, 1))  # directories' mtimes are no measure of change
    assert ours(upper, [lower]) == []


def test_redirected_directory_is_refused(tmp_path: Path) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    (lower / "old").mkdir(parents=True)
    (upper / "new").mkdir(parents=True)
    os.setxattr(upper / "new", "user.overlay.redirect", b"old")
    with pytest.raises(UsageError, match="redirect"):
        list(changes(os.fsencode(upper), [os.fsencode(lower)]))


def test_change_line_format() -> None:
    assert Change("A", b"/a b/\xff").line() == b"A /a b/\xff\n"


# --- the command ----------------------------------------------------------------------------------


def overlayd_cmd(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "overlayd", *args], capture_output=True,
                          check=False)


def test_command_with_lowerdir(tmp_path: Path) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    (lower / "etc").mkdir(parents=True)
    (lower / "etc/old").write_bytes(b"x")
    (upper / "etc").mkdir(parents=True)
    (upper / "etc/new").write_bytes(b"y")
    if os.geteuid() == 0:
        os.mknod(upper / "etc/old", stat.S_IFCHR, 0)
    else:
        (upper / "etc/.wh.old").touch()
    proc = overlayd_cmd("diff", str(upper), "--lowerdir", str(lower))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"C /etc\nA /etc/new\nD /etc/old\n"
    assert proc.stderr == b""


def test_command_with_overlay2_layer(tmp_path: Path) -> None:
    home = tmp_path / "overlay2"
    (home / "l").mkdir(parents=True)
    for layer_id, short in (("base", "AAAA"), ("ctr", "CCCC")):
        (home / layer_id / "diff").mkdir(parents=True)
        (home / layer_id / "work").mkdir()
        (home / layer_id / "link").write_text(short)
        (home / "l" / short).symlink_to(f"../{layer_id}/diff")
    (home / "base/committed").touch()
    (home / "ctr/lower").write_text("l/AAAA")
    (home / "base/diff/etc").mkdir()
    (home / "base/diff/etc/passwd").write_bytes(b"root")
    (home / "ctr/diff/etc").mkdir()
    (home / "ctr/diff/etc/passwd").write_bytes(b"root\nuser")
    (home / "ctr/diff/tmp").mkdir()
    proc = overlayd_cmd("diff", f"overlay2:{home / 'ctr'}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"C /etc\nC /etc/passwd\nA /tmp\n"


@pytest.mark.parametrize(("args", "message"), [
    (["/nonexistent-layer"], b"is not a directory"),
    (["overlay2:/nonexistent"], b"no diff/ directory"),
    ([".", "--lowerdir", "a::b"], b"empty element"),
])
def test_command_errors(args: list[str], message: bytes) -> None:
    proc = overlayd_cmd("diff", *args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert len(proc.stderr.splitlines()) == 1


def test_cli_dispatches_diff(tmp_path: Path, capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    (tmp_path / "f").write_bytes(b"")
    assert cli.main(["diff", str(tmp_path)]) == 0
    assert capfdbinary.readouterr().out == b"A /f\n"


def test_errno_of_unreadable_layer(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as excinfo:
        list(changes(os.fsencode(tmp_path / "missing"), []))
    assert excinfo.value.errno == errno.ENOENT
