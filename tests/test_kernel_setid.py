"""Set-user-ID, set-group-ID and file capabilities after writes, truncations and chowns,
against the kernel's overlayfs, as root and as nobody.

The kernel clears set-id bits when a process without CAP_FSETID writes or truncates a file, and
a file capability (security.capability) at any write. overlayd's writes reach the kernel by two
paths: through its page cache (the kernel clears the bits itself, with a SETATTR), and, for a
file open for writing only, directly (FOPEN_DIRECT_IO: the kernel leaves the clearing to the
daemon, flagging the writes of a process without CAP_FSETID). A truncating open (O_TRUNC) is a
third: the kernel's FUSE client forgets to clear there, and overlayd does it.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import needs_fuse, needs_kernel_overlay
from tests.mounting import NOBODY, Pair, kernel_shows, nobody_pair

pytestmark = [pytest.mark.kernel, pytest.mark.mounted, needs_kernel_overlay, needs_fuse]

CAPS = "security.capability"
# cap_net_bind_service=ep, VFS_CAP_REVISION_2
CAP_BLOB = bytes.fromhex("0100000200040000000000000000000000000000")
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]

# name: (mode, owner, with a file capability)
FILES = {
    "suid": (0o4777, 0, False),
    "sgid": (0o2777, 0, False),
    "both": (0o6777, 0, False),
    "suid-shut": (0o4755, 0, False),
    "plain": (0o0777, 0, False),
    "mine": (0o0777, NOBODY, False),
    "capped": (0o0755, 0, True),
    "suid-capped": (0o4777, 0, True),
}


def _files(lowers: list[Path]) -> None:
    top = lowers[0]
    os.chmod(top, 0o777)
    (top / "pub").mkdir()
    os.chmod(top / "pub", 0o777)
    (top / "shared").mkdir()
    os.chmod(top / "shared", 0o2777)
    for name, (mode, owner, capped) in FILES.items():
        path = top / name
        path.write_bytes(b"0123456789" * 1000)
        os.chown(path, owner, owner)
        os.chmod(path, mode)
        if capped:
            os.setxattr(path, CAPS, CAP_BLOB)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    with nobody_pair(tmp_path, _files) as both:
        yield both


def _state(mnt: Path, upper: Path, name: str) -> tuple[str, int, bool, str]:
    """What the merged view shows of *name*, and the upper file's mode."""
    st = os.lstat(mnt / name)
    try:
        capped = bool(os.getxattr(mnt / name, CAPS))
    except OSError:
        capped = False
    return (stat.filemode(st.st_mode), st.st_size, capped,
            stat.filemode(os.lstat(upper / name).st_mode))


def _compare(pair: Pair, name: str, script: str, user: list[str]) -> tuple[str, int, bool, str]:
    results = []
    for mnt, upper in ((pair.kernel, pair.kernel_upper), (pair.ours, pair.our_upper)):
        done = subprocess.run([*user, "sh", "-ec", script], cwd=mnt, capture_output=True,
                              text=True)
        assert done.returncode == 0, f"{script} in {mnt}: {done.stderr}"
        results.append(_state(mnt, upper, name))
    assert results[1] == results[0], f"kernel {results[0]}, overlayd {results[1]}"
    return results[0]


@pytest.mark.parametrize(("name", "script", "cleared"), [
    ("suid", "printf x >> suid", True),  # direct: open for writing only
    ("sgid", "printf x >> sgid", True),
    ("both", "printf x | dd of=both bs=1 seek=3 conv=notrunc status=none", True),
    ("suid", "printf x 1<> suid", True),  # read-write: through the page cache
    ("suid", ": > suid", True),  # O_TRUNC
    ("sgid", ": > sgid", True),
    ("suid", "truncate -s 5 suid", True),
    ("both", "fallocate -l 20000 both", True),
    ("suid", "fallocate -n -l 20000 suid", True),  # keeping the size
    ("suid-capped", "printf x 1<> suid-capped", True),
    ("mine", "printf x >> mine; chmod 4777 mine; printf y >> mine", True),
    ("mine", "exec 3>> mine; printf x >&3; chmod 6777 mine; printf y >&3", True),
    ("mine", "chmod 4777 mine; chown nobody mine", True),
    ("plain", "printf x >> plain", False),
])
def test_a_process_without_cap_fsetid_clears_set_id_bits(pair: Pair, name: str, script: str,
                                                          cleared: bool) -> None:
    mode, *_ = _compare(pair, name, script, AS_NOBODY)
    kernel_shows(("s" not in mode) is cleared or name == "plain", f"{script}: {mode}")


@pytest.mark.parametrize(("name", "script", "mode"), [
    ("suid", "printf x >> suid", "-rwsrwxrwx"),
    ("suid", "printf x 1<> suid", "-rwsrwxrwx"),
    ("suid", ": > suid", "-rwsrwxrwx"),
    ("suid", "truncate -s 5 suid", "-rwsrwxrwx"),
    ("suid", "fallocate -l 20000 suid", "-rwsrwxrwx"),
    ("suid-shut", "chown 1:1 suid-shut", "-rwxr-xr-x"),  # chown clears it even for root
    ("suid-shut", "python3 -c 'import os; os.chown(\"suid-shut\", -1, -1)'", "-rwxr-xr-x"),
    ("capped", "printf x >> capped", "-rwxr-xr-x"),
    ("capped", "printf x 1<> capped", "-rwxr-xr-x"),
    ("capped", ": > capped", "-rwxr-xr-x"),
    ("capped", "fallocate -l 20000 capped", "-rwxr-xr-x"),
    ("capped", "python3 -c 'import os; os.chown(\"capped\", -1, -1)'", "-rwxr-xr-x"),
    ("suid-capped", "printf x >> suid-capped", "-rwsrwxrwx"),
    ("suid-capped", "printf x 1<> suid-capped", "-rwsrwxrwx"),
    ("suid-capped", "truncate -s 5 suid-capped", "-rwsrwxrwx"),
    ("suid-capped", "fallocate -l 20000 suid-capped", "-rwsrwxrwx"),
    ("suid-capped", "chown 1:1 suid-capped", "-rwxrwxrwx"),
])
def test_root_keeps_set_id_bits_but_not_file_capabilities(pair: Pair, name: str, script: str,
                                                          mode: str) -> None:
    shown, _, capped, _ = _compare(pair, name, script, [])
    kernel_shows((shown, capped) == (mode, False), f"{script}: {shown}, capability {capped}")


@pytest.mark.parametrize(("where", "user", "made", "written"), [
    ("pub", AS_NOBODY, "-rwsr-sr-x", "-rwxr-xr-x"),
    ("pub", [], "-rwsr-sr-x", "-rwsr-sr-x"),
    # a set-group-ID directory whose group nobody is not in: mode_strip_sgid
    ("shared", AS_NOBODY, "-rwsr-xr-x", "-rwxr-xr-x"),
    ("shared", [], "-rwsr-sr-x", "-rwsr-sr-x"),
])
def test_a_file_made_set_id_keeps_the_bits_until_written(pair: Pair, where: str, user: list[str],
                                                         made: str, written: str) -> None:
    """Made with mode 6775 and written through the handle that made it, whose mode overlayd
    knows from the create."""
    script = (f"umask 022; python3 -c 'import os, stat; fd = os.open(\"{where}/new\", os.O_WRONLY"
              " | os.O_CREAT, 0o6775); print(stat.filemode(os.fstat(fd).st_mode));"
              " os.write(fd, b\"x\")'")
    before = {}
    for mnt in (pair.kernel, pair.ours):
        before[mnt] = subprocess.run([*user, "sh", "-ec", script], cwd=mnt, check=True,
                                     capture_output=True, text=True).stdout.strip()
    kernel_shows(before[pair.kernel] == made, f"made 6775: {before[pair.kernel]}")
    assert before[pair.ours] == before[pair.kernel]
    mode, size, _, _ = _compare(pair, f"{where}/new", "true", user)
    kernel_shows((mode, size) == (written, 1), f"made 6775 and written: {mode}")


def test_set_group_id_without_group_execute_is_a_documented_difference(pair: Pair) -> None:
    """The kernel clears set-group-ID without group execute when the writer is not in the file's
    group; the kernel's FUSE client keeps it (fuse_setattr), and so does overlayd's direct path,
    so that both of its paths agree."""
    for mnt in (pair.kernel, pair.ours):
        os.chmod(mnt / "sgid", 0o2767)
        subprocess.run([*AS_NOBODY, "sh", "-ec", "printf x >> sgid; printf y 1<> sgid"],
                       cwd=mnt, check=True)
    kernel_shows(stat.S_IMODE(os.stat(pair.kernel / "sgid").st_mode) == 0o0767, "cleared")
    assert stat.S_IMODE(os.stat(pair.ours / "sgid").st_mode) == 0o2767


def test_chown_by_root_keeping_owners_of_a_set_id_file_with_capabilities_is_a_difference(
        pair: Pair) -> None:
    """chown(-1, -1) clears set-id bits whoever calls. The kernel's FUSE client, told the file
    system clears them (FUSE_HANDLE_KILLPRIV_V2), asks for that with a SETATTR that has nothing
    to set, as it does before root's write to a file with capabilities, which keeps them:
    overlayd cannot tell the two apart there, and keeps them (Overlay._clear_privs)."""
    script = "python3 -c 'import os; os.chown(\"suid-capped\", -1, -1)'"
    for mnt in (pair.kernel, pair.ours):
        subprocess.run(["sh", "-ec", script], cwd=mnt, check=True)
    kernel = _state(pair.kernel, pair.kernel_upper, "suid-capped")
    kernel_shows(kernel[::2] == ("-rwxrwxrwx", False), f"chown(-1, -1): {kernel}")
    ours = _state(pair.ours, pair.our_upper, "suid-capped")
    assert ours[::2] == ("-rwsrwxrwx", False)
