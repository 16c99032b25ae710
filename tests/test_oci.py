"""overlayd export / import: OCI image-layer tarballs (overlayd/oci.py).

Tiers: the pure core on temp dirs (every entry type, whiteouts and opaque directories in every
format, hard links, xattrs, reproducibility, path safety, bad archives), GNU tar both ways, and
the kernel round trip: an upper made by real operations on ``mount -t overlay``, exported,
imported in both whiteout formats and stacked again, compared with the original stack.
Most tests need root (mknod, chown, trusted.* xattrs).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlayd.errors import UsageError
from overlayd.layertree import Kind, shown_xattrs, walk
from overlayd.oci import (
    export_layer,
    import_layer,
    main_export,
    main_import,
    parse_pax_time,
    pax_time,
)
from tests.conftest import needs_fuse, needs_kernel_overlay, needs_root
from tests.mounting import KERNEL_PINNED, kernel_mounted, overlay_options, overlayd_mounted
from tests.snapshot import diff_snapshots, snapshot

GNU_TAR = ["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner"]
needs_tar = pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")
# security.capability v2: cap_net_bind_service, effective.
CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)
T0 = 1_600_000_000_123_456_789


# --- helpers ----------------------------------------------------------------------------------


def export_bytes(layer: Path, **kw: Any) -> bytes:
    out = io.BytesIO()
    export_layer(os.fsencode(layer), out, **kw)
    return out.getvalue()


def import_bytes(data: bytes, dest: Path, **kw: Any) -> str:
    return import_layer(io.BytesIO(data), os.fsencode(dest), **kw)


def members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:", encoding="utf-8",
                      errors="surrogateescape") as tar:
        return tar.getmembers()


def xattrs_of(m: tarfile.TarInfo) -> dict[str, str]:
    return {k[len("SCHILY.xattr."):]: v for k, v in m.pax_headers.items()
            if k.startswith("SCHILY.xattr.")}


def _digest(dir_fd: int, name: bytes) -> str:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        h = hashlib.sha256()
        while chunk := os.read(fd, 1 << 16):
            h.update(chunk)
        return h.hexdigest()
    finally:
        os.close(fd)


def layer_view(root: Path) -> dict[bytes, tuple[object, ...]]:
    """What a layer says, format-independent (layertree reads both whiteout formats): per
    path its type, mode, owner, mtime, shown xattrs, opaqueness, content, target, device, and
    its hard-link group; whiteouts as ("whiteout",)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        st = os.fstat(fd)
        view: dict[bytes, tuple[object, ...]] = {
            b"/": ("dir", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns,
                   shown_xattrs(fd, b"."))}
        inodes: dict[tuple[int, int], list[bytes]] = {}
        for e in walk(fd):
            st = e.st
            if e.kind is Kind.WHITEOUT:
                view[e.path + b" (whiteout)"] = ("whiteout",)
                continue
            rec: tuple[object, ...] = (
                stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                st.st_mtime_ns, shown_xattrs(e.parent_fd, e.disk_name))
            if e.kind is Kind.DIR:
                rec += ("opaque" if e.opaque else "merged",)
            elif stat.S_ISREG(st.st_mode):
                rec += (st.st_size, _digest(e.parent_fd, e.disk_name))
            elif stat.S_ISLNK(st.st_mode):
                rec += (os.readlink(e.disk_name, dir_fd=e.parent_fd),)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                rec += (st.st_rdev,)
            if e.kind is not Kind.DIR and st.st_nlink > 1:
                inodes.setdefault((st.st_dev, st.st_ino), []).append(e.path)
            view[e.path] = rec
        for paths in inodes.values():
            for p in paths:
                view[p] += (("group", min(paths), len(paths)),)
        return view
    finally:
        os.close(fd)


def semantic(view: dict[bytes, tuple[object, ...]]) -> dict[bytes, tuple[object, ...]]:
    """A layer's meaning: a whiteout beside a same-named object of the layer says only that a
    directory there is opaque (the kernel format writes that as the directory's xattr)."""
    out = dict(view)
    for key in list(out):
        if not key.endswith(b" (whiteout)"):
            continue
        path = key[:-len(b" (whiteout)")]
        if path in out:
            del out[key]
            if out[path][0] == stat.S_IFDIR:
                out[path] = (*out[path][:6], "opaque")
    return out


def mkfile(path: Path, data: bytes = b"", mode: int = 0o644, mtime_ns: int | None = None,
           owner: tuple[int, int] | None = None) -> Path:
    path.write_bytes(data)
    if owner:
        os.chown(path, *owner)
    os.chmod(path, mode)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def whiteout(path: Path) -> None:
    os.mknod(path, stat.S_IFCHR | 0, 0)


def set_times(root: Path, ns: int) -> None:
    """Every object below *root* (and itself) gets mtime *ns*, directories last."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            p = os.path.join(dirpath, name)
            os.utime(p, ns=(ns, ns), follow_symlinks=False)
    os.utime(root, ns=(ns, ns))


def build_every_kind(layer: Path) -> None:
    """A kernel-format layer holding every kind of entry and mark."""
    layer.mkdir()
    (layer / "dir").mkdir(mode=0o750)
    mkfile(layer / "dir" / "file", b"hello\n", 0o640, owner=(1000, 1001))
    os.setxattr(layer / "dir" / "file", "user.color", b"blue")
    os.setxattr(layer / "dir" / "file", "trusted.mine", b"\x00\xff binary")
    mkfile(layer / "setuid", b"#!/bin/sh\n", 0o4755)
    mkfile(layer / "capable", b"\x7fELF", 0o755)
    os.setxattr(layer / "capable", "security.capability", CAPABILITY)
    mkfile(layer / "big", os.urandom(3000) + b"\0" * 5000)
    os.link(layer / "big", layer / "dir" / "big-link")
    os.symlink("../setuid", layer / "dir" / "sym")
    os.mkfifo(layer / "fifo", 0o620)
    os.mknod(layer / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(layer / "loop", stat.S_IFBLK | 0o660, os.makedev(7, 200))
    for name, mode in (("fifo", 0o620), ("null", 0o666), ("loop", 0o660)):
        os.chmod(layer / name, mode)  # past the umask
    whiteout(layer / "gone")
    mkfile(layer / ".wh.gone-oci", mode=0)
    for name, mark in (("op-trusted", "trusted.overlay.opaque"), ("op-user", "user.overlay.opaque"),
                       ("op-fuse", "user.fuseoverlayfs.opaque")):
        (layer / name).mkdir()
        os.setxattr(layer / name, mark, b"y")
        mkfile(layer / name / "kept", b"k")
    (layer / "op-oci").mkdir()
    mkfile(layer / "op-oci" / ".wh..wh..opq", mode=0)
    mkfile(layer / "op-oci" / "kept", b"k")
    mkfile(layer / "private", b"p")
    os.setxattr(layer / "private", "trusted.overlay.origin", b"\x00fh")
    os.setxattr(layer / "private", "trusted.overlay.overlay.nested", b"shown")
    long_dir = layer / ("d" * 120)
    long_dir.mkdir()
    mkfile(long_dir / ("f" * 200), b"long")
    mkfile(layer / "é-ünïcode", b"u")
    mkfile(layer / os.fsdecode(b"latin1-\xe9"), b"raw")
    set_times(layer, T0)


# --- export: the archive ----------------------------------------------------------------------


@needs_root
def test_export_writes_every_kind(tmp_path: Path) -> None:
    layer = tmp_path / "upper"
    build_every_kind(layer)
    os.utime(layer / "fifo", ns=(T0, T0 + 5), follow_symlinks=False)
    got = {m.name: m for m in members(export_bytes(layer))}
    names = [m.name for m in members(export_bytes(layer))]
    assert names[0] == "."  # the root, "./"
    assert names[1:4] == [".wh.gone", ".wh.gone-oci", "big"]
    for d in ("op-fuse", "op-oci", "op-trusted", "op-user"):
        i = names.index(d)
        assert names[i + 1] == d + "/.wh..wh..opq", "the marker right after its directory"
        assert got[d + "/kept"].isreg()
        assert "trusted.overlay.opaque" not in xattrs_of(got[d])
    for m in got.values():
        assert m.uname == ""
        assert m.gname == ""
    wo = got[".wh.gone"]
    assert (wo.isreg(), wo.size, wo.mode, wo.uid, wo.gid) == (True, 0, 0, 0, 0)
    f = got["dir/file"]
    assert (f.mode, f.uid, f.gid, f.size) == (0o640, 1000, 1001, 6)
    assert xattrs_of(f) == {"user.color": "blue",
                            "trusted.mine": b"\x00\xff binary".decode("utf-8", "surrogateescape")}
    assert float(f.pax_headers["mtime"]) == pytest.approx(T0 / 1e9)
    assert parse_pax_time(f.pax_headers["mtime"]) == T0
    assert got["setuid"].mode == 0o4755
    assert xattrs_of(got["capable"])["security.capability"].encode(
        "utf-8", "surrogateescape") == CAPABILITY
    assert got["big"].isreg()
    assert got["big"].size == 8000
    assert got["dir/big-link"].islnk()
    assert got["dir/big-link"].linkname == "big"
    assert got["dir/sym"].issym()
    assert got["dir/sym"].linkname == "../setuid"
    assert got["fifo"].isfifo()
    assert got["fifo"].mode == 0o620
    assert got["null"].ischr()
    assert (got["null"].devmajor, got["null"].devminor) == (1, 3)
    assert got["loop"].isblk()
    assert (got["loop"].devmajor, got["loop"].devminor) == (7, 200)
    assert "gone" not in got
    assert "op-oci/.wh..wh..opq" in got
    assert xattrs_of(got["private"]) == {"trusted.overlay.nested": "shown"}
    assert got["d" * 120 + "/" + "f" * 200].size == 4
    assert "é-ünïcode" in got
    assert os.fsdecode(b"latin1-\xe9") in got


@needs_root
def test_export_skips_sockets_with_a_warning(tmp_path: Path) -> None:
    import socket
    layer = tmp_path / "upper"
    layer.mkdir()
    mkfile(layer / "a", b"a")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(os.fspath(layer / "sock"))
        warnings: list[str] = []
        data = export_bytes(layer, warn=warnings.append)
    assert [m.name for m in members(data)] == [".", "a"]
    assert len(warnings) == 1
    assert "/sock" in warnings[0]
    assert "socket" in warnings[0]


@needs_root
def test_export_refuses_a_redirected_directory(tmp_path: Path) -> None:
    layer = tmp_path / "upper"
    (layer / "a" / "moved").mkdir(parents=True)
    os.setxattr(layer / "a" / "moved", "trusted.overlay.redirect", b"/old")
    with pytest.raises(UsageError, match="/a/moved: a renamed directory"):
        export_bytes(layer)
    out = tmp_path / "x.tar"
    with pytest.raises(UsageError):
        main_export([os.fspath(layer), "-o", os.fspath(out)])
    assert os.listdir(tmp_path) == ["upper"], "no partial output"


@needs_root
def test_export_is_reproducible(tmp_path: Path) -> None:
    layer = tmp_path / "upper"
    build_every_kind(layer)
    first = export_bytes(layer)
    for dirpath, _, filenames in os.walk(layer):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            os.utime(os.path.join(dirpath, name), ns=(st.st_atime_ns + 10**12, st.st_mtime_ns),
                     follow_symlinks=False)
    assert export_bytes(layer) == first
    a, b = tmp_path / "a.tar.gz", tmp_path / "b.tar.gz"
    assert main_export([os.fspath(layer), "--gzip", "-o", os.fspath(a)]) == 0
    assert main_export([os.fspath(layer), "--gzip", "-o", os.fspath(b)]) == 0
    assert a.read_bytes() == b.read_bytes()
    head = a.read_bytes()[:10]
    assert head[:4] == b"\x1f\x8b\x08\x00", "deflate, and no FNAME or other flags"
    assert head[4:8] == b"\0\0\0\0", "mtime 0"
    assert gzip.decompress(a.read_bytes()) == first


@needs_root
def test_mtime_clamp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layer = tmp_path / "upper"
    layer.mkdir()
    mkfile(layer / "old", b"o", mtime_ns=1_000_000_000_500)
    mkfile(layer / "new", b"n", mtime_ns=T0)
    os.utime(layer, ns=(T0, T0))
    clamp = 1_500_000_000
    out = tmp_path / "c.tar"
    main_export([os.fspath(layer), "--mtime", str(clamp), "-o", os.fspath(out)])
    got = {m.name: m for m in members(out.read_bytes())}
    assert got["new"].mtime == clamp
    assert "mtime" not in got["new"].pax_headers
    assert got["."].mtime == clamp
    assert parse_pax_time(got["old"].pax_headers["mtime"]) == 1_000_000_000_500
    monkeypatch.setenv("SOURCE_DATE_EPOCH", str(clamp))
    env_out = tmp_path / "e.tar"
    main_export([os.fspath(layer), "-o", os.fspath(env_out)])
    assert env_out.read_bytes() == out.read_bytes()
    with pytest.raises(UsageError, match="--mtime"):
        main_export([os.fspath(layer), "--mtime", "yesterday", "-o", os.fspath(out)])


def test_pax_time_round_trips() -> None:
    for ns in (0, 1, T0, 10**9, -1, -1_500_000_000, 2**40 * 10**9 + 7):
        assert parse_pax_time(pax_time(ns).decode()) == ns
    assert pax_time(-1_500_000_000) == b"-1.5"
    for bad in ("", "1.2.3", "x", "1e9", "-"):
        with pytest.raises(ValueError, match="bad PAX time"):
            parse_pax_time(bad)


def test_cli_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"^export: the following arguments"):
        main_export([os.fspath(tmp_path)])
    with pytest.raises(UsageError, match="no such directory"):
        main_export([os.fspath(tmp_path / "missing"), "-o", "-"])
    with pytest.raises(UsageError, match="invalid choice"):
        main_import(["--whiteouts", "aufs", "x.tar", os.fspath(tmp_path / "d")])
    with pytest.raises(UsageError, match="No such file"):
        main_import([os.fspath(tmp_path / "missing.tar"), os.fspath(tmp_path / "d")])


# --- round trips ------------------------------------------------------------------------------


@needs_root
@pytest.mark.parametrize("fmt", ["kernel", "oci"])
def test_round_trip_every_kind(tmp_path: Path, fmt: str) -> None:
    layer = tmp_path / "upper"
    build_every_kind(layer)
    data = export_bytes(layer)
    dest = tmp_path / "imported"
    assert import_bytes(data, dest, whiteouts=fmt) == fmt
    assert layer_view(dest) == layer_view(layer)
    assert export_bytes(dest) == data
    if fmt == "kernel":
        assert stat.S_ISCHR(os.lstat(dest / "gone-oci").st_mode)
        assert os.getxattr(dest / "op-oci", "trusted.overlay.opaque") == b"y"
        assert os.getxattr(dest / "private", "trusted.overlay.overlay.nested") == b"shown"
    else:
        assert (dest / ".wh.gone").is_file()
        assert (dest / "op-trusted" / ".wh..wh..opq").is_file()


def zstd_compress(data: bytes) -> bytes:
    return subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True,
                          check=True).stdout


@needs_root
def test_zstd_layer_imports_as_the_plain_one(tmp_path: Path) -> None:
    """An OCI layer may be zstd-compressed (application/vnd.oci.image.layer.v1.tar+zstd):
    the zstd program decompresses it."""
    layer = tmp_path / "upper"
    build_every_kind(layer)
    data = export_bytes(layer)
    assert import_bytes(zstd_compress(data), tmp_path / "zstd") == "kernel"
    assert layer_view(tmp_path / "zstd") == layer_view(layer)


def test_zstd_layer_without_the_program(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("overlayd.oci.shutil.which", lambda name: None)
    with pytest.raises(UsageError, match=r"needs the zstd program \(apt-get install zstd\)"):
        import_bytes(b"\x28\xb5\x2f\xfd" + b"\0" * 600, tmp_path / "zstd")
    assert not (tmp_path / "zstd").exists()


@needs_root
def test_import_userxattr_and_auto(tmp_path: Path) -> None:
    layer = tmp_path / "upper"
    build_every_kind(layer)
    data = export_bytes(layer)
    assert import_bytes(data, tmp_path / "auto") == "kernel"  # root here: mknod 0/0 works
    import_bytes(data, tmp_path / "user", whiteouts="kernel", userxattr=True)
    assert os.getxattr(tmp_path / "user" / "op-oci", "user.overlay.opaque") == b"y"
    assert "trusted.overlay.opaque" not in os.listxattr(tmp_path / "user" / "op-oci")


@needs_root
def test_import_as_an_unprivileged_importer(tmp_path: Path) -> None:
    """Not root: owners stay ours, trusted.* xattrs are left out with one warning."""
    layer = tmp_path / "upper"
    build_every_kind(layer)
    for p in (layer / "null", layer / "loop"):
        p.unlink()
    data = export_bytes(layer)
    reachable = Path(tempfile.mkdtemp(prefix="overlayd-oci-"))  # tmp_path is root's, 0700
    try:
        os.chmod(reachable, 0o755)
        dest = reachable / "dest"
        dest.mkdir()
        os.chown(dest, 65534, 65534)
        check_unprivileged_import(data, dest)
    finally:
        shutil.rmtree(reachable)


def check_unprivileged_import(data: bytes, dest: Path) -> None:
    script = (
        "import io, os, sys\n"
        "from overlayd.oci import import_layer\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "fmt = import_layer(io.BytesIO(sys.stdin.buffer.read()), sys.argv[1])\n"
        "print(fmt)\n")
    proc = subprocess.run([sys.executable, "-c", script, os.fspath(dest)],
                          input=data, capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().strip() in ("kernel", "oci")
    warnings = proc.stderr.decode().splitlines()
    assert any("trusted.* xattrs" in w for w in warnings), warnings
    assert len([w for w in warnings if "trusted" in w]) == 1, warnings
    st = os.lstat(dest / "dir" / "file")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, 65534, 0o640)
    assert os.getxattr(dest / "dir" / "file", "user.color") == b"blue"


@needs_root
def test_import_into_a_nonempty_dir_needs_merge(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    mkfile(base / "file", b"old")
    mkfile(base / "gone", b"x")
    (base / "dir").mkdir()
    mkfile(base / "dir" / "old-child", b"c")
    mkfile(base / "was-file", b"f")
    new = tmp_path / "new"
    new.mkdir()
    mkfile(new / "file", b"new")
    whiteout(new / "gone")
    (new / "dir").mkdir()
    os.setxattr(new / "dir", "trusted.overlay.opaque", b"y")
    mkfile(new / "dir" / "new-child", b"n")
    (new / "was-file").mkdir()
    data = export_bytes(new)
    with pytest.raises(UsageError, match="not empty"):
        import_bytes(data, base)
    assert (base / "file").read_bytes() == b"old"
    import_bytes(data, base, merge=True)
    assert (base / "file").read_bytes() == b"new"
    assert stat.S_ISCHR(os.lstat(base / "gone").st_mode)
    assert sorted(os.listdir(base / "dir")) == ["new-child"]
    assert os.getxattr(base / "dir", "trusted.overlay.opaque") == b"y"
    # a directory made where the layer before held a file must hide the layers below that
    assert os.getxattr(base / "was-file", "trusted.overlay.opaque") == b"y"


@needs_root
def test_whiteout_and_object_in_one_archive(tmp_path: Path) -> None:
    """Whiteouts hide the layers below, never the archive's own objects, in either order."""
    def tar(*entries: tuple[str, str]) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as t:
            for name, kind in entries:
                info = tarfile.TarInfo(name)
                info.type = tarfile.DIRTYPE if kind == "dir" else tarfile.REGTYPE
                info.mode = 0o755
                t.addfile(info, io.BytesIO(b""))
        return out.getvalue()

    for order in ((("d", "dir"), (".wh.d", "file")), ((".wh.d", "file"), ("d", "dir"))):
        for fmt in ("kernel", "oci"):
            dest = tmp_path / f"{fmt}-{order[0][0]}"
            import_bytes(tar(*order, ("d/x", "file"), ("f", "file"), (".wh.f", "file")),
                         dest, whiteouts=fmt)
            view = semantic(layer_view(dest))
            assert view[b"/d"][-1] == "opaque", (fmt, order)
            assert b"/d/x" in view
            assert b"/f" in view
            assert b"/f (whiteout)" not in view
    for fmt in ("kernel", "oci"):
        # A directory the archive implies (no entry of its own) where it whited the name out.
        dest = tmp_path / f"implied-{fmt}"
        import_bytes(tar((".wh.d", "file"), ("d/x", "file")), dest, whiteouts=fmt)
        assert semantic(layer_view(dest))[b"/d"][-1] == "opaque", fmt


# --- path safety and bad archives -------------------------------------------------------------


def crafted(*entries: tuple[str, str, str]) -> bytes:
    """A tarball of (name, type, link or content) made by Python's tarfile, hostile on request."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, kind, extra in entries:
            info = tarfile.TarInfo(name)
            info.mode = 0o644
            data = b""
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
            elif kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, extra
            elif kind == "link":
                info.type, info.linkname = tarfile.LNKTYPE, extra
            else:
                data = extra.encode()
                info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return out.getvalue()


HOSTILE = {
    "dotdot": [("../escaped", "file", "x")],
    "dotdot-inside": [("a/../../escaped", "file", "x")],
    "absolute": [("/tmp/escaped-abs", "file", "x")],
    "symlink-then-file": [("s", "sym", "OUTSIDE"), ("s/escaped", "file", "x")],
    "symlink-then-dir": [("s", "sym", "OUTSIDE"), ("s/sub/", "dir", "")],
    "symlink-then-whiteout": [("s", "sym", "OUTSIDE"), ("s/.wh.victim", "file", "")],
    "symlink-then-opaque": [("s", "sym", "OUTSIDE"), ("s/.wh..wh..opq", "file", "")],
    "symlink-then-link": [("f", "file", "x"), ("s", "sym", "OUTSIDE"), ("s/escaped", "link", "f")],
    "link-to-outside": [("escaped", "link", "../OUTSIDE/victim")],
    "link-to-absolute": [("escaped", "link", "/etc/passwd")],
    "link-through-symlink": [("s", "sym", "OUTSIDE"), ("escaped", "link", "s/victim")],
    "link-to-missing": [("escaped", "link", "nothing-here")],
}


@needs_root
@pytest.mark.parametrize("case", sorted(HOSTILE))
@pytest.mark.parametrize("fmt", ["kernel", "oci"])
def test_hostile_archives_are_refused(tmp_path: Path, case: str, fmt: str,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    outside = tmp_path / "OUTSIDE"
    outside.mkdir()
    mkfile(outside / "victim", b"precious")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # relative escapes would land here
    entries = [(n, k, os.fspath(outside) if e == "OUTSIDE" else e.replace("OUTSIDE", "../OUTSIDE")
                if k == "link" else e) for n, k, e in HOSTILE[case]]
    data = crafted(*entries)
    dest = work / "dest"
    with pytest.raises(UsageError, match="refusing"):
        import_bytes(data, dest, whiteouts=fmt)
    assert sorted(os.listdir(outside)) == ["victim"]
    assert (outside / "victim").read_bytes() == b"precious"
    assert os.lstat(outside / "victim").st_nlink == 1
    assert not os.path.lexists("/tmp/escaped-abs")
    assert os.listdir(work) == [], "the directory the import made is removed"


@needs_root
def test_truncated_and_garbage_archives(tmp_path: Path) -> None:
    layer = tmp_path / "upper"
    build_every_kind(layer)
    data = export_bytes(layer)
    cuts = [0, 100, 512, 1024, 1536, 4096, len(data) // 2, len(data) - 1024, len(data) - 600]
    for cut in cuts:
        dest = tmp_path / f"cut{cut}"
        with pytest.raises(UsageError) as excinfo:
            import_bytes(data[:cut], dest)
        message = str(excinfo.value)
        assert "\n" not in message
        assert any(w in message for w in ("truncated", "not a valid", "corrupt")), message
        assert not dest.exists()
    with pytest.raises(UsageError, match=r"corrupt|not a valid"):
        import_bytes(data[:1536] + b"\xff" * 512 + data[2048:], tmp_path / "bad")
    with pytest.raises(UsageError, match="not a valid"):
        import_bytes(b"this is not a tarball at all\n" * 40, tmp_path / "garbage")
    gz = gzip.compress(data, mtime=0)
    with pytest.raises(UsageError, match=r"not a valid|truncated"):
        import_bytes(gz[:len(gz) // 2], tmp_path / "gzcut")
    with pytest.raises(UsageError, match=r"not a valid|truncated"):
        import_bytes(gz[:-4], tmp_path / "gzcrc")
    zst = zstd_compress(data)
    for cut, what in ((b"\x28\xb5\x2f\xfd" + b"\0" * 600, "zstdjunk"),
                      (zst[:len(zst) // 2], "zstdcut"), (zst[:-3], "zstdend")):
        with pytest.raises(UsageError, match=r"not a valid|truncated") as excinfo:
            import_bytes(cut, tmp_path / what)
        assert "\n" not in str(excinfo.value)
        assert not (tmp_path / what).exists()
    assert import_bytes(b"\0" * 1024, tmp_path / "empty") in ("kernel", "oci")
    assert os.listdir(tmp_path / "empty") == []


@needs_root
def test_stdin_and_stdout(tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes],
                          monkeypatch: pytest.MonkeyPatch) -> None:
    layer = tmp_path / "upper"
    build_every_kind(layer)
    assert main_export([os.fspath(layer), "--gzip", "-o", "-"]) == 0
    data = capsysbinary.readouterr().out
    assert gzip.decompress(data) == export_bytes(layer)
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data)))
    assert main_import(["-", os.fspath(tmp_path / "in")]) == 0
    assert layer_view(tmp_path / "in") == layer_view(layer)


# --- GNU tar ----------------------------------------------------------------------------------


def build_for_gnu_tar(layer: Path) -> None:
    """build_every_kind's layer, less the escaped xattr: GNU tar knows no overlay escaping
    (it writes and sets trusted.overlay.overlay.X and trusted.overlay.X as they are)."""
    build_every_kind(layer)
    os.removexattr(layer / "private", "trusted.overlay.overlay.nested")
    os.utime(layer / "private", ns=(T0, T0))


@needs_root
@needs_tar
def test_gnu_tar_reads_ours(tmp_path: Path) -> None:
    layer = tmp_path / "upper"
    build_for_gnu_tar(layer)
    archive = tmp_path / "layer.tar"
    main_export([os.fspath(layer), "-o", os.fspath(archive)])
    listing = subprocess.run([*GNU_TAR, "-tvf", os.fspath(archive)], capture_output=True,
                             check=True)
    assert listing.stderr == b""
    assert b"dir/big-link link to big" in listing.stdout
    extracted = tmp_path / "gnu"
    extracted.mkdir()
    subprocess.run([*GNU_TAR, "-xpf", os.fspath(archive), "-C", os.fspath(extracted)],
                   capture_output=True, check=True)
    ours = tmp_path / "ours"
    import_bytes(archive.read_bytes(), ours, whiteouts="oci")  # .wh. files, as GNU tar keeps
    assert layer_view(extracted) == layer_view(ours) == layer_view(layer)


@needs_root
@needs_tar
def test_gnu_tar_archive_imports(tmp_path: Path) -> None:
    layer = tmp_path / "upper"
    build_for_gnu_tar(layer)
    oci_layer = tmp_path / "oci-layer"
    import_bytes(export_bytes(layer), oci_layer, whiteouts="oci")
    archive = tmp_path / "gnu.tar"
    subprocess.run([*GNU_TAR, "--format=pax", "-cf", os.fspath(archive), "-C",
                    os.fspath(oci_layer), "."], capture_output=True, check=True)
    for fmt in ("kernel", "oci"):
        dest = tmp_path / f"from-gnu-{fmt}"
        import_bytes(archive.read_bytes(), dest, whiteouts=fmt)
        assert layer_view(dest) == layer_view(layer), fmt


# --- random layers (hypothesis) ---------------------------------------------------------------

NAMES = st.sampled_from([b"a", b"b", b"c-d", b".hid", b"\xc3\xa9", b"\xff", b"x" * 110])
MODES = st.sampled_from([0o644, 0o600, 0o755, 0o4755, 0o2750, 0o1777, 0o000])
OWNERS = st.sampled_from([(0, 0), (1000, 1000), (65534, 7)])
TIMES = st.one_of(st.just(T0), st.integers(0, 2**34 * 10**9))
XATTRS = st.dictionaries(st.sampled_from(["user.a", "user.b", "trusted.t"]),
                         st.binary(max_size=40), max_size=2)
LEAF = st.one_of(
    st.tuples(st.just("file"), st.binary(max_size=1500), MODES, OWNERS, TIMES, XATTRS),
    st.tuples(st.just("symlink"), st.sampled_from([b"a", b"../up", b"/abs/t", b"x" * 150]),
              OWNERS, TIMES),
    st.tuples(st.just("fifo"), MODES, OWNERS, TIMES),
    st.tuples(st.just("whiteout")),
    st.tuples(st.just("oci-whiteout"), NAMES),
    st.tuples(st.just("link"), st.integers(0, 20)),
)
TREE = st.recursive(LEAF, lambda kids: st.tuples(
    st.just("dir"), MODES, OWNERS, TIMES, XATTRS,
    st.sampled_from([None, "trusted.overlay.opaque", "user.overlay.opaque", "oci"]),
    st.dictionaries(NAMES, kids, max_size=4)), max_leaves=14)
ROOT = st.dictionaries(NAMES, TREE, max_size=5)


def build(parent: Path, tree: dict[bytes, Any], files: list[Path]) -> None:
    for name, node in tree.items():
        path = Path(os.fsdecode(os.fsencode(parent) + b"/" + name))
        kind = node[0]
        if kind == "file":
            _, data, mode, owner, mtime, xattrs = node
            mkfile(path, data, mode, owner=owner)
            for k, v in xattrs.items():
                os.setxattr(path, k, v)
            os.utime(path, ns=(mtime, mtime))
            files.append(path)
        elif kind == "symlink":
            os.symlink(node[1], path)
            os.chown(path, *node[2], follow_symlinks=False)
            os.utime(path, ns=(node[3], node[3]), follow_symlinks=False)
        elif kind == "fifo":
            os.mkfifo(path)
            os.chown(path, *node[2])
            os.chmod(path, node[1])
            os.utime(path, ns=(node[3], node[3]))
        elif kind == "whiteout":
            whiteout(path)
        elif kind == "oci-whiteout":
            wh = Path(os.fsdecode(os.fsencode(parent) + b"/.wh." + node[1]))
            if not wh.exists():
                mkfile(wh, mode=0)
        elif kind == "link":
            if files:
                os.link(files[node[1] % len(files)], path)
            else:
                mkfile(path, b"no file to link to yet")
        else:
            _, mode, owner, mtime, xattrs, opaque, kids = node
            path.mkdir()
            build(path, kids, files)
            if opaque == "oci":
                mkfile(path / ".wh..wh..opq", mode=0)
            elif opaque:
                os.setxattr(path, opaque, b"y")
            for k, v in xattrs.items():
                os.setxattr(path, k, v)
            os.chown(path, *owner)
            os.chmod(path, mode)
            os.utime(path, ns=(mtime, mtime))


@needs_root
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=ROOT, root_mtime=TIMES)
def test_random_layers_round_trip(tree: dict[bytes, Any], root_mtime: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        layer = Path(tmp) / "layer"
        layer.mkdir()
        build(layer, tree, [])
        os.utime(layer, ns=(root_mtime, root_mtime))
        data = export_bytes(layer)
        assert export_bytes(layer) == data
        original = layer_view(layer)
        oci = Path(tmp) / "oci"
        import_bytes(data, oci, whiteouts="oci")
        assert layer_view(oci) == original
        assert export_bytes(oci) == data
        kernel = Path(tmp) / "kernel"
        import_bytes(data, kernel, whiteouts="kernel")
        assert semantic(layer_view(kernel)) == semantic(original)
        again = export_bytes(kernel)
        kernel2 = Path(tmp) / "kernel2"
        import_bytes(again, kernel2, whiteouts="kernel")
        assert export_bytes(kernel2) == again


# --- the kernel round trip --------------------------------------------------------------------


def all_xattrs(root: Path) -> dict[bytes, dict[bytes, bytes]]:
    """Every xattr (not only user.*) of every path under a mount, as the mount shows them."""
    found: dict[bytes, dict[bytes, bytes]] = {}
    base = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(base):
        for name in [b"", *dirnames, *filenames]:
            p = os.path.join(dirpath, name) if name else dirpath
            found[p[len(base):]] = {os.fsencode(k): os.getxattr(p, k, follow_symlinks=False)
                                    for k in os.listxattr(p, follow_symlinks=False)}
    return found


def build_lowers(root: Path) -> list[Path]:
    l1, l2 = root / "l1", root / "l2"
    for layer in (l1, l2):
        layer.mkdir(parents=True)
    (l2 / "etc").mkdir()
    mkfile(l2 / "etc" / "passwd", b"root:x:0:0\n")
    mkfile(l2 / "etc" / "hosts", b"127.0.0.1 localhost\n")
    (l2 / "var" / "lib" / "db").mkdir(parents=True)
    for i in range(3):
        mkfile(l2 / "var" / "lib" / "db" / f"row{i}", b"%d" % i)
    mkfile(l2 / "bin", b"\x7fELF", 0o755)
    (l1 / "etc").mkdir()
    mkfile(l1 / "etc" / "motd", b"welcome\n")
    (l1 / "opt" / "app").mkdir(parents=True)
    mkfile(l1 / "opt" / "app" / "config", b"a=1\n", 0o600)
    mkfile(l1 / "opt" / "app" / "data", b"payload" * 100)
    os.symlink("app/config", l1 / "opt" / "cfg")
    set_times(l1, T0)
    set_times(l2, T0 - 10**12)
    return [l1, l2]


def change_through_kernel_mount(mnt: Path) -> None:
    """Real operations on a kernel overlay mount, leaving whiteouts, opaque directories,
    copied-up and new objects of every kind in its upper layer."""
    (mnt / "etc" / "hosts").unlink()  # whiteout
    (mnt / "etc" / "motd").write_bytes(b"changed\n")  # copy-up
    shutil.rmtree(mnt / "var" / "lib" / "db")  # whiteout of a directory
    (mnt / "var" / "lib" / "db").mkdir()  # opaque
    mkfile(mnt / "var" / "lib" / "db" / "fresh", b"new row")
    os.chmod(mnt / "opt" / "app" / "config", 0o640)  # metadata copy-up
    os.chown(mnt / "opt" / "app" / "data", 1000, 1000)
    os.setxattr(mnt / "opt" / "app" / "data", "user.origin", b"lower")
    os.setxattr(mnt / "bin", "security.capability", CAPABILITY)
    os.setxattr(mnt / "etc", "trusted.note", b"\x01\x02")
    os.link(mnt / "opt" / "app" / "data", mnt / "opt" / "data-link")  # link of a lower file
    mkfile(mnt / "new", b"fresh file", 0o4750, owner=(0, 1000))
    os.link(mnt / "new", mnt / "etc" / "new-link")
    os.symlink("../new", mnt / "etc" / "to-new")
    os.mkfifo(mnt / "pipe", 0o600)
    os.mknod(mnt / "zero", stat.S_IFCHR | 0o666, os.makedev(1, 5))
    os.chmod(mnt / "zero", 0o666)
    os.rename(mnt / "etc" / "passwd", mnt / "passwd")  # whiteout + new name
    (mnt / "opt" / "cfg").unlink()
    os.symlink("app/data", mnt / "opt" / "cfg")  # a whiteout replaced by a symlink
    for path in (mnt / "new", mnt / "passwd", mnt / "pipe"):
        os.utime(path, ns=(T0 + 77, T0 + 77), follow_symlinks=False)


@contextlib.contextmanager
def kernel_view(mountpoint: Path, layers: list[Path]) -> Iterator[Path]:
    mountpoint.mkdir()
    with kernel_mounted(mountpoint, overlay_options(layers) + "," + KERNEL_PINNED):
        yield mountpoint


def changed_by_kernel(tmp_path: Path) -> tuple[list[Path], Path]:
    """Lower layers, and the upper layer the kernel's overlay wrote while they were changed."""
    lowers = build_lowers(tmp_path / "lowers")
    upper, work, mnt = tmp_path / "upper", tmp_path / "work", tmp_path / "mnt"
    for d in (upper, work, mnt):
        d.mkdir()
    with kernel_mounted(mnt, overlay_options(lowers, upper, work) + "," + KERNEL_PINNED):
        change_through_kernel_mount(mnt)
    return lowers, upper


@pytest.mark.kernel
@needs_root
@needs_kernel_overlay
def test_kernel_round_trip(tmp_path: Path) -> None:
    lowers, upper = changed_by_kernel(tmp_path)
    data = export_bytes(upper)
    names = [m.name for m in members(data)]
    assert "etc/.wh.hosts" in names
    assert "var/lib/db/.wh..wh..opq" in names
    imported = tmp_path / "imported"
    import_bytes(data, imported, whiteouts="kernel")
    with kernel_view(tmp_path / "want", [upper, *lowers]) as want:
        expected, expected_x = snapshot(want), all_xattrs(want)
    with kernel_view(tmp_path / "got", [imported, *lowers]) as got:
        actual, actual_x = snapshot(got), all_xattrs(got)
    assert b"etc/hosts" not in expected
    assert b"var/lib/db/row0" not in expected
    assert diff_snapshots(expected, actual) == []
    assert actual_x == expected_x
    assert expected_x[b"/bin"][b"security.capability"] == CAPABILITY


@pytest.mark.kernel
@pytest.mark.mounted
@needs_root
@needs_kernel_overlay
@needs_fuse
def test_kernel_round_trip_oci_format_through_overlayd(tmp_path: Path) -> None:
    """The kernel does not read .wh. files: the OCI-format import is stacked by overlayd."""
    lowers, upper = changed_by_kernel(tmp_path)
    imported = tmp_path / "imported"
    import_bytes(export_bytes(upper), imported, whiteouts="oci")
    assert (imported / "etc" / ".wh.hosts").is_file()
    with kernel_view(tmp_path / "want", [upper, *lowers]) as want:
        expected, expected_x = snapshot(want), all_xattrs(want)
    got = tmp_path / "got"
    got.mkdir()
    with overlayd_mounted(got, overlay_options([imported, *lowers])):
        actual, actual_x = snapshot(got), all_xattrs(got)
    assert diff_snapshots(expected, actual) == []
    assert actual_x == expected_x


def test_export_takes_a_store_spec(tmp_path: Path) -> None:
    from tests.test_stores import make_overlay2

    layers = make_overlay2(tmp_path / "overlay2")
    by_spec, by_dir = tmp_path / "spec.tar", tmp_path / "dir.tar"
    main_export([f"overlay2:{layers['ctr']}", "--mtime", "0", "-o", os.fspath(by_spec)])
    main_export([os.fspath(layers["ctr"] / "diff"), "--mtime", "0", "-o", os.fspath(by_dir)])
    assert by_spec.read_bytes() == by_dir.read_bytes()
    assert "etc/motd" in [m.name for m in members(by_spec.read_bytes())]
