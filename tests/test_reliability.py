"""Reliability: bad mount input, faults inside handlers and in the layers, a full upper
filesystem, and concurrent load (issue 8).

Faults are injected without hooks in the daemon: a small wrapper script, written by the test,
patches overlayd (an Overlay method, or ``os.open`` for one file name) and then runs overlayd's
own ``main`` in the foreground. Every mount and tmpfs is undone in ``finally``; every wait is
bounded; the only processes ever signalled are the ones a test started.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import needs_fuse, needs_kernel_overlay, needs_root
from tests.mounting import (
    KERNEL_PINNED,
    command_mounted,
    kernel_mounted,
    mount_fstype,
    overlay_options,
    overlayd_argv,
    overlayd_mounted,
    poll,
    processes_mentioning,
)
from tests.rootless import dev_fuse_mode, rootless
from tests.rootless import why_not as rootless_why_not

pytestmark = [pytest.mark.mounted]

TEMP_PREFIX = "#overlayd."  # copyup.TEMP_PREFIX
RUN_TIMEOUT = 60


def writable(stack: dict[str, Path], *extra: str) -> str:
    return ",".join([overlay_options([stack["lower1"], stack["lower2"]], stack["upper"],
                                     stack["work"]), *extra])


def errname(fn: Callable[[], object]) -> str:
    """"ok", or the errno's name of the OSError *fn* raised."""
    try:
        fn()
    except OSError as e:
        return "OSError without errno" if e.errno is None else errno.errorcode[e.errno]
    return "ok"


def mounts_at(path: Path) -> int:
    """How many mounts are stacked exactly at *path*."""
    target = os.fsencode(os.path.realpath(path))
    count = 0
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            point = line.split()[4]
            if point.replace(b"\\040", b" ") == target:
                count += 1
    return count


def work_leftovers(work: Path) -> list[str]:
    return sorted(os.listdir(work / "work"))


# --- bad mount input: one line, non-zero exit, nothing mounted, no daemon left -------------------


def run_overlayd(mnt: Path, *args: str,
                 prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """Run an overlayd command expected to fail at *mnt*. Should it mount after all (the bug
    a test looks for), the new mount is unmounted and the daemon it started waited for, so
    that a failing test leaves nothing behind."""
    mounted_before = mounts_at(mnt)
    daemons_before = processes_mentioning(str(mnt))
    argv = [*prefix, *overlayd_argv(*args)]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        # The foreground form never exits once it has mounted: watch for either.
        poll(lambda: proc.poll() is not None or mounts_at(mnt) > mounted_before,
             RUN_TIMEOUT, f"{argv} to exit")
    finally:
        for flag in ("-u", "-uz"):  # only the mount on top: the one this command made
            if mounts_at(mnt) > mounted_before:
                subprocess.run(["fusermount3", flag, str(mnt)], check=False,
                               timeout=RUN_TIMEOUT, capture_output=True)
        if mounts_at(mnt) == mounted_before and proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=RUN_TIMEOUT)  # a foreground daemon leaves once unmounted
        if processes_mentioning(str(mnt)) > daemons_before:
            with contextlib.suppress(TimeoutError):
                poll(lambda: processes_mentioning(str(mnt)) <= daemons_before, 10,
                     "the daemon to leave")
            for pid in processes_mentioning(str(mnt)) - daemons_before:  # started by us
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        if proc.poll() is None:
            proc.kill()
        out, err = proc.communicate(timeout=RUN_TIMEOUT)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def assert_refused(proc: subprocess.CompletedProcess[str], mnt: Path, *words: str,
                   code: int = 2, mounts_before: int = 0,
                   daemons_before: frozenset[int] = frozenset()) -> str:
    """Exit *code*, one line on stderr naming the problem, nothing new mounted or running."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == code, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("overlayd: "), proc.stderr
    for word in words:
        assert word in lines[0], proc.stderr
    assert proc.stdout == ""
    assert mounts_at(mnt) == mounts_before
    assert processes_mentioning(str(mnt)) == set(daemons_before)
    return lines[0]


FORMS = [pytest.param(("mount",), id="daemon"), pytest.param(("mount", "-f"), id="foreground"),
         pytest.param((), id="fuse-overlayfs-form")]


def bad_layers(stack: dict[str, Path], tmp_path: Path, case: str) -> tuple[str, tuple[str, ...]]:
    """The -o string of a bad-input case, and the words its error must hold."""
    l1, l2, up, wk = stack["lower1"], stack["lower2"], stack["upper"], stack["work"]
    if case == "layer-twice":
        return f"lowerdir={l1}:{l2}:{l1}", ("lowerdir", str(l1), "given twice")
    if case == "layer-twice-through-symlink":
        (tmp_path / "alias").symlink_to(l1)
        return (f"lowerdir={l1}:{tmp_path / 'alias'}",
                ("lowerdir", str(tmp_path / "alias"), "given twice", str(l1)))
    if case == "nested-layers":
        (l1 / "sub").mkdir()
        return f"lowerdir={l1 / 'sub'}:{l1}", ("lowerdir", str(l1 / "sub"), "overlaps")
    if case == "empty-element":
        return f"lowerdir={l1}::{l2}", ("lowerdir", "empty element")
    if case == "trailing-colon":
        return f"lowerdir={l1}:", ("lowerdir", "empty element")
    if case == "501-layers":
        many = []
        for i in range(501):
            (tmp_path / "many" / str(i)).mkdir(parents=True)
            many.append(str(tmp_path / "many" / str(i)))
        return "lowerdir=" + ":".join(many), ("too many layers", "501", "500")
    if case == "missing-layer":
        return f"lowerdir={l1}:{tmp_path / 'nope'}", ("lowerdir", "No such file or directory")
    if case == "layer-is-a-file":
        (tmp_path / "file").write_bytes(b"")
        return f"lowerdir={tmp_path / 'file'}", ("lowerdir", "not a directory")
    if case == "upper-without-work":
        return f"lowerdir={l1},upperdir={up}", ("upperdir= needs workdir=",)
    if case == "work-inside-upper":
        (up / "w").mkdir()
        return f"lowerdir={l1},upperdir={up},workdir={up / 'w'}", ("separate subtrees",)
    if case == "upper-is-a-lower":
        return f"lowerdir={l1},upperdir={l1},workdir={wk}", ("upperdir overlaps lowerdir",)
    if case == "work-subdir-is-a-file":
        (wk / "work").write_bytes(b"garbage")
        return (f"lowerdir={l1},upperdir={up},workdir={wk}",
                ("workdir", str(wk / "work"), "not a directory"))
    if case == "unknown-option":
        return f"lowerdir={l1},redirectdir=on", ("unknown option", "redirectdir=on")
    if case == "not-supported-yet":
        return f"lowerdir={l1},ino32_t", ("ino32_t", "not supported")
    raise AssertionError(case)


BAD_LAYERS = ["layer-twice", "layer-twice-through-symlink", "nested-layers", "empty-element",
              "trailing-colon", "501-layers", "missing-layer", "layer-is-a-file",
              "upper-without-work", "work-inside-upper", "upper-is-a-lower",
              "work-subdir-is-a-file", "unknown-option", "not-supported-yet"]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case", BAD_LAYERS)
def test_bad_layers_refused(stack: dict[str, Path], tmp_path: Path, case: str,
                            form: tuple[str, ...]) -> None:
    options, words = bad_layers(stack, tmp_path, case)
    proc = run_overlayd(stack["mnt"], *form, "-o", options, str(stack["mnt"]))
    assert_refused(proc, stack["mnt"], *words)


@needs_kernel_overlay
@pytest.mark.parametrize("case", ["layer-twice", "layer-twice-through-symlink", "nested-layers",
                                  "501-layers"])
def test_bad_layers_refused_by_the_kernel_too(stack: dict[str, Path], tmp_path: Path,
                                              case: str) -> None:
    """The layer checks are the kernel's: it refuses the same stacks (ELOOP, EINVAL)."""
    options, _ = bad_layers(stack, tmp_path, case)
    proc = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options,
                           str(stack["mnt"])], capture_output=True, text=True, check=False,
                          timeout=RUN_TIMEOUT)
    try:
        assert proc.returncode != 0, "the kernel mounted it"
    finally:
        if mount_fstype(stack["mnt"]) == "overlay":
            subprocess.run(["umount", str(stack["mnt"])], check=False)


@needs_fuse
def test_500_layers_mount(stack: dict[str, Path], tmp_path: Path) -> None:
    """The kernel's limit is 500 lower layers: 500 mount and merge."""
    many = []
    for i in range(500):
        layer = tmp_path / "many" / str(i)
        layer.mkdir(parents=True)
        (layer / f"f{i}").write_bytes(b"%d" % i)
        many.append(layer)
    (many[-1] / "f0").write_bytes(b"hidden")
    with overlayd_mounted(stack["mnt"], overlay_options(many)):
        names = os.listdir(stack["mnt"])
        assert len(names) == 500
        assert (stack["mnt"] / "f499").read_bytes() == b"499"
        assert (stack["mnt"] / "f0").read_bytes() == b"0"


@pytest.mark.parametrize("form", FORMS)
def test_bad_mountpoint_and_log(stack: dict[str, Path], tmp_path: Path,
                                form: tuple[str, ...]) -> None:
    lower = f"lowerdir={stack['lower1']}"
    (tmp_path / "file").write_bytes(b"")
    for mnt, args, words in [
        (tmp_path / "file", (), ("mountpoint", "not a directory")),
        (tmp_path / "absent", (), ("mountpoint", "No such file or directory")),
        (stack["lower1"], (), ("inside lowerdir",)),
        (stack["mnt"], ("--log", str(tmp_path / "no" / "log")), ("--log", "No such file")),
    ]:
        proc = run_overlayd(mnt, *form, *args, "-o", lower, str(mnt))
        assert_refused(proc, mnt, *words)


def test_config_file_with_a_nul(stack: dict[str, Path], tmp_path: Path) -> None:
    """A NUL cannot come from argv, but can from a --config file: still a clean usage error."""
    config = tmp_path / "nul.conf"
    for text in (f"MOUNTPOINT={stack['mnt']}\0x\nOPTIONS=lowerdir={stack['lower1']}\n",
                 f"MOUNTPOINT={stack['mnt']}\nOPTIONS=lowerdir={stack['lower1']}\0x\n"):
        config.write_text(text)
        proc = run_overlayd(stack["mnt"], "mount", "--config", str(config))
        assert_refused(proc, stack["mnt"], "NUL")


@needs_fuse
@pytest.mark.parametrize("form", FORMS)
def test_mountpoint_already_an_overlayd_mount(stack: dict[str, Path],
                                              form: tuple[str, ...]) -> None:
    mnt = stack["mnt"]
    (stack["lower1"] / "f").write_bytes(b"first")
    with overlayd_mounted(mnt, writable(stack)) as daemon:
        daemons = frozenset({daemon.proc.pid})
        proc = run_overlayd(mnt, *form, "-o", f"lowerdir={stack['lower2']}", str(mnt))
        assert_refused(proc, mnt, str(mnt), "already an overlayd mount", mounts_before=1,
                       daemons_before=daemons)
        assert (mnt / "f").read_bytes() == b"first"


@needs_fuse
def test_mountpoint_is_a_dead_overlayd_mount(stack: dict[str, Path]) -> None:
    """After a kill -9 the mount answers ENOTCONN: the error still names the real problem
    (and says what to do), rather than the mountpoint's stat failing."""
    mnt = stack["mnt"]
    with overlayd_mounted(mnt, writable(stack)) as daemon:
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait(timeout=RUN_TIMEOUT)
        proc = run_overlayd(mnt, "mount", "-o", writable(stack), str(mnt))
        assert_refused(proc, mnt, "already an overlayd mount", "overlayd umount",
                       mounts_before=1)
        assert subprocess.run(overlayd_argv("umount", str(mnt)), timeout=RUN_TIMEOUT,
                              check=False).returncode == 0
        with overlayd_mounted(mnt, writable(stack)):  # and the layers are free again
            assert os.listdir(mnt) == []


@needs_fuse
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shared", ["upper-and-work", "upper", "work"])
def test_layers_in_use_by_a_live_mount(stack: dict[str, Path], tmp_path: Path,
                                       form: tuple[str, ...], shared: str) -> None:
    """A second mount on a live mount's upper or workdir is refused (the kernel marks them in
    use too): it would have cleaned the first one's copy-ups in progress out of work/."""
    other = tmp_path / "other"
    for name in ("upper", "work", "mnt"):
        (other / name).mkdir(parents=True)
    upper = stack["upper"] if "upper" in shared else other / "upper"
    work = stack["work"] if "work" in shared else other / "work"
    with overlayd_mounted(stack["mnt"], writable(stack)) as daemon:
        in_flight = stack["work"] / "work" / f"{TEMP_PREFIX}{daemon.proc.pid}.99"
        in_flight.write_bytes(b"a copy-up in progress")
        proc = run_overlayd(other / "mnt", *form, "-o",
                            overlay_options([stack["lower1"]], upper, work), str(other / "mnt"))
        what = "upperdir" if "upper" in shared else "workdir"
        assert_refused(proc, other / "mnt", what, "in use by another overlayd mount", code=1)
        assert in_flight.read_bytes() == b"a copy-up in progress"
        in_flight.unlink()
        (stack["mnt"] / "still-serving").write_bytes(b"yes")
    assert (stack["upper"] / "still-serving").read_bytes() == b"yes"


def kernel_leftovers(work: Path) -> None:
    """What a crashed kernel overlay mount leaves in work/ (whiteouts, a half-built
    directory, mode 0 like the kernel's own work/), and what a crashed overlayd leaves."""
    w = work / "work"
    w.mkdir()
    os.mknod(w / "#1f", stat.S_IFCHR | 0o000, os.makedev(0, 0))
    (w / "#20").mkdir()
    (w / "#20" / "f").write_bytes(b"x")
    (w / f"{TEMP_PREFIX}12345.0").write_bytes(b"half a copy")
    (w / f"{TEMP_PREFIX}12345.1").mkdir(mode=0o700)
    (w / f"{TEMP_PREFIX}12345.1" / "inner").mkdir(mode=0o000)
    w.chmod(0o000)


@needs_root  # mknod of a whiteout
@needs_fuse
def test_workdir_left_by_crashed_mounts(stack: dict[str, Path]) -> None:
    """A workdir left by a crashed mount is reused: overlayd's own temporaries are removed,
    the kernel's (which overlayd never names) are left alone, and the mount works."""
    kernel_leftovers(stack["work"])
    (stack["lower1"] / "f").write_bytes(b"lower")
    with overlayd_mounted(stack["mnt"], writable(stack)) as daemon:
        assert work_leftovers(stack["work"]) == ["#1f", "#20"]
        with open(stack["mnt"] / "f", "ab") as f:  # a copy-up through that work/
            f.write(b"+")
        assert work_leftovers(stack["work"]) == ["#1f", "#20"]
    assert (stack["upper"] / "f").read_bytes() == b"lower+"
    assert "removing leftover" in daemon.log()


@needs_kernel_overlay
def test_kernel_cleans_a_workdir_overlayd_left(stack: dict[str, Path]) -> None:
    """The other way round, for the record: the kernel reuses the same workdir and empties
    work/ entirely (ovl_workdir_cleanup), our temporaries included."""
    kernel_leftovers(stack["work"])
    with kernel_mounted(stack["mnt"], writable(stack, KERNEL_PINNED)):
        assert work_leftovers(stack["work"]) == []


@needs_root
def test_upper_on_a_read_only_filesystem(stack: dict[str, Path], tmp_path: Path) -> None:
    """Root may write any directory, but not a read-only filesystem."""
    fs = tmp_path / "rofs"
    fs.mkdir()
    with tmpfs(fs, "size=1m"):
        (fs / "upper").mkdir()
        (fs / "work").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True, timeout=RUN_TIMEOUT)
        proc = run_overlayd(stack["mnt"], "mount", "-o",
                            overlay_options([stack["lower1"]], fs / "upper", fs / "work"),
                            str(stack["mnt"]))
        assert_refused(proc, stack["mnt"], "upperdir", str(fs / "upper"), "not writable")


# --- as a user who may not write the upper layer ------------------------------------------------

NOBODY = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")


def can_run_as_nobody() -> bool:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return False
    try:
        pwd_entry = subprocess.run(["id", "-u", "nobody"], capture_output=True, check=False)
        if pwd_entry.returncode != 0:
            return False
        proc = subprocess.run([*NOBODY, sys.executable, "-c", "import overlayd.cli"],
                              capture_output=True, timeout=RUN_TIMEOUT, check=False,
                              cwd="/")
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


needs_nobody = pytest.mark.skipif(
    not can_run_as_nobody(),
    reason="needs root, setpriv, a user nobody, and this interpreter runnable by nobody")


@pytest.fixture
def public_stack() -> Iterator[dict[str, Path]]:
    """A stack under a directory every user may search (pytest's tmp_path is root's 0700)."""
    top = Path(tempfile.mkdtemp(prefix="overlayd-reliability-"))
    try:
        top.chmod(0o755)
        dirs = {name: top / name for name in ("lower", "upper", "work", "mnt")}
        for path in dirs.values():
            path.mkdir(mode=0o755)
        for name in ("upper", "work", "mnt"):
            os.chown(dirs[name], 65534, 65534)
        yield dirs
    finally:
        if mount_fstype(top / "mnt") is not None:
            subprocess.run(["fusermount3", "-u", str(top / "mnt")], check=False)
        shutil.rmtree(top)


@needs_nobody
@pytest.mark.parametrize("case", ["upper-not-owned", "work-not-owned", "work-subdir-of-root"])
def test_layers_not_writable_by_the_user(public_stack: dict[str, Path], case: str) -> None:
    s = public_stack
    if case == "upper-not-owned":
        os.chown(s["upper"], 0, 0)
        words: tuple[str, ...] = ("upperdir", str(s["upper"]), "not writable")
    elif case == "work-not-owned":
        os.chown(s["work"], 0, 0)
        words = ("workdir", str(s["work"]), "not writable")
    else:  # what a root mount (the kernel's or ours) leaves: work/ of mode 0, root's
        (s["work"] / "work").mkdir(mode=0o000)
        words = ("workdir", str(s["work"] / "work"), "not writable")
    for form in (("mount",), ("mount", "-f")):
        proc = run_overlayd(s["mnt"], *form, "-o",
                            overlay_options([s["lower"]], s["upper"], s["work"]), str(s["mnt"]),
                            prefix=NOBODY)
        assert_refused(proc, s["mnt"], *words)


def nobody_may_open_dev_fuse() -> bool:
    return can_run_as_nobody() and subprocess.run(
        [*NOBODY, sys.executable, "-c", "open('/dev/fuse', 'rb+', buffering=0)"],
        capture_output=True, timeout=RUN_TIMEOUT, check=False).returncode == 0


@needs_nobody
@needs_fuse
def test_user_mount_refused_by_libfuse_is_one_line(public_stack: dict[str, Path]) -> None:
    """When libfuse or fusermount3 refuse the mount, their reason is the one line (pyfuse3
    alone would say "fuse_session_mount failed", after a traceback)."""
    s = public_stack
    with dev_fuse_mode(0o600) if os.geteuid() == 0 else contextlib.nullcontext():
        if nobody_may_open_dev_fuse():
            pytest.skip("nobody may open /dev/fuse here: a user mount would succeed")
        refused_forms(s)


def refused_forms(s: dict[str, Path]) -> None:
    for form in (("mount",), ("mount", "-f")):
        proc = run_overlayd(s["mnt"], *form, "-o",
                            overlay_options([s["lower"]], s["upper"], s["work"]), str(s["mnt"]),
                            prefix=NOBODY)
        line = assert_refused(proc, s["mnt"], "cannot mount", "/dev/fuse", code=1)
        assert "Traceback" not in line


@pytest.mark.skipif(rootless_why_not() is not None, reason=str(rootless_why_not()))
def test_lower_file_unreadable_by_a_user_daemon() -> None:
    """A user's daemon meets a lower file it may not read: EACCES for that file only."""
    with rootless() as user:
        s = {name: user.base / "home" / name for name in ("lower", "upper", "work", "mnt")}
        for name, path in s.items():
            path.mkdir()
            if name != "lower":
                os.chown(path, user.uid, user.gid)
        s["lower"].chmod(0o755)
        (s["lower"] / "secret").write_bytes(b"root's")
        (s["lower"] / "secret").chmod(0o000)
        (s["lower"] / "open").write_bytes(b"anyone's")
        with user.mounted(s["mnt"], overlay_options([s["lower"]], s["upper"], s["work"])):
            proc = user.python_run(textwrap.dedent(f"""
                import errno, os
                out = []
                for name, mode in (("secret", "rb"), ("secret", "ab"), ("open", "rb")):
                    try:
                        with open(os.path.join({str(s['mnt'])!r}, name), mode) as f:
                            out.append(f.read() if mode == "rb" else b"")
                    except OSError as e:
                        out.append(errno.errorcode[e.errno])
                print(out)
            """))
            assert user.unmount(s["mnt"]).returncode == 0
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "['EACCES', 'EACCES', b\"anyone's\"]"
        assert os.listdir(s["upper"]) == []


# --- no request can crash the daemon ------------------------------------------------------------

HANDLER_FAULTS = textwrap.dedent('''
    """Run overlayd with faults injected into Overlay methods, each for one magic name."""
    import os
    import sys

    from overlayd import cli
    from overlayd.overlay import Overlay

    FLAG = sys.argv.pop(1)  # statfs fails while this file exists


    def inject(method, exc, pick):
        original = getattr(Overlay, method)

        def faulty(self, *args, **kwargs):
            if pick(self, *args, **kwargs):
                raise exc(f"injected fault in {method}")
            return original(self, *args, **kwargs)

        setattr(Overlay, method, faulty)


    def node_named(name):
        return lambda self, node, *args, **kwargs: node.name == name


    def name_is(name):
        return lambda self, parent, child, *args, **kwargs: child == name


    def handle_of(name):
        def pick(self, fh, *args, **kwargs):
            handle = self.handles.get(fh)
            return handle is not None and handle.node.name == name
        return pick


    def dir_handle_of(name):
        def pick(self, dh, *args, **kwargs):
            node = self.dir_handles.get(dh)
            return node is not None and node.name == name
        return pick


    inject("lookup", RuntimeError, name_is(b"boom-lookup"))
    inject("open", AssertionError, node_named(b"boom-open"))
    inject("read", KeyError, handle_of(b"boom-read"))
    inject("write", RuntimeError, handle_of(b"boom-write"))
    inject("release", RuntimeError, handle_of(b"boom-release"))
    inject("create", OSError, name_is(b"boom-create"))  # an OSError without an errno
    inject("mkdir", ArithmeticError, name_is(b"boom-mkdir"))
    inject("unlink", RuntimeError, name_is(b"boom-unlink"))
    inject("rename", RuntimeError,
           lambda self, old_parent, old_name, *args, **kwargs: old_name == b"boom-rename")
    inject("setattr", RecursionError, node_named(b"boom-setattr"))
    inject("opendir", RuntimeError, node_named(b"boom-opendir"))
    inject("dir_node", RuntimeError, dir_handle_of(b"boom-readdir"))
    inject("readlink", MemoryError, node_named(b"boom-link"))
    inject("getxattr", RuntimeError,
           lambda self, node, name, *args, **kwargs: name == b"user.boom")
    inject("statfs", RuntimeError, lambda self: os.path.exists(FLAG))
    sys.exit(cli.main(sys.argv[1:]))
''')


def wrapper(tmp_path: Path, name: str, text: str) -> Path:
    script = tmp_path / name
    script.write_text(text)
    return script


def expect_eio(fn: Callable[[], object]) -> None:
    assert errname(fn) == "EIO"


@needs_fuse
def test_faults_in_handlers_answer_eio_and_the_daemon_serves_on(stack: dict[str, Path],
                                                                tmp_path: Path) -> None:
    lower, mnt = stack["lower1"], stack["mnt"]
    for name in ("boom-open", "boom-read", "boom-write", "boom-release", "boom-unlink",
                 "boom-rename", "boom-setattr", "plain"):
        (lower / name).write_bytes(b"lower " + name.encode())
    for name in ("boom-opendir", "boom-readdir"):
        (lower / name).mkdir()
        (lower / name / "inside").write_bytes(b"")
    (lower / "boom-link").symlink_to("plain")
    flag = tmp_path / "statfs-fault"
    script = wrapper(tmp_path, "faults.py", HANDLER_FAULTS)
    argv = [sys.executable, str(script), str(flag), "mount", "-f", "-o", writable(stack),
            str(mnt)]
    faults = {
        "lookup": lambda: os.stat(mnt / "boom-lookup"),
        "open": lambda: (mnt / "boom-open").read_bytes(),
        "read": lambda: (mnt / "boom-read").read_bytes(),
        "write": lambda: os.write(fd, b"x"),
        "create": lambda: os.close(os.open(mnt / "boom-create", os.O_CREAT | os.O_WRONLY, 0o644)),
        "mkdir": lambda: os.mkdir(mnt / "boom-mkdir"),
        "unlink": lambda: os.unlink(mnt / "boom-unlink"),
        "rename": lambda: os.rename(mnt / "boom-rename", mnt / "renamed"),
        "setattr": lambda: os.chmod(mnt / "boom-setattr", 0o600),
        "opendir": lambda: os.listdir(mnt / "boom-opendir"),
        "dir_node": lambda: os.listdir(mnt / "boom-readdir"),
        "readlink": lambda: os.readlink(mnt / "boom-link"),
        "getxattr": lambda: os.getxattr(mnt / "plain", "user.boom"),
        "statfs": lambda: os.statvfs(mnt),
    }
    with command_mounted(mnt, argv, check_logs=False) as daemon:
        # The copy-up works, the write fails. The reader, through the page cache, keeps the
        # upper file from being opened passthrough (overlayd/openmodes.py), where the kernel
        # would write it without asking the daemon.
        reader = os.open(mnt / "boom-write", os.O_RDONLY)
        fd = os.open(mnt / "boom-write", os.O_WRONLY)
        try:
            flag.write_bytes(b"")
            for method, request in faults.items():
                expect_eio(request)
                assert daemon.proc.poll() is None, f"the daemon died of a fault in {method}"
            flag.unlink()
        finally:
            os.close(fd)
            os.close(reader)
        # release: the kernel does not wait for its answer; the traceback reaches the log.
        (mnt / "boom-release").read_bytes()
        poll(lambda: "injected fault in release" in daemon.log(), 30, "release's traceback")
        # Nothing changed where the fault struck, and the mount serves on.
        assert (mnt / "boom-unlink").read_bytes() == b"lower boom-unlink"
        assert (mnt / "boom-rename").exists()
        assert not (mnt / "renamed").exists()
        assert not (mnt / "boom-create").exists()
        assert not (mnt / "boom-mkdir").exists()
        assert stat.S_IMODE(os.stat(mnt / "boom-setattr").st_mode) == 0o644
        assert (mnt / "boom-write").read_bytes() == b"lower boom-write"
        assert (mnt / "plain").read_bytes() == b"lower plain"
        (mnt / "new").write_bytes(b"after the faults")
        assert (mnt / "new").read_bytes() == b"after the faults"
        assert "plain" in os.listdir(mnt)
        os.statvfs(mnt)
        os.rename(mnt / "plain", mnt / "plain2")
        assert daemon.proc.poll() is None
    assert daemon.proc.returncode == 0, daemon.log()
    log = daemon.log()
    for method in [*faults, "release"]:
        assert f"injected fault in {method}" in log, method
    # Every traceback is one of ours: nothing else went wrong.
    ours = re.findall(r"^\w+: '?injected fault in \w+", log, re.MULTILINE)
    assert log.count("Traceback (most recent call last)") == len(ours), log
    assert work_leftovers(stack["work"]) == []


# --- faults in the layers themselves ------------------------------------------------------------

LAYER_FAULTS = textwrap.dedent('''
    """Run overlayd as if three lower files sat on a failing disk: "denied" cannot be opened
    (EACCES), "broken" cannot be opened (EIO), "badsector" opens but cannot be read (EIO)."""
    import errno
    import os
    import sys

    from overlayd import cli

    LOWER = os.fsencode(sys.argv.pop(1))
    real_open, real_pread, real_copy = os.open, os.pread, os.copy_file_range


    def fail(err, what):
        raise OSError(err, os.strerror(err), what)


    def open_(path, flags, mode=0o777, *, dir_fd=None):
        name = os.path.basename(os.fsencode(path))
        if name == b"denied":
            fail(errno.EACCES, path)
        if name == b"broken":
            fail(errno.EIO, path)
        return real_open(path, flags, mode, dir_fd=dir_fd)


    def bad(fd):
        where = os.fsencode(os.readlink(f"/proc/self/fd/{fd}"))
        return where.startswith(LOWER) and where.endswith(b"/badsector")


    def pread(fd, size, offset):
        if bad(fd):
            fail(errno.EIO, "badsector")
        return real_pread(fd, size, offset)


    def copy_file_range(src, dst, count, offset_src=None, offset_dst=None):
        if bad(src):
            fail(errno.EIO, "badsector")
        return real_copy(src, dst, count, offset_src, offset_dst)


    os.open, os.pread, os.copy_file_range = open_, pread, copy_file_range
    sys.exit(cli.main(sys.argv[1:]))
''')


@needs_fuse
def test_unreadable_lower_files_fail_alone(stack: dict[str, Path], tmp_path: Path) -> None:
    """A lower file that cannot be opened or read gives its errno, to that file only: the
    names are listed and stat works, a copy-up of it fails leaving nothing behind, and every
    other file is served."""
    lower, mnt = stack["lower2"], stack["mnt"]
    (lower / "dir").mkdir()
    for name in ("denied", "broken", "badsector", "fine"):
        (lower / name).write_bytes(b"lower " + name.encode())
        (lower / "dir" / name).write_bytes(b"deeper " + name.encode())
    script = wrapper(tmp_path, "layer_faults.py", LAYER_FAULTS)
    argv = [sys.executable, str(script), str(lower), "mount", "-f", "-o", writable(stack),
            str(mnt)]
    with command_mounted(mnt, argv) as daemon:
        for where in (mnt, mnt / "dir"):
            assert sorted(os.listdir(where)) == sorted(
                ["badsector", "broken", "denied", "fine", *(["dir"] if where == mnt else [])])
            below = lower if where == mnt else lower / "dir"
            for name in ("denied", "broken", "badsector"):
                assert os.stat(where / name).st_size == os.stat(below / name).st_size
            got = {name: (errname(lambda p=where / name: p.read_bytes()),
                          errname(lambda p=where / name: os.close(os.open(p, os.O_WRONLY))),
                          errname(lambda p=where / name: os.chmod(p, 0o600)))
                   for name in ("denied", "broken", "badsector", "fine")}
            assert got == {"denied": ("EACCES", "EACCES", "EACCES"),
                           "broken": ("EIO", "EIO", "EIO"),
                           "badsector": ("EIO", "EIO", "EIO"),
                           "fine": ("ok", "ok", "ok")}
        assert sorted(os.listdir(stack["upper"])) == ["dir", "fine"]
        assert os.listdir(stack["upper"] / "dir") == ["fine"]
        assert work_leftovers(stack["work"]) == []
        assert (mnt / "fine").read_bytes() == b"lower fine"
        assert daemon.proc.poll() is None


@needs_fuse
def test_upper_removed_under_the_daemon(stack: dict[str, Path]) -> None:
    """The upper and work directories removed under a live mount: changes fail with errors
    (no EIO, no traceback), reads of the lower layers go on, and the mount unmounts."""
    (stack["lower1"] / "f").write_bytes(b"lower")
    (stack["lower1"] / "d").mkdir()
    mnt = stack["mnt"]
    with overlayd_mounted(mnt, writable(stack)) as daemon:
        (mnt / "new").write_bytes(b"new")
        (mnt / "d" / "made").write_bytes(b"made")
        shutil.rmtree(stack["upper"])
        shutil.rmtree(stack["work"])
        results = {
            "read lower": errname(lambda: (mnt / "f").read_bytes()),
            "read upper": errname(lambda: (mnt / "new").read_bytes()),
            "list": errname(lambda: os.listdir(mnt)),
            "list d": errname(lambda: os.listdir(mnt / "d")),
            "create": errname(lambda: (mnt / "other").write_bytes(b"x")),
            "copy-up": errname(lambda: (mnt / "f").write_bytes(b"x")),
            "mkdir": errname(lambda: os.mkdir(mnt / "dir")),
            "unlink lower": errname(lambda: os.unlink(mnt / "f")),
            "unlink upper": errname(lambda: os.unlink(mnt / "new")),
            "rename": errname(lambda: os.rename(mnt / "d" / "made", mnt / "d" / "moved")),
            "statfs": errname(lambda: os.statvfs(mnt)),
        }
        assert "EIO" not in results.values(), results
        assert results["read lower"] == "ok"
        assert results["create"] != "ok", results
        assert results["mkdir"] != "ok", results
        assert (mnt / "f").read_bytes() == b"lower"
        assert daemon.proc.poll() is None
        proc = subprocess.run(overlayd_argv("umount", str(mnt)), capture_output=True,
                              text=True, timeout=RUN_TIMEOUT, check=False)
        assert (proc.returncode, proc.stderr) == (0, "")
        assert daemon.proc.wait(timeout=RUN_TIMEOUT) == 0
    assert mount_fstype(mnt) is None


# --- a full upper filesystem --------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[None]:
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True,
                   timeout=RUN_TIMEOUT)
    try:
        yield
    finally:
        for flags in ([], ["-l"]):
            if mount_fstype(path) == "tmpfs":
                subprocess.run(["umount", *flags, str(path)], check=False, timeout=RUN_TIMEOUT)


MiB = 1 << 20


def fill(path: Path) -> None:
    """Write *path* until the filesystem is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        chunk = b"\xff" * (64 << 10)
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, chunk)
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\xff")
    finally:
        os.close(fd)


def use_all_inodes(directory: Path) -> None:
    directory.mkdir()
    with contextlib.suppress(OSError):
        for i in range(1 << 20):
            os.mkdir(directory / str(i))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def append(path: Path, data: bytes) -> None:
    """One unbuffered write: its errno is the write's, not a later flush's."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        assert os.write(fd, data) == len(data)
    finally:
        os.close(fd)


PHASES = ("blocks full", "inodes full", "freed")


def enospc_scenario(mnt: Path, fs: Path, work: Path | None) -> list[tuple[str, str]]:
    """Run the full-disk steps on a mount whose upper and work live on the tmpfs *fs*;
    return (step, "ok" or errno name) of each, checking what must hold after each one."""
    results: list[tuple[str, str]] = []
    lower_big = sha(mnt / "big")

    def step(name: str, fn: Callable[[], object]) -> None:
        results.append((name, errname(fn)))
        # Whatever failed: the lower objects are visible and unchanged, nothing is half
        # published, the workdir holds no garbage, and the mount answers.
        assert sha(mnt / "big") == lower_big or (mnt / "big").stat().st_size == LOWER_BIG + 1
        if work is not None:
            assert work_leftovers(work) == [], name
        assert "big" in os.listdir(mnt)
        os.statvfs(mnt)

    def phase_steps(phase: str) -> None:
        n = PHASES.index(phase)
        step(f"{phase}: create", lambda: (mnt / f"created-{n}").touch(exist_ok=False))
        step(f"{phase}: write", lambda: append(mnt / "upper-file", b"data"))
        step(f"{phase}: copy-up by open", lambda: append(mnt / f"small-{n}", b"+"))
        step(f"{phase}: copy-up by chmod", lambda: os.chmod(mnt / f"small-{n}", 0o600))
        step(f"{phase}: mkdir", lambda: os.mkdir(mnt / f"newdir-{n}"))
        step(f"{phase}: symlink", lambda: os.symlink("big", mnt / f"link-{n}"))
        step(f"{phase}: whiteout", lambda: os.unlink(mnt / f"gone-{n}"))
        step(f"{phase}: create over a whiteout", lambda: (mnt / f"was-{n}").touch())
        step(f"{phase}: directory copy-up", lambda: os.chmod(mnt / f"d-{n}", 0o700))

    # While there is room: a page-sized upper file (so that any append needs a new block)
    # and whiteouts to create over.
    (mnt / "upper-file").write_bytes(b"u" * 4096)
    for n in range(len(PHASES)):
        os.unlink(mnt / f"was-{n}")
    fill(fs / "filler1")
    os.truncate(fs / "filler1", os.stat(fs / "filler1").st_size - MiB)  # room for half of big
    step("copy-up of a file larger than the room left", lambda: append(mnt / "big", b"+"))
    fill(fs / "filler2")
    phase_steps("blocks full")
    use_all_inodes(fs / "inodes")
    phase_steps("inodes full")
    for n in range(2):
        assert (mnt / f"small-{n}").read_bytes() == b"small\n"
        assert (mnt / f"d-{n}" / "f").read_bytes() == b"f\n"
    os.unlink(fs / "filler1")
    os.unlink(fs / "filler2")
    shutil.rmtree(fs / "inodes")
    step("freed: copy-up of the large file", lambda: append(mnt / "big", b"+"))
    phase_steps("freed")
    return results


LOWER_BIG = 2 * MiB


def big_data() -> bytes:
    return random.Random(8).randbytes(LOWER_BIG)


def enospc_lower(lower: Path) -> None:
    (lower / "big").write_bytes(big_data())
    for n in range(len(PHASES)):
        (lower / f"small-{n}").write_bytes(b"small\n")
        (lower / f"gone-{n}").write_bytes(b"gone\n")
        (lower / f"was-{n}").write_bytes(b"was\n")
        (lower / f"d-{n}").mkdir()
        (lower / f"d-{n}" / "f").write_bytes(b"f\n")


def enospc_run(stack: dict[str, Path], tmp_path: Path, kind: str) -> list[tuple[str, str]]:
    lower = stack["lower1"]
    enospc_lower(lower)
    fs = tmp_path / f"fs-{kind}"
    fs.mkdir()
    with tmpfs(fs, "size=4m,nr_inodes=512"):
        upper, work = fs / "upper", fs / "work"
        upper.mkdir()
        work.mkdir()
        options = overlay_options([lower], upper, work)
        mnt = stack["mnt"]
        mounted = (overlayd_mounted(mnt, options) if kind == "overlayd"
                   else kernel_mounted(mnt, f"{options},{KERNEL_PINNED}"))
        with mounted:
            results = enospc_scenario(mnt, fs, work if kind == "overlayd" else None)
            assert (mnt / "big").read_bytes() == big_data() + b"+"
            freed = PHASES.index("freed")
            assert (mnt / f"small-{freed}").read_bytes() == b"small\n+"
        # What reached the upper layer is whole, and the lower layer is untouched.
        assert (upper / "big").read_bytes() == big_data() + b"+"
        assert (upper / f"small-{freed}").read_bytes() == b"small\n+"
        assert (upper / "upper-file").read_bytes() == b"u" * 4096 + b"data"
        for n in range(2):
            assert not (upper / f"small-{n}").exists()
        assert (lower / "big").read_bytes() == big_data()
        assert (lower / "small-0").read_bytes() == b"small\n"
    return results


@needs_root  # tmpfs
@needs_fuse
def test_full_upper_filesystem(stack: dict[str, Path], tmp_path: Path) -> None:
    """Upper and work on a small tmpfs: copy-up, create, write and mkdir fail with ENOSPC
    and leave nothing behind; once there is room, the same operations succeed."""
    results = dict(enospc_run(stack, tmp_path, "overlayd"))
    # tmpfs: data needs blocks, every new object an inode; an empty file, a directory, a
    # short symlink or a whiteout needs no block.
    no_block = ("create", "mkdir", "symlink", "whiteout", "create over a whiteout",
                "directory copy-up")
    expected = {"copy-up of a file larger than the room left": "ENOSPC",
                "freed: copy-up of the large file": "ok"}
    for phase in PHASES:
        for what in ("create", "write", "copy-up by open", "copy-up by chmod", "mkdir",
                     "symlink", "whiteout", "create over a whiteout", "directory copy-up"):
            room = phase == "freed" or (phase == "blocks full" and what in no_block)
            expected[f"{phase}: {what}"] = "ok" if room else "ENOSPC"
    assert results == expected


@needs_kernel_overlay
@needs_fuse
def test_full_upper_filesystem_same_errors_as_the_kernel(stack: dict[str, Path],
                                                         tmp_path: Path) -> None:
    """The same steps on the kernel's overlay: the same outcome and errno for each, but one.
    The kernel (5.8+) makes a whiteout by hard-linking one shared whiteout (no new inode);
    overlayd makes each its own char 0/0 device (a documented difference), so with no inode
    left, deleting a lower file fails with ENOSPC in overlayd and succeeds in the kernel."""
    ours = enospc_run(stack, tmp_path, "overlayd")
    shutil.rmtree(stack["lower1"])
    stack["lower1"].mkdir()
    kernels = enospc_run(stack, tmp_path, "kernel")
    assert [name for name, _ in ours] == [name for name, _ in kernels]
    differ = {name: (ours_errno, kernel_errno)
              for (name, ours_errno), (_, kernel_errno) in zip(ours, kernels, strict=True)
              if ours_errno != kernel_errno}
    assert differ == {"inodes full: whiteout": ("ENOSPC", "ok")}


# --- concurrency ----------------------------------------------------------------------------------

WORKER = textwrap.dedent('''
    """One of several processes changing one shared directory of a mount for a while."""
    import json, os, random, sys, time

    shared, wid, seconds, seed, out = sys.argv[1], sys.argv[2], float(sys.argv[3]), \\
        int(sys.argv[4]), sys.argv[5]
    rng = random.Random(seed)
    mine = {}
    own = f"own-{wid}"
    own_data = open(os.path.join(shared, own), "rb").read()
    errors = []
    ops = 0
    counter = 0


    def lower_content(k):
        return (f"lower {k}\\n" * (40 + k)).encode()


    def path(name):
        return os.path.join(shared, name)


    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not errors:
        op = rng.choice(["create", "create", "append", "append", "rename", "unlink",
                         "read lower", "read own", "readdir", "append own"])
        if not mine and op in ("append", "rename", "unlink", "read own"):
            op = "create"
        try:
            if op == "create":
                name = f"w{wid}-{counter}"
                counter += 1
                data = rng.randbytes(rng.randrange(0, 6000))
                with open(path(name), "xb") as f:
                    f.write(data)
                mine[name] = data
            elif op == "append":
                name = rng.choice(sorted(mine))
                extra = rng.randbytes(rng.randrange(1, 3000))
                with open(path(name), "ab") as f:
                    f.write(extra)
                mine[name] += extra
            elif op == "rename":
                old = rng.choice(sorted(mine))
                new = f"w{wid}-{counter}"
                counter += 1
                os.rename(path(old), path(new))
                mine[new] = mine.pop(old)
            elif op == "unlink":
                name = rng.choice(sorted(mine))
                os.unlink(path(name))
                del mine[name]
            elif op == "read lower":
                k = rng.randrange(8)
                with open(path(f"lower-{k}"), "rb") as f:
                    got = f.read()
                if got != lower_content(k):
                    errors.append(f"lower-{k} read {len(got)} bytes, not its content")
            elif op == "read own":
                name = rng.choice(sorted(mine))
                with open(path(name), "rb") as f:
                    if f.read() != mine[name]:
                        errors.append(f"{name} does not hold what was written")
            elif op == "readdir":
                names = os.listdir(shared)
                if len(names) != len(set(names)):
                    errors.append(f"duplicate names in a listing: {sorted(names)}")
                missing = set(mine) - set(names)
                if missing:
                    errors.append(f"own files missing from a listing: {sorted(missing)}")
            else:  # append own: its first change copies a lower file up
                extra = rng.randbytes(rng.randrange(1, 500))
                with open(path(own), "ab") as f:
                    f.write(extra)
                own_data += extra
            ops += 1
        except OSError as e:
            errors.append(f"{op}: {e!r}")
    with open(out, "w") as f:
        json.dump({"files": {n: d.hex() for n, d in mine.items()}, "own": own_data.hex(),
                   "errors": errors, "ops": ops}, f)
''')


def lower_content(k: int) -> bytes:
    return (f"lower {k}\n" * (40 + k)).encode()


def reap(procs: list[subprocess.Popen[bytes]]) -> list[tuple[int, bytes]]:
    """Wait for every process (bounded) and read its stderr; a process still running after
    the bound is killed and fails the test. (Their output is small: no pipe fills up.)"""
    results = []
    for proc in procs:
        try:
            proc.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"a worker hung: {proc.args}") from None
        results.append((proc.returncode, proc.stderr.read() if proc.stderr else b""))
    return results


@needs_fuse
def test_concurrent_processes_in_one_directory(stack: dict[str, Path], tmp_path: Path,
                                               children: list[subprocess.Popen[bytes]]) -> None:
    """Four processes create, append, rename, unlink, list and read in one merged directory
    for three seconds; then each one's record matches the mount and the upper layer."""
    workers, seconds = 4, 3.0
    shared = stack["lower2"] / "shared"
    shared.mkdir()
    for k in range(8):
        (shared / f"lower-{k}").write_bytes(lower_content(k))
    for wid in range(workers):
        (shared / f"own-{wid}").write_bytes(f"own file of worker {wid}\n".encode())
    script = wrapper(tmp_path, "worker.py", WORKER)
    mnt = stack["mnt"]
    with overlayd_mounted(mnt, writable(stack)):
        for wid in range(workers):
            children.append(subprocess.Popen(
                [sys.executable, str(script), str(mnt / "shared"), str(wid), str(seconds),
                 str(wid + 100), str(tmp_path / f"worker-{wid}.json")],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        for code, err in reap(children):
            assert code == 0, err.decode(errors="replace")
        names = os.listdir(mnt / "shared")
        assert len(names) == len(set(names))
        for wid in range(workers):
            record = json.loads((tmp_path / f"worker-{wid}.json").read_text())
            assert record["errors"] == [], record["errors"]
            assert record["ops"] > 0
            files = {n: bytes.fromhex(d) for n, d in record["files"].items()}
            own = bytes.fromhex(record["own"])
            for where in (mnt / "shared", stack["upper"] / "shared"):
                present = {n for n in os.listdir(where) if n.startswith(f"w{wid}-")}
                assert present == set(files), where
                for name, data in files.items():
                    assert (where / name).read_bytes() == data, (where, name)
            if own != (shared / f"own-{wid}").read_bytes():  # appended to: copied up
                assert (stack["upper"] / "shared" / f"own-{wid}").read_bytes() == own
            assert (mnt / "shared" / f"own-{wid}").read_bytes() == own
        for k in range(8):
            assert (mnt / "shared" / f"lower-{k}").read_bytes() == lower_content(k)
            assert not (stack["upper"] / "shared" / f"lower-{k}").exists()
        assert work_leftovers(stack["work"]) == []


RACER = textwrap.dedent('''
    """Open the files named on stdin for writing at the parent's signal, and write a patch."""
    import os, sys

    offset, patch = int(sys.argv[1]), sys.argv[2].encode()
    for line in sys.stdin:
        fd = os.open(line.strip(), os.O_WRONLY)
        try:
            os.pwrite(fd, patch, offset)
        finally:
            os.close(fd)
        print("done", flush=True)
''')


@needs_fuse
def test_two_processes_open_one_lower_file_for_write(stack: dict[str, Path], tmp_path: Path,
                                                     children: list[subprocess.Popen[bytes]]
                                                     ) -> None:
    """Two processes open the same lower file for writing at the same moment, twenty times:
    one copy-up each time, and both writes land in it."""
    rounds = 20
    for r in range(rounds):
        (stack["lower1"] / f"target-{r}").write_bytes(b"." * 4096)
    script = wrapper(tmp_path, "racer.py", RACER)
    mnt = stack["mnt"]
    with overlayd_mounted(mnt, writable(stack)):
        for offset, patch in ((0, "AAAA"), (2048, "BBBB")):
            children.append(subprocess.Popen(
                [sys.executable, str(script), str(offset), patch], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        for r in range(rounds):
            for proc in children:  # both told before either is waited for
                assert proc.stdin is not None
                proc.stdin.write(f"{mnt / f'target-{r}'}\n".encode())
                proc.stdin.flush()
            for proc in children:
                assert proc.stdout is not None
                assert proc.stdout.readline() == b"done\n", reap([proc])
        for proc in children:
            assert proc.stdin is not None
            proc.stdin.close()
        for code, err in reap(children):
            assert code == 0, err.decode(errors="replace")
        expected = b"AAAA" + b"." * 2044 + b"BBBB" + b"." * 2044
        for r in range(rounds):
            assert (mnt / f"target-{r}").read_bytes() == expected, r
            assert (stack["upper"] / f"target-{r}").read_bytes() == expected, r
            assert (stack["lower1"] / f"target-{r}").read_bytes() == b"." * 4096
        assert work_leftovers(stack["work"]) == []


CHURN = textwrap.dedent('''
    """Create, rename and unlink names in a directory for a while."""
    import os, sys, time

    directory, seconds = sys.argv[1], float(sys.argv[2])
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        a = os.path.join(directory, f"churn-{n}")
        with open(a, "wb") as f:
            f.write(b"x")
        os.rename(a, os.path.join(directory, f"moved-{n}"))
        if n >= 10:
            os.unlink(os.path.join(directory, f"moved-{n - 10}"))
        n += 1
''')


@needs_fuse
def test_readdir_while_the_directory_changes(stack: dict[str, Path], tmp_path: Path,
                                             children: list[subprocess.Popen[bytes]]) -> None:
    """Listings (each several readdir requests long) taken while another process churns the
    directory: never a duplicate, never a missing untouched name, no error."""
    busy = stack["lower2"] / "busy"
    busy.mkdir()
    stable = set()
    for i in range(150):  # long names: a listing spans several readdir requests
        name = f"stable-lower-{i:03d}-" + "x" * 60
        (busy / name).write_bytes(b"")
        stable.add(name)
    mnt = stack["mnt"]
    script = wrapper(tmp_path, "churn.py", CHURN)
    with overlayd_mounted(mnt, writable(stack)):
        for i in range(150):
            name = f"stable-upper-{i:03d}-" + "y" * 60
            (mnt / "busy" / name).write_bytes(b"")
            stable.add(name)
        children.append(subprocess.Popen(
            [sys.executable, str(script), str(mnt / "busy"), "2.5"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        listings = 0
        while children[0].poll() is None:
            for names in (os.listdir(mnt / "busy"),
                          [e.name for e in os.scandir(mnt / "busy")]):
                assert len(names) == len(set(names)), "a name listed twice"
                assert stable <= set(names), sorted(stable - set(names))[:5]
                listings += 1
        for code, err in reap(children):
            assert code == 0, err.decode(errors="replace")
        assert listings > 0
        assert stable <= set(os.listdir(mnt / "busy"))


RENAMER = textwrap.dedent('''
    """Rename a file back and forth between two names for a while."""
    import os, sys, time

    a, b, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        os.rename(a, b)
        os.rename(b, a)
''')


@needs_fuse
def test_rename_racing_with_open(stack: dict[str, Path], tmp_path: Path,
                                 children: list[subprocess.Popen[bytes]]) -> None:
    """While one process renames a (lower, then copied-up) file back and forth, opens of
    either name find the whole file or ENOENT, nothing else."""
    content = b"the racing file\n" * 100
    (stack["lower1"] / "a").write_bytes(content)
    mnt = stack["mnt"]
    script = wrapper(tmp_path, "renamer.py", RENAMER)
    with overlayd_mounted(mnt, writable(stack)):
        children.append(subprocess.Popen(
            [sys.executable, str(script), str(mnt / "a"), str(mnt / "b"), "2.5"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        outcomes: dict[str, int] = {}
        while children[0].poll() is None:
            for name in ("a", "b"):
                for flags in (os.O_RDONLY, os.O_RDWR):
                    try:
                        fd = os.open(mnt / name, flags)
                    except FileNotFoundError:
                        outcomes["ENOENT"] = outcomes.get("ENOENT", 0) + 1
                        continue
                    try:
                        data = os.pread(fd, len(content) + 1, 0)
                    finally:
                        os.close(fd)
                    assert data == content
                    outcomes["opened"] = outcomes.get("opened", 0) + 1
        for code, err in reap(children):
            assert code == 0, err.decode(errors="replace")
        assert outcomes.get("opened", 0) > 0, outcomes
        assert (mnt / "a").read_bytes() == content
        assert not (mnt / "b").exists()
        assert sorted(os.listdir(mnt)) == ["a"]
        assert (stack["upper"] / "a").read_bytes() == content
        assert work_leftovers(stack["work"]) == []
