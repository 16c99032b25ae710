"""Escapes: an ordinary user's mount never makes the daemon read or change anything outside its
layers, and never creates a setuid file the user could not create anyway.

The layers point at a "host" directory outside them (a stand-in for /etc, owned by the user so
that only the daemon's care, not permissions, keeps it safe): a top lower layer replaces a
directory by an absolute symlink to it, symlinks to a secret file in it, and the upper holds
redirect xattrs that climb out with ".." or through that symlink (xattrs an unprivileged user
may write on its own upper). Through the mount the user changes the symlinks without following
them (the kernel follows a symlink itself, against the host, as with any filesystem: that is not
the daemon's doing), hard-links across layers, and writes a root-owned setuid lower file. The
host tree and the lower layers are compared before and after: listing, content, owner, mode,
times, link counts.
"""

from __future__ import annotations

import ast
import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mounting import check_log, overlay_options
from tests.rootless import Rootless, rootless, why_not

pytestmark = [pytest.mark.mounted,
              pytest.mark.skipif(why_not() is not None, reason=str(why_not()))]

ATTEMPTS = r'''
import errno, os, sys
mnt, uid, gid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def p(name): return os.path.join(mnt, name)
out = {}
def attempt(title, call):
    try:
        result = call()
        out[title] = "ok" if result is None else result
    except OSError as e:
        out[title] = errno.errorcode[e.errno]
attempt("readlink esc", lambda: os.readlink(p("esc")))
attempt("lchown esc", lambda: os.chown(p("esc"), uid, gid, follow_symlinks=False))
attempt("lutimes esc", lambda: os.utime(p("esc"), ns=(1, 2), follow_symlinks=False))
attempt("lutimes secret link", lambda: os.utime(p("secret"), ns=(1, 2), follow_symlinks=False))
attempt("rename esc", lambda: os.rename(p("esc"), p("esc2")))
attempt("link the secret link", lambda: os.link(p("secret"), p("secret2"),
                                                 follow_symlinks=False))
attempt("link a lower file", lambda: os.link(p("plain"), p("plain2")))
attempt("write plain link", lambda: open(p("plain2"), "a").write("more\n") and None)
attempt("list redirect up", lambda: sorted(os.listdir(p("up"))))
attempt("list redirect rel", lambda: sorted(os.listdir(p("rel"))))
attempt("list redirect via symlink", lambda: sorted(os.listdir(p("via"))))
attempt("write setuid root file", lambda: os.close(os.open(p("suid"), os.O_WRONLY)))
attempt("chmod setuid root file", lambda: os.chmod(p("suid"), 0o4777))
attempt("setuid own file", lambda: os.chmod(p("mine"), 0o4755))
attempt("mode of own file", lambda: oct(os.stat(p("mine")).st_mode & 0o7777))
print(repr(out))
'''


def state(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything a change to the tree *root* would show: per path, its type, mode, owner,
    link count, size, mtime and ctime, content hash, link target, xattrs and listing."""
    found: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            extra: object = None
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    extra = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(path)
            elif stat.S_ISDIR(st.st_mode):
                extra = tuple(sorted(os.listdir(path)))
            xattrs = () if stat.S_ISLNK(st.st_mode) else tuple(sorted(
                (x, os.getxattr(path, x)) for x in os.listxattr(path)))
            found[os.path.normpath(os.path.relpath(path, root))] = (
                st.st_mode, st.st_uid, st.st_gid, st.st_nlink, st.st_size, st.st_mtime_ns,
                st.st_ctime_ns, extra, xattrs)
    return found


@pytest.fixture(scope="module")
def user() -> Iterator[Rootless]:
    with rootless() as env:
        yield env


def test_nothing_outside_the_layers_is_read_or_changed(user: Rootless) -> None:
    base = user.base / "home" / "escapes"
    base.mkdir()
    host = base / "host"  # outside every layer
    host.mkdir()
    (host / "secret").write_text("host secret\n")
    (host / "hostdir").mkdir()
    (host / "hostdir" / "inner").write_text("host inner\n")
    top, bottom = base / "lower1", base / "lower2"
    upper = base / "upper"
    for d in (top, bottom, upper, base / "work", base / "mnt"):
        d.mkdir()
    (bottom / "esc").mkdir()  # a directory below ...
    (bottom / "esc" / "inner").write_text("layer inner\n")
    os.symlink(host, top / "esc")  # ... replaced by an absolute symlink to the host
    os.symlink(host / "secret", top / "secret")
    (bottom / "plain").write_text("plain\n")
    (bottom / "mine").write_text("mine\n")
    # Redirects an unprivileged user could have written into its own upper.
    for name, redirect in (("up", b"/../host"), ("rel", b"../host"), ("via", b"/esc")):
        (upper / name).mkdir()
        os.setxattr(upper / name, "user.overlay.redirect", redirect)
    user.chown_tree(base)
    (bottom / "suid").write_text("#!/bin/sh\n")  # root's setuid file, writable by anyone
    os.chmod(bottom / "suid", 0o4777)
    before = {"host": state(host), "lower1": state(top), "lower2": state(bottom)}

    opts = overlay_options([top, bottom], upper, base / "work")
    with user.mounted(base / "mnt", opts) as daemon:
        done = user.python_run(ATTEMPTS, str(base / "mnt"), str(user.uid), str(user.gid))
        assert done.returncode == 0, done.stderr
        assert user.unmount(base / "mnt").returncode == 0
        assert daemon.proc.wait(timeout=10) == 0
    check_log(daemon.log())
    out = ast.literal_eval(done.stdout)

    # Nothing outside the layers changed, nor the lower layers.
    assert {"host": state(host), "lower1": state(top), "lower2": state(bottom)} == before

    # The symlinks were changed as symlinks: copied up as links, never their targets.
    assert out["readlink esc"] == str(host)
    for title in ("lchown esc", "lutimes esc", "lutimes secret link", "rename esc",
                  "link the secret link", "link a lower file", "write plain link"):
        assert out[title] == "ok", (title, out[title])
    assert os.readlink(upper / "esc2") == str(host)
    assert os.lstat(upper / "esc2").st_mtime_ns == 2
    assert os.readlink(upper / "secret") == str(host / "secret")
    assert os.lstat(upper / "secret").st_mtime_ns == 2
    assert os.path.samestat(os.lstat(upper / "secret"), os.lstat(upper / "secret2"))
    assert os.lstat(upper / "esc").st_rdev == 0  # a whiteout hides the old name
    assert (upper / "plain2").read_text() == "plain\nmore\n"
    assert (bottom / "plain").read_text() == "plain\n"

    # Redirects that climb out are refused as the kernel refuses them; one through a symlink
    # finds no directory below. None lists the host.
    assert out["list redirect up"] == "EACCES"
    assert out["list redirect rel"] == "EINVAL"
    assert out["list redirect via symlink"] == []

    # The root-owned setuid file: a copy-up cannot give it to root, so it fails; no setuid
    # file in the upper but the one the user made of its own file.
    assert out["write setuid root file"] == "EPERM"
    assert out["chmod setuid root file"] == "EPERM"
    assert out["setuid own file"] == "ok"
    assert out["mode of own file"] == "0o4755"
    setuid = {}
    for dirpath, dirnames, filenames in os.walk(upper):
        for name in [*dirnames, *filenames]:
            st = os.lstat(os.path.join(dirpath, name))
            assert st.st_uid == user.uid, name
            if st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                setuid[name] = st.st_uid
    assert setuid == {"mine": user.uid}
    assert not os.path.lexists(upper / "suid")
    assert os.listdir(base / "work" / "work") == []
