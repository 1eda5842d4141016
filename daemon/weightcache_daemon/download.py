"""The download engine: parallel ranged reads into ingest files, hashed as they land.

A job's files are cut into parts of ``part_size``. Each part is fetched into a buffer from a
fixed pool (so memory does not grow with model size and no fresh memory is touched per
part), written at its offset with O_DIRECT (on this class of machine, buffered writes of a
new file spend their time faulting in fresh page-cache memory; direct writes run at disk
speed), and then hashed from the same buffer, in file order: a part that completes early
waits in its buffer until the parts before it are hashed. The pool is larger than the
number of parts in flight, so a slow part holds back at most the pool's slack.

A transient error retries that part from the byte where it stopped; an object that changed
(If-Match failed) restarts the whole file once no part of it is in flight, so two versions
are never spliced. Filesystems without O_DIRECT (tmpfs) get buffered writes.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from weightcache.errors import DeadlineError, ExhaustedError, SourceError, WeightcacheError

from .config import DownloadConfig
from .sources import ObjectChanged, RemoteObject, Source

__all__ = ["BufferPool", "Downloaded", "RateLimiter", "download"]

PART_RETRIES = 5
ALIGN = 4096


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


class BufferPool:
    """Page-aligned part buffers (anonymous mmaps), reused for the daemon's lifetime."""

    def __init__(self, count: int, size: int) -> None:
        self.size = size
        self._free: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
        for _ in range(count):
            self._free.put(mmap.mmap(-1, size))

    def try_get(self) -> mmap.mmap | None:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            return None

    def put(self, buf: mmap.mmap) -> None:
        self._free.put(buf)

    def wait(self, timeout: float) -> None:
        """Block until a buffer is free (or timeout), without keeping it: the pool is shared by
        every running job, and a job whose parts all wait for a buffer waits, it does not fail."""
        try:
            self._free.put(self._free.get(timeout=timeout))
        except queue.Empty:
            pass


@dataclass
class Downloaded:
    obj: RemoteObject
    path: Path
    sha256: str
    restarts: int


def _space_error(exc: OSError, obj: RemoteObject) -> WeightcacheError | OSError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ExhaustedError(f"no space left in the store for {obj.uri} ({obj.size} bytes)")
    return exc


@dataclass
class _File:
    obj: RemoteObject
    path: Path
    fd: int
    direct: bool
    part_size: int
    pool: BufferPool
    restarts: int = 0
    generation: int = 0
    parts_total: int = 0
    next_part: int = 0
    in_flight: int = 0
    restart_pending: bool = False
    hashed_parts: int = 0
    hashing: bool = False
    completed: dict[int, tuple[mmap.mmap, int]] = field(default_factory=dict)
    written: set[int] = field(default_factory=set)  # parts on disk (recorded for resume)
    resumed: set[int] = field(default_factory=set)  # parts a previous run wrote: read back, not fetched
    hasher: hashlib._Hash = field(default_factory=hashlib.sha256)
    lock: threading.Lock = field(default_factory=threading.Lock)
    digest: str | None = None

    def reset(self, obj: RemoteObject, resumed: set[int] | None = None) -> None:
        """Start (over) at version obj, keeping the parts a previous run wrote when given.
        Only called with no part of this file in flight."""
        for buf, _ in self.completed.values():
            self.pool.put(buf)
        self.resumed = set(resumed or ())
        self.written = set(self.resumed)
        self.obj = obj
        self.generation += 1
        self.parts_total = max(1, -(-obj.size // self.part_size))
        self.next_part = 0
        self.completed = {}
        self.restart_pending = False
        self.hashed_parts = 0
        self.hasher = hashlib.sha256()
        self.digest = None
        if not self.resumed:
            os.ftruncate(self.fd, 0)
        if obj.size:
            try:
                os.posix_fallocate(self.fd, 0, obj.size)
            except OSError as exc:
                raise _space_error(exc, obj) from None

    def part_range(self, i: int) -> tuple[int, int]:
        start = i * self.part_size
        return start, min(self.part_size, self.obj.size - start)

    def write(self, buf: mmap.mmap, offset: int, n: int) -> None:
        # O_DIRECT needs aligned lengths: the last part writes up to ALIGN-1 stale bytes past
        # the object's end, cut off by finish().
        length = -(-n // ALIGN) * ALIGN if self.direct else n
        view = memoryview(buf)[:length]
        done = 0
        try:
            while done < length:
                done += os.pwrite(self.fd, view[done:], offset + done)
        except OSError as exc:
            raise _space_error(exc, self.obj) from None
        finally:
            view.release()

    def part_done(self, i: int, gen: int, buf: mmap.mmap, n: int) -> None:
        """Queue a fetched part for hashing; hash every part now contiguous (one thread at a time)."""
        with self.lock:
            if gen != self.generation:
                self.pool.put(buf)
                return
            self.completed[i] = (buf, n)
            if self.hashing:
                return  # the thread hashing this file will find it
            self.hashing = True
        while True:
            with self.lock:
                item = self.completed.pop(self.hashed_parts, None)
                if item is None:
                    self.hashing = False
                    if self.hashed_parts == self.parts_total:
                        self.digest = self.hasher.hexdigest()
                    return
            view = memoryview(item[0])[: item[1]]
            self.hasher.update(view)  # hashlib releases the GIL for large buffers
            view.release()
            self.pool.put(item[0])
            with self.lock:
                self.hashed_parts += 1

    def finish(self) -> None:
        if self.direct:
            os.ftruncate(self.fd, self.obj.size)
        os.fsync(self.fd)


def _open_ingest(path: Path) -> tuple[int, bool]:
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
    try:
        return os.open(path, flags | os.O_DIRECT, 0o600), True
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    return os.open(path, flags, 0o600), False


def download(
    source: Source,
    objects: list[RemoteObject],
    ingest_dir: Path,
    cfg: DownloadConfig,
    pool: BufferPool,
    limiter: RateLimiter,
    on_bytes: Callable[[int], None],
    on_file: Callable[[Downloaded], None],
    cancelled: threading.Event,
    resume: dict[str, set[int]] | None = None,
    on_state: Callable[[list[tuple[RemoteObject, str, list[int]]]], None] | None = None,
) -> list[Downloaded]:
    """Fetch every object into ingest_dir; return them hashed and fsynced, in the order given.

    ``resume`` maps relative paths to parts already written by an earlier run into the same
    ingest_dir at the same object version; those are read back from disk (for the hash), not
    fetched. ``on_state`` receives [(object, ingest file name, parts written)] now and then,
    after those parts are on disk, so a crash can resume from it.
    """
    files: list[_File] = []
    try:
        for obj in objects:
            path = ingest_dir / ingest_name(obj.relpath)
            fd, direct = _open_ingest(path)
            f = _File(obj, path, fd, direct, pool.size, pool)
            files.append(f)
            f.reset(obj, (resume or {}).get(obj.relpath))
        _run(source, files, cfg, pool, limiter, on_bytes, on_file, cancelled, on_state)
        return [Downloaded(f.obj, f.path, f.digest or "", f.restarts) for f in files]
    finally:
        for f in files:
            for buf, _ in f.completed.values():
                pool.put(buf)
            f.completed = {}
            os.close(f.fd)


def ingest_name(relpath: str) -> str:
    return hashlib.sha256(relpath.encode()).hexdigest()[:24] + ".part"


STATE_EVERY = 0.1  # seconds between resume-state records


def _run(
    source: Source,
    files: list[_File],
    cfg: DownloadConfig,
    pool: BufferPool,
    limiter: RateLimiter,
    on_bytes: Callable[[int], None],
    on_file: Callable[[Downloaded], None],
    cancelled: threading.Event,
    on_state: Callable[[list[tuple[RemoteObject, str, list[int]]]], None] | None,
) -> None:
    last_state = 0.0

    def record_state(force: bool = False) -> None:
        nonlocal last_state
        if on_state is None or (not force and time.monotonic() - last_state < STATE_EVERY):
            return
        last_state = time.monotonic()
        snapshot = []
        for f in files:
            with f.lock:
                written = sorted(f.written)
            if not f.direct and written:
                os.fdatasync(f.fd)  # buffered writes must be on disk before they are recorded
            snapshot.append((f.obj, f.path.name, written))
        on_state(snapshot)

    def fetch(f: _File, i: int, gen: int, buf: mmap.mmap) -> None:
        start, length = f.part_range(i)
        if i in f.resumed:
            # Written by an earlier run: read it back for the in-order hash, fetch nothing.
            # O_DIRECT reads need aligned lengths too: ask for the aligned span, take `length`.
            span = min(-(-length // ALIGN) * ALIGN, len(buf)) if f.direct else length
            view = memoryview(buf)[:span]
            try:
                done = 0
                while done < length:
                    n = os.preadv(f.fd, [view[done:]], start + done)
                    if n <= 0:
                        raise SourceError(f"{f.obj.uri}: resumed ingest file ends at {start + done}")
                    done += n
            except BaseException:
                view.release()
                pool.put(buf)
                raise
            view.release()
            f.part_done(i, gen, buf, length)
            return
        filled = 0
        attempt = 0

        def landed(n: int) -> None:
            nonlocal filled
            if cancelled.is_set():
                raise _Cancelled()
            filled += n
            limiter.take(n)
            on_bytes(n)

        try:
            while filled < length:
                view = memoryview(buf)[filled:length]
                try:
                    source.read_into(f.obj, start + filled, view, landed)
                except SourceError:
                    attempt += 1
                    if attempt > PART_RETRIES:
                        raise
                    time.sleep(min(0.2 * 2**attempt, 5.0))
                finally:
                    view.release()
            f.write(buf, start, length)
        except BaseException:
            pool.put(buf)
            raise
        with f.lock:
            if gen == f.generation:
                f.written.add(i)
        f.part_done(i, gen, buf, length)

    pending: dict[Future[None], _File] = {}
    queue_ = list(files)
    with ThreadPoolExecutor(max_workers=cfg.concurrency, thread_name_prefix="wc-dl") as ex:
        try:
            while True:
                for f in queue_:
                    if f.restart_pending and f.in_flight == 0:
                        if f.restarts >= cfg.max_restarts:
                            raise SourceError(f"{f.obj.uri} changed {f.restarts + 1} times during the download")
                        f.restarts += 1
                        f.reset(source.stat(f.obj.relpath))
                # Fill the pipeline in file order so the first files finish (and hash) first.
                for f in queue_:
                    while len(pending) < cfg.concurrency and not f.restart_pending and f.next_part < f.parts_total:
                        buf = pool.try_get()
                        if buf is None:
                            break
                        i = f.next_part
                        f.next_part += 1
                        f.in_flight += 1
                        pending[ex.submit(fetch, f, i, f.generation, buf)] = f
                finished = [f for f in queue_ if f.digest is not None and f.in_flight == 0]
                for f in finished:
                    queue_.remove(f)
                    f.finish()
                    on_file(Downloaded(f.obj, f.path, f.digest or "", f.restarts))
                if not queue_:
                    return
                record_state()
                if cancelled.is_set():
                    raise DeadlineError("download cancelled")
                if not pending and not any(f.restart_pending for f in queue_):
                    if any(f.next_part < f.parts_total for f in queue_):
                        pool.wait(0.5)  # other jobs hold every buffer: our turn comes when one is put back
                        continue
                    raise SourceError(f"download stalled with {len(queue_)} file(s) incomplete")  # a bug if seen
                done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for fut in done:
                    f = pending.pop(fut)
                    f.in_flight -= 1
                    exc = fut.exception()
                    if isinstance(exc, ObjectChanged):
                        f.restart_pending = True
                    elif exc is not None:
                        raise exc
        except BaseException:
            cancelled.set()
            raise
        finally:
            if on_state is not None:
                try:
                    record_state(force=True)
                except OSError:
                    pass


class _Cancelled(Exception):
    """Raised inside a part when the job is cancelled; never retried."""
