"""Tier 1: the proxy of trio given to pyfuse3's session loop (overlayd/fastpath.py)."""

from __future__ import annotations

import os

import pyfuse3
import trio

from overlayd import fastpath


def test_install_replaces_only_what_it_must_and_uninstall_restores() -> None:
    assert fastpath.install()
    try:
        proxy = pyfuse3.trio  # type: ignore[attr-defined]
        assert proxy is not trio
        assert proxy.lowlevel.current_trio_token is trio.lowlevel.current_trio_token
        assert proxy.ClosedResourceError is trio.ClosedResourceError
        assert proxy.open_nursery is trio.open_nursery
        assert proxy.Lock is not trio.Lock
    finally:
        fastpath.uninstall()
    assert pyfuse3.trio is trio  # type: ignore[attr-defined]


def test_wait_readable_returns_for_a_readable_fd_and_waits_otherwise() -> None:
    proxy = fastpath._Trio()
    r, w = os.pipe()
    try:
        os.write(w, b"x")

        async def readable_now() -> None:
            for _ in range(3 * fastpath.YIELD_EVERY):  # through the trio fallback too
                await proxy.lowlevel.wait_readable(r)

        trio.run(readable_now)
        os.read(r, 1)

        async def not_readable() -> bool:
            with trio.move_on_after(0.2) as scope:
                await proxy.lowlevel.wait_readable(r)
            return scope.cancelled_caught

        assert trio.run(not_readable)  # nothing to read: it waited until cancelled

        async def sole_reader_lock() -> None:
            async with proxy.Lock(), proxy.Lock():  # never waits: the loop has one reader
                pass

        trio.run(sole_reader_lock)
    finally:
        os.close(r)
        os.close(w)
