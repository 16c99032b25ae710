"""The documented, deliberate differences between overlayd and the kernel's overlayfs, in one
place: each normaliser below erases exactly one of them from a snapshot before comparison.

1. Whiteouts: the kernel (5.8+) hard-links one shared whiteout inode into every place that needs
   one; overlayd makes each with mknod. Same type and device number, different nlink and inode;
   and the group: the kernel's is made in the workdir, overlayd's in place, where a set-group-ID
   directory hands down its group (the fuzzer's seed 20261209). Overlayfs reads neither.
2. Lower hard links in a writable mount: in both, each name is an inode of its own, so that a
   copy-up through one name breaks the link (the kernel's index=off). The kernel's inodes all
   report the origin's st_ino; a FUSE inode's number is its st_ino, so overlayd's differ.
3. Times set while a test runs differ by timing between two runs: compare "changed" only.
4. A whiteout inside a directory that only one lower layer holds: the kernel lists it (it reads
   such a directory raw, ovl_dir_is_real) while its lookup denies it; overlayd lists no name its
   lookup denies (tests/test_fuzz_regressions.py shows both; the fuzzer's stacks avoid it).

Asserted rather than normalised (tests/test_fuzz_regressions.py): a lower FIFO, socket or
device held open and removed, then changed through its fd, fails with EEXIST, as a regular file
does in the kernel; the kernel copies such an object up to its old name over the whiteout, so
that the removed object comes back (the fuzzer met it with seed 20261208; its FIFO handles
now only read, write and stat).

Asserted rather than normalised (the snapshots never meet it): a write by a process outside a
file's group leaves a set-group-ID bit without group execute, which the kernel's overlay clears;
that is the kernel's FUSE client's rule, and overlayd's own clearing follows it
(tests/test_kernel_setid.py).

Asserted rather than normalised (tests/test_kernel_setid.py): chown(-1, -1) by root keeps the
set-id bits of a file with a file capability, which the kernel's overlay clears: with
FUSE_HANDLE_KILLPRIV_V2 the kernel's FUSE client asks for it as for root's write to such a file,
which keeps them.

Not met by the snapshots (no test turns O_APPEND off): a passthrough file keeps appending after
fcntl(F_SETFL) turns O_APPEND off (overlayd/openmodes.py).

Known gap with a stock pyfuse3 only (not deliberate; a strict xfail in
tests/test_fuzz_regressions.py and exempted in the fuzzer when the binding lacks our patch): a
failing setxattr with XATTR_CREATE/XATTR_REPLACE copies up in the kernel and not in overlayd,
because stock pyfuse3 answers those flags itself without calling the filesystem's setxattr.
"""

from __future__ import annotations

import dataclasses
import stat

from tests.snapshot import Entry

CHANGED = -1  # an mtime set while the scenario ran


def whiteouts_unshared(snap: dict[bytes, Entry]) -> dict[bytes, Entry]:
    return {path: dataclasses.replace(entry, nlink=1, inode_group=path, gid=0)
            if entry.kind == stat.S_IFCHR and entry.rdev == (0, 0) else entry
            for path, entry in snap.items()}


def lower_links_split(snap: dict[bytes, Entry]) -> dict[bytes, Entry]:
    return {path: dataclasses.replace(entry, inode_group=path)
            if entry.kind != stat.S_IFDIR and entry.nlink > 1 else entry
            for path, entry in snap.items()}


def recent_times(snap: dict[bytes, Entry], since_ns: int) -> dict[bytes, Entry]:
    return {path: dataclasses.replace(entry, mtime_ns=CHANGED)
            if entry.mtime_ns >= since_ns else entry
            for path, entry in snap.items()}


def normalize(snap: dict[bytes, Entry], since_ns: int) -> dict[bytes, Entry]:
    """Every difference above erased: for trees changed through a writable mount."""
    return lower_links_split(whiteouts_unshared(recent_times(snap, since_ns)))
