"""The overlayd command line.

Forms (shared/DESIGN.md section 1):
  overlayd mount [-f] [-d] [--log FILE] -o OPTIONS MOUNTPOINT
  overlayd [-f] [-d] -o OPTIONS MOUNTPOINT          (fuse-overlayfs / podman mount_program)
  overlayd SOURCE MOUNTPOINT -o OPTIONS             (mount.fuse3 helper: mount -t fuse.overlayd)
  overlayd umount MOUNTPOINT
Every error is one line on stderr; bad input exits 2 before anything is mounted.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from overlayd import __version__
from overlayd.errors import UsageError

USAGE = """\
usage: overlayd mount [-f] [-d] [--log FILE] -o lowerdir=L1:L2[,upperdir=U,workdir=W] MOUNTPOINT
       overlayd [-f] [-d] -o OPTIONS MOUNTPOINT
       overlayd SOURCE MOUNTPOINT -o OPTIONS
       overlayd umount MOUNTPOINT
       overlayd --version | --help

Mount the merged view of lower layers (top first) and an optional upper layer, with the kernel
overlayfs's semantics. Without upperdir the mount is read-only.

  -o OPTIONS      comma-separated mount options (may be repeated)
  -f, --foreground  stay in the foreground (default: return once the mount answers)
  -d, --debug     log every request (implies nothing else)
  --log FILE      log to FILE instead of stderr (foreground) or syslog (daemon)
  -h, --help      show this help
  -V, --version   show the version
"""


@dataclass
class Command:
    action: str  # "mount", "umount", "help", "version"
    options: list[str] = field(default_factory=list)
    positionals: list[str] = field(default_factory=list)
    foreground: bool = False
    debug: bool = False
    log_file: str | None = None


def parse_argv(argv: Sequence[str]) -> Command:
    cmd = Command("mount")
    args = list(argv)
    if args and args[0] in ("mount", "umount"):
        cmd.action = args.pop(0)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            cmd.positionals.extend(args[i:])
            break
        if arg in ("-h", "--help"):
            return Command("help")
        if arg in ("-V", "--version"):
            return Command("version")
        if arg in ("-f", "--foreground"):
            cmd.foreground = True
        elif arg in ("-d", "--debug"):
            cmd.debug = True
        elif arg == "-o" or arg == "--log":
            if i >= len(args):
                raise UsageError(f"{arg} needs a value")
            if arg == "-o":
                cmd.options.append(args[i])
            else:
                cmd.log_file = args[i]
            i += 1
        elif arg.startswith("-o"):
            cmd.options.append(arg[2:])
        elif arg.startswith("--log="):
            cmd.log_file = arg[len("--log="):]
        elif arg.startswith("-") and arg != "-":
            raise UsageError(f"unknown flag {arg!r}")
        else:
            cmd.positionals.append(arg)
    return cmd


def _mountpoint(cmd: Command) -> bytes | None:
    pos = cmd.positionals
    if cmd.action == "umount":
        if len(pos) != 1:
            raise UsageError("umount takes exactly one MOUNTPOINT")
    elif len(pos) > 2:
        raise UsageError(f"too many arguments: {' '.join(pos)}")
    if not pos:
        return None
    # One positional: the mountpoint. Two: mount.fuse3's SOURCE MOUNTPOINT (source unused).
    return os.path.abspath(os.fsencode(pos[-1]))


def do_mount(cmd: Command) -> int:
    from overlayd.options import parse_options, validate  # deferred: keeps --help fast

    opts = parse_options(cmd.options)
    mountpoint = _mountpoint(cmd)
    validate(opts, mountpoint)
    assert mountpoint is not None
    if cmd.log_file is not None:
        cmd.log_file = os.path.abspath(cmd.log_file)
    from overlayd import daemon  # deferred: pyfuse3 and trio only when mounting

    if cmd.foreground:
        return daemon.run_foreground(opts, mountpoint, cmd.debug, cmd.log_file)
    return daemon.run_daemon(opts, mountpoint, cmd.debug, cmd.log_file)


def _unescape_mountinfo(field: bytes) -> bytes:
    # The kernel escapes space, tab, newline and backslash as \NNN (octal).
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)


def mount_fstype(mountpoint: bytes) -> str | None:
    """The filesystem type mounted at *mountpoint* (the topmost), from /proc/self/mountinfo."""
    found = None
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            if _unescape_mountinfo(fields[4]) == mountpoint:
                found = os.fsdecode(fields[fields.index(b"-") + 1])
    return found


def do_umount(cmd: Command) -> int:
    mountpoint = _mountpoint(cmd)
    assert mountpoint is not None
    fstype = mount_fstype(mountpoint)
    if fstype is None:
        raise UsageError(f"{os.fsdecode(mountpoint)}: not mounted")
    if fstype != "fuse.overlayd":
        raise UsageError(f"{os.fsdecode(mountpoint)}: not an overlayd mount ({fstype})")
    # fusermount3 -u also clears a dead ("transport endpoint is not connected") mount.
    proc = subprocess.run(["fusermount3", "-u", os.fsdecode(mountpoint)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        reason = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
        print(f"overlayd: umount {os.fsdecode(mountpoint)}: {reason}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cmd = parse_argv(sys.argv[1:] if argv is None else argv)
        if cmd.action == "help":
            sys.stdout.write(USAGE)
            return 0
        if cmd.action == "version":
            print(f"overlayd {__version__}")
            return 0
        if cmd.action == "umount":
            return do_umount(cmd)
        return do_mount(cmd)
    except UsageError as e:
        print(f"overlayd: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except OSError as e:
        print(f"overlayd: {e}", file=sys.stderr)
        return 1
