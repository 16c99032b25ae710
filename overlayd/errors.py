"""Domain errors of the core, each carrying the errno the FUSE adapter answers with."""

from __future__ import annotations

import argparse
import errno
from typing import NoReturn


class OverlayError(Exception):
    """An error the core reports to the caller as *errno*."""

    errno: int = errno.EIO

    def __init__(self, message: str = "", err: int | None = None) -> None:
        super().__init__(message)
        if err is not None:
            self.errno = err


class ReadOnly(OverlayError):
    """A change was asked of a mount without an upper layer."""

    errno = errno.EROFS


class UsageError(Exception):
    """Bad command line or mount options: reported as one line, exit status 2."""


class MountError(Exception):
    """A mount that cannot be made (its layers in use, libfuse refusing it, ...): reported as
    one line, exit status 1."""


class CommandParser(argparse.ArgumentParser):
    """argparse for the layer commands, its errors one line like every other usage error
    (``overlayd: export: MESSAGE``, exit status 2) instead of a usage dump."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("overlayd ")
        raise UsageError(f"{command}: {message} (overlayd {command} --help)")
