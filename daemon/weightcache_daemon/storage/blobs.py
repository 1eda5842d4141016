"""The content-addressed blob store on local disk.

Lifecycle of a blob (the only way bytes become visible)::

    ingest   bytes are written to ingest/<job>/<n> (a private, unique name)
    verify   fsync, sha256 over the bytes, format validation (by the caller)
    seal     the daemon's writers closed: chmod 0444 -> [immutable] -> sha256 read back from the
             disk, compared with the bytes downloaded (``seal``): what is committed is what
             was downloaded, even if something wrote into the file meanwhile
    commit   [clear immutable] -> rename to blobs/sha256/<2 hex>/<hex> -> [immutable] -> fsync the directory
    visible  only now may the index refer to it; a blob is never modified again
    remove   [clear immutable] -> unlink (never truncate: a process that still maps it keeps its bytes)

Every descriptor handed out is opened through a read-only mount of the store when the daemon
can make one (``readonly.ReadOnlyView``): reopening it for writing through /proc/self/fd then
fails with EROFS for anyone, root with every capability included.

With ``immutable=True`` every committed blob carries FS_IMMUTABLE_FL: the kernel refuses to
open it for writing to anyone, root included, so a descriptor granted to a container cannot
be reopened writable through /proc/self/fd (docs/security.md, "No writable path to shared bytes").
The store directory is private to the daemon (0700, or 0750 when an operator gave it a group).

Correctness never depends on a lock: a unique ingest name plus an atomic rename does.
Identical content has one name, so committing bytes that are already stored just drops
the new copy.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import shutil
import stat
import struct
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from weightcache.contract.errors import (
    BusyError,
    CorruptedError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
)
from weightcache_daemon.storage.readonly import ReadOnlyView

__all__ = [
    "BlobStore",
    "LocalBlobStore",
    "StoreLock",
    "check_digest",
    "fsync_dir",
    "hash_file",
    "is_immutable",
    "set_immutable",
]

# linux/fs.h: _IOR('f', 1, long) / _IOW('f', 2, long); the kernel reads and writes an int.
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IMMUTABLE_FL = 0x00000010

_HEX64 = re.compile(r"[0-9a-f]{64}")
HASH_CHUNK = 8 << 20
SEAL_HASHERS = 4  # files hashed at once at commit (a file's sha256 is sequential)


def check_digest(digest: str) -> str:
    if not _HEX64.fullmatch(digest):
        raise InvalidInputError(f"digest {digest[:80]!r} is not 64 lowercase hex characters (sha256)")
    return digest


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _flags(fd: int) -> int:
    buf = bytearray(8)
    fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf)
    return int(struct.unpack_from("i", buf)[0])


def set_immutable(path: Path | str, on: bool) -> None:
    """Set or clear FS_IMMUTABLE_FL (chattr +i / -i). Needs CAP_LINUX_IMMUTABLE and a
    filesystem that supports the flag (ext4, xfs, btrfs; not tmpfs or overlayfs)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        flags = _flags(fd)
        new = flags | FS_IMMUTABLE_FL if on else flags & ~FS_IMMUTABLE_FL
        if new != flags:
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("i", new) + bytes(4))
    finally:
        os.close(fd)


def is_immutable(path: Path | str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        return bool(_flags(fd) & FS_IMMUTABLE_FL)
    except OSError:
        return False
    finally:
        os.close(fd)


def hash_file(path: Path | str, buf: bytearray | None = None) -> str:
    h = hashlib.sha256()
    view = memoryview(buf or bytearray(HASH_CHUNK))
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        off = 0
        while n := os.preadv(fd, [view], off):
            h.update(view[:n])
            off += n
    finally:
        os.close(fd)
    return h.hexdigest()


class BlobStore(Protocol):
    """The store as everyone but its constructor sees it: read, ingest, manage (the lifecycle
    above). Callers type against this, never against LocalBlobStore."""

    root: Path  # the store directory: index.db and lock live here too
    blobs: Path  # blobs/sha256/<2 hex>/<hex>: reconciliation walks it for strays
    ingest: Path  # ingest/<job>/: downloads in progress, each job's record beside its files
    snapshots: Path  # snapshots/<model>/<snapshot>/: views of relative symlinks (views.py)
    view: ReadOnlyView  # what descriptors handed to clients are opened through (readonly.py)

    # read
    def path(self, digest: str) -> Path: ...

    def has(self, digest: str) -> bool: ...

    def check(self, digest: str) -> None: ...

    def open(self, digest: str) -> int: ...

    def open_file(self, path: Path) -> int: ...

    def seal(self, files: Sequence[tuple[Path, str]]) -> list[tuple[Path, str]]: ...

    def digests(self) -> Iterator[str]: ...

    # ingest
    def commit(self, tmp: Path, digest: str) -> bool: ...

    def remove_ingest(self, d: Path) -> None: ...

    # manage
    def remove(self, digest: str) -> int: ...

    def quarantine(self, digest: str) -> Path | None: ...

    def unfreeze(self, p: Path) -> None: ...


class LocalBlobStore:
    def __init__(
        self, root: Path, immutable: bool = False, readonly: str = "off", readonly_store: Path | None = None
    ) -> None:
        self.root = root
        self.immutable = immutable
        self.blobs = root / "blobs" / "sha256"
        self.ingest = root / "ingest"
        self.snapshots = root / "snapshots"
        private_dir(root)
        for d in (self.blobs, self.ingest, self.snapshots):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        if immutable:
            self._check_immutable()
        # Last: a clone of the store's mount taken now sees the directories made above.
        self.view = ReadOnlyView.make(root, readonly, readonly_store)

    def _check_immutable(self) -> None:
        """Refuse to start when immutable blobs are asked for but cannot be had: a silent
        fallback would leave the protection the operator configured off."""
        probe = self.ingest / f".immutable-probe-{os.getpid()}"
        probe.write_bytes(b"")
        try:
            set_immutable(probe, True)
            set_immutable(probe, False)
        except OSError as exc:
            raise PermissionDeniedError(
                f"immutable_blobs: cannot set FS_IMMUTABLE_FL in {self.root} ({exc.strerror or exc}); the daemon "
                "needs CAP_LINUX_IMMUTABLE and a filesystem with the flag (ext4, xfs, btrfs)"
            ) from None
        finally:
            probe.unlink(missing_ok=True)

    def path(self, digest: str) -> Path:
        check_digest(digest)
        return self.blobs / digest[:2] / digest

    def has(self, digest: str) -> bool:
        try:
            st = os.lstat(self.path(digest))
        except FileNotFoundError:
            return False
        return os.path.stat.S_ISREG(st.st_mode)  # type: ignore[attr-defined, no-any-return]

    def check(self, digest: str) -> None:
        """What open() would refuse, refused without opening (a grant checks every file before
        it sends any, then opens them one batch at a time)."""
        try:
            st = os.lstat(self.path(digest))
        except FileNotFoundError:
            raise NotFoundError(f"blob sha256:{digest} is missing from the store") from None
        if stat.S_ISLNK(st.st_mode):
            raise CorruptedError(f"blob sha256:{digest} was replaced by a symlink; refusing it")
        if not stat.S_ISREG(st.st_mode):
            raise CorruptedError(f"blob sha256:{digest} is not a regular file; refusing it")

    def open(self, digest: str) -> int:
        """A read-only descriptor of a blob, opened through the read-only view. O_NOFOLLOW: a
        symlink planted in the store is refused."""
        try:
            return self.view.open(self.path(digest))
        except FileNotFoundError:
            raise NotFoundError(f"blob sha256:{digest} is missing from the store") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise CorruptedError(f"blob sha256:{digest} was replaced by a symlink; refusing it") from None
            raise

    def open_file(self, path: Path) -> int:
        """A read-only descriptor of any file of the store (an ingest file a client streams),
        opened through the read-only view; FileNotFoundError as os.open raises it."""
        return self.view.open(path)

    def seal(self, files: Sequence[tuple[Path, str]]) -> list[tuple[Path, str]]:
        """Make each ingest file unchangeable, then hash it from the disk: (path, expected sha256)
        in, the files whose bytes on disk differ out, as (path, sha256 on disk).

        Called after the daemon's own writers are closed. Read-only (0444) stops every writer
        but root; with immutable blobs FS_IMMUTABLE_FL stops root too, and writes through
        descriptors opened before (EPERM) and shared mappings (SIGBUS). Without the flag, no
        client ever had a writable descriptor when the read-only view is protected
        (readonly.py). So the hash read here is the content id of what will be committed,
        whatever wrote into the file while it was downloading."""
        for tmp, _ in files:
            os.chmod(tmp, 0o444)
            if self.immutable:
                set_immutable(tmp, True)
        if not files:
            return []
        with ThreadPoolExecutor(max_workers=min(SEAL_HASHERS, len(files)), thread_name_prefix="wc-seal") as pool:
            on_disk = list(pool.map(lambda f: hash_file(f[0]), files))
        return [(tmp, got) for (tmp, want), got in zip(files, on_disk, strict=True) if got != want]

    def commit(self, tmp: Path, digest: str) -> bool:
        """Move a verified, fsynced (and sealed) file into the store. False when the content was
        already there."""
        final = self.path(digest)
        final.parent.mkdir(exist_ok=True)
        if self.has(digest):
            self.unfreeze(tmp)
            tmp.unlink()
            return False
        # An immutable file can be neither chmod-ed nor renamed: a sealed one gets the flag back below.
        self.unfreeze(tmp)
        os.chmod(tmp, 0o444)  # read-only before it becomes visible
        os.rename(tmp, final)
        if self.immutable:
            set_immutable(final, True)
        fsync_dir(final.parent)
        return True

    def remove(self, digest: str) -> int:
        p = self.path(digest)
        try:
            size = os.lstat(p).st_size
            self.unfreeze(p)
            p.unlink()
        except FileNotFoundError:
            return 0
        return size

    def unfreeze(self, p: Path) -> None:
        """Clear the immutable flag (set by this or an earlier run) so the blob can go."""
        if is_immutable(p):
            set_immutable(p, False)

    def digests(self) -> Iterator[str]:
        for sub in sorted(self.blobs.iterdir()):
            if sub.is_dir():
                for f in sorted(sub.iterdir()):
                    if _HEX64.fullmatch(f.name):
                        yield f.name

    def quarantine(self, digest: str) -> Path | None:
        """Move a bad blob out of blobs/ (kept for inspection); None when it was already gone."""
        qdir = self.root / "quarantine"
        qdir.mkdir(exist_ok=True)
        src = self.path(digest)
        dst = qdir / f"{digest}.{int(time.time())}"
        try:
            self.unfreeze(src)
            os.rename(src, dst)
        except FileNotFoundError:
            return None
        fsync_dir(src.parent)
        return dst

    def remove_ingest(self, d: Path) -> None:
        if self.immutable:  # files sealed for a commit that failed carry the flag
            for p in d.glob("*"):
                if p.is_file() and not p.is_symlink():
                    try:
                        self.unfreeze(p)
                    except OSError:
                        pass
        shutil.rmtree(d, ignore_errors=True)


def private_dir(root: Path) -> None:
    """The store root: created 0700; an existing one keeps a group it was given (0750 from the
    systemd unit) but loses group write and everything for others."""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = os.stat(root).st_mode & 0o7777
    if mode & 0o027:
        os.chmod(root, mode & ~0o027)


class StoreLock:
    """One daemon per store: an exclusive flock on <store>/lock, held for the process lifetime."""

    def __init__(self, root: Path) -> None:
        private_dir(root)
        self.path = root / "lock"
        # 0600 whatever the umask: a lock others can open is a lock others can hold.
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        os.fchmod(self.fd, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise BusyError(
                f"store {root} is already used by another weightcached (pid {holder}); one daemon per store"
            ) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        os.close(self.fd)
