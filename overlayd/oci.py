"""OCI image-layer tarballs: a layer directory exported as one, and one imported as a layer.

Export (``overlayd export``) writes the changes a layer holds (an upper directory, in the kernel's
format or the OCI one) as a PAX tarball in the OCI image spec's changeset format (image-spec
layer.md): entries sorted, parents first, names in byte order within each directory; numeric
owners only; mtimes to the nanosecond (clamped to ``--mtime`` when asked, as ``tar
--clamp-mtime``); xattrs as ``SCHILY.xattr.NAME`` records, without the overlay's private ones;
hard links within the layer as links to the first name; a whiteout (char 0/0 or ``.wh.NAME``)
as an empty regular ``.wh.NAME`` of mode 0 and owner 0:0; an opaque directory as the directory
followed at once by ``DIR/.wh..wh..opq``. The header bytes are built here, not by tarfile, so
that the output depends on the layer alone.

Import (``overlayd import``) applies such a tarball to a directory, as a layer in the kernel's
whiteout format (char 0/0 whiteouts, ``trusted.overlay.opaque=y``) or kept in the OCI one
(``.wh.`` files, which overlayd reads). Paths are untrusted: every name is split into components,
absolute names and ``..`` are refused, and every object is reached from the directory's fd one
component at a time with O_NOFOLLOW, so an entry can never write through a symlink an earlier one
planted. Archives are read with tarfile (streamed), and the end of archive is checked by hand,
since tarfile takes a truncated or corrupt header past the first for a clean end.

Pure and synchronous, single-threaded; never used by the daemon.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import io
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

from overlayd.constants import OPAQUE_MARKER, OPAQUE_VALUE, WHITEOUT_PREFIX
from overlayd.copyup import remove_tree
from overlayd.errors import CommandParser, UsageError
from overlayd.layers import lstat_at, open_dir_at
from overlayd.layertree import Kind, shown_xattrs, walk
from overlayd.ondisk import (
    ALL_FORMATS,
    USER_FORMAT,
    XattrFormat,
    fd_path,
    is_whiteout,
    xattr_to_disk,
)
from overlayd.stores import CONTAINERD, OVERLAY2, resolve_stack

Warn = Callable[[str], None]

BLOCK = 512
_CHUNK = 1 << 20
_NS = 1_000_000_000
XATTR_RECORD = b"SCHILY.xattr."
AUFS_META_PREFIX = WHITEOUT_PREFIX + WHITEOUT_PREFIX  # .wh..wh.: AUFS bookkeeping, not a whiteout
TRUSTED_OPAQUE = b"trusted.overlay.opaque"
USER_OPAQUE = b"user.overlay.opaque"
WHITEOUT_FORMATS = ("auto", "kernel", "oci")
PROBE_NAME = b"#overlayd.import-probe"

REGTYPE, LNKTYPE, SYMTYPE, CHRTYPE, BLKTYPE, DIRTYPE, FIFOTYPE = (
    b"0", b"1", b"2", b"3", b"4", b"5", b"6")
PAXTYPE = b"x"

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def shown(path: bytes | tuple[bytes, ...]) -> str:
    """A path for a message: ``/a/b`` from the layer's root, undecodable bytes escaped."""
    if isinstance(path, tuple):
        path = b"/" + b"/".join(path)
    return path.decode("utf-8", "backslashreplace")


def _stderr_warning(message: str) -> None:
    print(f"overlayd: warning: {message}", file=sys.stderr)


# --- writing: the tar format ------------------------------------------------------------------


def _octal(value: int, width: int) -> bytes:
    """A ustar number field: octal digits and a NUL, *width* bytes in all."""
    return b"%0*o\0" % (width - 1, value)


def _fits(value: int, width: int) -> bool:
    limit: int = 8 ** (width - 1)
    return 0 <= value < limit


def pax_time(ns: int) -> bytes:
    """A time in nanoseconds as a PAX decimal: ``1700000000``, ``1700000000.5``, ``-1.25``."""
    sign = b"-" if ns < 0 else b""
    sec, frac = divmod(abs(ns), _NS)
    text = b"%s%d" % (sign, sec)
    if frac:
        text += (b".%09d" % frac).rstrip(b"0")
    return text


def parse_pax_time(text: str) -> int:
    """A PAX time (``[-]SECONDS[.FRACTION]``) in nanoseconds; ValueError if it is none."""
    neg = text.startswith("-")
    whole, _, frac = text[1 if neg else 0:].partition(".")
    if not whole.isdigit() or (frac and not frac.isdigit()):
        raise ValueError(f"bad PAX time {text!r}")
    ns = int(whole) * _NS + int((frac + "000000000")[:9])
    return -ns if neg else ns


def _pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + len(b"%d" % len(body))
    while length != len(body) + len(b"%d" % length):
        length += 1
    return b"%d" % length + body


def _ustar_header(name: bytes, mode: int, uid: int, gid: int, size: int, mtime: int,
                  typeflag: bytes, linkname: bytes = b"", rdev: int = 0) -> bytes:
    buf = bytearray(BLOCK)
    buf[0:100] = name[:100].ljust(100, b"\0")
    buf[100:108] = _octal(mode, 8)
    buf[108:116] = _octal(uid if _fits(uid, 8) else 0, 8)
    buf[116:124] = _octal(gid if _fits(gid, 8) else 0, 8)
    buf[124:136] = _octal(size if _fits(size, 12) else 0, 12)
    buf[136:148] = _octal(mtime if _fits(mtime, 12) else 0, 12)
    buf[148:156] = b" " * 8
    buf[156:157] = typeflag
    buf[157:257] = linkname[:100].ljust(100, b"\0")
    buf[257:265] = b"ustar\x0000"
    if typeflag in (CHRTYPE, BLKTYPE):
        buf[329:337] = _octal(os.major(rdev), 8)
        buf[337:345] = _octal(os.minor(rdev), 8)
    buf[148:156] = b"%06o\0 " % sum(buf)
    return bytes(buf)


def _needs_pax(text: bytes) -> bool:
    return len(text) > 100 or not text.isascii()


@dataclass
class Member:
    """One entry of an exported layer."""

    key: tuple[bytes, ...]  # sorts the archive: tar name components (b"" puts a marker first)
    name: bytes  # the tar name; directories end with "/"
    typeflag: bytes
    mode: int  # permission bits only
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    linkname: bytes = b""
    rdev: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    inode: tuple[int, int] | None = None  # regular files etc. with nlink > 1: (st_dev, st_ino)
    parts: tuple[bytes, ...] = ()  # regular files: where the data is, from the layer's root


def header_blocks(m: Member) -> bytes:
    """The header blocks of *m*: a PAX extended header when needed, then the ustar header."""
    # Names that are not UTF-8 go raw, as GNU tar writes and reads them (it ignores
    # hdrcharset=BINARY); tarfile falls back to the raw bytes too.
    records: list[bytes] = []
    if _needs_pax(m.name):
        records.append(_pax_record(b"path", m.name))
    if _needs_pax(m.linkname):
        records.append(_pax_record(b"linkpath", m.linkname))
    if not _fits(m.size, 12):
        records.append(_pax_record(b"size", b"%d" % m.size))
    for key, value in ((b"uid", m.uid), (b"gid", m.gid)):
        if not _fits(value, 8):
            records.append(_pax_record(key, b"%d" % value))
    sec = m.mtime_ns // _NS
    if m.mtime_ns % _NS or not _fits(sec, 12):
        records.append(_pax_record(b"mtime", pax_time(m.mtime_ns)))
    for xname in sorted(m.xattrs):
        records.append(_pax_record(XATTR_RECORD + xname, m.xattrs[xname]))
    out = b""
    if records:
        data = b"".join(records)
        head, _, base = m.name.rstrip(b"/").rpartition(b"/")
        pax_name = (head + b"/" if head else b"") + b"PaxHeaders.0/" + base
        out = _ustar_header(pax_name, 0o644, 0, 0, len(data), 0, PAXTYPE) + _padded(data)
    return out + _ustar_header(m.name, m.mode, m.uid, m.gid, m.size, sec, m.typeflag,
                               m.linkname, m.rdev)


def _padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % BLOCK)


# --- export -----------------------------------------------------------------------------------


def _join(parts: tuple[bytes, ...]) -> bytes:
    return b"/".join(parts)


def collect(root_fd: int, fmt: XattrFormat = ALL_FORMATS, warn: Warn = _stderr_warning,
            clamp_ns: int | None = None) -> list[Member]:
    """The members of the layer at *root_fd*, in archive order, hard links resolved."""
    def mtime(st: os.stat_result) -> int:
        return st.st_mtime_ns if clamp_ns is None else min(st.st_mtime_ns, clamp_ns)

    root = os.fstat(root_fd)
    members = [Member((), b"./", DIRTYPE, stat.S_IMODE(root.st_mode), root.st_uid, root.st_gid,
                      mtime(root), xattrs=shown_xattrs(root_fd, b".", fmt))]
    keys: set[tuple[bytes, ...]] = set()
    for e in walk(root_fd, fmt):
        st = e.st
        if e.kind is Kind.WHITEOUT:
            if e.name in (b"", b".", b"..") or e.name.startswith(WHITEOUT_PREFIX):
                warn(f"{shown((*e.parts[:-1], e.disk_name))}: not a whiteout of a name "
                     "(AUFS metadata?), skipped")
                continue
            key = (*e.parts[:-1], WHITEOUT_PREFIX + e.name)
            if key not in keys:  # both a char 0/0 and a .wh. file for one name
                keys.add(key)
                members.append(Member(key, _join(key), REGTYPE, 0, mtime_ns=mtime(st)))
            continue
        if stat.S_ISSOCK(st.st_mode):
            warn(f"{shown(e.parts)}: a socket cannot be archived, skipped")
            continue
        m = Member(e.parts, _join(e.parts), REGTYPE, stat.S_IMODE(st.st_mode), st.st_uid,
                   st.st_gid, mtime(st), xattrs=shown_xattrs(e.parent_fd, e.disk_name, fmt))
        if e.kind is Kind.DIR:
            if e.redirect is not None:
                raise UsageError(
                    f"{shown(e.parts)}: a renamed directory (redirect to "
                    f"{shown(e.redirect)}, redirect_dir=on) cannot be expressed in an OCI layer")
            m.name += b"/"
            m.typeflag = DIRTYPE
            members.append(m)
            if e.opaque:
                marker = (*e.parts, OPAQUE_MARKER)
                members.append(Member((*e.parts, b""), _join(marker), REGTYPE, 0,
                                      mtime_ns=mtime(st)))
            continue
        if st.st_nlink > 1:
            m.inode = (st.st_dev, st.st_ino)
        if stat.S_ISREG(st.st_mode):
            m.size, m.parts = st.st_size, e.parts
        elif stat.S_ISLNK(st.st_mode):
            m.typeflag, m.linkname = SYMTYPE, os.readlink(e.disk_name, dir_fd=e.parent_fd)
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            m.typeflag = CHRTYPE if stat.S_ISCHR(st.st_mode) else BLKTYPE
            m.rdev = st.st_rdev
        elif stat.S_ISFIFO(st.st_mode):
            m.typeflag = FIFOTYPE
        members.append(m)
    members.sort(key=lambda m: m.key)
    first: dict[tuple[int, int], bytes] = {}
    for m in members:
        if m.inode is None:
            continue
        if m.inode in first:
            m.typeflag, m.linkname, m.size, m.xattrs = LNKTYPE, first[m.inode], 0, {}
        else:
            first[m.inode] = m.name
    return members


class _DirCursor:
    """Opens directories below a root fd by components, never following a symlink, keeping
    the last one open (an archive visits a directory's files together)."""

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd
        self.parts: tuple[bytes, ...] | None = None
        self.fd = -1

    def open(self, parts: tuple[bytes, ...]) -> int:
        if parts == self.parts:
            return self.fd
        self.close()
        fd = self.root_fd
        try:
            for part in parts:
                nxt = open_dir_at(fd, part)
                if fd != self.root_fd:
                    os.close(fd)
                fd = nxt
        except BaseException:
            if fd != self.root_fd:
                os.close(fd)
            raise
        self.parts, self.fd = parts, fd
        return fd

    def close(self) -> None:
        if self.fd not in (-1, self.root_fd):
            os.close(self.fd)
        self.parts, self.fd = None, -1


def _write_data(out: BinaryIO, cursor: _DirCursor, m: Member) -> None:
    parent = cursor.open(m.parts[:-1])
    fd = os.open(m.parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC,
                 dir_fd=parent)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != m.size or (
                m.inode is not None and (st.st_dev, st.st_ino) != m.inode):
            raise OSError(errno.EAGAIN, "changed during the export", shown(m.parts))
        left = m.size
        while left:
            chunk = os.read(fd, min(left, _CHUNK))
            if not chunk:
                raise OSError(errno.EAGAIN, "shrank during the export", shown(m.parts))
            out.write(chunk)
            left -= len(chunk)
        out.write(b"\0" * (-m.size % BLOCK))
    finally:
        os.close(fd)


def export_layer(layer: bytes | str, out: BinaryIO, *, clamp_mtime: int | None = None,
                 fmt: XattrFormat = ALL_FORMATS, warn: Warn = _stderr_warning) -> int:
    """Write the layer directory *layer* to *out* as an uncompressed OCI layer tarball.

    *clamp_mtime* (seconds since the epoch) caps every mtime, as ``tar --clamp-mtime``. Returns
    the number of entries written. Raises UsageError for a layer OCI cannot express (a
    redirected directory), OSError for the layer's own errors.
    """
    root_fd = os.open(layer, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    cursor = _DirCursor(root_fd)
    try:
        members = collect(root_fd, fmt, warn,
                          None if clamp_mtime is None else clamp_mtime * _NS)
        for m in members:
            out.write(header_blocks(m))
            if m.typeflag == REGTYPE and m.size:
                _write_data(out, cursor, m)
        out.write(b"\0" * (2 * BLOCK))
    finally:
        cursor.close()
        os.close(root_fd)
    return len(members)


# --- import -----------------------------------------------------------------------------------


class _Window:
    """A reader that counts what it delivers and keeps the last bytes, so that the block where
    tarfile stopped can be looked at."""

    KEEP = 1 << 16

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.pos = 0
        self.tail = bytearray()

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.pos += len(data)
        self.tail += data
        if len(self.tail) > 2 * self.KEEP:
            del self.tail[:-self.KEEP]
        return data

    def block_at(self, offset: int) -> bytes | None:
        start = self.pos - len(self.tail)
        if offset < start:
            return None
        return bytes(self.tail[offset - start:offset - start + BLOCK])


class _Prefixed(io.RawIOBase):
    """*head* (bytes already read from *rest*), then *rest*."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        self.head = head
        self.rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        if self.head:
            n = min(len(buf), len(self.head))
            buf[:n] = self.head[:n]
            self.head = self.head[n:]
            return n
        data = self.rest.read(len(buf))
        buf[:len(data)] = data
        return len(data)


class _Zstd(io.RawIOBase):
    """A zstd stream, decompressed by the zstd program (Python 3.11 has no zstd): a thread feeds
    it *raw*, and reads take its output. Its end checks the program's exit status, so a corrupt
    or cut stream is a UsageError, as a bad gzip stream is."""

    def __init__(self, raw: BinaryIO) -> None:
        program = shutil.which("zstd")
        if program is None:
            raise UsageError("a zstd-compressed layer needs the zstd program "
                             "(apt-get install zstd)")
        self.proc = subprocess.Popen([program, "-d", "-c", "-q"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.feeder = threading.Thread(target=self._feed, args=(raw,), daemon=True)
        self.feeder.start()

    def _feed(self, raw: BinaryIO) -> None:
        assert self.proc.stdin is not None
        try:
            while chunk := raw.read(_CHUNK):
                self.proc.stdin.write(chunk)
        except (BrokenPipeError, ValueError):
            pass  # zstd stopped reading (a bad stream, or closed early): its status tells
        finally:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        assert self.proc.stdout is not None
        n = os.readv(self.proc.stdout.fileno(), [buf])
        if not n:
            self._finish()
        return n

    def _finish(self) -> None:
        assert self.proc.stderr is not None
        self.feeder.join()
        status = self.proc.wait()
        if status != 0:
            why = self.proc.stderr.read().decode(errors="replace").strip().splitlines()
            raise UsageError("not a valid zstd stream: "
                             + (why[-1] if why else f"zstd exited with {status}"))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # ours: stopped before its end (a refused archive)
        self.proc.wait()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        self.feeder.join()
        super().close()


def _decompressed(source: BinaryIO) -> BinaryIO:
    head = b""
    while len(head) < 4:
        more = source.read(4 - len(head))
        if not more:
            break
        head += more
    raw = io.BufferedReader(_Prefixed(head, source), _CHUNK)
    if head.startswith(_GZIP_MAGIC):
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if head.startswith(_ZSTD_MAGIC):
        return io.BufferedReader(_Zstd(raw), _CHUNK)
    return raw


def _safe_parts(name: bytes) -> tuple[bytes, ...]:
    """The components of an archive name; UsageError for one that could leave the directory."""
    if b"\0" in name:
        raise UsageError(f"refusing {shown(name)!r}: a NUL in the name")
    if name.startswith(b"/"):
        raise UsageError(f"refusing {shown(name)!r}: an absolute path")
    parts = tuple(p for p in name.split(b"/") if p not in (b"", b"."))
    if b".." in parts:
        raise UsageError(f"refusing {shown(name)!r}: a '..' component")
    return parts


def _name_bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")



def _remove_at(dir_fd: int, name: bytes) -> None:
    """Remove *name* from *dir_fd*, a directory with everything in it, if it is there; never
    follows a symlink."""
    with contextlib.suppress(FileNotFoundError):
        remove_tree(dir_fd, name)


def _xattrs_of(member: tarfile.TarInfo) -> dict[bytes, bytes]:
    prefix = XATTR_RECORD.decode()
    return {_name_bytes(k[len(prefix):]): _name_bytes(v)
            for k, v in member.pax_headers.items() if k.startswith(prefix)}


def _mtime_ns(member: tarfile.TarInfo) -> int:
    text = member.pax_headers.get("mtime")
    if text is None:
        return int(member.mtime) * _NS
    try:
        return parse_pax_time(text)
    except ValueError:
        raise UsageError(f"{member.name!r}: a bad PAX mtime {text!r}") from None


class Importer:
    """Applies an archive's members, in order, to the directory *root_fd*.

    Objects this archive made are remembered (by path), so that its whiteouts and opaque
    markers hide only what was there before it (whiteouts apply to the layers below; a layer's
    own files are never hidden by its own whiteouts), as the OCI spec says.
    """

    def __init__(self, root_fd: int, *, kernel: bool, fmt: XattrFormat = ALL_FORMATS,
                 warn: Warn = _stderr_warning, privileged: bool | None = None) -> None:
        self.root_fd = root_fd
        self.kernel = kernel
        self.fmt = fmt
        self.opaque_xattr = USER_OPAQUE if fmt is USER_FORMAT else TRUSTED_OPAQUE
        self.warn = warn
        self.privileged = os.geteuid() == 0 if privileged is None else privileged
        self.made: set[tuple[bytes, ...]] = set()  # every object this archive made
        self.hidden: set[tuple[bytes, ...]] = set()  # names this archive whited out
        self.dirs: dict[tuple[bytes, ...], tuple[int, int]] = {}  # late (mode, mtime_ns)
        self.warned: set[str] = set()
        self.cursor = _DirCursor(root_fd)
        self.count = 0

    def close(self) -> None:
        self.cursor.close()

    def warn_once(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            self.warn(message)

    # -- directories

    def dir(self, parts: tuple[bytes, ...]) -> int:
        """The directory *parts*, made (mode 0755) where the archive implies it; the fd stays
        ours. A symlink or other non-directory on the way is refused, a whiteout replaced."""
        try:
            return self.cursor.open(parts)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                raise
        fd = self.root_fd
        for depth, part in enumerate(parts):
            here = parts[:depth + 1]
            st = lstat_at(fd, part)
            if st is not None and not stat.S_ISDIR(st.st_mode):
                if not is_whiteout(st):
                    what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
                    raise UsageError(f"refusing to go through {shown(here)}: {what}")
                self.remove(fd, part, here)
                self.hidden.add(here)  # the directory made over the whiteout hides below
                st = None
            if st is None:
                os.mkdir(part, 0o700, dir_fd=fd)
                self.made.add(here)
                self.cursor.close()
                nxt = open_dir_at(fd, part)
                os.fchmod(nxt, 0o755)
                if here in self.hidden:
                    self.set_opaque(nxt, here, fd, part)
            else:
                nxt = open_dir_at(fd, part)
            if fd != self.root_fd:
                os.close(fd)
            fd = nxt
        if fd != self.root_fd:
            os.close(fd)
        return self.cursor.open(parts)

    def set_opaque(self, fd: int, parts: tuple[bytes, ...], parent_fd: int, name: bytes) -> None:
        """Make the directory *fd* hide the layers below."""
        if self.kernel:
            os.setxattr(fd, self.opaque_xattr, OPAQUE_VALUE)
            return
        if lstat_at(parent_fd, WHITEOUT_PREFIX + name) is not None:
            return  # a .wh.NAME beside the directory already makes it opaque (overlayd's rule)
        if lstat_at(fd, OPAQUE_MARKER) is None:
            os.close(os.open(OPAQUE_MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o000, dir_fd=fd))
            self.made.add((*parts, OPAQUE_MARKER))

    def remove(self, parent_fd: int, name: bytes, parts: tuple[bytes, ...]) -> None:
        n = len(parts)
        _remove_at(parent_fd, name)
        if self.cursor.parts is not None and self.cursor.parts[:n] == parts:
            self.cursor.close()  # it was inside what went
        # self.hidden stays: what this archive said is gone below stays gone.
        for p in [p for p in self.made if p[:n] == parts]:
            self.made.discard(p)
        for p in [p for p in self.dirs if p[:n] == parts]:
            del self.dirs[p]

    # -- metadata

    def set_xattrs(self, target: int | bytes, xattrs: dict[bytes, bytes],
                   parts: tuple[bytes, ...]) -> None:
        for name, value in xattrs.items():
            disk = xattr_to_disk(name, self.fmt)
            if disk is None:
                self.warn_once("private", f"{shown(parts)}: the overlay's private xattr "
                                          f"{shown(name)} left out (and any others)")
                continue
            try:
                os.setxattr(target, disk, value, follow_symlinks=isinstance(target, int))
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
                space = shown(name.split(b".", 1)[0])
                self.warn_once(f"xattr:{space}", f"{shown(parts)}: cannot set {space}.* xattrs "
                                                 f"here ({e.strerror}): left out (and any others)")

    def owner(self, target: int | bytes, dir_fd: int | None, m: tarfile.TarInfo) -> None:
        if self.privileged:
            if isinstance(target, int):
                os.chown(target, m.uid, m.gid)
            else:
                os.chown(target, m.uid, m.gid, dir_fd=dir_fd, follow_symlinks=False)

    # -- members

    def apply(self, m: tarfile.TarInfo) -> None:
        parts = _safe_parts(_name_bytes(m.name))
        self.count += 1
        if not parts:
            if not m.isdir():
                raise UsageError(f"refusing {m.name!r}: the root is not a directory")
            self.dir_meta(self.root_fd, (), m)
            return
        base = parts[-1]
        if base == OPAQUE_MARKER:
            self.opaque(parts[:-1], m)
        elif base.startswith(AUFS_META_PREFIX):
            self.warn_once("aufs", f"{shown(parts)}: AUFS metadata, skipped (and any others)")
        elif base.startswith(WHITEOUT_PREFIX):
            target = base[len(WHITEOUT_PREFIX):]
            if target in (b"", b".", b".."):
                raise UsageError(f"refusing {shown(parts)}: a whiteout of no name")
            self.whiteout(parts[:-1], target, m)
        elif m.ischr() and m.devmajor == 0 and m.devminor == 0:
            self.whiteout(parts[:-1], base, m)  # a kernel-format whiteout, tarred as it is
        else:
            self.create(parts, m)

    def whiteout(self, dir_parts: tuple[bytes, ...], target: bytes, m: tarfile.TarInfo) -> None:
        pfd = self.dir(dir_parts)
        path = (*dir_parts, target)
        st = lstat_at(pfd, target)
        if st is not None and path in self.made and not is_whiteout(st):
            # This archive's own object stays; a directory of it now hides the layers below
            # (in the OCI format, the .wh. file made below says so).
            if stat.S_ISDIR(st.st_mode) and self.kernel:
                fd = open_dir_at(pfd, target)
                try:
                    os.setxattr(fd, self.opaque_xattr, OPAQUE_VALUE)
                finally:
                    os.close(fd)
        elif st is not None:
            self.remove(pfd, target, path)  # the layer before this one had it: gone
            pfd = self.dir(dir_parts)
            st = None
        self.hidden.add(path)
        if not self.kernel:
            self.marker_file(pfd, (*dir_parts, WHITEOUT_PREFIX + target), m)
        elif st is None:
            os.mknod(target, stat.S_IFCHR | 0o000, 0, dir_fd=pfd)
            self.owner(target, pfd, m)
            ns = _mtime_ns(m)
            os.utime(target, ns=(ns, ns), dir_fd=pfd, follow_symlinks=False)
            self.made.add(path)

    def marker_file(self, pfd: int, parts: tuple[bytes, ...], m: tarfile.TarInfo) -> None:
        name = parts[-1]
        if lstat_at(pfd, name) is not None:
            self.remove(pfd, name, parts)
            pfd = self.dir(parts[:-1])
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=pfd)
        try:
            self.owner(fd, None, m)
            os.fchmod(fd, m.mode & 0o7777)
            ns = _mtime_ns(m)
            os.utime(fd, ns=(ns, ns))
        finally:
            os.close(fd)
        self.made.add(parts)

    def opaque(self, dir_parts: tuple[bytes, ...], m: tarfile.TarInfo) -> None:
        fd = self.dir(dir_parts)
        for child in sorted(os.fsencode(n) for n in os.listdir(fd)):
            if (*dir_parts, child) not in self.made:
                self.remove(fd, child, (*dir_parts, child))
                fd = self.dir(dir_parts)
        if self.kernel:
            os.setxattr(fd, self.opaque_xattr, OPAQUE_VALUE)
        else:
            self.marker_file(fd, (*dir_parts, OPAQUE_MARKER), m)

    def create(self, parts: tuple[bytes, ...], m: tarfile.TarInfo) -> None:
        pfd = self.dir(parts[:-1])
        name = parts[-1]
        st = lstat_at(pfd, name)
        hides = parts in self.hidden
        if m.islnk():
            self.hard_link(pfd, parts, st, m)
            return
        if st is not None:
            if m.isdir() and stat.S_ISDIR(st.st_mode):
                fd = open_dir_at(pfd, name)
                try:
                    self.dir_meta(fd, parts, m)
                finally:
                    os.close(fd)
                self.made.add(parts)
                return
            # A directory replacing a whiteout, or what an earlier layer held here, must not
            # merge with the layers below.
            hides = hides or is_whiteout(st) or parts not in self.made
            self.remove(pfd, name, parts)
            pfd = self.dir(parts[:-1])
        if m.isreg():
            self.regular(pfd, parts, tar_data=m)
        elif m.isdir():
            os.mkdir(name, 0o700, dir_fd=pfd)
            fd = open_dir_at(pfd, name)
            try:
                if hides:
                    self.hidden.add(parts)
                    self.set_opaque(fd, parts, pfd, name)
                self.dir_meta(fd, parts, m)
            finally:
                os.close(fd)
        elif m.issym():
            target = _name_bytes(m.linkname)
            if not target or b"\0" in target:
                raise UsageError(f"refusing {shown(parts)}: a symlink to {m.linkname!r}")
            os.symlink(target, name, dir_fd=pfd)
            self.node_meta(pfd, parts, m, chmod=False)
        elif m.ischr() or m.isblk() or m.isfifo():
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK if m.isblk() else stat.S_IFIFO
            rdev = os.makedev(m.devmajor, m.devminor) if not m.isfifo() else 0
            try:
                os.mknod(name, kind | 0o600, rdev, dir_fd=pfd)
            except PermissionError as e:
                self.warn(f"{shown(parts)}: cannot make a device here ({e.strerror}), skipped")
                return
            self.node_meta(pfd, parts, m, chmod=True)
        else:
            raise UsageError(f"{shown(parts)}: unsupported entry type {m.type!r}")
        self.made.add(parts)

    def regular(self, pfd: int, parts: tuple[bytes, ...], tar_data: tarfile.TarInfo) -> None:
        m = tar_data
        fd = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600, dir_fd=pfd)
        try:
            src = self.tar.extractfile(m)
            if src is not None:
                while chunk := src.read(_CHUNK):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
            self.owner(fd, None, m)
            self.set_xattrs(fd, _xattrs_of(m), parts)
            os.fchmod(fd, m.mode & 0o7777)
            ns = _mtime_ns(m)
            os.utime(fd, ns=(ns, ns))
        finally:
            os.close(fd)

    def node_meta(self, pfd: int, parts: tuple[bytes, ...], m: tarfile.TarInfo, *,
                  chmod: bool) -> None:
        name = parts[-1]
        self.owner(name, pfd, m)
        self.set_xattrs(fd_path(pfd, name), _xattrs_of(m), parts)
        if chmod:  # a node we just made, not a symlink: chmod follows nothing else
            os.chmod(name, m.mode & 0o7777, dir_fd=pfd)
        ns = _mtime_ns(m)
        os.utime(name, ns=(ns, ns), dir_fd=pfd, follow_symlinks=False)

    def dir_meta(self, fd: int, parts: tuple[bytes, ...], m: tarfile.TarInfo) -> None:
        """Owner and xattrs now; mode and mtime at the end, after the children."""
        self.owner(fd, None, m)
        self.set_xattrs(fd, _xattrs_of(m), parts)
        self.dirs[parts] = (m.mode & 0o7777, _mtime_ns(m))

    def hard_link(self, pfd: int, parts: tuple[bytes, ...], st: os.stat_result | None,
                  m: tarfile.TarInfo) -> None:
        target = _safe_parts(_name_bytes(m.linkname))
        if not target or target[-1].startswith(WHITEOUT_PREFIX):
            raise UsageError(f"refusing {shown(parts)}: a hard link to {m.linkname!r}")
        tfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.root_fd)
        try:
            for part in target[:-1]:
                try:
                    nxt = open_dir_at(tfd, part)
                except OSError as e:
                    raise UsageError(f"refusing the hard link {shown(parts)}: its target "
                                     f"{shown(target)} is not in the directory") from e
                os.close(tfd)
                tfd = nxt
            tst = lstat_at(tfd, target[-1])
            if tst is None or stat.S_ISDIR(tst.st_mode) or is_whiteout(tst):
                raise UsageError(f"refusing the hard link {shown(parts)}: its target "
                                 f"{shown(target)} is not a file extracted before it")
            if st is not None and (st.st_dev, st.st_ino) == (tst.st_dev, tst.st_ino):
                return
            if st is not None:
                self.remove(pfd, parts[-1], parts)
                pfd = self.dir(parts[:-1])
            os.link(target[-1], parts[-1], src_dir_fd=tfd, dst_dir_fd=pfd,
                    follow_symlinks=False)
            self.made.add(parts)
        finally:
            os.close(tfd)

    def finish(self) -> None:
        """Directories' modes and mtimes, deepest first, once nothing more is made in them."""
        self.cursor.close()
        for parts in sorted(self.dirs, key=len, reverse=True):
            mode, ns = self.dirs[parts]
            try:
                fd = self.cursor.open(parts)
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    raise
                continue  # replaced later in the archive by a non-directory
            os.fchmod(fd, mode)
            os.utime(fd, ns=(ns, ns))
        self.cursor.close()

    def run(self, source: BinaryIO) -> None:
        with _decompressed(source) as stream:
            self._run(_Window(stream))

    def _run(self, window: _Window) -> None:
        self.tar = tarfile.open(  # noqa: SIM115 - read to its end below, owns no file
            fileobj=window, mode="r|",  # type: ignore[call-overload]
            encoding="utf-8", errors="surrogateescape")
        members: list[tarfile.TarInfo] = self.tar.members  # type: ignore[attr-defined]
        while (m := self.tar.next()) is not None:
            self.apply(m)
            members.clear()  # streamed: nothing is looked up again
        end = window.block_at(self.tar.offset)
        if end is None or len(end) < BLOCK:
            raise UsageError("truncated archive: no end-of-archive marker "
                             f"(after {self.count} entries)")
        if end.strip(b"\0"):
            raise UsageError(f"corrupt archive: a bad header at byte {self.tar.offset} "
                             f"(after {self.count} entries)")
        while window.read(_CHUNK):  # the rest: a gzip stream's checksum is checked at its end
            pass
        self.finish()

    tar: tarfile.TarFile


def probe_kernel_whiteouts(root_fd: int, opaque_xattr: bytes) -> str | None:
    """None if char 0/0 whiteouts and the opaque xattr can be made in *root_fd*, else why not."""
    name = PROBE_NAME + b".%d" % os.getpid()
    os.mkdir(name, 0o700, dir_fd=root_fd)
    try:
        fd = open_dir_at(root_fd, name)
        try:
            os.mknod(b"w", stat.S_IFCHR | 0o000, 0, dir_fd=fd)
            os.setxattr(fd, opaque_xattr, OPAQUE_VALUE)
        except OSError as e:
            return f"{e.strerror}"
        finally:
            os.close(fd)
    finally:
        _remove_at(root_fd, name)
    return None


def import_layer(source: BinaryIO, dest: bytes | str, *, whiteouts: str = "auto",
                 userxattr: bool = False, merge: bool = False,
                 warn: Warn = _stderr_warning) -> str:
    """Apply the OCI layer tarball read from *source* (plain, gzip or zstd) to the directory
    *dest*.

    *dest* is made if missing; an existing one must be empty unless *merge*, which applies the
    layer over what it holds (its whiteouts and opaque markers remove what was there: the
    result is the two layers squashed). *whiteouts*: "kernel" (char 0/0 whiteouts and
    ``trusted.overlay.opaque=y``, ``user.overlay.opaque=y`` with *userxattr*), "oci" (the
    ``.wh.`` files kept), or "auto" (kernel where it can be made here). Returns the format
    used. UsageError for a bad or malicious archive; a *dest* this call made is removed then.
    """
    if whiteouts not in WHITEOUT_FORMATS:
        raise UsageError(f"--whiteouts {whiteouts}: expected one of {', '.join(WHITEOUT_FORMATS)}")
    fmt = USER_FORMAT if userxattr else ALL_FORMATS
    dest_b = os.fsencode(dest)
    created = False
    try:
        os.mkdir(dest_b, 0o755)
        created = True
    except FileExistsError:
        pass
    except FileNotFoundError:
        raise UsageError(f"{shown(dest_b)}: its parent directory does not exist") from None
    try:
        root_fd = os.open(dest_b, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except NotADirectoryError:
        raise UsageError(f"{shown(dest_b)}: not a directory") from None
    try:
        if created:
            os.fchmod(root_fd, 0o755)
        elif os.listdir(root_fd) and not merge:
            raise UsageError(f"{shown(dest_b)}: not empty (--merge applies the layer over it)")
        importer = Importer(root_fd, kernel=False, fmt=fmt, warn=warn)
        if whiteouts != "oci":
            why = probe_kernel_whiteouts(root_fd, importer.opaque_xattr)
            if why is None:
                importer.kernel = True
            elif whiteouts == "kernel":
                raise UsageError(f"{shown(dest_b)}: cannot make kernel whiteouts here (mknod "
                                 f"0/0 or {shown(importer.opaque_xattr)}: {why}); try "
                                 "--whiteouts oci" + ("" if userxattr else " or --userxattr"))
        try:
            importer.run(source)
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise UsageError(f"not a valid layer tarball: {e or type(e).__name__} "
                             f"(after {importer.count} entries)") from None
        finally:
            importer.close()
        return "kernel" if importer.kernel else "oci"
    except BaseException:
        if created:
            parent, _, base = dest_b.rstrip(b"/").rpartition(b"/")
            pfd = os.open(parent or b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                _remove_at(pfd, base)
            except OSError:
                pass
            finally:
                os.close(pfd)
        raise
    finally:
        os.close(root_fd)


# --- command line ------------------------------------------------------------------------------


def _clamp_from(value: str | None, what: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        clamp = int(value)
    except ValueError:
        raise UsageError(f"{what}: expected seconds since the epoch, not {value!r}") from None
    if clamp < 0:
        raise UsageError(f"{what}: must not be negative")
    return clamp


def main_export(argv: list[str]) -> int:
    p = CommandParser(prog="overlayd export", description=(
        "Write the changes a layer directory holds (an upper dir) as an OCI image-layer "
        "tarball: whiteouts as .wh.NAME, opaque directories as DIR/.wh..wh..opq, numeric "
        "owners, modes, xattrs and hard links kept, entries sorted."))
    p.add_argument("layer", metavar="UPPERDIR|SPEC",
                   help="the layer directory, or overlay2:DIR or containerd:ROOT/snapshots/N "
                        "(that stack's top layer)")
    p.add_argument("-o", "--output", required=True, metavar="FILE",
                   help="the tarball to write ('-': standard output)")
    p.add_argument("--gzip", action="store_true", help="gzip it (reproducibly: no name, mtime 0)")
    p.add_argument("--mtime", metavar="EPOCH", default=None,
                   help="clamp mtimes above EPOCH to it (default: $SOURCE_DATE_EPOCH, if set)")
    p.add_argument("--userxattr", action="store_true",
                   help="read the layer as the kernel's userxattr mounts do (user.overlay.*)")
    args = p.parse_args(argv)
    if args.mtime is not None:
        clamp = _clamp_from(args.mtime, "--mtime")
    else:
        clamp = _clamp_from(os.environ.get("SOURCE_DATE_EPOCH"), "SOURCE_DATE_EPOCH")
    if args.layer.startswith((OVERLAY2, CONTAINERD)):
        layer = resolve_stack(args.layer).layers[0]
    else:
        layer = os.fsencode(args.layer)
    if not os.path.isdir(layer):
        raise UsageError(f"{shown(layer)}: no such directory")
    fmt = USER_FORMAT if args.userxattr else ALL_FORMATS

    def write(out: BinaryIO) -> None:
        if args.gzip:
            with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0) as gz:
                export_layer(layer, gz, clamp_mtime=clamp, fmt=fmt)  # type: ignore[arg-type]
        else:
            export_layer(layer, out, clamp_mtime=clamp, fmt=fmt)
        out.flush()

    if args.output == "-":
        if sys.stdout.isatty():
            raise UsageError("refusing to write a tarball to a terminal")
        write(sys.stdout.buffer)
        return 0
    output = os.fsencode(args.output)
    fd, tmp = tempfile.mkstemp(prefix=b".overlayd-export.",
                               dir=os.path.dirname(output) or b".")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(f.fileno(), 0o666 & ~umask)
        os.replace(tmp, output)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return 0


def main_import(argv: list[str]) -> int:
    p = CommandParser(prog="overlayd import", description=(
        "Unpack an OCI image-layer tarball (plain, gzip or zstd) into a layer directory that the "
        "kernel's overlayfs or overlayd can stack. DIR is made if missing; an existing DIR "
        "must be empty unless --merge."))
    p.add_argument("source", metavar="FILE", help="the tarball ('-': standard input)")
    p.add_argument("dest", metavar="DIR")
    p.add_argument("--whiteouts", choices=WHITEOUT_FORMATS, default="auto", help=(
        "kernel: char 0/0 whiteouts and the opaque xattr; oci: keep .wh. files (overlayd reads "
        "them); auto (default): kernel where mknod 0/0 and the xattr work here, else oci"))
    p.add_argument("--userxattr", action="store_true",
                   help="mark opaque directories with user.overlay.opaque (the kernel's userxattr)")
    p.add_argument("--merge", action="store_true",
                   help="apply the layer over a non-empty DIR (the result: both layers squashed)")
    args = p.parse_args(argv)
    if args.source == "-":
        if sys.stdin.isatty():
            raise UsageError("refusing to read a tarball from a terminal")
        import_layer(sys.stdin.buffer, args.dest, whiteouts=args.whiteouts,
                     userxattr=args.userxattr, merge=args.merge)
        return 0
    try:
        f = open(os.fsencode(args.source), "rb")  # noqa: SIM115 - closed below
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        raise UsageError(f"{args.source}: {e.strerror}") from None
    with f:
        import_layer(f, args.dest, whiteouts=args.whiteouts, userxattr=args.userxattr,
                     merge=args.merge)
    return 0

