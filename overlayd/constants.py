"""Every constant the daemon's behaviour depends on, in one place."""

from __future__ import annotations

import os

# Kernel cache lifetimes (seconds). Every change to the merged view passes through the daemon
# (lower layers are immutable by the overlayfs contract, and the upper belongs to the mount), so
# the kernel may cache entries and attributes for a long time; we invalidate what we change.
ENTRY_TIMEOUT = 86400.0
ATTR_TIMEOUT = 86400.0
# Negative entries too: a name we said is absent stays absent until we create it.
NEGATIVE_TIMEOUT = 86400.0

# The kernel's limit on stacked layers (OVL_MAX_STACK).
MAX_LAYERS = 500

# Whiteout and opaque formats (Documentation/filesystems/overlayfs.rst; OCI image spec).
WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
OPAQUE_XATTRS = (
    b"trusted.overlay.opaque",
    b"user.overlay.opaque",
    b"user.fuseoverlayfs.opaque",
)
OPAQUE_VALUE = b"y"
# A renamed directory's origin in the layers below (redirect_dir): "/abs/path" or "name".
REDIRECT_XATTRS = (b"trusted.overlay.redirect", b"user.overlay.redirect")

# Xattrs that describe the overlay itself: never listed, read or written through the mount
# (the kernel hides trusted.overlay.*; we hide every overlay family we read).
PRIVATE_XATTR_PREFIXES = (
    b"trusted.overlay.",
    b"user.overlay.",
    b"user.fuseoverlayfs.",
)
# A copied-up object's inode number, recorded at copy-up so that a remount shows the same st_ino
# (the kernel derives it from its trusted.overlay.origin file handle). Inside the kernel's private
# namespace, so that its mount of our upper layer hides it too; not under the escape prefix
# "trusted.overlay.overlay." (the name goes on with "d", not ".").
INO_XATTRS = (b"trusted.overlay.overlayd.ino", b"user.overlay.overlayd.ino")

# The kernel's escaping (6.7+, for overlays nested in overlays): trusted.overlay.X set through
# the mount is stored as trusted.overlay.overlay.X, and shown unescaped. We escape user.overlay.*
# the same way, since we read that family as private on every mount.
ESCAPED_XATTR_PREFIXES = (b"trusted.overlay.", b"user.overlay.")
ESCAPE = b"overlay."

# Inode numbers: the real inode number tagged with the index of the layer's filesystem in the
# top bits (the kernel's xino scheme); numbers that do not fit get a synthetic one.
XINO_SHIFT = 56
SYNTHETIC_INO_BASE = 0xFF << XINO_SHIFT
# The names of a lower hard link in a writable mount, each an inode of its own: numbers derived
# from (origin, parent, name), so that every mount of the same layers gives the same ones.
LINK_INO_BASE = SYNTHETIC_INO_BASE | (1 << (XINO_SHIFT - 1))

# The workdir's subdirectory where objects are built before publication (the kernel's name).
WORK_SUBDIR = b"work"
# Probes made in work/ at mount time to choose the upper layer's format: whether trusted.*
# xattrs can be set (else the userxattr format) and whether mknod makes 0/0 whiteouts.
TRUSTED_PROBE = b"trusted.overlay.overlayd.probe"
WHITEOUT_PROBE = b"#overlayd.whiteout-probe"  # a leftover is cleaned (copyup.TEMP_PREFIX)

FSNAME = "overlayd"
FUSE_SUBTYPE = "overlayd"

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")  # the kernel's page cache works in these

# File capabilities, which a chown or a change to the data clears.
CAPABILITY = b"security.capability"
