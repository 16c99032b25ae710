"""A fuzz of the options parser, its validation and the command line (issue 8): whatever the
input, the only failure is a clean usage error, one line long, never another exception.

Inputs mix real directories (so that validation gets past the stat calls), paths that are
files, symlinks or missing, and arbitrary text: NULs, newlines, escapes, quotes, lone
surrogates. Nothing is mounted or unmounted: the daemon's entry points and fusermount3 are
replaced by fakes that record the call.
"""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlayd import cli, daemon
from overlayd.errors import UsageError
from overlayd.options import MountOptions, parse_options, validate


@dataclass(frozen=True)
class Pool:
    """Paths the fuzz draws from; *cwd* is where relative paths (a --log FILE) land."""

    paths: tuple[str, ...]
    cwd: Path
    config: Path


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Pool:
    top = tmp_path_factory.mktemp("fuzz")
    for name in ("l1/sub", "l2", "u", "w/work", "w2", "mnt", "cwd/a/b/c"):
        (top / name).mkdir(parents=True)
    (top / "file").write_bytes(b"")
    (top / "w2" / "work").write_bytes(b"")  # work/ that is a file
    (top / "link").symlink_to(top / "l1")
    paths = tuple(str(top / name) for name in (
        "l1", "l2", "l1/sub", "u", "w", "w2", "mnt", "file", "link", "missing", "u/inner"))
    return Pool(paths, top / "cwd" / "a" / "b" / "c", top / "fuzz.conf")


# Characters that matter to the parsers, and any character at all (surrogates included).
SPECIAL = st.sampled_from(list("/:,\\=\"'\0\n\t -.#x"))
ANY_CHAR = st.one_of(SPECIAL, SPECIAL, SPECIAL, st.characters(),
                     st.characters(categories=["Cs"]))
TEXT = st.text(ANY_CHAR, max_size=12)
# What a path may hold that a C string, a one-line message or an encoder chokes on.
NASTY = st.sampled_from(["\0", "\n", "\ud800", "\udcff", "\r", "\x1b[2J"])
# Relative text only where the command line could create a file (--log): no "/".
NO_SLASH = st.text(ANY_CHAR.filter(lambda c: c != "/"), max_size=12)

KNOWN = st.sampled_from([
    "ro", "rw", "volatile", "fsync=0", "fsync=1", "redirect_dir=on", "redirect_dir=nofollow",
    "xino=auto", "index=off", "nodev", "suid", "static_nlink", "allow_other", "x-systemd.a",
    'context="system_u:object_r:container_file_t:s0:c1,c2"', "fsname=ov", "noacl", "",
])
NEAR_MISS = st.sampled_from([
    "redirect_dir=maybe", "index=on", "uidmapping=0:1:1", "userxattr", "fsync=2", "bogus",
    "lowerdir", "upperdir=", "workdir=", "lowerdir=", "ro=1", "fsname",
])


def option_strings(pool: Pool) -> st.SearchStrategy[list[str]]:
    """Mostly well-formed items around real and near-real paths (so that validation runs),
    some near misses, a little arbitrary text."""
    real = st.sampled_from(pool.paths)
    path = st.one_of(real, real, real, st.tuples(real, TEXT).map("".join),
                     st.tuples(real, NASTY, TEXT).map("".join), TEXT)
    escaped = path.map(lambda p: p.replace("\\", "\\\\").replace(":", "\\:")
                       .replace(",", "\\,"))
    lower = st.lists(st.one_of(path, escaped), min_size=1, max_size=4).map(
        lambda ps: "lowerdir=" + ":".join(ps))
    upper_work = st.tuples(st.one_of(path, escaped), st.one_of(path, escaped)).map(
        lambda uw: f"upperdir={uw[0]},workdir={uw[1]}")
    layer = st.one_of(lower, upper_work, st.tuples(
        st.sampled_from(["upperdir=", "workdir="]), st.one_of(path, escaped)).map("".join))
    # Most strings name a lower layer, half of them an upper and workdir too: validate runs.
    clean = st.tuples(lower, st.lists(st.one_of(upper_work, KNOWN), max_size=3)).map(
        lambda items: [items[0], *items[1]])
    noisy = st.lists(st.one_of(layer, KNOWN, NEAR_MISS, TEXT), max_size=6)
    return st.lists(st.one_of(clean, clean, noisy).map(",".join), min_size=1, max_size=3)


def assert_clean(message: str) -> None:
    assert message
    assert "\n" not in message
    assert "Traceback" not in message


@given(data=st.data())
@settings(deadline=None, max_examples=300)
def test_parse_and_validate_raise_only_usage_errors(pool: Pool, data: st.DataObject) -> None:
    strings = data.draw(option_strings(pool))
    mountpoint = data.draw(st.sampled_from(pool.paths).map(os.fsencode))
    try:
        opts = parse_options(strings)
        validate(opts, mountpoint)
    except UsageError as e:
        assert_clean(str(e))
        return
    assert isinstance(opts, MountOptions)


@dataclass
class Calls:
    mounts: list[tuple[MountOptions, bytes]]
    fusermounts: list[str]


@contextlib.contextmanager
def fake_world(pool: Pool) -> Iterator[tuple[Calls, io.StringIO, io.StringIO]]:
    """main() with the daemon and fusermount3 replaced by recorders, its output captured,
    and relative paths under the pool's scratch directory."""
    calls = Calls([], [])

    def run(opts: MountOptions, mountpoint: bytes, debug: bool, log_file: str | None) -> int:
        calls.mounts.append((opts, mountpoint))
        return 0

    def fusermount(flag: str, mountpoint: bytes) -> subprocess.CompletedProcess[str]:
        calls.fusermounts.append(flag)
        return subprocess.CompletedProcess([], 1, "", "fusermount3: fake\n")

    out, err = io.StringIO(), io.StringIO()
    with mock.patch.object(daemon, "run_daemon", run), \
            mock.patch.object(daemon, "run_foreground", run), \
            mock.patch.object(cli, "_fusermount", fusermount), \
            contextlib.chdir(pool.cwd), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        yield calls, out, err


def check_main(pool: Pool, argv: list[str]) -> None:
    with fake_world(pool) as (calls, _, err):
        code = cli.main(argv)
    if code == 0:
        assert err.getvalue() == ""
        for opts, mountpoint in calls.mounts:  # only what validate accepted reaches here
            validate(opts, mountpoint)
            assert os.path.isabs(mountpoint)
    else:
        assert code in (1, 2), code
        lines = err.getvalue().splitlines()
        assert len(lines) == 1, err.getvalue()
        assert lines[0].startswith("overlayd: ")
        assert_clean(lines[0])


FLAGS = st.sampled_from(["mount", "umount", "status", "-f", "-d", "--json", "-o", "--log",
                         "--config", "--", "-h", "-V", "-x", "--foreground", "-"])


@given(data=st.data())
@settings(deadline=None, max_examples=300)
def test_command_line_fails_only_with_a_usage_error(pool: Pool, data: st.DataObject) -> None:
    options = option_strings(pool).map(",".join)
    arg = st.one_of(
        FLAGS, FLAGS, st.sampled_from(pool.paths), options, options.map("-o".__add__),
        NO_SLASH, NO_SLASH.map("--log=".__add__),
        st.sampled_from(pool.paths).map("--config=".__add__))
    check_main(pool, data.draw(st.lists(arg, max_size=8)))


@given(data=st.data())
@settings(deadline=None, max_examples=500)
def test_config_file_fails_only_with_a_usage_error(pool: Pool, data: st.DataObject) -> None:
    options = option_strings(pool).map(",".join)
    quoted = st.sampled_from([shlex.quote, shlex.quote, shlex.quote, str])
    real = st.sampled_from(pool.paths)
    path = st.one_of(real, st.tuples(real, TEXT).map("".join),
                     st.tuples(real, NASTY, TEXT).map("".join), TEXT)
    mountpoint = st.tuples(quoted, path).map(lambda qv: "MOUNTPOINT=" + qv[0](qv[1]))
    options_line = st.tuples(quoted, options).map(lambda qv: "OPTIONS=" + qv[0](qv[1]))
    # A LOG file is created: only under the pool.
    log_line = st.tuples(quoted, st.tuples(real, NO_SLASH).map("".join)).map(
        lambda qv: "LOG=" + qv[0](qv[1]))
    other = st.one_of(
        st.tuples(st.sampled_from(["MOUNTPOINT", "OPTIONS", "LOG", "OTHER", ""]),
                  st.sampled_from(["=", "= ", " ="]), TEXT).map("".join),
        TEXT, st.just("# a comment"), st.just(""))
    lines = st.tuples(
        st.one_of(mountpoint, mountpoint, mountpoint, other),
        st.one_of(options_line, options_line, options_line, other),
        st.lists(st.one_of(log_line, log_line, other), max_size=2)).map(
            lambda t: [t[0], t[1], *t[2]])
    text = data.draw(lines.map("\n".join))
    try:
        pool.config.write_text(text, encoding="utf-8", errors="surrogateescape")
    except UnicodeEncodeError:
        pool.config.write_bytes(text.encode("utf-8", errors="replace"))
    for action in ("mount", "umount"):
        check_main(pool, [action, "--config", str(pool.config)])
