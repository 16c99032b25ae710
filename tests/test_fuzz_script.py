"""The differential fuzzer's reproducer scripts (tests/fuzz_script.py): what its rules record,
rendered, must run as a plain Python script and do what the fuzzer did. No mount: the script's
``none`` target runs the steps on an empty plain directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import needs_root
from tests.fuzz_script import Script, open_flags, path_at
from tests.snapshot import diff_snapshots, snapshot
from tests.test_kernel_fuzz import (
    DATA,
    DirHandle,
    OverlayPair,
    build_layer,
    layer_statements,
    listing,
    plan_layer,
    readdir_problems,
)

# Every kind a layer may hold that an unprivileged user can make, over two layers.
UNPRIVILEGED = [("file", "symlink", "dir_x", "sparse", "link", "dir", "fifo", "dir", "file"),
                ("sparse", "file", "dir", "file", "absent", "dir", "symlink", "absent", "absent")]
# And those that need root: whiteouts, opaque directories, chown.
PRIVILEGED = [("whiteout", "file_alt", "opaque", "file", "link", "dir", "whiteout", "dir",
               "file_alt")]


class Recording(OverlayPair):
    """The fuzzer's rules with no mounts: each only records its statement."""

    def same(self, what: str, code: str) -> None:
        self.script.add(what, code)

    def same_open(self, what: str, code: str, table: str, number: int) -> bool:
        self.same(what, code)
        return True

    def same_readdir(self, what: str, code: str, handle: int) -> None:
        self.same(what, code)


def sample(tmp_path: Path) -> Script:
    """A script with a step of every form the rules write."""
    Recording.root = tmp_path
    m = Recording()
    m.mkdir(path="d", mode=0o755)
    m.write(path="d/n", offset=4096, data=DATA[3], create=True, trunc=False)
    m.append(path="d/n", data=DATA[1])
    m.truncate(path="d/n", size=70000)
    m.chmod(path="d/n", mode=0o4755)
    m.chown(path="d/n", uid=os.geteuid(), gid=os.getegid(), follow=False)
    m.utime(path="d/n", times=(1, 2), follow=False)
    m.utime(path="d/n", times=None, follow=True)
    m.setxattr(path="d/n", name="user.k", value=b"1", follow=True)
    m.getxattr(path="d/n", name="user.k")
    m.removexattr(path="d/n", name="user.k", follow=False)
    m.getxattr(path="d/n", name="user.k")
    m.symlink(path="a", dest="nowhere")
    m.link(src="d/n", dst="b", follow=False)
    m.mkfifo(path="e")
    m.rename(old="b", new="n", how="rename")
    m.rename(old="n", new="d/a", how="noreplace")
    m.rename(old="a", new="e", how="exchange")
    m.open_rdwr(path="d/a", trunc=False, create=False)
    m.fd_write(handle=1, offset=1, data=DATA[0])
    m.fd_read(handle=1)
    m.fd_truncate(handle=1, size=10)
    m.fd_stat(handle=1)
    for call in ("os.fchmod({fd}, 0o600)", "os.setxattr({fd}, 'user.k', b'fd')",
                 "show(sorted(os.listxattr({fd})))", "os.removexattr({fd}, 'user.k')",
                 "os.utime({fd}, ns=(1, 2))", "os.fsync({fd})",
                 "show(os.lseek({fd}, 0, os.SEEK_END))"):
        m.fd_call(handle=1, call=call)
    m.fd_close(handle=1)
    m.opendir(path="d")
    assert isinstance(m.dirs[2], DirHandle)
    m.readdir_some(handle=2)
    m.closedir(handle=2)
    m.unlink(path="d/x/n")
    m.rmdir(path="e")
    m.read(path="d/a")
    m.listdir(path="")
    return m.script


def run_script(tmp_path: Path, script: Script) -> tuple[list[str], Path]:
    """Run *script* with the ``none`` target; its output lines and the temp dir it built in."""
    path = tmp_path / "repro.py"
    path.write_text(script.render())
    temp = tmp_path / "temp"
    temp.mkdir()
    done = subprocess.run([sys.executable, str(path), "none"], capture_output=True, text=True,
                          env={**os.environ, "TMPDIR": str(temp)}, check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    (built,) = temp.iterdir()
    return done.stdout.splitlines(), built


def test_script_runs_every_step_and_prints_its_outcome(tmp_path: Path) -> None:
    script = sample(tmp_path)
    script.layers = [layer_statements(level, plan_layer(spec))
                     for level, spec in enumerate(UNPRIVILEGED)]
    lines, _ = run_script(tmp_path, script)
    steps = [line for line in lines if re.match(r"\d+ ", line)]
    assert [int(line.split()[0]) for line in steps] == list(range(1, len(script.steps) + 1))
    outcome = {line.split(": ")[0].split(" ", 1)[1]: line.split(": ", 1)[1] for line in steps}
    assert outcome["mkdir d"] == "ok"
    assert outcome["pwrite d/n"] == "ok 5120"
    # chown dropped the setuid bit; d/n and d/a are one file
    assert outcome["fstat fd 1"] == f"ok ('0o100755', 2, {os.geteuid()}, {os.getegid()}, 10)"
    assert outcome["unlink d/x/n"] == "ENOENT"
    assert outcome["rmdir e"] == "ENOTDIR"  # e is the symlink the exchange put there
    assert outcome["read d/a"] == "ok b'\\x00x\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00'"
    assert outcome["listdir "] == "ok [b'a', b'd', b'e']"
    assert outcome["closedir 2"].startswith("ok [")
    pairs = [(line.split(": ")[0].split(" ", 1)[1], line.split(": ", 1)[1]) for line in steps]
    assert [v for k, v in pairs if k == "getxattr d/n"] == ["ok b'1'", "ENODATA"]
    assert any(line.startswith("  d/a: -rw-------") for line in lines), lines  # the tree


@pytest.mark.parametrize("specs", [
    pytest.param(UNPRIVILEGED, id="unprivileged"),
    pytest.param(PRIVILEGED, id="privileged", marks=needs_root),
])
def test_script_builds_the_layers_the_fuzzer_built(tmp_path: Path,
                                                   specs: list[tuple[str, ...]]) -> None:
    layers = [layer_statements(level, plan_layer(spec)) for level, spec in enumerate(specs)]
    for level, statements in enumerate(layers):
        build_layer(tmp_path / f"fuzzer{level}", statements)
    _, built = run_script(tmp_path, Script(layers=layers))
    for level in range(len(layers)):
        a, b = snapshot(tmp_path / f"fuzzer{level}"), snapshot(built / f"l{level}")
        assert a[b"."].names, "an empty layer proves nothing"
        assert diff_snapshots(a, b) == []


def test_statement_spelling() -> None:
    assert path_at("M", "") == "M"
    assert path_at("M", "d/n") == "M + b'/d/n'"
    assert open_flags(os.O_RDWR | os.O_CREAT | os.O_NONBLOCK) == \
        "os.O_RDWR | os.O_CREAT | os.O_NONBLOCK"
    assert open_flags(os.O_RDONLY | os.O_DIRECTORY) == "os.O_RDONLY | os.O_DIRECTORY"
    for flags in (os.O_WRONLY | os.O_TRUNC | os.O_APPEND, os.O_RDONLY | os.O_CLOEXEC):
        assert eval(open_flags(flags), {"os": os}) == flags


def test_readdir_problems_holds_a_listing_to_what_posix_promises() -> None:
    before = {b"a": 1, b"b": 2, b"c": 3}
    after = {b"a": 1, b"c": 9, b"n": 4}  # b removed, c replaced, n added: all may or may not show
    dots = [b".", b".."]
    assert readdir_problems([*dots, b"a"], [before, after]) == []
    assert readdir_problems([*dots, b"a", b"b", b"c", b"c", b"n"], [before, after]) == []
    assert readdir_problems([*dots], [before, after]) == ["b'a' given 0 times"]
    assert readdir_problems([*dots, b"a", b"a"], [before, after]) == ["b'a' given 2 times"]
    assert readdir_problems([b".", b"a"], [before, after]) == ["b'..' given 0 times"]
    assert readdir_problems([*dots, b"a", b"z"], [before, after]) == ["b'z' given, never there"]
    assert readdir_problems([], [before, None]) == []  # the directory is gone: nothing promised


def test_listing_of_a_removed_directory_is_none(tmp_path: Path) -> None:
    """A directory removed while open still opens through /proc and lists as empty (no "."
    or ".." either): listing must say it is gone, or readdir_problems holds that empty read to
    what the directory promised (the soak with seed 20261202 failed on the kernel that way)."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d/x").write_bytes(b"")
    fd = os.open(tmp_path / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert listing(fd) == {b"x": os.stat(tmp_path / "d/x").st_ino}
        os.unlink(tmp_path / "d/x")
        os.rmdir(tmp_path / "d")
        assert os.listdir(f"/proc/self/fd/{fd}") == []
        assert listing(fd) is None
    finally:
        os.close(fd)
