"""The overlayd command line.

Forms (shared/DESIGN.md section 1):
  overlayd mount [-f] [-d] [--log FILE] -o OPTIONS MOUNTPOINT
  overlayd [-f] [-d] -o OPTIONS MOUNTPOINT          (fuse-overlayfs / podman mount_program)
  overlayd SOURCE MOUNTPOINT -o OPTIONS             (mount.fuse3 helper: mount -t fuse.overlayd)
  overlayd umount MOUNTPOINT
  overlayd mount|umount --config FILE              (systemd's overlayd@.service)
  overlayd status [--json]
Every error is one line on stderr; bad input exits 2 before anything is mounted.
"""

from __future__ import annotations

import importlib
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from overlayd import __version__
from overlayd.errors import MountError, UsageError
from overlayd.options import encode_path, parse_mountinfo, shown

USAGE = """\
usage: overlayd mount [-f] [-d] [--log FILE] -o lowerdir=L1:L2[,upperdir=U,workdir=W] MOUNTPOINT
       overlayd [-f] [-d] -o OPTIONS MOUNTPOINT
       overlayd SOURCE MOUNTPOINT -o OPTIONS
       overlayd mount [-f] [-d] --config FILE
       overlayd umount MOUNTPOINT | --config FILE
       overlayd status [--json]
       overlayd mount [-f] [-d] --layers-from SPEC [-o OPTIONS] MOUNTPOINT
       overlayd diff UPPERDIR [--lowerdir L1:L2] | overlayd diff SPEC
       overlayd export UPPERDIR|SPEC -o FILE|- [--gzip] [--mtime EPOCH] [--userxattr]
       overlayd import FILE|- DIR [--whiteouts auto|kernel|oci] [--userxattr] [--merge]
       overlayd du [--json] [--bytes] [--no-hash] SPEC...
       overlayd --version | --help

Mount the merged view of lower layers (top first) and an optional upper layer, with the kernel
overlayfs's semantics. Without upperdir the mount is read-only. diff, export, import and du work
on layer directories (overlayd COMMAND --help for each).

  -o OPTIONS      comma-separated mount options (may be repeated)
  -f, --foreground  stay in the foreground (default: return once the mount answers)
  -d, --debug     log every request (implies nothing else)
  --log FILE      log to FILE instead of stderr (foreground) or syslog (daemon); SIGHUP
                  reopens it
  --config FILE   take MOUNTPOINT, OPTIONS and LOG from FILE, shell-style KEY=VALUE lines
                  (systemd/README.md); more -o options are added after OPTIONS
  --layers-from SPEC  take the layers from a container engine's store: overlay2:DIR (Docker's
                  .../overlay2/<id>), containerd:ROOT/snapshots/N (containerd's overlayfs
                  snapshotter), or L1:L2 (plain directories, top first); -o adds options,
                  -o ro mounts a writable layer read-only
  --json          status: print JSON instead of a table
  -h, --help      show this help
  -V, --version   show the version
"""


@dataclass
class Command:
    action: str  # "mount", "umount", "status", "help", "version"
    options: list[str] = field(default_factory=list)
    positionals: list[str] = field(default_factory=list)
    foreground: bool = False
    debug: bool = False
    log_file: str | None = None
    config: str | None = None
    json: bool = False
    layers_from: str | None = None


# Commands on layer directories: each parses its own arguments.
LAYER_COMMANDS = {"diff": "overlayd.diff:main_diff", "export": "overlayd.oci:main_export",
                  "import": "overlayd.oci:main_import", "du": "overlayd.du:main_du"}


def parse_argv(argv: Sequence[str]) -> Command:
    cmd = Command("mount")
    args = list(argv)
    if args and args[0] in LAYER_COMMANDS:
        return Command(args[0], positionals=args[1:])
    if args and args[0] in ("mount", "umount", "status"):
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
        elif arg == "--json":
            cmd.json = True
        elif arg in ("-o", "--log", "--config", "--layers-from"):
            if i >= len(args):
                raise UsageError(f"{arg} needs a value")
            if arg == "-o":
                cmd.options.append(args[i])
            elif arg == "--log":
                cmd.log_file = args[i]
            elif arg == "--config":
                cmd.config = args[i]
            else:
                cmd.layers_from = args[i]
            i += 1
        elif arg.startswith("-o"):
            cmd.options.append(arg[2:])
        elif arg.startswith("--log="):
            cmd.log_file = arg[len("--log="):]
        elif arg.startswith("--config="):
            cmd.config = arg[len("--config="):]
        elif arg.startswith("--layers-from="):
            cmd.layers_from = arg[len("--layers-from="):]
        elif arg.startswith("-") and arg != "-":
            raise UsageError(f"unknown flag {arg!r}")
        else:
            cmd.positionals.append(arg)
    if cmd.json and cmd.action != "status":
        raise UsageError("--json goes with status")
    if cmd.config is not None and cmd.action not in ("mount", "umount"):
        raise UsageError("--config goes with mount or umount")
    if cmd.action == "status" and (cmd.positionals or cmd.options):
        raise UsageError("status takes no arguments")
    if cmd.layers_from is not None and cmd.action != "mount":
        raise UsageError("--layers-from goes with mount")
    return cmd


# --- the config file of overlayd@.service ------------------------------------------------------

CONFIG_KEYS = ("MOUNTPOINT", "OPTIONS", "LOG")


def read_config(path: str) -> dict[str, str]:
    """Read KEY=VALUE lines (shell quoting, # comments), as systemd's EnvironmentFile= does.

    Known keys: MOUNTPOINT (absolute), OPTIONS (what -o takes), LOG (absolute, optional). An
    unknown or repeated key is an error: a typo must not silently change the mount.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise UsageError(f"config {shown(path)}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"config {shown(path)}: not UTF-8 text") from None
    except ValueError:
        raise UsageError(f"config {shown(path)}: contains a NUL character") from None
    config: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        where = f"config {shown(path)} line {number}"
        try:
            words = shlex.split(line, comments=True)
        except ValueError as e:
            raise UsageError(f"{where}: {e}") from None
        if not words:
            continue
        key, eq, value = words[0].partition("=")
        if len(words) != 1 or not eq:
            raise UsageError(f"{where}: expected KEY=VALUE (quote values holding spaces)")
        if key not in CONFIG_KEYS:
            raise UsageError(f"{where}: unknown key {key!r} (known: {', '.join(CONFIG_KEYS)})")
        if key in config:
            raise UsageError(f"{where}: {key} given twice")
        if key in ("MOUNTPOINT", "LOG") and not value.startswith("/"):
            raise UsageError(f"{where}: {key} must be an absolute path")
        config[key] = value
    if "MOUNTPOINT" not in config:
        raise UsageError(f"config {shown(path)}: no MOUNTPOINT=")
    return config


def apply_config(cmd: Command) -> None:
    """Fill *cmd* from its --config file: the file's OPTIONS come before any -o given."""
    if cmd.config is None:
        return
    config = read_config(cmd.config)
    if cmd.positionals:
        raise UsageError(f"the mountpoint comes from {shown(cmd.config)}: "
                         f"no {' '.join(map(shown, cmd.positionals))} on the command line")
    cmd.positionals = [config["MOUNTPOINT"]]
    if cmd.action == "mount":
        if "OPTIONS" not in config:
            raise UsageError(f"config {shown(cmd.config)}: no OPTIONS=")
        cmd.options = [config["OPTIONS"], *cmd.options]
        if cmd.log_file is None:
            cmd.log_file = config.get("LOG")


def _mountpoint(cmd: Command) -> bytes | None:
    pos = cmd.positionals
    if cmd.action == "umount":
        if len(pos) != 1:
            raise UsageError("umount takes exactly one MOUNTPOINT")
    elif len(pos) > 2:
        raise UsageError(f"too many arguments: {' '.join(map(shown, pos))}")
    if not pos:
        return None
    # One positional: the mountpoint. Two: mount.fuse3's SOURCE MOUNTPOINT (source unused).
    if "\0" in pos[-1]:  # from a --config file
        raise UsageError(f"mountpoint {pos[-1]!r} contains a NUL character")
    return os.path.abspath(encode_path("mountpoint", pos[-1]))


def do_mount(cmd: Command) -> int:
    from overlayd.options import parse_options, validate  # deferred: keeps --help fast

    apply_config(cmd)
    if cmd.layers_from is not None:
        cmd.options = [layers_from_options(cmd.layers_from, cmd.options), *cmd.options]
    opts = parse_options(cmd.options)
    mountpoint = _mountpoint(cmd)
    if mountpoint is not None:
        # Before validate stats it: a dead mount's stat fails with ENOTCONN, a stopped
        # daemon's hangs. The parent resolved, the last component as given.
        head, tail = os.path.split(mountpoint)
        _refuse_overlayd_mount(mountpoint, os.path.join(os.path.realpath(head), tail))
    validate(opts, mountpoint)
    assert mountpoint is not None
    _refuse_overlayd_mount(mountpoint, os.path.realpath(mountpoint))  # through a symlink
    if cmd.log_file is not None:
        cmd.log_file = os.path.abspath(cmd.log_file)
        _check_log_file(cmd.log_file)
    from overlayd import daemon  # deferred: pyfuse3 and trio only when mounting

    if cmd.foreground:
        return daemon.run_foreground(opts, mountpoint, cmd.debug, cmd.log_file)
    return daemon.run_daemon(opts, mountpoint, cmd.debug, cmd.log_file)


def layers_from_options(spec: str, options: list[str]) -> str:
    """The -o options that mount the stack *spec* names (overlayd.stores). The stack gives the
    layers: -o may add any other option, and ``ro`` mounts a writable layer read-only."""
    from overlayd.options import option_keys
    from overlayd.stores import resolve_stack

    keys = option_keys(options)
    if {"lowerdir", "upperdir", "workdir"} & set(keys):
        raise UsageError(f"--layers-from {spec} gives the layers: no lowerdir, upperdir or "
                         f"workdir in -o")
    stack = resolve_stack(spec)
    if [k for k in keys if k in ("ro", "rw")][-1:] == ["ro"]:
        stack = stack.read_only()
    return stack.mount_options()


def _refuse_overlayd_mount(mountpoint: bytes, real: bytes) -> None:
    """A second overlayd on the same mountpoint would hide the first one's files from new
    lookups while its open files live on: refuse, as podman expects one mount per point."""
    if mount_fstype(real) == OVERLAYD_FSTYPE:
        raise UsageError(f"mountpoint {shown(mountpoint)} is already an overlayd mount "
                         f"(overlayd umount it first)")


def _check_log_file(path: str) -> None:
    """Open --log FILE as the daemon will, so that a bad path is a usage error here rather
    than a dying daemon with nowhere to say why."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    except OSError as e:
        raise UsageError(f"--log {shown(path)}: {e.strerror}") from None
    except ValueError:
        raise UsageError(f"--log {shown(path)}: contains a NUL character") from None
    os.close(fd)


def mounts() -> list[tuple[bytes, str]]:
    """(mountpoint, fstype) of every mount, bottom first, from /proc/self/mountinfo."""
    with open("/proc/self/mountinfo", "rb") as f:
        return [(point, os.fsdecode(fstype)) for point, fstype, _ in parse_mountinfo(f.read())]


def mount_fstype(mountpoint: bytes) -> str | None:
    """The filesystem type mounted at *mountpoint* (the topmost), from /proc/self/mountinfo."""
    found = None
    for point, fstype in mounts():
        if point == mountpoint:
            found = fstype
    return found


OVERLAYD_FSTYPE = "fuse.overlayd"


def _fusermount(flag: str, mountpoint: bytes) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["fusermount3", flag, os.fsdecode(mountpoint)],
                          capture_output=True, text=True, check=False)


def do_umount(cmd: Command) -> int:
    apply_config(cmd)
    mountpoint = _mountpoint(cmd)
    assert mountpoint is not None
    fstype = mount_fstype(mountpoint)
    if fstype is None:
        raise UsageError(f"{shown(mountpoint)}: not mounted")
    if fstype != OVERLAYD_FSTYPE:
        raise UsageError(f"{shown(mountpoint)}: not an overlayd mount ({fstype})")
    # fusermount3 -u also clears a dead ("transport endpoint is not connected") mount. Nothing
    # here looks at the mountpoint itself: a hung daemon would hang us too.
    proc = _fusermount("-u", mountpoint)
    if proc.returncode != 0:
        reason = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
        print(f"overlayd: umount {shown(mountpoint)}: {reason}", file=sys.stderr)
        return 1
    _remove_stale_state(mountpoint)
    return 0


def _remove_stale_state(mountpoint: bytes) -> None:
    """A daemon killed with its mount leaves its state file: remove it once it is unmounted."""
    from overlayd import daemon

    for path, info in daemon.read_states():
        # *mountpoint* matched /proc/self/mountinfo: it is the path the state file records.
        if os.fsencode(info["mountpoint"]) == mountpoint and not daemon.daemon_alive(info):
            daemon.remove_state(path, pid=info["pid"])


# --- status ------------------------------------------------------------------------------------

# What status shows of a daemon's state file (daemon.write_state), besides mountpoint and state.
STATUS_FIELDS = ("pid", "lowerdirs", "upperdir", "workdir", "writable", "fsync", "redirect_dir",
                 "log_file")

def status_entries() -> list[dict[str, Any]]:
    """The overlayd mounts of this mount namespace, each with what its daemon's state file says.

    state: "running", "stopped" (SIGSTOP), "dead" (its daemon is gone: the mount answers
    ENOTCONN until `overlayd umount`), or "unknown" (no daemon found). Without a state file we
    can read (a user's daemon seen by root, an older overlayd), the daemon's command line
    tells. The mountpoint itself is never touched: a stopped daemon would hang us.
    """
    from overlayd import daemon

    states: dict[bytes, dict[str, Any]] = {}
    for _, found in daemon.read_states():
        states.setdefault(os.fsencode(found["mountpoint"]), found)  # our own directory first
    entries = []
    by_cmdline: dict[bytes, dict[str, Any]] | None = None
    for point, fstype in mounts():
        if fstype != OVERLAYD_FSTYPE:
            continue
        info = states.get(point)
        if info is None:
            if by_cmdline is None:
                by_cmdline = daemons_by_cmdline()
            info = by_cmdline.get(point)
        entry: dict[str, Any] = {"mountpoint": os.fsdecode(point), "state": "unknown"}
        entry.update({k: None if info is None else info.get(k) for k in STATUS_FIELDS})
        if info is not None:
            if not daemon.daemon_alive(info):
                entry["state"] = "dead"
            elif daemon.proc_state(info["pid"]) in ("T", "t"):
                entry["state"] = "stopped"
            else:
                entry["state"] = "running"
        entries.append(entry)
    return entries


def daemons_by_cmdline() -> dict[bytes, dict[str, Any]]:
    """What the command lines of running overlayd mount daemons say, by absolute mountpoint:
    for mounts without a state file we can read (another user's daemon, an older overlayd)."""
    from overlayd import daemon
    from overlayd.options import parse_options

    found: dict[bytes, dict[str, Any]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")[:-1]
        except OSError:
            continue
        # python -m overlayd ..., /usr/bin/python3 /usr/local/bin/overlayd ..., overlayd ...
        starts = [i for i, arg in enumerate(argv[:3]) if os.path.basename(arg) == b"overlayd"]
        if not starts or daemon.proc_state(int(entry)) in (None, "Z", "X"):
            continue
        try:
            cmd = parse_argv([os.fsdecode(a) for a in argv[starts[0] + 1:]])
            if cmd.action != "mount":
                continue
            apply_config(cmd)
            if not cmd.positionals or not cmd.positionals[-1].startswith("/"):
                continue  # relative to a directory the daemon has left
            opts = parse_options(cmd.options)
        except (UsageError, OSError):
            continue
        pid = int(entry)
        # normpath, not realpath: a lookup of a mountpoint would hang on a hung daemon.
        found[os.path.normpath(os.fsencode(cmd.positionals[-1]))] = {
            "pid": pid, "start_time": daemon.proc_start_time(pid),
            "lowerdirs": [os.fsdecode(d) for d in opts.lowerdirs],
            "upperdir": None if opts.upperdir is None else os.fsdecode(opts.upperdir),
            "workdir": None if opts.workdir is None else os.fsdecode(opts.workdir),
            "writable": opts.writable, "fsync": opts.fsync, "redirect_dir": opts.redirect_dir,
            "log_file": cmd.log_file}
    return found


def format_status(entries: list[dict[str, Any]]) -> str:
    header = ("MOUNTPOINT", "PID", "STATE", "UPPERDIR", "LOWERDIRS")
    rows = [header]
    for e in entries:
        rows.append((e["mountpoint"], "-" if e["pid"] is None else str(e["pid"]), e["state"],
                     e["upperdir"] or "-", ":".join(e["lowerdirs"] or []) or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return "".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
        + "  " + row[-1] + "\n" for row in rows)


def do_status(cmd: Command) -> int:
    entries = status_entries()
    if cmd.json:
        print(json.dumps(entries, indent=1))
    else:
        sys.stdout.write(format_status(entries))
    return 0


def run_layer_command(action: str, argv: list[str]) -> int:
    # Deferred import: each command loads only its own module.
    module, _, function = LAYER_COMMANDS[action].partition(":")
    command: Callable[[list[str]], int] = getattr(importlib.import_module(module), function)
    return command(argv)


def binding_version() -> str:
    """pyfuse3's version, and what our patch to it adds (scripts/pyfuse3-3.5.0.patch)."""
    import importlib.metadata

    from overlayd.fs import BINDING_FEATURES

    features = ", ".join(sorted(BINDING_FEATURES)) or "none: a stock pyfuse3"
    return f"pyfuse3 {importlib.metadata.version('pyfuse3')} (overlayd's patch: {features})"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cmd = parse_argv(sys.argv[1:] if argv is None else argv)
        if cmd.action == "help":
            sys.stdout.write(USAGE)
            return 0
        if cmd.action == "version":
            print(f"overlayd {__version__}")
            print(binding_version())
            return 0
        if cmd.action == "umount":
            return do_umount(cmd)
        if cmd.action == "status":
            return do_status(cmd)
        if cmd.action in LAYER_COMMANDS:
            return run_layer_command(cmd.action, cmd.positionals)
        return do_mount(cmd)
    except UsageError as e:
        print(f"overlayd: {e}", file=sys.stderr)
        return 2
    except MountError as e:
        print(f"overlayd: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `overlayd diff ... | head`: the reader left. Exit as a tool killed by SIGPIPE does,
        # without a message, and without Python's complaint at the final flush.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + 13
    except OSError as e:
        print(f"overlayd: {e}", file=sys.stderr)
        return 1
