"""Tier 1: OpenModes keeps page-cache and passthrough opens of one node apart, as the kernel
demands (it fails a mixed open with EIO), and hands back each backing id once."""

from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest

from overlayd.openmodes import OpenModes


class FakeKernel:
    """FUSE_DEV_IOC_BACKING_OPEN and _CLOSE: ids handed out and not yet given back."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.open_ids: dict[int, int] = {}  # id -> fd
        self.next_id = 1
        self.calls = 0

    def backing_open(self, fd: int) -> int:
        self.calls += 1
        if self.fail:
            raise OSError(self.fail, "refused")
        backing_id, self.next_id = self.next_id, self.next_id + 1
        self.open_ids[backing_id] = fd
        return backing_id

    def backing_close(self, backing_id: int) -> None:
        del self.open_ids[backing_id]


@pytest.fixture
def kernel() -> FakeKernel:
    return FakeKernel()


@pytest.fixture
def modes(kernel: FakeKernel) -> Iterator[OpenModes]:
    m = OpenModes(kernel.backing_open, kernel.backing_close)
    yield m
    m.check_invariants()


def test_passthrough_opens_of_a_node_share_one_backing_id(modes: OpenModes,
                                                          kernel: FakeKernel) -> None:
    first = modes.passthrough(1, ino=10, fd=100, may_start=True)
    # Once passthrough, every open of the node must be: even one that could not start it.
    second = modes.passthrough(2, ino=10, fd=101, may_start=False)
    other = modes.passthrough(3, ino=11, fd=102, may_start=True)
    assert first == second != other
    assert kernel.open_ids == {first: 100, other: 102}
    modes.check_invariants()
    modes.release(1)
    assert first in kernel.open_ids  # one open left
    modes.release(2)
    modes.release(3)
    assert kernel.open_ids == {}


def test_a_page_cache_open_keeps_passthrough_off_until_it_closes(modes: OpenModes,
                                                                 kernel: FakeKernel) -> None:
    modes.cached(1, ino=10)
    modes.cached(2, ino=10)
    assert modes.passthrough(3, ino=10, fd=100, may_start=True) == 0
    assert modes.passthrough(4, ino=11, fd=101, may_start=True) != 0  # another node
    modes.release(1)
    assert modes.passthrough(5, ino=10, fd=100, may_start=True) == 0
    modes.release(2)
    modes.release(3)  # the caller opened it otherwise (direct): nothing to undo
    backing_id = modes.passthrough(6, ino=10, fd=100, may_start=True)
    assert backing_id
    assert kernel.open_ids[backing_id] == 100
    for fh in (4, 6):
        modes.release(fh)
    assert kernel.open_ids == {}


def test_only_an_open_that_may_start_it_starts_passthrough(modes: OpenModes,
                                                           kernel: FakeKernel) -> None:
    assert modes.passthrough(1, ino=10, fd=100, may_start=False) == 0
    assert kernel.calls == 0


@pytest.mark.parametrize("err", [errno.EPERM, errno.ELOOP, errno.EOPNOTSUPP])
def test_passthrough_the_kernel_refuses_is_off_for_good(err: int) -> None:
    kernel = FakeKernel(fail=err)
    modes = OpenModes(kernel.backing_open, kernel.backing_close)
    assert modes.passthrough(1, ino=10, fd=100, may_start=True) == 0
    kernel.fail = 0
    assert modes.passthrough(2, ino=11, fd=101, may_start=True) == 0
    assert kernel.calls == 1
    modes.check_invariants()


def test_a_passing_failure_skips_one_open_only(kernel: FakeKernel) -> None:
    kernel.fail = errno.EMFILE
    modes = OpenModes(kernel.backing_open, kernel.backing_close)
    assert modes.passthrough(1, ino=10, fd=100, may_start=True) == 0
    kernel.fail = 0
    assert modes.passthrough(2, ino=10, fd=100, may_start=True) != 0
    modes.release(2)
    assert kernel.open_ids == {}


def test_without_passthrough_nothing_is_asked(kernel: FakeKernel) -> None:
    modes = OpenModes(None, kernel.backing_close)
    assert modes.passthrough(1, ino=10, fd=100, may_start=True) == 0
    modes.cached(2, ino=10)
    modes.release(2)
    modes.release(1)
    modes.check_invariants()
    assert kernel.calls == 0
