"""Tier 1: the command line. parse_argv's forms, and main()'s one-line errors on bad input.

Every input given to main() here is bad: nothing may ever be mounted. A fixture replaces the daemon
module and subprocess.run with fakes that fail the test, should a check ever let one through.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tempfile
import types
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

import overlayd
from overlayd import __version__, cli
from overlayd.cli import Command, main, parse_argv
from overlayd.errors import UsageError


@pytest.fixture(autouse=True)
def never_mount(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> NoReturn:
        raise AssertionError(f"a bad input reached mount/umount: {args!r}")

    fake = types.ModuleType("overlayd.daemon")
    fake.run_foreground = refuse  # type: ignore[attr-defined]
    fake.run_daemon = refuse  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "overlayd.daemon", fake)
    monkeypatch.setattr(overlayd, "daemon", fake, raising=False)
    monkeypatch.setattr(subprocess, "run", refuse)


# --- parse_argv -----------------------------------------------------------------------------


def test_mount_subcommand() -> None:
    assert parse_argv(["mount", "-f", "-d", "-o", "lowerdir=/l", "/mnt"]) == Command(
        "mount", ["lowerdir=/l"], ["/mnt"], foreground=True, debug=True)


def test_long_flags() -> None:
    cmd = parse_argv(["mount", "--foreground", "--debug", "-o", "lowerdir=/l", "/mnt"])
    assert cmd.foreground
    assert cmd.debug


def test_fuse_overlayfs_form() -> None:
    assert parse_argv(["-o", "lowerdir=/l,upperdir=/u,workdir=/w", "/merged"]) == Command(
        "mount", ["lowerdir=/l,upperdir=/u,workdir=/w"], ["/merged"])


def test_mount_fuse3_helper_form() -> None:
    cmd = parse_argv(["overlayd", "/mnt", "-o", "rw,lowerdir=/l,dev,suid"])
    assert cmd == Command("mount", ["rw,lowerdir=/l,dev,suid"], ["overlayd", "/mnt"])
    assert cli._mountpoint(cmd) == b"/mnt"


def test_mountpoint_made_absolute(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli._mountpoint(parse_argv(["-o", "x", "mnt"])) == os.fsencode(tmp_path / "mnt")


def test_glued_option() -> None:
    assert parse_argv(["-olowerdir=/l", "-oro", "/mnt"]).options == ["lowerdir=/l", "ro"]


def test_several_o_options_kept_in_order() -> None:
    cmd = parse_argv(["-o", "lowerdir=/l", "/mnt", "-o", "ro"])
    assert cmd.options == ["lowerdir=/l", "ro"]
    assert cmd.positionals == ["/mnt"]


@pytest.mark.parametrize("argv", [
    ["--log", "/var/log/o.log", "-o", "x", "/mnt"],
    ["--log=/var/log/o.log", "-o", "x", "/mnt"],
])
def test_log_file(argv: list[str]) -> None:
    cmd = parse_argv(argv)
    assert cmd.log_file == "/var/log/o.log"
    assert cmd.positionals == ["/mnt"]
    assert cmd.options == ["x"]


def test_umount() -> None:
    assert parse_argv(["umount", "/mnt"]) == Command("umount", [], ["/mnt"])


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag: str) -> None:
    assert parse_argv([flag]).action == "version"
    assert parse_argv(["mount", "-o", "x", flag, "/mnt"]).action == "version"


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help(flag: str) -> None:
    assert parse_argv([flag]).action == "help"


def test_double_dash_ends_flags() -> None:
    assert parse_argv(["-o", "x", "--", "-weird"]).positionals == ["-weird"]


@pytest.mark.parametrize("flag", ["-x", "--bogus", "--log-file=x", "-fd"])
def test_unknown_flag(flag: str) -> None:
    with pytest.raises(UsageError, match=f"^unknown flag {re.escape(repr(flag))}$"):
        parse_argv(["-o", "x", flag, "/mnt"])


@pytest.mark.parametrize("flag", ["-o", "--log"])
def test_flag_without_value(flag: str) -> None:
    with pytest.raises(UsageError, match=f"^{re.escape(flag)} needs a value$"):
        parse_argv(["/mnt", flag])


def test_too_many_positionals() -> None:
    with pytest.raises(UsageError, match=r"^too many arguments: a b c$"):
        cli._mountpoint(parse_argv(["a", "b", "c"]))


# --- main: one line on stderr, exit 2, no traceback ----------------------------------------


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="overlayd-test-") as d:
        yield Path(d)


def run_main(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str],
                          message: str) -> None:
    rc, out, err = run_main(capsys, argv)
    assert (rc, out, err) == (2, "", f"overlayd: {message}\n")
    assert "Traceback" not in err


def test_main_missing_lowerdir(capsys: pytest.CaptureFixture[str], stack: dict[str, Path]) -> None:
    assert_one_line_error(capsys, ["-o", f"upperdir={stack['upper']},workdir={stack['work']}",
                                   str(stack["mnt"])], "missing lowerdir= option")


def test_main_missing_layer(capsys: pytest.CaptureFixture[str], stack: dict[str, Path]) -> None:
    missing = stack["lower1"] / "nope"
    assert_one_line_error(capsys, ["mount", "-o", f"lowerdir={missing}", str(stack["mnt"])],
                          f"lowerdir {missing}: No such file or directory")


def test_main_upperdir_without_workdir(capsys: pytest.CaptureFixture[str],
                                       stack: dict[str, Path]) -> None:
    assert_one_line_error(
        capsys, ["-o", f"lowerdir={stack['lower1']},upperdir={stack['upper']}", str(stack["mnt"])],
        "upperdir= needs workdir=")


def test_main_workdir_on_other_filesystem(capsys: pytest.CaptureFixture[str],
                                          stack: dict[str, Path], shm_dir: Path) -> None:
    if os.stat(shm_dir).st_dev == os.stat(stack["upper"]).st_dev:
        pytest.skip("/dev/shm is on the same filesystem as tmp_path")
    options = f"lowerdir={stack['lower1']},upperdir={stack['upper']},workdir={shm_dir}"
    assert_one_line_error(capsys, ["-o", options, str(stack["mnt"])],
                          "workdir and upperdir must be on the same filesystem")


def test_main_workdir_inside_upperdir(capsys: pytest.CaptureFixture[str],
                                      stack: dict[str, Path]) -> None:
    work = stack["upper"] / "w"
    work.mkdir()
    options = f"lowerdir={stack['lower1']},upperdir={stack['upper']},workdir={work}"
    assert_one_line_error(capsys, ["-o", options, str(stack["mnt"])],
                          "workdir and upperdir must be separate subtrees")


def test_main_mountpoint_inside_layer(capsys: pytest.CaptureFixture[str],
                                      stack: dict[str, Path]) -> None:
    mnt = stack["lower2"] / "m"
    mnt.mkdir()
    assert_one_line_error(
        capsys, ["-o", f"lowerdir={stack['lower1']}:{stack['lower2']}", str(mnt)],
        f"mountpoint {mnt} is inside lowerdir {stack['lower2']}")


def test_main_unknown_option(capsys: pytest.CaptureFixture[str], stack: dict[str, Path]) -> None:
    assert_one_line_error(capsys, ["-o", f"lowerdir={stack['lower1']},nodevv", str(stack["mnt"])],
                          "unknown option 'nodevv'")


def test_main_missing_mountpoint(capsys: pytest.CaptureFixture[str],
                                 stack: dict[str, Path]) -> None:
    assert_one_line_error(capsys, ["mount", "-o", f"lowerdir={stack['lower1']}"],
                          "missing mountpoint")


def test_main_nonexistent_mountpoint(capsys: pytest.CaptureFixture[str],
                                     stack: dict[str, Path]) -> None:
    mnt = stack["mnt"] / "nope"
    assert_one_line_error(capsys, ["-o", f"lowerdir={stack['lower1']}", str(mnt)],
                          f"mountpoint {mnt}: No such file or directory")


def test_main_umount_not_mounted(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert_one_line_error(capsys, ["umount", str(tmp_path)], f"{tmp_path}: not mounted")


def test_main_umount_not_overlayd(capsys: pytest.CaptureFixture[str]) -> None:
    if cli.mount_fstype(b"/proc") != "proc":
        pytest.skip("/proc is not a proc mount here")
    assert_one_line_error(capsys, ["umount", "/proc"], "/proc: not an overlayd mount (proc)")


def test_main_umount_needs_one_mountpoint(capsys: pytest.CaptureFixture[str]) -> None:
    assert_one_line_error(capsys, ["umount"], "umount takes exactly one MOUNTPOINT")
    assert_one_line_error(capsys, ["umount", "/a", "/b"], "umount takes exactly one MOUNTPOINT")


def test_main_unknown_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert_one_line_error(capsys, ["--frobnicate"], "unknown flag '--frobnicate'")


MOUNTINFO_WITH_EURO = (
    "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
    "90 22 0:50 / /srv/caf\u00e9\u20ac rw,relatime shared:2 - tmpfs tmpfs rw\n"
    "91 22 0:51 / /srv/with\\040space rw,relatime shared:3 - fuse.overlayd overlayd rw\n"
)


def fake_mountinfo(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_open(path: str, *args: object, **kwargs: object) -> io.BytesIO:
        assert path == "/proc/self/mountinfo"
        return io.BytesIO(MOUNTINFO_WITH_EURO.encode())

    monkeypatch.setattr(cli, "open", fake_open, raising=False)


def test_umount_with_non_latin1_mount_elsewhere(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    fake_mountinfo(monkeypatch)
    assert_one_line_error(capsys, ["umount", "/srv/elsewhere"], "/srv/elsewhere: not mounted")


def test_mount_fstype_reads_escaped_and_non_latin1_points(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_mountinfo(monkeypatch)
    assert cli.mount_fstype(b"/srv/with space") == "fuse.overlayd"
    assert cli.mount_fstype(os.fsencode("/srv/caf\u00e9\u20ac")) == "tmpfs"


def test_main_version(capsys: pytest.CaptureFixture[str]) -> None:
    binding = cli.binding_version()
    assert run_main(capsys, ["--version"]) == (0, f"overlayd {__version__}\n{binding}\n", "")
    # scripts/setup builds the patched binding: a stock one here means the setup went wrong.
    assert binding.endswith("(overlayd's patch: dont_mask, fallocate, killpriv_v2, "
                            "opendir_fileinfo, passthrough, setxattr_flags, sole_reader, "
                            "write_flags)")


def test_main_help(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run_main(capsys, ["--help"])
    assert (rc, err) == (0, "")
    assert out == cli.USAGE
    assert out.startswith("usage: overlayd mount ")


# --- issue 8: more bad input, each one line naming the problem ---------------------------------


def test_main_layer_given_twice(capsys: pytest.CaptureFixture[str],
                                stack: dict[str, Path]) -> None:
    l1, l2 = stack["lower1"], stack["lower2"]
    assert_one_line_error(capsys, ["-o", f"lowerdir={l1}:{l2}:{l1}", str(stack["mnt"])],
                          f"lowerdir {l1} is given twice")
    assert_one_line_error(capsys, ["-o", f"lowerdir={l1}:{l1}/", str(stack["mnt"])],
                          f"lowerdir {l1}/ is given twice (as {l1} before)")


def test_main_nested_layers(capsys: pytest.CaptureFixture[str], stack: dict[str, Path]) -> None:
    inner = stack["lower1"] / "sub"
    inner.mkdir()
    assert_one_line_error(capsys, ["-o", f"lowerdir={stack['lower1']}:{inner}", str(stack["mnt"])],
                          f"lowerdir {inner} overlaps lowerdir {stack['lower1']}")


def test_main_work_subdir_not_a_directory(capsys: pytest.CaptureFixture[str],
                                          stack: dict[str, Path]) -> None:
    (stack["work"] / "work").write_bytes(b"")
    options = f"lowerdir={stack['lower1']},upperdir={stack['upper']},workdir={stack['work']}"
    assert_one_line_error(capsys, ["-o", options, str(stack["mnt"])],
                          f"workdir {stack['work']}: {stack['work'] / 'work'} is not a directory "
                          "(remove it)")


def test_main_log_file_cannot_be_opened(capsys: pytest.CaptureFixture[str],
                                        stack: dict[str, Path]) -> None:
    log = stack["mnt"] / "no" / "log"
    assert_one_line_error(capsys, ["mount", "--log", str(log), "-o",
                                   f"lowerdir={stack['lower1']}", str(stack["mnt"])],
                          f"--log {log}: No such file or directory")


def test_main_path_with_a_newline_stays_one_line(capsys: pytest.CaptureFixture[str],
                                                 stack: dict[str, Path]) -> None:
    missing = f"{stack['lower1']}/a\nb"
    assert_one_line_error(capsys, ["-o", f"lowerdir={missing}", str(stack["mnt"])],
                          f"lowerdir {missing!r}: No such file or directory")


def test_main_nul_and_surrogates(capsys: pytest.CaptureFixture[str],
                                 stack: dict[str, Path]) -> None:
    """Neither reaches main() from argv; a --config file or a caller of main() may pass them."""
    lower = f"lowerdir={stack['lower1']}"
    assert_one_line_error(capsys, ["-o", lower, "/tmp/a\0b"],
                          "mountpoint '/tmp/a\\x00b' contains a NUL character")
    with_nul = f"{stack['lower1']}\0x"
    assert_one_line_error(capsys, ["-o", f"lowerdir={with_nul}", str(stack["mnt"])],
                          f"lowerdir {with_nul!r}: contains a NUL character")
    assert_one_line_error(capsys, ["-o", lower, "/tmp/\ud800"],
                          "mountpoint '/tmp/\\ud800' is not a valid path")
    assert_one_line_error(capsys, ["-o", "lowerdir=/tmp/\ud800", str(stack["mnt"])],
                          "lowerdir '/tmp/\\ud800' is not a valid path")


def test_layer_command_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """`overlayd diff ... | head -1`: exit 141 (as a tool killed by SIGPIPE), nothing on
    stderr."""
    for i in range(20000):
        (tmp_path / f"f{i:05}").write_bytes(b"")
    proc = subprocess.Popen([sys.executable, "-m", "overlayd", "diff", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"A /f00000\n"
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 141
    assert err == b""
