"""Mount options: parse ``-o`` strings into a frozen MountOptions and validate it.

Pure apart from the stat calls of validation; raises UsageError with one line naming the problem.
Policy (shared/DESIGN.md section 1): refuse what we do not know, so a typo never silently changes
semantics; know everything real callers send (mount(8)/mount.fuse3, podman's containers/storage,
fuse-overlayfs's own options); ignore empty items.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field

from overlayd.constants import MAX_LAYERS, WORK_SUBDIR
from overlayd.errors import UsageError
from overlayd.idmap import IDENTITY, IdMap, parse_mapping

# mount(8) flags that libfuse applies to the mount itself.
FUSE_MOUNT_FLAGS = frozenset({
    "rw", "ro", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "sync", "async", "dirsync",
    "atime", "noatime", "diratime", "nodiratime", "relatime", "norelatime", "strictatime",
    "nostrictatime", "lazytime", "nolazytime",
})
# Flags that cancel each other: the last one given wins, as with mount(8).
OPPOSITES = {
    "rw": "ro", "ro": "rw", "dev": "nodev", "nodev": "dev", "suid": "nosuid", "nosuid": "suid",
    "exec": "noexec", "noexec": "exec", "sync": "async", "async": "sync",
    "atime": "noatime", "noatime": "atime", "diratime": "nodiratime", "nodiratime": "diratime",
    "relatime": "norelatime", "norelatime": "relatime", "strictatime": "nostrictatime",
    "nostrictatime": "strictatime", "lazytime": "nolazytime", "nolazytime": "lazytime",
}
# libfuse options a caller may pass through.
FUSE_PASSTHROUGH = frozenset({"allow_other", "allow_root", "default_permissions", "auto_unmount"})
# Accepted and without effect for us: mount(8) bookkeeping and SELinux labels
# (FUSE mounts cannot carry them), and the kernel's defaults that are what we implement.
IGNORED_FLAGS = frozenset({
    "_netdev", "auto", "noauto", "user", "nouser", "users", "owner", "nofail", "defaults",
    "silent", "loud",
})
IGNORED_KEYS = frozenset({"context", "fscontext", "defcontext", "rootcontext", "comment"})
# Kernel options whose value must be the one we implement (the kernel's defaults here).
PINNED = {
    "index": frozenset({"off"}),
    "metacopy": frozenset({"off"}),
    "nfs_export": frozenset({"off"}),
    "xino": frozenset({"off", "auto", "on"}),  # we always number inodes xino-style
    "uuid": frozenset({"on", "off", "null", "auto"}),
}
REDIRECT_DIR_VALUES = ("follow", "nofollow", "off", "on")
BUSY_POLL_MAX = 100_000  # microseconds: a tenth of a second of spinning is already absurd
# Known, but not implemented yet: refused with a clear message rather than ignored.
NOT_YET = frozenset({
    "ino32_t", "xattr_permissions",
})


@dataclass(frozen=True)
class MountOptions:
    lowerdirs: tuple[bytes, ...]  # top first
    upperdir: bytes | None = None
    workdir: bytes | None = None
    fuse_options: frozenset[str] = frozenset()
    read_only: bool = False
    fsync: bool = True  # volatile / fsync=0 trade durability away explicitly
    static_nlink: bool = False  # fuse-overlayfs's: every directory reports nlink 1
    # redirect_dir: "on" moves merged directories by writing a redirect; "follow" and "off"
    # (the kernel's default with redirect_always_follow) only read them; "nofollow" neither.
    redirect_dir: str = "off"
    # userxattr: write the kernel's unprivileged format (user.overlay.*) even where trusted.*
    # could be written; without it the format is chosen at mount time (overlay.Overlay).
    userxattr: bool = False
    # fuse-overlayfs's uidmapping=/gidmapping=/squash_to_*: see overlayd.idmap.
    uidmap: IdMap = IDENTITY
    gidmap: IdMap = IDENTITY
    # busy_poll=N: microseconds the daemon spins for the next request before it sleeps (0:
    # never); None: the daemon's default (overlayd.daemon.busy_poll_us).
    busy_poll: int | None = None
    # fuse-overlayfs's noacl: the kernel checks the mode bits alone, not POSIX ACLs (which the
    # kernel's overlay always checks).
    acl: bool = True

    @property
    def squashed(self) -> bool:
        return self.uidmap.squash is not None or self.gidmap.squash is not None

    @property
    def redirect_create(self) -> bool:
        return self.redirect_dir == "on"

    @property
    def redirect_follow(self) -> bool:
        return self.redirect_dir != "nofollow"
    ignored: tuple[str, ...] = field(default=())

    @property
    def writable(self) -> bool:
        return self.upperdir is not None and not self.read_only


def split_escaped(text: str, sep: str) -> list[str]:
    """Split *text* at unescaped *sep*; a backslash escapes the next character."""
    parts: list[str] = []
    cur: list[str] = []
    chars = iter(text)
    for ch in chars:
        if ch == "\\":
            nxt = next(chars, None)
            if nxt is None:
                raise UsageError(f"trailing backslash in {text!r}")
            cur.append(nxt)
        elif ch == sep:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _split_options(text: str) -> list[str]:
    """Split at unescaped commas outside double quotes (SELinux labels such as
    ``context="system_u:object_r:container_file_t:s0:c1,c2"`` hold commas), keeping the
    escapes for the lowerdir split after."""
    items: list[str] = []
    cur: list[str] = []
    escaped = False
    quoted = False
    for ch in text:
        if escaped:
            cur.append("\\" + ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
            cur.append(ch)
        elif ch == "," and not quoted:
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if escaped:
        raise UsageError(f"trailing backslash in options {text!r}")
    items.append("".join(cur))
    return items


def option_keys(option_strings: Iterable[str]) -> list[str]:
    """The keys of the ``-o`` items, in order, empty items left out."""
    return [item.partition("=")[0] for text in option_strings
            for item in _split_options(text) if item]


def _unescape(value: str) -> str:
    return "".join(split_escaped(value, "\0"))


def encode_path(what: str, value: str) -> bytes:
    """*value* as a host path, or a UsageError: a lone surrogate (from a caller of main(), never
    from argv) has no bytes. A NUL is refused by validate, where it meets a system call."""
    try:
        return os.fsencode(value)
    except UnicodeEncodeError:
        raise UsageError(f"{what} {value!r} is not a valid path") from None


def shown(path: bytes | str) -> str:
    """A path for a one-line message: as is when printable, else quoted with escapes (a
    newline in a name must not split the message)."""
    text = os.fsdecode(path)
    return text if text.isprintable() else repr(text)


def parse_options(option_strings: Iterable[str]) -> MountOptions:
    """Parse one or more ``-o`` strings. Does not touch the filesystem."""
    lowers: tuple[bytes, ...] | None = None
    upper: bytes | None = None
    work: bytes | None = None
    fuse: set[str] = set()
    read_only = False
    fsync = True
    static_nlink = False
    redirect_dir: str | None = None
    userxattr = False
    uid_ranges: tuple[tuple[int, int, int], ...] = ()
    gid_ranges: tuple[tuple[int, int, int], ...] = ()
    squash_root = False
    squash_uid: int | None = None
    squash_gid: int | None = None
    busy_poll: int | None = None
    acl = True
    ignored: list[str] = []
    for text in option_strings:
        for item in _split_options(text):
            if not item:
                continue  # podman passes empty items (",,", a trailing ",")
            key, has_value, value = item.partition("=")
            if key == "lowerdir":
                parts = split_escaped(value, ":")
                if not value or any(p == "" for p in parts):
                    raise UsageError(f"lowerdir has an empty element: {value!r}")
                lowers = tuple(encode_path("lowerdir", p) for p in parts)
            elif key == "upperdir":
                upper = encode_path("upperdir", _unescape(value)) if value else None
                if upper is None:
                    raise UsageError("upperdir= is empty")
            elif key == "workdir":
                work = encode_path("workdir", _unescape(value)) if value else None
                if work is None:
                    raise UsageError("workdir= is empty")
            elif not has_value and key in FUSE_MOUNT_FLAGS:
                fuse.add(key)
                fuse.discard(OPPOSITES.get(key, ""))
                if key in ("ro", "rw"):
                    read_only = key == "ro"
            elif not has_value and key in FUSE_PASSTHROUGH:
                fuse.add(key)
            elif key == "fsname" and has_value:
                fuse.add(item)
            elif key == "volatile" and not has_value:
                fsync = False
            elif key == "fsync" and value in ("0", "1"):
                fsync = value == "1"
            elif key == "busy_poll" and has_value:
                if not (value.isascii() and value.isdigit()) or int(value) > BUSY_POLL_MAX:
                    raise UsageError(f"option {item!r}: takes microseconds, 0 to {BUSY_POLL_MAX}")
                busy_poll = int(value)
            elif key == "noacl" and not has_value:
                acl = False
            elif key == "xattr_permissions" and value == "0":
                ignored.append(item)  # fuse-overlayfs's default: xattrs carry no permissions
            elif key == "redirect_dir":
                if value not in REDIRECT_DIR_VALUES:
                    raise UsageError(f"option {item!r} is not supported "
                                     f"(redirect_dir= takes {', '.join(REDIRECT_DIR_VALUES)})")
                redirect_dir = value
            elif key == "static_nlink" and not has_value:
                static_nlink = True
            elif key == "userxattr" and not has_value:
                userxattr = True
            elif key == "uidmapping" and has_value:
                uid_ranges = parse_mapping(key, value)
            elif key == "gidmapping" and has_value:
                gid_ranges = parse_mapping(key, value)
            elif key == "squash_to_root" and not has_value:
                squash_root = True
            elif key in ("squash_to_uid", "squash_to_gid") and has_value:
                if not (value.isascii() and value.isdigit()) or int(value) > 0xFFFFFFFF:
                    raise UsageError(f"option {item!r}: takes an id")
                if key == "squash_to_uid":
                    squash_uid = int(value)
                else:
                    squash_gid = int(value)
            elif (not has_value and key in IGNORED_FLAGS) or key.startswith("x-") or (
                    has_value and key in IGNORED_KEYS):
                ignored.append(item)
            elif key in PINNED:
                if value not in PINNED[key]:
                    allowed = ", ".join(sorted(PINNED[key]))
                    raise UsageError(f"option {item!r} is not supported ({key}= takes {allowed})")
                ignored.append(item)
            elif key in NOT_YET:
                raise UsageError(f"option {key!r} is not supported yet")
            else:
                raise UsageError(f"unknown option {item!r}")
    if lowers is None:
        raise UsageError("missing lowerdir= option")
    if userxattr:
        # As the kernel (ovl_fs_params_verify): the unprivileged format cannot hold trusted
        # redirects, so userxattr neither writes nor follows them.
        if redirect_dir not in (None, "nofollow"):
            raise UsageError(f"conflicting options: userxattr,redirect_dir={redirect_dir} "
                             f"(userxattr takes redirect_dir=nofollow)")
        redirect_dir = "nofollow"
    if upper is not None and work is None:
        raise UsageError("upperdir= needs workdir=")
    if work is not None and upper is None:
        raise UsageError("workdir= needs upperdir=")
    if len(lowers) > MAX_LAYERS:  # the kernel's limit counts lower layers only
        raise UsageError(f"too many layers: {len(lowers)} lower layers (at most {MAX_LAYERS})")
    # As fuse-overlayfs's find_mapping: squash_to_uid/gid first, then squash_to_root.
    uidmap = IdMap(uid_ranges, squash_uid if squash_uid is not None else
                   0 if squash_root else None)
    gidmap = IdMap(gid_ranges, squash_gid if squash_gid is not None else
                   0 if squash_root else None)
    return MountOptions(lowers, upper, work, frozenset(fuse), read_only, fsync, static_nlink,
                        redirect_dir or "off", userxattr, uidmap, gidmap, busy_poll, acl,
                        tuple(ignored))


def _is_within(inner: bytes, outer: bytes) -> bool:
    """Whether the real path *inner* is *outer* or lies below it."""
    return inner == outer or inner.startswith(outer.rstrip(b"/") + b"/")


def _stat_dir(what: str, path: bytes) -> os.stat_result:
    try:
        st = os.stat(path)
    except OSError as e:
        raise UsageError(f"{what} {shown(path)}: {e.strerror}") from None
    except ValueError:  # a NUL, possible in a --config file
        raise UsageError(f"{what} {shown(path)}: contains a NUL character") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{what} {shown(path)}: not a directory")
    return st


def _check_lowers(lowers: tuple[bytes, ...]) -> None:
    """Each lower layer a readable directory, none of them another or inside another: the
    kernel refuses both ("conflicting lowerdir path", "overlapping lowerdir path", ELOOP)."""
    seen: list[tuple[bytes, bytes, tuple[int, int]]] = []
    for lower in lowers:
        st = _stat_dir("lowerdir", lower)
        if not os.access(lower, os.R_OK | os.X_OK):
            raise UsageError(f"lowerdir {shown(lower)}: not readable")
        real = os.path.realpath(lower)
        for other, other_real, other_id in seen:
            if other_id == (st.st_dev, st.st_ino) or real == other_real:
                also = "" if other == lower else f" (as {shown(other)} before)"
                raise UsageError(f"lowerdir {shown(lower)} is given twice{also}")
            if _is_within(real, other_real) or _is_within(other_real, real):
                raise UsageError(f"lowerdir {shown(lower)} overlaps lowerdir {shown(other)}")
        seen.append((lower, real, (st.st_dev, st.st_ino)))


def _check_workdir(workdir: bytes) -> None:
    """The workdir and its work/ (left by an earlier mount, ours or the kernel's) usable."""
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise UsageError(f"workdir {shown(workdir)}: not writable")
    work = os.path.join(workdir, WORK_SUBDIR)
    try:
        st = os.lstat(work)
    except FileNotFoundError:
        return
    except OSError as e:
        raise UsageError(f"workdir {shown(workdir)}: {shown(work)}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"workdir {shown(workdir)}: {shown(work)} is not a directory "
                         f"(remove it)")
    if not os.access(work, os.R_OK | os.W_OK | os.X_OK):
        raise UsageError(f"workdir {shown(workdir)}: {shown(work)} is not writable "
                         f"(left by another user's mount? remove it)")


def unescape_mountinfo(field: bytes) -> bytes:
    """A /proc/self/mountinfo field as it was: the kernel escapes space, tab, newline and
    backslash (and, in options, ',' and '=') as \\NNN (octal)."""
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)


def parse_mountinfo(mountinfo: bytes) -> list[tuple[bytes, bytes, bytes]]:
    """(mountpoint, fstype, super options) of every mount in *mountinfo* (the text of
    /proc/self/mountinfo), bottom first; the mountpoint unescaped."""
    found = []
    for line in mountinfo.splitlines():
        fields = line.split()
        try:
            sep = fields.index(b"-")
            found.append((unescape_mountinfo(fields[4]), fields[sep + 1], fields[sep + 3]))
        except (ValueError, IndexError):
            continue
    return found


def kernel_overlay_dirs(mountinfo: bytes) -> list[tuple[bytes, bytes, bytes]]:
    """(mountpoint, option, directory) of every upperdir= and workdir= of the kernel's overlay
    mounts listed in *mountinfo* (the text of /proc/self/mountinfo)."""
    found = []
    for point, fstype, super_options in parse_mountinfo(mountinfo):
        if fstype != b"overlay":
            continue
        for item in super_options.split(b","):
            key, _, value = item.partition(b"=")
            if key in (b"upperdir", b"workdir") and value:
                found.append((point, key, unescape_mountinfo(value)))
    return found


def _check_not_kernel_upper(upper_real: bytes, work_real: bytes) -> None:
    """Refuse an upper or work directory that a kernel overlay mount is using: a running
    container's layer (Docker's overlay2 <id>/diff, a containerd active snapshot). Two mounts
    changing one upper layer corrupt it (overlayfs.rst, "Changes to underlying filesystems");
    the kernel itself refuses a second mount of it with EBUSY when it can tell (index=on)."""
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            mountinfo = f.read()
    except OSError:
        return
    for point, key, path in kernel_overlay_dirs(mountinfo):
        if os.path.realpath(path) in (upper_real, work_real):
            mine = "upperdir" if os.path.realpath(path) == upper_real else "workdir"
            raise UsageError(f"{mine} {shown(path)} is the {key.decode()} of the kernel overlay "
                             f"mounted at {shown(point)} (a running container?): two mounts "
                             f"on one upper layer corrupt it")


def validate(opts: MountOptions, mountpoint: bytes | None) -> None:
    """Refuse, before anything is mounted, every combination that cannot work."""
    if mountpoint is None:
        raise UsageError("missing mountpoint")
    _check_lowers(opts.lowerdirs)
    _stat_dir("mountpoint", mountpoint)
    mnt_real = os.path.realpath(mountpoint)
    layers = [("lowerdir", p) for p in opts.lowerdirs]
    if opts.upperdir is not None and opts.workdir is not None:
        upper_st = _stat_dir("upperdir", opts.upperdir)
        work_st = _stat_dir("workdir", opts.workdir)
        if upper_st.st_dev != work_st.st_dev:
            raise UsageError("workdir and upperdir must be on the same filesystem")
        upper_real = os.path.realpath(opts.upperdir)
        work_real = os.path.realpath(opts.workdir)
        if _is_within(work_real, upper_real) or _is_within(upper_real, work_real):
            raise UsageError("workdir and upperdir must be separate subtrees")
        if not opts.read_only and not os.access(opts.upperdir, os.W_OK | os.X_OK):
            raise UsageError(f"upperdir {shown(opts.upperdir)}: not writable")
        for _what, lower in layers:
            # As the kernel: the upper and work trees must not overlap a lower layer.
            lower_real = os.path.realpath(lower)
            for name, real in (("upperdir", upper_real), ("workdir", work_real)):
                if _is_within(real, lower_real) or _is_within(lower_real, real):
                    raise UsageError(f"{name} overlaps lowerdir {shown(lower)}")
        # Even a read-only mount builds its work/ (and cleans it): the workdir must be usable.
        _check_workdir(opts.workdir)
        _check_not_kernel_upper(upper_real, work_real)
        layers += [("upperdir", opts.upperdir), ("workdir", opts.workdir)]
    for what, path in layers:
        real = os.path.realpath(path)
        if _is_within(mnt_real, real):
            raise UsageError(f"mountpoint {shown(mountpoint)} is inside {what} {shown(path)}")
        if _is_within(real, mnt_real):
            raise UsageError(f"{what} {shown(path)} is inside the mountpoint")
