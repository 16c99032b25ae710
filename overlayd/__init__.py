"""overlayd: the kernel overlayfs's container filesystem mechanics as a FUSE daemon."""

__version__ = "0.1.0"
