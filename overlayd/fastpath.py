"""Fewer trio scheduler round trips per FUSE request.

pyfuse3's session loop (internal.pxi, ``_wait_fuse_readable``) takes a ``trio.Lock`` and then
``trio.lowlevel.wait_readable(session_fd)`` before every request: three scheduler round trips,
each with an epoll_wait and an epoll_ctl, that cost more than most of our handlers (profiled:
about 40% of the daemon's time in a create loop). The loop finds those names through the module
global ``trio`` of pyfuse3, so giving pyfuse3 a proxy of trio with two names replaced removes
them:

- ``Lock``: a lock that never waits. It only serialises readers of /dev/fuse, and overlayd runs
  exactly one reader (``pyfuse3.main(max_tasks=1)``: our handlers never await, so more worker
  tasks would only add task switches).
- ``lowlevel.wait_readable``: when a zero-timeout poll says the fd is readable (a request, or the
  unmount's hang-up), return at once; otherwise, and once every ``YIELD_EVERY`` requests so the
  signal handler and other tasks are never starved under load, wait through trio as before.

Everything else is trio itself. If pyfuse3 changes its loop (it has no ``trio`` global any
more), nothing is patched and the daemon runs at pyfuse3's own speed.
"""

from __future__ import annotations

import logging
import select
import time
import types
from typing import Any

import pyfuse3
import trio

log = logging.getLogger(__name__)

YIELD_EVERY = 32  # requests served without a trio checkpoint, at most
BUSY_WINDOW = 0.05  # seconds after a request during which the loop waits in poll
BUSY_WAIT_MS = 5  # the longest wait in poll, during which trio's other tasks wait


class _SoleReaderLock:
    """Stands in for trio.Lock in pyfuse3's reader loop, which has a single reader."""

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


class _Lowlevel(types.ModuleType):
    def __init__(self) -> None:
        super().__init__("trio.lowlevel")
        self._poll = select.poll()
        self._fd = -1
        self._served = 0
        self._last = 0.0  # when a request last came in through trio or the busy wait

    def __getattr__(self, name: str) -> Any:
        return getattr(trio.lowlevel, name)

    async def wait_readable(self, fd: int) -> None:
        if fd != self._fd:
            if self._fd >= 0:
                self._poll.unregister(self._fd)
            self._poll.register(fd, select.POLLIN)
            self._fd = fd
        self._served += 1
        if self._served % YIELD_EVERY:
            if self._poll.poll(0):
                return
            now = time.monotonic()
            if now - self._last < BUSY_WINDOW and self._poll.poll(BUSY_WAIT_MS):
                # A client that just sent a request usually sends the next within a few
                # microseconds: waiting for it in poll is far cheaper than through trio.
                self._last = now
                return
        await trio.lowlevel.wait_readable(fd)
        self._last = time.monotonic()


class _Trio(types.ModuleType):
    def __init__(self) -> None:
        super().__init__("trio")
        self.lowlevel = _Lowlevel()
        self.Lock = _SoleReaderLock

    def __getattr__(self, name: str) -> Any:
        return getattr(trio, name)


def install() -> bool:
    """Give pyfuse3's session loop the fast proxy; False if pyfuse3 does not look as expected."""
    if getattr(pyfuse3, "trio", None) is not trio:
        log.info("pyfuse3 has no trio global; its session loop runs unchanged")
        return False
    pyfuse3.trio = _Trio()  # type: ignore[attr-defined]
    return True


def uninstall() -> None:
    if isinstance(getattr(pyfuse3, "trio", None), _Trio):
        pyfuse3.trio = trio  # type: ignore[attr-defined]
