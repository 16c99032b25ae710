"""How the kernel does each open file's I/O: through its page cache (FUSE READ and WRITE
requests), directly (FOPEN_DIRECT_IO: a WRITE request per write(2)), or passthrough to the
upper file (FOPEN_PASSTHROUGH, Linux 6.9+: the kernel reads, writes and maps the real file
itself, and the daemon sees no request at all).

Passthrough needs a backing id, which the kernel hands out for an open file
(FUSE_DEV_IOC_BACKING_OPEN, CAP_SYS_ADMIN only). The kernel fails an open with EIO when it would
mix modes on one inode: a page-cache open while a passthrough one is open, or the reverse, or
two backing files for one inode. OpenModes keeps them apart: a node open through the page cache
gets no passthrough open until the last of those closes (then the next opens fall back to the
other modes), and all passthrough opens of a node share one backing id, given back when the
last of them closes.

Only upper files go passthrough: a lower file may be copied up while it is open, and a
passthrough open would go on reading the lower copy (Overlay._follow_copy_up moves the others).
Nor does an O_DIRECT open start passthrough: the kernel opens the backing file with the
caller's flags, and a later fcntl(F_SETFL) reaches the FUSE file only, so the backing file
keeps O_DIRECT and its alignment rules after the caller dropped it (dd does, for its last
block). The same holds for O_APPEND, which is rarely dropped: a passthrough file keeps
appending (a documented difference; the kernel's overlay passes the change on).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

# The kernel or the daemon cannot do passthrough at all: no FUSE_PASSTHROUGH (before 6.9, or
# not granted at INIT), no CAP_SYS_ADMIN (rootless), or an upper layer on a stacked filesystem
# (ELOOP: max_stack_depth is 1).
UNAVAILABLE = frozenset({errno.EPERM, errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS,
                         errno.ELOOP})


@dataclass
class Backing:
    id: int
    opens: int = 0


class OpenModes:
    def __init__(self, backing_open: Callable[[int], int] | None,
                 backing_close: Callable[[int], None]) -> None:
        self._backing_open = backing_open  # None: no passthrough
        self._backing_close = backing_close
        self._backing: dict[int, Backing] = {}  # node inode -> its backing file
        self._cached: dict[int, int] = {}  # node inode -> its opens through the page cache
        self._handles: dict[int, tuple[int, bool]] = {}  # fh -> (node inode, passthrough)

    def passthrough(self, fh: int, ino: int, fd: int, may_start: bool) -> int:
        """The backing id for handle *fh* of node *ino*, open as *fd*, to be opened passthrough
        with; 0: not passthrough, and the caller opens it otherwise. Once a node has passthrough
        opens every open of it must be one; *may_start*: this one may be the first (an upper
        file, not O_DIRECT)."""
        backing = self._backing.get(ino)
        if backing is None:
            if not may_start or self._backing_open is None or self._cached.get(ino):
                return 0
            try:
                backing = Backing(self._backing_open(fd))
            except OSError as e:
                if e.errno in UNAVAILABLE:
                    log.info("passthrough is off: %s", e.strerror)
                    self._backing_open = None
                else:
                    log.warning("cannot open inode %d passthrough: %s", ino, e)
                return 0
            self._backing[ino] = backing
        backing.opens += 1
        self._handles[fh] = (ino, True)
        return backing.id

    def cached(self, fh: int, ino: int) -> None:
        """Handle *fh* of node *ino* is open through the kernel's page cache (counted only
        while passthrough can still start: it holds that back)."""
        if self._backing_open is None:
            return
        self._cached[ino] = self._cached.get(ino, 0) + 1
        self._handles[fh] = (ino, False)

    def release(self, fh: int) -> None:
        """Handle *fh* closed (the kernel has left its mode before it sends the RELEASE)."""
        opened = self._handles.pop(fh, None)
        if opened is None:
            return  # direct: neutral to the kernel
        ino, passthrough = opened
        if not passthrough:
            left = self._cached.pop(ino) - 1
            if left:
                self._cached[ino] = left
            return
        backing = self._backing[ino]
        backing.opens -= 1
        if not backing.opens:
            del self._backing[ino]
            try:
                self._backing_close(backing.id)
            except OSError as e:
                log.warning("cannot close backing id %d: %s", backing.id, e)

    def check_invariants(self) -> None:
        counted = {ino: 0 for ino in [*self._backing, *self._cached]}
        for ino, _ in self._handles.values():
            counted[ino] += 1
        assert not self._backing.keys() & self._cached.keys()
        for ino, count in counted.items():
            backing = self._backing.get(ino)
            assert count == (backing.opens if backing else self._cached[ino]) > 0
