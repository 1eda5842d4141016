"""The content-addressed blob store on local disk.

Lifecycle of a blob (the only way bytes become visible)::

    ingest   bytes are written to ingest/<job>/<n> (a private, unique name)
    verify   fsync, sha256 over the bytes, format validation (by the caller)
    commit   chmod 0444 -> rename to blobs/sha256/<2 hex>/<hex> -> fsync the directory
    visible  only now may the index refer to it; a blob is never modified again
    remove   unlink (never truncate: a process that still maps it keeps its bytes)

Correctness never depends on a lock: a unique ingest name plus an atomic rename does.
Identical content has one name, so committing bytes that are already stored just drops
the new copy.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from weightcache.errors import BusyError, CorruptedError, InvalidInputError, NotFoundError

__all__ = ["BlobStore", "LocalBlobStore", "StoreLock", "check_digest", "fsync_dir", "hash_file"]

_HEX64 = re.compile(r"[0-9a-f]{64}")
HASH_CHUNK = 8 << 20


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
    """Role interface of the store: read, ingest, manage."""

    def path(self, digest: str) -> Path: ...

    def has(self, digest: str) -> bool: ...

    def open(self, digest: str) -> int: ...

    def commit(self, tmp: Path, digest: str) -> bool: ...

    def remove(self, digest: str) -> int: ...

    def digests(self) -> Iterator[str]: ...


class LocalBlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"
        self.ingest = root / "ingest"
        self.snapshots = root / "snapshots"
        for d in (self.blobs, self.ingest, self.snapshots):
            d.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        check_digest(digest)
        return self.blobs / digest[:2] / digest

    def has(self, digest: str) -> bool:
        try:
            st = os.lstat(self.path(digest))
        except FileNotFoundError:
            return False
        return os.path.stat.S_ISREG(st.st_mode)  # type: ignore[attr-defined, no-any-return]

    def open(self, digest: str) -> int:
        """A read-only descriptor of a blob. O_NOFOLLOW: a symlink planted in the store is refused."""
        try:
            return os.open(self.path(digest), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise NotFoundError(f"blob sha256:{digest} is missing from the store") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise CorruptedError(f"blob sha256:{digest} was replaced by a symlink; refusing it") from None
            raise

    def commit(self, tmp: Path, digest: str) -> bool:
        """Move a verified, fsynced file into the store. False when the content was already there."""
        final = self.path(digest)
        final.parent.mkdir(exist_ok=True)
        if self.has(digest):
            tmp.unlink()
            return False
        os.chmod(tmp, 0o444)  # read-only before it becomes visible
        os.rename(tmp, final)
        fsync_dir(final.parent)
        return True

    def remove(self, digest: str) -> int:
        p = self.path(digest)
        try:
            size = os.lstat(p).st_size
            p.unlink()
        except FileNotFoundError:
            return 0
        return size

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
            os.rename(src, dst)
        except FileNotFoundError:
            return None
        fsync_dir(src.parent)
        return dst

    def remove_ingest(self, d: Path) -> None:
        shutil.rmtree(d, ignore_errors=True)


class StoreLock:
    """One daemon per store: an exclusive flock on <store>/lock, held for the process lifetime."""

    def __init__(self, root: Path) -> None:
        import fcntl

        root.mkdir(parents=True, exist_ok=True)
        self.path = root / "lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
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
