"""The download engine: parallel ranged reads into ingest files, hashed as they land.

A job's files are cut into parts of ``part_size``; up to ``concurrency`` parts are in
flight at once across all files, and each part is written at its offset with pwrite as
chunks arrive (memory per part: one chunk, so RSS does not grow with model size). A
file's sha256 is computed while the download goes on: whenever the parts form a longer
contiguous prefix, the thread that completed it hashes the new bytes back from the page
cache. A transient error retries that part from the byte where it stopped; an object that
changed (If-Match failed) restarts the whole file once no part of it is in flight, so two
versions are never spliced.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from weightcache.errors import (
    DeadlineError,
    ExhaustedError,
    SourceError,
    WeightcacheError,
)

from .config import DownloadConfig
from .sources import ObjectChanged, RemoteObject, Source

__all__ = ["Downloaded", "RateLimiter", "download"]

PART_RETRIES = 5
HASH_CHUNK = 4 << 20


class RateLimiter:
    """A token bucket shared by every download of the daemon (0 = unlimited)."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._lock = threading.Lock()
        self._next = time.monotonic()

    def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        with self._lock:
            now = time.monotonic()
            start = max(self._next, now)
            self._next = start + n / self.rate
            delay = start - now
        if delay > 0:
            time.sleep(delay)


@dataclass
class Downloaded:
    obj: RemoteObject
    path: Path
    sha256: str
    restarts: int


@dataclass
class _File:
    obj: RemoteObject
    path: Path
    fd: int
    part_size: int
    restarts: int = 0
    generation: int = 0
    parts_total: int = 0
    next_part: int = 0
    done: set[int] = field(default_factory=set)
    in_flight: int = 0
    restart_pending: bool = False
    hashed_parts: int = 0
    hasher: hashlib._Hash = field(default_factory=hashlib.sha256)
    hash_lock: threading.Lock = field(default_factory=threading.Lock)
    digest: str | None = None

    def reset(self, obj: RemoteObject) -> None:
        self.obj = obj
        self.generation += 1
        self.parts_total = max(1, -(-obj.size // self.part_size))
        self.next_part = 0
        self.done = set()
        self.restart_pending = False
        self.hashed_parts = 0
        self.hasher = hashlib.sha256()
        self.digest = None
        os.ftruncate(self.fd, 0)
        if obj.size:
            try:
                os.posix_fallocate(self.fd, 0, obj.size)
            except OSError as exc:
                raise _space_error(exc, obj) from None

    def part_range(self, i: int) -> tuple[int, int]:
        start = i * self.part_size
        return start, min(self.part_size, self.obj.size - start)

    def advance_hash(self, buf: memoryview) -> None:
        """Hash every newly contiguous part; only one thread hashes a file at a time.

        A thread that finds the lock taken leaves its part to the holder, which looks
        again after releasing, so no completed part is ever left unhashed.
        """
        while True:
            if not self.hash_lock.acquire(blocking=False):
                return
            try:
                while self.hashed_parts in self.done:
                    start, length = self.part_range(self.hashed_parts)
                    end = start + length
                    while start < end:
                        n = os.preadv(self.fd, [buf[: min(len(buf), end - start)]], start)
                        if n <= 0:
                            raise SourceError(f"{self.obj.uri}: ingest file shorter than expected at {start}")
                        self.hasher.update(buf[:n])
                        start += n
                    self.hashed_parts += 1
                if self.hashed_parts == self.parts_total and self.digest is None:
                    self.digest = self.hasher.hexdigest()
            finally:
                self.hash_lock.release()
            if self.digest is not None or self.hashed_parts not in self.done:
                return


def _space_error(exc: OSError, obj: RemoteObject) -> WeightcacheError | OSError:
    import errno

    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ExhaustedError(f"no space left in the store for {obj.uri} ({obj.size} bytes)")
    return exc


def download(
    source: Source,
    objects: list[RemoteObject],
    ingest_dir: Path,
    cfg: DownloadConfig,
    limiter: RateLimiter,
    on_bytes: Callable[[int], None],
    on_file: Callable[[Downloaded], None],
    cancelled: threading.Event,
) -> list[Downloaded]:
    """Fetch every object into ingest_dir; return them hashed, in the order given."""
    files: list[_File] = []
    try:
        for n, obj in enumerate(objects):
            path = ingest_dir / f"{n:05d}.part"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            f = _File(obj, path, fd, cfg.part_size)
            files.append(f)
            f.reset(obj)
        _run(source, files, cfg, limiter, on_bytes, on_file, cancelled)
        out = []
        for f in files:
            os.fsync(f.fd)
            assert f.digest is not None
            out.append(Downloaded(f.obj, f.path, f.digest, f.restarts))
        return out
    finally:
        for f in files:
            os.close(f.fd)


def _run(
    source: Source,
    files: list[_File],
    cfg: DownloadConfig,
    limiter: RateLimiter,
    on_bytes: Callable[[int], None],
    on_file: Callable[[Downloaded], None],
    cancelled: threading.Event,
) -> None:
    lock = threading.Lock()
    bufs = threading.local()

    def fetch(f: _File, i: int, gen: int) -> None:
        start, length = f.part_range(i)
        written = 0
        attempt = 0
        while written < length:
            try:
                for chunk in source.read(f.obj, start + written, length - written):
                    if cancelled.is_set():
                        raise _Cancelled()
                    limiter.take(len(chunk))
                    view = memoryview(chunk)
                    while view:
                        try:
                            n = os.pwrite(f.fd, view, start + written)
                        except OSError as exc:
                            raise _space_error(exc, f.obj) from None
                        view = view[n:]
                        written += n
                        on_bytes(n)
            except SourceError:
                attempt += 1
                if attempt > PART_RETRIES:
                    raise
                time.sleep(min(0.2 * 2**attempt, 5.0))
        if not hasattr(bufs, "buf"):
            bufs.buf = memoryview(bytearray(HASH_CHUNK))
        with lock:
            if gen != f.generation:
                return
            f.done.add(i)
        f.advance_hash(bufs.buf)

    pending: dict[Future[None], tuple[_File, int]] = {}
    queue = list(files)
    with ThreadPoolExecutor(max_workers=cfg.concurrency, thread_name_prefix="wc-dl") as pool:
        try:
            while True:
                for f in queue:
                    if f.restart_pending and f.in_flight == 0:
                        if f.restarts >= cfg.max_restarts:
                            raise SourceError(f"{f.obj.uri} changed {f.restarts + 1} times during the download; giving up")
                        f.restarts += 1
                        f.reset(source.stat(f.obj.relpath))
                # Fill the pipeline in file order so the first files finish (and hash) first.
                for f in queue:
                    while len(pending) < cfg.concurrency and not f.restart_pending and f.next_part < f.parts_total:
                        i = f.next_part
                        f.next_part += 1
                        f.in_flight += 1
                        pending[pool.submit(fetch, f, i, f.generation)] = (f, i)
                    if len(pending) >= cfg.concurrency:
                        break
                finished = [f for f in queue if f.digest is not None and f.in_flight == 0]
                for f in finished:
                    queue.remove(f)
                    on_file(Downloaded(f.obj, f.path, f.digest or "", f.restarts))
                if not queue:
                    return
                if not pending and not any(f.restart_pending for f in queue):
                    raise SourceError(f"download stalled with {len(queue)} file(s) incomplete")  # a bug if ever seen
                if cancelled.is_set():
                    raise DeadlineError("download cancelled")
                done, _ = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                for fut in done:
                    f, _i = pending.pop(fut)
                    f.in_flight -= 1
                    exc = fut.exception()
                    if isinstance(exc, ObjectChanged):
                        f.restart_pending = True
                    elif exc is not None:
                        raise exc
        except BaseException:
            cancelled.set()
            raise


class _Cancelled(Exception):
    """Raised inside a part when the job is cancelled; never retried."""
