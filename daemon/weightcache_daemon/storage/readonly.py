"""A read-only view of the store: every descriptor the daemon hands out is opened through it.

Why: a descriptor remembers the mount it was opened through. ``open("/proc/self/fd/N",
O_WRONLY)`` re-opens the same file *through that mount*, and the kernel checks the mount's
read-only flag after every permission check (``EROFS``), whatever the caller's uid and
capabilities (``CAP_DAC_OVERRIDE`` bypasses file modes, not a read-only mount). So a descriptor
opened through a read-only mount of the store can never become a writable one, while the daemon
keeps writing ingest files through its own, writable path to the same inodes (the bytes, and
the page cache that holds them, are shared: a mount is only a way in).

How: ``open_tree(OPEN_TREE_CLONE | AT_RECURSIVE)`` clones the store's mount into a *detached*
mount that no mount namespace contains (nothing to clean up, nothing propagates to the host,
no other process sees it); ``mount_setattr(MOUNT_ATTR_RDONLY)`` makes it read-only; every
grant is an ``openat`` relative to it. Needs ``CAP_SYS_ADMIN`` (over the mount namespace the
store is in) and Linux 5.12; without them the daemon opens through the writable path as before
and says so (``cachectl doctor``, the ``readonly_descriptors`` metric, docs/security.md).

Lifecycle: ``ReadOnlyView.make`` once at start-up (before any grant), ``open`` per
descriptor, ``close`` at shut-down (granted descriptors keep the detached mount alive in the
kernel for as long as any of them is open).
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

from weightcache.contract.errors import CorruptedError, NotFoundError, PermissionDeniedError

__all__ = ["ReadOnlyView"]

# Syscall numbers of the new mount API: one table for every architecture (asm-generic and
# x86_64 alike), since Linux 5.2 (open_tree) and 5.12 (mount_setattr).
SYS_OPEN_TREE = 428
SYS_MOUNT_SETATTR = 442
OPEN_TREE_CLONE = 1
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1

MODES = ("auto", "require", "off")


class _MountAttr(ctypes.Structure):
    _fields_ = (
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    )


def _detached_readonly_clone(root: Path) -> int:
    """A descriptor of a read-only, detached clone of the mount tree at `root`; OSError when the
    kernel refuses (EPERM without CAP_SYS_ADMIN, ENOSYS before 5.12, EINVAL in odd places)."""
    # The library is loaded here, at start-up, not at import (the daemon's modules load nothing native).
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(
        ctypes.c_long(SYS_OPEN_TREE),
        ctypes.c_int(AT_FDCWD),
        ctypes.c_char_p(os.fsencode(root)),
        ctypes.c_uint(OPEN_TREE_CLONE | os.O_CLOEXEC | AT_RECURSIVE),
    )
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"open_tree: {os.strerror(e)}")
    attr = _MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
    r = libc.syscall(
        ctypes.c_long(SYS_MOUNT_SETATTR),
        ctypes.c_int(fd),
        ctypes.c_char_p(b""),
        ctypes.c_uint(AT_EMPTY_PATH | AT_RECURSIVE),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    if r < 0:
        e = ctypes.get_errno()
        os.close(fd)
        raise OSError(e, f"mount_setattr: {os.strerror(e)}")
    return int(fd)


class ReadOnlyView:
    """Opens files of the store for reading, through a read-only mount when the daemon could
    make one (``protected``), else through the store's own path."""

    def __init__(self, root: Path, fd: int | None, reason: str) -> None:
        self.root = root
        self.fd = fd
        self.reason = reason  # why the view is (not) protected, for doctor and the start-up log

    @property
    def protected(self) -> bool:
        return self.fd is not None

    @staticmethod
    def make(root: Path, mode: str = "auto", mounted: Path | None = None) -> ReadOnlyView:
        """`mode`: "auto" (use a read-only mount when the kernel allows it), "require" (refuse to
        start without one), "off" (never; descriptors are opened through the writable path).

        `mounted`: a read-only mount of the store the operator made in the daemon's mount
        namespace (a second, ``readOnly`` volumeMount of the store's hostPath; systemd's
        ``BindReadOnlyPaths=``): used instead of a clone, so the daemon needs no CAP_SYS_ADMIN.
        It must be the store's directory and read-only, or the daemon refuses to start."""
        if mode not in MODES:
            raise ValueError(f"readonly_descriptors {mode!r}: must be one of {', '.join(MODES)}")
        if mode == "off":
            return ReadOnlyView(root, None, "readonly_descriptors = off")
        if mounted is not None:
            try:
                fd = os.open(mounted, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as exc:
                raise PermissionDeniedError(f"readonly_store {mounted}: {exc.strerror or exc}") from None
            view = ReadOnlyView(root, fd, f"descriptors are opened through the read-only mount {mounted}")
            try:
                view._check()
            except PermissionDeniedError:
                view.close()
                raise
            return view
        try:
            fd = _detached_readonly_clone(root)
        except OSError as exc:
            why = exc.strerror or str(exc)
            if exc.errno == errno.EPERM:
                why += " (the daemon lacks CAP_SYS_ADMIN)"
            elif exc.errno == errno.ENOSYS:
                why += " (the kernel is older than 5.12)"
            if mode == "require":
                raise PermissionDeniedError(
                    f"readonly_descriptors = require: cannot make a read-only mount of {root}: {why}; grant the "
                    "daemon CAP_SYS_ADMIN or set readonly_descriptors = auto"
                ) from None
            return ReadOnlyView(root, None, f"no read-only mount of the store: {why}")
        view = ReadOnlyView(root, fd, "descriptors are opened through a detached read-only mount of the store")
        view._check()
        return view

    def _check(self) -> None:
        """The clone must be the store (same inode) and refuse writes (EROFS): verified, not assumed."""
        assert self.fd is not None
        mine, theirs = os.stat(self.root), os.fstat(self.fd)
        if (mine.st_dev, mine.st_ino) != (theirs.st_dev, theirs.st_ino):
            raise PermissionDeniedError(
                f"read-only view of {self.root}: it is not the store's directory (another device or inode)"
            )
        if not os.fstatvfs(self.fd).f_flag & os.ST_RDONLY:
            raise PermissionDeniedError(f"read-only view of {self.root}: the mount is writable, not read-only")

    def open(self, path: Path) -> int:
        """A read-only descriptor of `path` (a file of the store, named by its store path).
        O_NOFOLLOW: a symlink planted in the store is refused (ELOOP, for the caller to map)."""
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
        if self.fd is None:
            return os.open(path, flags)
        try:
            rel = path.relative_to(self.root)
        except ValueError:
            raise NotFoundError(f"{path} is not inside the store {self.root}") from None
        if ".." in rel.parts:
            raise CorruptedError(f"{path}: a store path may not contain '..'")
        return os.open(rel, flags, dir_fd=self.fd)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
