"""The pyfuse3 adapter: translates FUSE requests into Overlay calls, and nothing more.

One error boundary (``fuse_op``) turns OSError and OverlayError into FUSEError(errno) and any other
exception into a logged traceback and EIO, so no request can take the daemon down. Every handler
runs in the trio thread without awaiting: the core is synchronous and the fast path has no await.
"""

from __future__ import annotations

import bisect
import errno
import functools
import logging
import os
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

import pyfuse3

from overlayd.constants import ATTR_TIMEOUT, CAPABILITY, ENTRY_TIMEOUT, NEGATIVE_TIMEOUT
from overlayd.errors import OverlayError
from overlayd.inodes import Node
from overlayd.openmodes import OpenModes
from overlayd.overlay import Handle, Overlay, effective_caps, in_initial_user_namespace

log = logging.getLogger(__name__)

# What overlayd's patch to pyfuse3 adds (scripts/pyfuse3-3.5.0.patch, built by scripts/setup);
# with a stock pyfuse3 each is left off and the daemon works as before.
BINDING_FEATURES: frozenset[str] = getattr(pyfuse3, "OVERLAYD_FEATURES", frozenset())
CACHE_READDIR = "opendir_fileinfo" in BINDING_FEATURES  # decided once, not at every opendir
# Files open for writing only bypass the kernel's page cache (FOPEN_DIRECT_IO): a write(2) is one
# WRITE request, where the cache splits one that begins inside a page in two and asks
# getxattr("security.capability") before each. Only with the write's flags (our patch), which
# tell when to clear set-id bits, since the kernel leaves that to us on this path.
DIRECT_WRITES = "write_flags" in BINDING_FEATURES
WRITE_KILL_SUIDGID: int = getattr(pyfuse3, "WRITE_KILL_SUIDGID", 0)
# Upper files open passthrough (FOPEN_PASSTHROUGH, overlayd/openmodes.py): the kernel reads and
# writes them itself, and asks us to clear set-id bits first with a SETATTR (file_remove_privs).
PASSTHROUGH = "passthrough" in BINDING_FEATURES
CAP_SYS_ADMIN = 21  # linux/capability.h: what FUSE_DEV_IOC_BACKING_OPEN needs


def _backing_open(fd: int) -> int:
    if not pyfuse3.passthrough_granted():
        raise OSError(errno.EOPNOTSUPP, "the kernel was not given FUSE_PASSTHROUGH at INIT")
    return pyfuse3.backing_open(fd)


def _backing_close(backing_id: int) -> None:
    pyfuse3.backing_close(backing_id)


P = ParamSpec("P")
R = TypeVar("R")


def fuse_op(
    fn: Callable[Concatenate[Operations, P], R],
) -> Callable[Concatenate[Operations, P], Coroutine[Any, Any, R]]:
    """Make a synchronous handler a pyfuse3 coroutine with the single error boundary."""
    name = fn.__name__
    payload = PAYLOAD.get(name)

    @functools.wraps(fn)
    async def handler(self: Operations, /, *args: P.args, **kwargs: P.kwargs) -> R:
        if self.trace:
            log.debug("request %s%r", name, _shown(args, payload))
        try:
            try:
                return fn(self, *args, **kwargs)
            finally:
                if self.overlay.stale_attrs:
                    self.invalidate()
        except pyfuse3.FUSEError:
            raise
        except OverlayError as e:
            log.debug("%s%r: %s (errno %d)", name, _shown(args, payload), e, e.errno)
            raise pyfuse3.FUSEError(e.errno) from None
        except OSError as e:
            if e.errno is None:
                log.exception("%s%r failed without an errno", name, _shown(args, payload))
                raise pyfuse3.FUSEError(errno.EIO) from None
            log.debug("%s%r: %s", name, _shown(args, payload), e)
            raise pyfuse3.FUSEError(e.errno) from None
        except Exception:
            log.exception("unexpected error in %s%r", name, _shown(args, payload))
            raise pyfuse3.FUSEError(errno.EIO) from None

    return handler


# The argument that carries data, by handler: logged by its length only.
PAYLOAD = {"write": 2, "setxattr": 2}


def _shown(args: tuple[object, ...], payload: int | None = None) -> tuple[object, ...]:
    """A request's arguments as logged: numbers and names (inodes, handles, offsets, flags),
    not the request context nor the attributes, and the *payload* argument (a write's data,
    an xattr's value) by its length."""
    return tuple(f"<{len(a)} bytes>" if i == payload and isinstance(a, bytes) else a
                 for i, a in enumerate(args) if isinstance(a, (int, bytes)))


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    # Off: with the kernel's writeback cache a write(2) returns before the upper file has the
    # bytes, so a full upper fails the close(2) or the fsync instead of the write(2), as the
    # kernel's overlay does (tests/test_reliability.py), and a daemon killed loses what was
    # not written back. Tried (with the writes from the cache keeping the upper mtime, which
    # the kernel owns then, and mtime-only setattrs after an unlink not copying up): it saved
    # the write requests and the reads of grep -r after tar, but tar -x itself was no faster.
    enable_writeback_cache = False
    # POSIX ACLs: the kernel checks them (with default_permissions), as the kernel's overlay
    # checks the real inode's; without this it checked the mode bits alone, and let through
    # whom an ACL denied. The umask is then applied as the upper filesystem does it
    # (Overlay.create's umask) ...
    enable_acl = True
    # ... and not even masked by the kernel first (FUSE_CAP_DONT_MASK, our patch): under a
    # default ACL the umask does not apply. A stock pyfuse3 lacks it: the kernel masks first.
    dont_mask = "dont_mask" in BINDING_FEATURES
    # XATTR_CREATE/XATTR_REPLACE reach our setxattr, which copies up first, as the kernel does.
    setxattr_flags = "setxattr_flags" in BINDING_FEATURES
    # write gets the request's write_flags (WRITE_KILL_SUIDGID), for DIRECT_WRITES.
    write_flags = DIRECT_WRITES
    # FUSE_HANDLE_KILLPRIV_V2 (our patch): the kernel leaves the clearing of set-id bits to
    # us, which spares the GETATTR it sends before every chown without it. A write says so in
    # its flags (write_flags), a truncation in SetattrFields.kill_suidgid; a chown clears them
    # on the upper file itself, as the daemon's chown there does for any caller.
    killpriv_v2 = DIRECT_WRITES and "killpriv_v2" in BINDING_FEATURES
    # FUSE_PASSTHROUGH is offered to the kernel at INIT (our patch), when we may use it.
    passthrough = False

    def __init__(self, overlay: Overlay) -> None:
        super().__init__()
        self.overlay = overlay
        # -d: every request is logged, as it arrives (its failure too, once answered).
        self.trace = log.isEnabledFor(logging.DEBUG)
        if not overlay.opts.acl:  # -o noacl
            self.enable_acl = self.dont_mask = False
        # FUSE_DEV_IOC_BACKING_OPEN needs CAP_SYS_ADMIN in the initial user namespace (the
        # kernel's capable()): without it FUSE_PASSTHROUGH is not even offered at INIT, which
        # would only make the mount count as stacked (max_stack_depth). A rootless podman's
        # mount program has CAP_SYS_ADMIN in its own user namespace only.
        self.passthrough = (PASSTHROUGH and bool((effective_caps() or 0) >> CAP_SYS_ADMIN & 1)
                            and in_initial_user_namespace())
        self.modes = OpenModes(_backing_open if self.passthrough else None, _backing_close)
        self._uncapped: set[int] = set()  # inodes whose capabilities the kernel just removed

    def invalidate(self) -> None:
        """Tell the kernel to drop what a change made stale behind its back."""
        ov = self.overlay
        attrs, ov.stale_attrs = ov.stale_attrs, []
        for ino in attrs:
            try:
                # Attributes only and no writeback cache: this never blocks.
                pyfuse3.invalidate_inode(pyfuse3.InodeT(ino), attr_only=True)
            except OSError as e:
                if e.errno != errno.ENOENT:  # ENOENT: the kernel holds nothing of it
                    log.warning("cannot invalidate inode %d: %s", ino, e)

    def _entry(self, node: Node, st: os.stat_result) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.ino
        attr.generation = 0
        attr.entry_timeout = ENTRY_TIMEOUT
        attr.attr_timeout = ATTR_TIMEOUT
        attr.st_mode = st.st_mode
        attr.st_nlink = self.overlay.nlink(node, st)
        attr.st_uid, attr.st_gid = self.overlay.shown_owner(st)
        attr.st_rdev = st.st_rdev
        attr.st_size = st.st_size
        attr.st_blksize = st.st_blksize
        attr.st_blocks = st.st_blocks
        attr.st_atime_ns = st.st_atime_ns
        attr.st_mtime_ns = st.st_mtime_ns
        attr.st_ctime_ns = st.st_ctime_ns
        return attr

    # -- lookups ---------------------------------------------------------------------------

    @fuse_op
    def lookup(self, parent_inode: int, name: bytes,
               ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        ov = self.overlay
        hit = ov.lookup(ov.node(parent_inode), name)
        if hit is None:
            # A negative entry the kernel may cache: st_ino 0 with an entry timeout.
            attr = pyfuse3.EntryAttributes()
            attr.st_ino = 0
            attr.entry_timeout = NEGATIVE_TIMEOUT
            return attr
        node, st = hit
        ov.remember(node)
        return self._entry(node, st)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # Never raises: the kernel cannot be told about a failed forget.
        if self.trace:
            log.debug("request forget%r", tuple(inode_list))
        for ino, nlookup in inode_list:
            try:
                self.overlay.forget(ino, nlookup)
            except Exception:
                log.exception("forget(%d, %d)", ino, nlookup)

    @fuse_op
    def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self.overlay.node(inode)
        return self._entry(node, self.overlay.stat(node))

    @fuse_op
    def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self.overlay.readlink(self.overlay.node(inode))

    @fuse_op
    def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        # default_permissions: the kernel checks mode bits itself before asking us.
        return True

    # -- directories -------------------------------------------------------------------------

    @fuse_op
    def opendir(self, inode: int,
                ctx: pyfuse3.RequestContext) -> pyfuse3.FileHandleT | pyfuse3.FileInfo:
        fh = pyfuse3.FileHandleT(self.overlay.opendir(self.overlay.node(inode)))
        if not CACHE_READDIR:
            return fh
        # The kernel keeps the listing in the directory's page cache (FOPEN_CACHE_DIR) across
        # opens (FOPEN_KEEP_CACHE): a directory changes only through us, and every change
        # through FUSE (create, unlink, rename...) drops that cache in the kernel itself.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, cache_readdir=True)

    @fuse_op
    def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        ov = self.overlay
        parent, cookies, names = ov.listing(fh)
        # Offsets: 1 and 2 are "." and "..", every other name has its cookie (Overlay.listing).
        # "." and ".." are not counted as lookups (the kernel does not link them).
        for offset, node in ((1, parent), (2, parent.parent or parent)):
            if start_id < offset and not pyfuse3.readdir_reply(
                    token, b"." * offset, self._entry(node, ov.stat(node)), offset):
                return
        for index in range(bisect.bisect_right(cookies, start_id), len(names)):
            name = names[index]
            hit = ov.lookup(parent, name)
            if hit is None:
                continue  # gone since it was listed
            node, st = hit
            if not pyfuse3.readdir_reply(token, name, self._entry(node, st), cookies[index]):
                return
            ov.remember(node)  # readdir_reply accepted it: the kernel counts one lookup

    @fuse_op
    def releasedir(self, fh: int) -> None:
        self.overlay.releasedir(fh)

    # -- files -------------------------------------------------------------------------------

    @fuse_op
    def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        handle = self.overlay.open(self.overlay.node(inode), flags, (ctx.pid, ctx.uid))
        return self._file_info(handle, flags, created=False)

    def _file_info(self, handle: Handle, flags: int, created: bool) -> pyfuse3.FileInfo:
        fh = pyfuse3.FileHandleT(handle.fh)
        node = handle.node
        # Only a file the node will show for good goes passthrough: a lower file of a writable
        # mount stays with us, since a copy-up moves its readers to the upper copy
        # (Overlay._follow_copy_up), which a passthrough open could not follow. A read-only
        # mount copies nothing up.
        settled = handle.layer == 0 or not self.overlay.opts.writable
        backing_id = self.modes.passthrough(handle.fh, node.ino, handle.fd,
                                            settled and not flags & os.O_DIRECT)
        if backing_id:
            # Its writes pass the page cache by; the kernel drops the cached pages at every open
            # without keep_cache, and caches none while passthrough opens exist.
            return pyfuse3.FileInfo(fh=fh, keep_cache=False, backing_id=backing_id)
        # Write-only: nothing can be read or mapped through it, so the page cache serves it
        # nothing; the kernel drops other openers' cached pages of the range it writes.
        handle.direct = DIRECT_WRITES and flags & os.O_ACCMODE == os.O_WRONLY
        if handle.direct:
            return pyfuse3.FileInfo(fh=fh, keep_cache=True, direct_io=True)
        self.modes.cached(handle.fh, node.ino)
        return pyfuse3.FileInfo(fh=fh, keep_cache=created or self._keep_cache(node))

    @staticmethod
    def _keep_cache(node: Node) -> bool:
        """Whether the kernel keeps the file's cached pages at this open. Changes reach files
        only through us, so cached pages stay valid across opens; but after a write that began
        or ended inside a page (tar writes 10 KiB records, echo a few bytes) the kernel holds
        that page not up to date and would read each such page in a request of its own. Dropping
        the cache once makes it read the file in readahead-sized requests instead."""
        if node.partial_pages:
            node.partial_pages = False
            return False
        return True

    @fuse_op
    def read(self, fh: int, off: int, size: int) -> bytes:
        return self.overlay.read(fh, off, size)

    async def flush(self, fh: int) -> None:
        # Nothing to do at close(2): writes reach the upper file at once, and locks are the
        # kernel's. The kernel's overlay calls the real file's ->flush, which local
        # filesystems lack. ENOSYS makes the kernel stop sending FLUSH for the whole mount: a
        # request fewer for every close.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @fuse_op
    def release(self, fh: int) -> None:
        self.modes.release(fh)
        self.overlay.release(fh)

    # -- xattrs and the filesystem -------------------------------------------------------------

    @fuse_op
    def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return self.overlay.getxattr(self.overlay.node(inode), name)

    @fuse_op
    def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        return self.overlay.listxattr(self.overlay.node(inode))

    @fuse_op
    def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = self.overlay.statfs()
        data = pyfuse3.StatvfsData()
        data.f_bsize = sv.f_bsize
        data.f_frsize = sv.f_frsize
        data.f_blocks = sv.f_blocks
        data.f_bfree = sv.f_bfree
        data.f_bavail = sv.f_bavail
        data.f_files = sv.f_files
        data.f_ffree = sv.f_ffree
        data.f_favail = sv.f_favail
        data.f_namemax = sv.f_namemax
        return data

    # -- changes ------------------------------------------------------------------------------

    def _owner(self, ctx: pyfuse3.RequestContext) -> tuple[int, int]:
        """The on-disk owner of an object the caller creates (its ids mapped, as chown's)."""
        return self.overlay.disk_owner(ctx.uid, ctx.gid)

    def _new_entry(self, node: Node, st: os.stat_result) -> pyfuse3.EntryAttributes:
        self.overlay.remember(node)
        return self._entry(node, st)

    @fuse_op
    def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
               ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        ov = self.overlay
        handle, node, st = ov.create(ov.node(parent_inode), name, mode, flags, self._owner(ctx),
                                     ctx.umask)
        return self._file_info(handle, flags, created=True), self._new_entry(node, st)

    @fuse_op
    def mkdir(self, parent_inode: int, name: bytes, mode: int,
              ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        ov = self.overlay
        return self._new_entry(*ov.mkdir(ov.node(parent_inode), name, mode, self._owner(ctx),
                                         ctx.umask))

    @fuse_op
    def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
              ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        ov = self.overlay
        return self._new_entry(*ov.mknod(ov.node(parent_inode), name, mode, rdev,
                                         self._owner(ctx), ctx.umask))

    @fuse_op
    def symlink(self, parent_inode: int, name: bytes, target: bytes,
                ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        ov = self.overlay
        return self._new_entry(*ov.symlink(ov.node(parent_inode), name, target,
                                           self._owner(ctx)))

    @fuse_op
    def link(self, inode: int, new_parent_inode: int, new_name: bytes,
             ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        ov = self.overlay
        return self._new_entry(*ov.link(ov.node(inode), ov.node(new_parent_inode), new_name))

    @fuse_op
    def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.overlay.unlink(self.overlay.node(parent_inode), name)

    @fuse_op
    def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.overlay.rmdir(self.overlay.node(parent_inode), name)

    @fuse_op
    def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
               name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        ov = self.overlay
        ov.rename(ov.node(parent_inode_old), name_old, ov.node(parent_inode_new), name_new, flags)

    @fuse_op
    def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        ov = self.overlay
        node = ov.node(inode)
        nothing = not (fields.update_mode or fields.update_uid or fields.update_gid
                       or fields.update_size or fields.update_atime or fields.update_mtime)
        uncapped = inode in self._uncapped
        if uncapped:
            self._uncapped.remove(inode)
        st = ov.setattr(
            node,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            fh=fh,
            kill_setid=getattr(fields, "kill_suidgid", False),
            clear_privs=(ctx.pid, ctx.uid) if nothing and self.killpriv_v2 else None,
            uncapped=uncapped,
        )
        return self._entry(node, st)

    @fuse_op
    def setxattr(self, inode: int, name: bytes, value: bytes,
                 ctx: pyfuse3.RequestContext, flags: int = 0) -> None:
        self.overlay.setxattr(self.overlay.node(inode), name, value, flags)

    @fuse_op
    def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.overlay.removexattr(self.overlay.node(inode), name)
        if name == CAPABILITY:
            # The kernel removes file capabilities itself before it asks, with a SETATTR that
            # has nothing to set, for the set-id bits to go (Overlay._clear_privs).
            self._uncapped.add(inode)

    @fuse_op
    def write(self, fh: int, off: int, buf: bytes, flags: int = 0) -> int:
        return self.overlay.write(fh, off, buf, kill_setid=bool(flags & WRITE_KILL_SUIDGID))

    @fuse_op
    def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        self.overlay.fallocate(fh, mode, offset, length)

    @fuse_op
    def fsync(self, fh: int, datasync: bool) -> None:
        self.overlay.fsync(fh, datasync)

    @fuse_op
    def fsyncdir(self, fh: int, datasync: bool) -> None:
        self.overlay.fsyncdir(self.overlay.dir_node(fh))
