"""Tier 1: the inode table's lookup counting, on real dir fds (no mount)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from overlayd.inodes import ROOT_INODE, InodeTable, Node


def make_root() -> Node:
    return Node(ROOT_INODE, None, b"", (0, 1), True)


def is_closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as e:
        if e.errno != errno.EBADF:
            raise
        return True
    return False


@pytest.fixture
def table() -> InodeTable:
    return InodeTable(make_root())


@pytest.fixture
def dir_fds(tmp_path: Path) -> Iterator[list[int]]:
    """Two fresh dir fds; any the test did not see closed are closed after it."""
    fds = [os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY) for _ in range(2)]
    yield fds
    for fd in fds:
        if not is_closed(fd):
            os.close(fd)


def test_root_only(table: InodeTable) -> None:
    assert len(table) == 1
    assert table.get(ROOT_INODE) is table.root
    assert list(table) == [table.root]
    table.check_invariants()


def test_root_must_be_inode_1() -> None:
    with pytest.raises(AssertionError):
        InodeTable(Node(2, None, b"", (0,), True))


def test_remember_counts(table: InodeTable) -> None:
    node = Node(5, table.root, b"f", (1,), False)
    table.remember(node)
    table.remember(node)
    table.remember(node)
    assert node.lookups == 3
    assert table.get(5) is node
    assert len(table) == 2
    table.check_invariants()


def test_node_leaves_exactly_at_zero(table: InodeTable) -> None:
    node = Node(5, table.root, b"f", (1,), False)
    for _ in range(3):
        table.remember(node)
    assert table.forget(5, 2) is None
    assert table.get(5) is node
    assert node.lookups == 1
    table.check_invariants()
    assert table.forget(5, 1) is node
    assert table.get(5) is None
    assert node.lookups == 0
    assert len(table) == 1
    table.check_invariants()


def test_forget_all_at_once(table: InodeTable) -> None:
    node = Node(7, table.root, b"d", (0, 1), True)
    for _ in range(1000):
        table.remember(node)
    assert table.forget(7, 1000) is node
    assert table.get(7) is None


def test_leaving_node_closes_its_dir_fds(table: InodeTable, dir_fds: list[int]) -> None:
    node = Node(9, table.root, b"d", (0, 1), True)
    node.fds = {0: dir_fds[0], 1: dir_fds[1]}
    table.remember(node)
    table.remember(node)
    table.forget(9, 1)
    assert not is_closed(dir_fds[0])
    assert not is_closed(dir_fds[1])
    assert table.forget(9, 1) is node
    assert is_closed(dir_fds[0])
    assert is_closed(dir_fds[1])
    assert node.fds == {}


def test_root_never_leaves(table: InodeTable, dir_fds: list[int]) -> None:
    table.root.fds = {0: dir_fds[0]}
    table.remember(table.root)
    table.remember(table.root)
    assert table.forget(ROOT_INODE, 2) is None
    assert table.get(ROOT_INODE) is table.root
    assert table.root.lookups == 0
    assert not is_closed(dir_fds[0])
    table.check_invariants()


def test_forget_unknown_inode_is_harmless(table: InodeTable) -> None:
    node = Node(5, table.root, b"f", (1,), False)
    table.remember(node)
    assert table.forget(12345, 1) is None
    assert table.forget(5, 1) is node
    assert table.forget(5, 1) is None  # already gone
    assert len(table) == 1
    table.check_invariants()


def test_node_can_come_back(table: InodeTable) -> None:
    node = Node(5, table.root, b"f", (1,), False)
    table.remember(node)
    table.forget(5, 1)
    again = Node(5, table.root, b"f", (1,), False)
    table.remember(again)
    assert table.get(5) is again
    assert again.lookups == 1
    table.check_invariants()


def test_two_nodes_for_one_inode_refused(table: InodeTable) -> None:
    node = Node(5, table.root, b"f", (1,), False)
    table.remember(node)
    with pytest.raises(AssertionError, match="two nodes for inode 5"):
        table.remember(Node(5, table.root, b"g", (0,), False))
    assert table.get(5) is node
    assert node.lookups == 1


def test_forget_more_than_counted_raises(table: InodeTable) -> None:
    node = Node(5, table.root, b"f", (1,), False)
    table.remember(node)
    with pytest.raises(AssertionError, match="lookup count of inode 5 below zero"):
        table.forget(5, 2)
    assert node.lookups == 0


def test_forget_more_than_counted_still_drops_node(table: InodeTable,
                                                   dir_fds: list[int]) -> None:
    node = Node(5, table.root, b"d", (1,), True)
    node.fds = {1: dir_fds[0]}
    table.remember(node)
    with pytest.raises(AssertionError):
        table.forget(5, 2)
    assert table.get(5) is None
    assert is_closed(dir_fds[0])
    table.check_invariants()


# --- hard-link aliases -------------------------------------------------------------------------


def test_new_node_defaults(table: InodeTable) -> None:
    node = Node(5, table.root, b"f", (1,), False)
    assert (node.lookups, node.unlinked, node.aliases, node.fds, node.top) == (0, False, [], {}, 1)


def test_add_alias_ignores_current_name_and_duplicates(table: InodeTable) -> None:
    d = Node(2, table.root, b"d", (0,), True)
    node = Node(5, table.root, b"a", (1,), False)
    node.add_alias(table.root, b"a")  # where it is located already
    node.add_alias(table.root, b"b")
    node.add_alias(d, b"a")  # the same name in another directory is another name
    node.add_alias(table.root, b"b")
    assert node.aliases == [(table.root, b"b"), (d, b"a")]


def test_drop_name_moves_node_to_another_name(table: InodeTable) -> None:
    d = Node(2, table.root, b"d", (0,), True)
    node = Node(5, table.root, b"a", (1,), False)
    node.add_alias(table.root, b"b")
    node.add_alias(d, b"c")
    node.drop_name(table.root, b"a")
    assert (node.parent, node.name) == (d, b"c")
    assert node.aliases == [(table.root, b"b")]
    node.drop_name(table.root, b"b")  # an alias, not the current name
    assert (node.parent, node.name) == (d, b"c")
    assert node.aliases == []


def test_drop_last_name_keeps_location(table: InodeTable) -> None:
    node = Node(5, table.root, b"a", (1,), False)
    node.drop_name(table.root, b"a")
    assert (node.parent, node.name, node.aliases) == (table.root, b"a", [])


def test_drop_unknown_name_changes_nothing(table: InodeTable) -> None:
    node = Node(5, table.root, b"a", (1,), False)
    node.add_alias(table.root, b"b")
    node.drop_name(table.root, b"zzz")
    assert (node.parent, node.name, node.aliases) == (table.root, b"a", [(table.root, b"b")])


# --- check_invariants catches a corrupted table --------------------------------------------


def test_invariants_catch_zero_count_node(table: InodeTable) -> None:
    node = Node(5, table.root, b"f", (1,), False)
    table.remember(node)
    table.check_invariants()
    node.lookups = 0
    with pytest.raises(AssertionError, match="<Node 5 b'f' layers=\\(1,\\) lookups=0>"):
        table.check_invariants()


def test_invariants_catch_wrong_inode_key(table: InodeTable) -> None:
    node = Node(5, table.root, b"f", (1,), False)
    table.remember(node)
    node.ino = 6
    with pytest.raises(AssertionError):
        table.check_invariants()


def test_invariants_catch_node_without_layers(table: InodeTable) -> None:
    node = Node(5, table.root, b"f", (1,), False)
    table.remember(node)
    node.layers = ()
    with pytest.raises(AssertionError):
        table.check_invariants()


def test_invariants_catch_non_dir_with_fds(table: InodeTable) -> None:
    node = Node(5, table.root, b"f", (1,), False)
    table.remember(node)
    node.fds = {1: 99999}
    with pytest.raises(AssertionError):
        table.check_invariants()
    node.fds = {}


def test_invariants_catch_non_dir_in_two_layers(table: InodeTable) -> None:
    node = Node(5, table.root, b"f", (0, 1), False)
    table.remember(node)
    with pytest.raises(AssertionError):
        table.check_invariants()


def test_invariants_catch_replaced_root(table: InodeTable) -> None:
    table._nodes[ROOT_INODE] = make_root()
    with pytest.raises(AssertionError):
        table.check_invariants()


# --- random sequences ---------------------------------------------------------------------


INODES = st.integers(min_value=ROOT_INODE, max_value=8)


class InodeTableMachine(RuleBasedStateMachine):
    """The table against a model: inode -> expected count; dir fds closed exactly on leaving."""

    @initialize()
    def setup(self) -> None:
        self.base_fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
        self.table = InodeTable(make_root())
        self.counts: dict[int, int] = {ROOT_INODE: 0}

    def teardown(self) -> None:
        if hasattr(self, "table"):
            for node in list(self.table):
                node.close_fds()
            os.close(self.base_fd)

    @rule(ino=INODES)
    def remember(self, ino: int) -> None:
        node = self.table.get(ino)
        if node is None:
            is_dir = ino % 2 == 0
            node = Node(ino, self.table.root, b"n%d" % ino, (0, 1) if is_dir else (1,), is_dir)
            if is_dir:
                node.fds = {0: os.dup(self.base_fd)}
        self.table.remember(node)
        self.counts[ino] = self.counts.get(ino, 0) + 1

    @precondition(lambda self: any(n > 0 for n in self.counts.values()))
    @rule(data=st.data())
    def forget(self, data: st.DataObject) -> None:
        ino = data.draw(st.sampled_from(sorted(i for i, n in self.counts.items() if n > 0)))
        nlookup = data.draw(st.integers(min_value=1, max_value=self.counts[ino]))
        node = self.table.get(ino)
        assert node is not None
        fds = list(node.fds.values())
        gone = self.table.forget(ino, nlookup)
        self.counts[ino] -= nlookup
        if self.counts[ino] == 0 and ino != ROOT_INODE:
            assert gone is node
            assert self.table.get(ino) is None
            assert all(is_closed(fd) for fd in fds)
            del self.counts[ino]
        else:
            assert gone is None
            assert self.table.get(ino) is node
            assert not any(is_closed(fd) for fd in fds)

    @rule(ino=st.integers(min_value=9, max_value=2**64 - 1), nlookup=st.integers(1, 2**32))
    def forget_unknown(self, ino: int, nlookup: int) -> None:
        before = len(self.table)
        assert self.table.forget(ino, nlookup) is None
        assert len(self.table) == before

    @invariant()
    def matches_model(self) -> None:
        if not hasattr(self, "table"):
            return
        self.table.check_invariants()
        assert {node.ino for node in self.table} == set(self.counts)
        for ino, count in self.counts.items():
            node = self.table.get(ino)
            assert node is not None
            assert node.lookups == count


InodeTableMachine.TestCase.settings = settings(max_examples=50, stateful_step_count=40,
                                               deadline=None)
TestInodeTableMachine = InodeTableMachine.TestCase
