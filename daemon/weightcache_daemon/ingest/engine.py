"""The download engine: parallel ranged reads into ingest files, in priority order, hashed as
the contiguous on-disk prefix of each file grows.

Order. A job's files are cut into parts of ``part_size``, and every part has a rank
(``priority``: for weights, the first layer group that needs its bytes; by default the file's
position, which is plain file order). The scheduler always submits the globally lowest
(rank, file position, part index) part not fetched yet, across all the files of the job, so
the bytes a reader needs next are the ones on the wire. At most ``concurrency`` parts are in
flight, each fetched into a buffer of a fixed pool (memory does not grow with model size and no
fresh memory is touched per part) and written at its offset with O_DIRECT (on this class of
machine, buffered writes of a new file spend their time faulting in fresh page-cache memory;
direct writes run at disk speed). A part is written in pieces of ``WRITE_PIECE`` as its bytes
arrive, and ``DownloadEvents.written`` reports each piece once its write returned, so readers of the
in-progress file may use it without waiting for the rest of the part. Bytes known before the
download (``heads``: the headers the job read for the manifest) are written and reported
before any part is fetched.

Hashing. A blob's address is the sha256 of the whole file, and that is also what sources vouch
for (S3 checksums, Hugging Face LFS oids): the digest must be the plain, sequential SHA-256 of
the bytes. A tree or per-part hash would be another address that no source can confirm, and
one SHA-256 cannot be computed in pieces out of order. So each file has a cursor that hashes
in file order as the contiguous on-disk prefix grows, on up to HASHERS threads (one per file
at a time). A landed part keeps its buffer for the cursor, which hashes it from memory, but
only while no fetch needs the buffer: a kept buffer is a cache of bytes already on disk, and
when the pool has no free buffer, BufferPool.try_get takes one back (the one farthest ahead of
its cursor), for this job or another. The cursor then reads that part back from the ingest
file through a second, buffered, read-only descriptor (readahead off, so only written ranges
are read) into a small per-thread buffer. So fetches are never starved by hashing, and a job
whose buffers are all kept still progresses. Parts written by an earlier run (resume) are
simply on disk at the start.

What it costs. In file order nothing is read back: a kept buffer whose part is behind only
parts in flight is waited for, never taken back. Out of order, the bytes that land behind a
part not even requested yet are mostly read once more, and as direct writes bypass the page
cache, from the disk unless asked for ahead: once every part of a file is on disk or in flight
(``read_ahead``), every part its cursor will read back is asked for with POSIX_FADV_WILLNEED,
one readahead window per call, and while one part is hashed the next is asked for too. The
pages read back stay in the page cache, where readers of the in-progress file want them
anyway; the sha256 work itself is the same.
The real cost is at the end: a file whose first bytes are fetched late (a checkpoint stored in
name order puts ``lm_head``, of the last group, first in its shard) can only be hashed after
they land, so its hashing becomes a tail of (bytes behind them / sha256 speed) after the last
fetch, one thread per such file. On a 2.1 GiB two-shard Llama-shaped checkpoint stored in name
order (240 MiB read back), from a local S3 server at 300 MB/s, that tail is about 0.2 s (0.6 s
when the parts read back came from the disk). ``HashedFile.read_back`` counts those bytes.

Failures. A transient error retries that part from the byte where it stopped; an object that
changed (If-Match failed) voids the file at once (``DownloadEvents.restarted``; nothing more of that version
is reported) and restarts it, at the same ranks, once no part of it is in flight, so two
versions are never spliced. Filesystems without O_DIRECT (tmpfs) get buffered writes.
"""

from __future__ import annotations

import errno
import hashlib
import heapq
import itertools
import mmap
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from weightcache.contract.errors import DeadlineError, ExhaustedError, SourceError, WeightcacheError
from weightcache.contract.readahead import willneed
from weightcache_daemon.config import DownloadConfig
from weightcache_daemon.ingest.schedule import part_count
from weightcache_daemon.sources import ObjectChanged, RemoteObject, Source
from weightcache_daemon.storage.blobs import is_immutable, set_immutable

__all__ = ["BufferPool", "DownloadEvents", "HashedFile", "IgnoredEvents", "RateLimiter", "download", "ingest_name"]

PART_RETRIES = 5
ALIGN = 4096
HASHERS = 4  # files hashed at once; one thread per file, as a file's sha256 is sequential
READ_CHUNK = 1 << 20  # the read-back buffer of each hashing thread
# A part is written, and reported to readers, in pieces of this size as its bytes arrive, not
# once whole: a reader waiting for the first bytes of a part (the end of a layer that shares
# the part with the next one) does not wait for the rest of it, nor for one long write.
WRITE_PIECE = 1 << 20
TODO, FETCHING, ON_DISK = 0, 1, 2  # the states of a part


class RateLimiter:
    """A token bucket shared by every download of the daemon (0 = unlimited).

    Bytes are paid for after they arrive, one chunk at a time (``take``): a chunk waits until
    the link's time already paid for has passed, then pays for its own bytes. When several
    parts wait, the one that was started first (the lowest ``ticket``) goes first, not whichever
    thread asks first: the engine starts parts in execution order, so under a rate limit the
    oldest part in flight gets the whole rate and parts finish in the order they were started,
    instead of every part of a window of ``concurrency`` finishing together at its end. The
    bucket keeps BURST of unused time, so a thread that wakes a little late costs no
    throughput. A part with no bytes to pay for does not hold the others up, and no part waits
    longer than the parts started before it take to finish. A wait ends early, raising
    ``_Cancelled``, once the ``cancelled`` event given to ``take`` is set.
    """

    BURST = 0.02  # seconds of unused rate kept
    POLL = 0.1  # seconds between looks at the cancelled event while waiting

    def __init__(self, rate: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self._clock = clock
        self._lock = threading.Lock()
        self._next = clock()  # when the bytes paid for so far have been sent at the rate
        self._tickets = itertools.count()
        self._waiting: list[tuple[int, threading.Condition]] = []  # a heap: lowest ticket first

    def ticket(self) -> int:
        """A place in line, taken when a part starts."""
        with self._lock:
            return next(self._tickets)

    def take(self, n: int, ticket: int | None = None, cancelled: threading.Event | None = None) -> None:
        if self.rate <= 0:
            return
        with self._lock:
            me = (next(self._tickets) if ticket is None else ticket, threading.Condition(self._lock))
            heapq.heappush(self._waiting, me)
            try:
                while True:
                    if cancelled is not None and cancelled.is_set():
                        raise _Cancelled()
                    now = self._clock()
                    head = self._waiting[0] is me
                    if head and self._next <= now:
                        break
                    wait = self._next - now if head else None
                    if cancelled is not None:
                        wait = self.POLL if wait is None else min(wait, self.POLL)
                    me[1].wait(wait)
                heapq.heappop(self._waiting)
                self._next = max(self._next, now - self.BURST) + n / self.rate
            except BaseException:
                self._waiting.remove(me)
                heapq.heapify(self._waiting)
                raise
            finally:
                if self._waiting:
                    self._waiting[0][1].notify()  # the new head (or the same) recomputes its wait


class BufferPool:
    """Page-aligned part buffers (anonymous mmaps), reused for the daemon's lifetime.

    A running job may keep landed parts in their buffers for its hash cursor; those buffers are
    reclaimable (their bytes are on disk): ``try_get`` takes one back from a job's reclaimer when
    none is free, so a kept buffer never stands in the way of a fetch of any job."""

    def __init__(self, count: int, size: int) -> None:
        self.count = count
        self.size = size
        self._free: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
        for _ in range(count):
            self._free.put(mmap.mmap(-1, size))
        self._lock = threading.Lock()
        self._reclaimers: list[Callable[[], mmap.mmap | None]] = []

    def try_get(self) -> mmap.mmap | None:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            reclaimers = list(self._reclaimers)
        for reclaim in reclaimers:
            buf = reclaim()
            if buf is not None:
                return buf
        return None

    def add_reclaimer(self, reclaim: Callable[[], mmap.mmap | None]) -> None:
        with self._lock:
            self._reclaimers.append(reclaim)

    def remove_reclaimer(self, reclaim: Callable[[], mmap.mmap | None]) -> None:
        with self._lock:
            self._reclaimers.remove(reclaim)

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
class HashedFile:
    """One object downloaded whole into its ingest file, with the sha256 of those bytes (checked
    against nothing yet: the job verifies and commits it)."""

    obj: RemoteObject
    path: Path
    sha256: str
    restarts: int
    read_back: int = 0  # bytes hashed by reading them back from the ingest file (resumed or out of order)


ResumeState = list[tuple[RemoteObject, str, list[int]]]  # (object, ingest file name, parts on disk)


class DownloadEvents(Protocol):
    """What a download reports, through one object instead of a callback each. Called from the
    engine's threads (the scheduler, workers, hashing): keep each call cheap. Per download:
    ``started`` once; then ``written``/``received`` as bytes land, ``restarted`` when an object
    changed at the source, ``resume_state`` now and then; ``hashed`` once per file, last."""

    def started(self) -> None:
        """Every ingest file exists at its full size: readers may open and map them."""

    def received(self, n: int) -> None:
        """n more bytes came from the source (counted as they arrive, before they are written)."""

    def written(self, obj: RemoteObject, start: int, end: int) -> None:
        """Bytes [start, end) of obj are on disk (the write returned): readers may use them."""

    def restarted(self, obj: RemoteObject) -> None:
        """obj changed at the source: everything reported of it is void; it starts over."""

    def hashed(self, f: HashedFile) -> None:
        """Every byte of one file is on disk and hashed; raising fails the download."""

    def resume_state(self, files: ResumeState) -> None:
        """Which parts are on disk (fsynced), for a resume after a crash."""


class IgnoredEvents:
    """A DownloadEvents that ignores everything: subclass it and override what you need."""

    def started(self) -> None:
        pass

    def received(self, n: int) -> None:
        pass

    def written(self, obj: RemoteObject, start: int, end: int) -> None:
        pass

    def restarted(self, obj: RemoteObject) -> None:
        pass

    def hashed(self, f: HashedFile) -> None:
        pass

    def resume_state(self, files: ResumeState) -> None:
        pass


def _space_error(exc: OSError, obj: RemoteObject) -> WeightcacheError | OSError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ExhaustedError(f"no space left in the store for {obj.uri} ({obj.size} bytes)")
    return exc


@dataclass
class _File:
    """One object being downloaded. The fields after ``# -- lock`` are guarded by the job's lock
    (worker and hashing threads use them); the others belong to the scheduler thread."""

    obj: RemoteObject
    pos: int  # position in the job's list: the tie-break after the rank
    path: Path
    fd: int  # writes (O_DIRECT where the filesystem has it)
    rfd: int  # buffered, read-only, no readahead: the hash cursor's read-back
    direct: bool
    part_size: int
    priority: Sequence[int] | None
    restarts: int = 0
    parts_total: int = 0
    ranks: list[int] = field(default_factory=list)
    in_flight: int = 0
    restart_pending: bool = False
    # -- lock
    generation: int = 0
    state: bytearray = field(default_factory=bytearray)  # per part at this version: TODO, FETCHING, ON_DISK
    written: set[int] = field(default_factory=set)  # the same, as the resume record lists it
    held: dict[int, tuple[mmap.mmap, int]] = field(default_factory=dict)  # landed parts' buffers
    cursor: int = 0  # parts hashed
    advised: int = -1  # the generation whose read-back parts were asked for (read_ahead)
    hashing: bool = False  # a hashing thread owns the cursor
    hasher: hashlib._Hash = field(default_factory=hashlib.sha256)
    digest: str | None = None
    read_back: int = 0

    def reset(self, obj: RemoteObject, resumed: set[int] | None = None) -> None:
        """Start (over) at version obj, keeping the parts a previous run wrote when given.
        Only called with no part of this file in flight and no thread hashing it."""
        self.obj = obj
        self.generation += 1
        self.parts_total = part_count(obj.size, self.part_size)
        self.ranks = _ranks(self.priority, self.parts_total, self.pos)
        self.state = bytearray(self.parts_total)  # all TODO
        self.written = {i for i in resumed or () if 0 <= i < self.parts_total}
        for i in self.written:
            self.state[i] = ON_DISK
        self.restart_pending = False
        self.cursor = 0
        self.hasher = hashlib.sha256()
        self.digest = None
        if not self.written:
            # To the object's size, never through 0: an early reader may have this file
            # mapped, and a mapping touched past a shrunken end is SIGBUS, not an error. Stale
            # bytes of an abandoned version are never reported ready (only this generation's
            # writes are) and never hashed (the cursor reads only parts written since).
            os.ftruncate(self.fd, obj.size)
        if obj.size:
            try:
                os.posix_fallocate(self.fd, 0, obj.size)
            except OSError as exc:
                raise _space_error(exc, obj) from None

    def part_range(self, i: int) -> tuple[int, int]:
        start = i * self.part_size
        return start, min(self.part_size, self.obj.size - start)

    def write(self, buf: mmap.mmap, offset: int, end: int, skip: int = 0) -> None:
        """Write buf[skip:end] at file offset offset + skip (buf holds the part at ``offset``;
        skip is a multiple of ALIGN)."""
        # The last part writes up to ALIGN-1 stale bytes past the object's end, cut off by finish().
        self._pwrite(buf, skip, self._io_length(end - skip), offset + skip)

    def _io_length(self, n: int) -> int:
        """How many bytes a write of n takes: O_DIRECT needs lengths rounded up to ALIGN."""
        return -(-n // ALIGN) * ALIGN if self.direct else n

    def _pwrite(self, buf: mmap.mmap, start: int, length: int, at: int) -> None:
        """All of buf[start:start + length] at file offset ``at``."""
        view = memoryview(buf)[start : start + length]
        done = 0
        try:
            while done < length:
                done += os.pwrite(self.fd, view[done:], at + done)
        except OSError as exc:
            raise _space_error(exc, self.obj) from None
        finally:
            view.release()

    def write_head(self, head: bytes) -> None:
        """Write bytes [0, len(head)) known before the download (a header the daemon read to
        build the manifest). Only before any part is fetched: with O_DIRECT the write is padded
        with zeros to ALIGN, over bytes that no part has written yet and no reader is told of."""
        length = self._io_length(len(head))
        buf = mmap.mmap(-1, max(length, ALIGN))  # page-aligned, as O_DIRECT wants its memory
        try:
            buf[: len(head)] = head
            self._pwrite(buf, 0, length, 0)
        finally:
            buf.close()

    def finish(self) -> None:
        if self.direct:
            os.ftruncate(self.fd, self.obj.size)
        os.fsync(self.fd)


def _ranks(priority: Sequence[int] | None, parts: int, pos: int) -> list[int]:
    if priority is None:
        return [pos] * parts  # file order
    ranks = list(priority[:parts])
    # Only after a restart at a version of another size: the parts past the old end go last.
    return ranks + [max(ranks, default=pos)] * (parts - len(ranks))


_thread = threading.local()


def _read_buffer() -> memoryview:
    """The calling thread's read-back buffer: made once per hashing thread, never per part."""
    buf: memoryview | None = getattr(_thread, "buf", None)
    if buf is None:
        buf = _thread.buf = memoryview(bytearray(READ_CHUNK))
    return buf


class _Job:
    """What the workers, the hashing threads and the scheduler share: the files' cursors and
    the buffers held for them."""

    def __init__(
        self,
        files: list[_File],
        pool: BufferPool,
        cancelled: threading.Event,
        report: DownloadEvents,
    ) -> None:
        self.files = files
        self.pool = pool
        self.cancelled = cancelled
        self.report = report
        self.lock = threading.Lock()
        # Finished tasks and returned buffers: what the scheduler waits for.
        self.events: queue.SimpleQueue[object] = queue.SimpleQueue()

    def wrote(self, f: _File, gen: int, start: int, end: int) -> None:
        """Bytes [start, end) of f, inside a part still arriving, are on disk: report them."""
        with self.lock:
            # Under the lock: once a file is voided, no report of its old version follows.
            if gen == f.generation and end > start:
                self.report.written(f.obj, start, end)

    def landed(self, f: _File, i: int, gen: int, buf: mmap.mmap, n: int, reported: int = 0) -> None:
        """Part i (n bytes, the first ``reported`` of them reported by ``wrote`` already) of f is
        on disk: record it, report the rest, and keep its buffer for the cursor until a fetch
        needs it (BufferPool.try_get reclaims it then)."""
        with self.lock:
            if gen != f.generation:  # the file restarted while this part was in flight
                self.pool.put(buf)
                return
            f.state[i] = ON_DISK
            f.written.add(i)
            if n > reported:
                start = i * f.part_size
                try:
                    self.report.written(f.obj, start + reported, start + n)
                except BaseException:
                    self.pool.put(buf)
                    raise
            f.held[i] = (buf, n)

    def evict(self) -> mmap.mmap | None:
        """Take back the held buffer farthest ahead of its cursor (its bytes are on disk), of a
        part behind a gap that is not even being fetched. A part with only parts on disk or in
        flight between it and its cursor is not taken: the cursor reaches it as soon as those
        land and gives its buffer back then (so file order reads nothing back, as a buffer is
        then waited for rather than taken)."""
        with self.lock:
            best: tuple[int, _File, int] | None = None
            for f in self.files:
                if not f.held:
                    continue
                gap = f.state.find(TODO, f.cursor)  # the first part from the cursor not even in flight
                for i in f.held:
                    if 0 <= gap < i and (best is None or i - f.cursor > best[0]):
                        best = (i - f.cursor, f, i)
            if best is None:
                return None
            _, f, i = best
            return f.held.pop(i)[0]

    def read_ahead(self, f: _File) -> None:
        """Once every part of f is on disk or in flight, ask the kernel for the parts its cursor
        will read back (on disk, not in a kept buffer), all at once: the hash then reads them
        from the page cache while the last parts arrive, instead of from the disk after the
        last byte. From then on nothing of f is taken back (``evict`` takes only parts behind
        a part not yet requested), so this is the whole set."""
        with self.lock:
            if f.advised == f.generation or f.restart_pending or TODO in f.state:
                return
            f.advised = f.generation
            parts = [i for i in range(f.cursor, f.parts_total) if f.state[i] == ON_DISK and i not in f.held]
        for first, end in _runs(parts):
            start, _ = f.part_range(first)
            willneed(f.rfd, start, min(end * f.part_size, f.obj.size) - start)

    def wake(self, _: object = None) -> None:
        self.events.put(None)

    def drop(self, f: _File) -> None:
        with self.lock:
            for buf, _ in f.held.values():
                self.pool.put(buf)
            f.held = {}

    def void(self, f: _File) -> bool:
        """f's version changed at the source: what was written of it is void. True the first time."""
        with self.lock:
            if f.restart_pending:
                return False
            f.restart_pending = True
            f.generation += 1  # parts still in flight land nowhere; the cursor stops
        self.drop(f)
        return True

    def start_hashing(self, f: _File) -> bool:
        """Claim f's cursor when the part at it is on disk and no thread holds it."""
        with self.lock:
            if f.hashing or f.restart_pending or f.cursor >= f.parts_total or f.state[f.cursor] != ON_DISK:
                return False
            f.hashing = True
            return True

    def advance(self, f: _File, gen: int) -> None:
        """Hash f in file order while the part at the cursor is on disk (a hashing thread)."""
        try:
            while True:
                with self.lock:
                    if gen != f.generation or f.state[f.cursor] != ON_DISK:
                        f.hashing = False
                        return
                    i = f.cursor
                    item = f.held.pop(i, None)
                    hasher = f.hasher
                    # The next part, when it will be read back too: ask the disk for it now, so
                    # reading and hashing overlap (about twice the read-back speed).
                    after = i + 1 < f.parts_total and f.state[i + 1] == ON_DISK and i + 1 not in f.held
                start, length = f.part_range(i)
                if item is None:
                    willneed(f.rfd, start, length)
                if after:
                    willneed(f.rfd, *f.part_range(i + 1))
                if item is not None:
                    buf, n = item
                    view = memoryview(buf)[:n]
                    try:
                        hasher.update(view)  # hashlib releases the GIL for large buffers
                    finally:
                        view.release()
                        self.pool.put(buf)
                        self.wake()  # a scheduler may be waiting for this buffer
                else:
                    self._read_back(f, hasher, start, length)
                with self.lock:
                    if gen != f.generation:
                        f.hashing = False
                        return
                    f.read_back += 0 if item is not None else length
                    f.cursor += 1
                    if f.cursor == f.parts_total:
                        f.digest = hasher.hexdigest()
                        f.hashing = False
                        return
        except BaseException:
            with self.lock:
                f.hashing = False
            raise

    def _read_back(self, f: _File, hasher: hashlib._Hash, start: int, length: int) -> None:
        buf = _read_buffer()
        done = 0
        while done < length:
            if self.cancelled.is_set():
                raise _Cancelled()
            n = os.preadv(f.rfd, [buf[: min(len(buf), length - done)]], start + done)
            if n <= 0:
                raise SourceError(
                    f"{f.obj.uri}: ingest file {f.path} ends at byte {start + done}, inside a written part"
                )
            hasher.update(buf[:n])
            done += n


def _open_ingest(path: Path) -> tuple[int, bool]:
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
    if path.exists():  # resumed: it may have been sealed (0444, immutable) for a commit a crash cut short
        if is_immutable(path):
            set_immutable(path, False)
        os.chmod(path, 0o600)
    try:
        return os.open(path, flags | os.O_DIRECT, 0o600), True
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    return os.open(path, flags, 0o600), False


def _open_read_back(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    # Read exactly the ranges asked for: readahead could pull in bytes not written yet (and
    # cache them over the direct writes still to come).
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    return fd


def _runs(parts: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted part indices as (first, last + 1) runs of consecutive parts."""
    out: list[tuple[int, int]] = []
    for i in parts:
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def download(
    source: Source,
    objects: list[RemoteObject],
    ingest_dir: Path,
    cfg: DownloadConfig,
    pool: BufferPool,
    limiter: RateLimiter,
    events: DownloadEvents,
    cancelled: threading.Event,
    *,
    resume: dict[str, set[int]] | None = None,
    priority: Mapping[str, Sequence[int]] | None = None,
    heads: Mapping[str, bytes] | None = None,
) -> list[HashedFile]:
    """Fetch every object into ingest_dir; return them hashed and fsynced, in the order given.

    ``resume`` maps relative paths to parts already written by an earlier run into the same
    ingest_dir at the same object version; those are not fetched (the hash reads them back).
    ``events.resume_state`` receives [(object, ingest file name, parts written)] now and then,
    after those parts are on disk, so a crash can resume from it.

    ``priority`` maps relative paths to a rank per part (``pool.size`` bytes each, as
    schedule.part_ranks makes them): parts are fetched lowest (rank, position in ``objects``,
    part index) first, across files; a file without ranks ranks at its position (file order).
    ``events.started()`` is called once every ingest file exists at its full size, before any
    part is fetched. ``events.written(obj, start, end)`` is called (from worker threads: keep it
    cheap) once bytes [start, end) of obj are on disk: for resumed parts first, before anything
    is fetched. ``events.restarted(obj)`` is called when obj (the version listed or last restarted at)
    changed at the source: what was reported of it is void, and it starts over at its new
    version; nothing of that file is fetched or reported between the two.

    ``heads`` maps relative paths to bytes [0, n) of the object at the version listed, already
    read (the safetensors headers the manifest was built from): they are written and reported
    (``events.written``) before any part is fetched, so every file's header is on disk from the
    start, whatever its part's rank. The part holding them is still fetched, for the hash.
    """
    heads = heads or {}
    for obj in objects:
        head = heads.get(obj.relpath, b"")
        if len(head) > obj.size:
            raise ValueError(f"head of {obj.relpath}: {len(head)} bytes, but the object has {obj.size}")
        ranks = (priority or {}).get(obj.relpath)
        if ranks is not None and len(ranks) != part_count(obj.size, pool.size):
            raise ValueError(
                f"priority for {obj.relpath}: {len(ranks)} ranks, but {obj.size} bytes make "
                f"{part_count(obj.size, pool.size)} parts of {pool.size}"
            )
    files: list[_File] = []
    job: _Job | None = None
    try:
        for pos, obj in enumerate(objects):
            path = ingest_dir / ingest_name(obj.relpath)
            fd, direct = _open_ingest(path)
            try:
                rfd = _open_read_back(path)
            except BaseException:
                os.close(fd)
                raise
            f = _File(obj, pos, path, fd, rfd, direct, pool.size, (priority or {}).get(obj.relpath))
            files.append(f)
            f.reset(obj, (resume or {}).get(obj.relpath))
        job = _Job(files, pool, cancelled, events)
        pool.add_reclaimer(job.evict)
        events.started()  # every ingest file exists at its full size: readers may open and map them
        for f in files:
            for first, end in _runs(sorted(f.written)):
                start, _ = f.part_range(first)
                stop = min(end * f.part_size, f.obj.size)
                if stop > start:
                    events.written(f.obj, start, stop)
        for f in files:
            head = heads.get(f.obj.relpath, b"")
            if head and 0 not in f.written:  # a resumed part 0 holds these bytes already
                f.write_head(head)
                events.written(f.obj, 0, len(head))
        _run(source, job, cfg, limiter, events)
        return [HashedFile(f.obj, f.path, f.digest or "", f.restarts, f.read_back) for f in files]
    finally:
        if job is not None:
            pool.remove_reclaimer(job.evict)
            for f in files:
                job.drop(f)
        for f in files:
            os.close(f.fd)
            os.close(f.rfd)


def read_retrying(
    source: Source, obj: RemoteObject, offset: int, view: memoryview, on_bytes: Callable[[int], None]
) -> None:
    """Fill ``view`` with bytes [offset, offset + len(view)) of obj. A transient SourceError is
    retried (PART_RETRIES times, backing off) from the byte where it stopped; anything else,
    ObjectChanged included, is the caller's to handle."""
    filled = 0
    attempt = 0

    def landed(n: int) -> None:
        nonlocal filled
        on_bytes(n)
        filled += n

    while filled < len(view):
        rest = view[filled:]
        try:
            source.read_into(obj, offset + filled, rest, landed)
        except SourceError:
            attempt += 1
            if attempt > PART_RETRIES:
                raise
            time.sleep(min(0.2 * 2**attempt, 5.0))
        finally:
            rest.release()


def ingest_name(relpath: str) -> str:
    return hashlib.sha256(relpath.encode()).hexdigest()[:24] + ".part"


STATE_EVERY = 0.1  # seconds between resume-state records


def _run(source: Source, job: _Job, cfg: DownloadConfig, limiter: RateLimiter, events: DownloadEvents) -> None:
    _Scheduler(source, job, cfg, limiter, events).run()


class _Scheduler:
    """The scheduler loop of one download, one step per method: restart changed files, start
    hashing, submit the lowest-ranked parts, hand finished files over, record the resume state,
    wait for a task or a buffer, collect what finished."""

    def __init__(self, source: Source, job: _Job, cfg: DownloadConfig, limiter: RateLimiter,
                 events: DownloadEvents) -> None:  # fmt: skip
        self.source, self.job, self.cfg, self.limiter, self.events = source, job, cfg, limiter, events
        self.files, self.pool, self.cancelled = job.files, job.pool, job.cancelled
        self.last_state = 0.0
        # Parts not fetched yet, lowest (rank, file position, part) first; an entry of an earlier
        # generation of its file is stale (the file restarted) and skipped.
        self.todo: list[tuple[int, int, int, int]] = []
        self.fetching: dict[Future[None], _File] = {}
        self.hashing: dict[Future[None], _File] = {}
        self.queue = list(self.files)  # files not handed over yet

    def run(self) -> None:
        for f in self.files:
            self.enqueue(f)
        with (
            ThreadPoolExecutor(max_workers=self.cfg.concurrency, thread_name_prefix="wc-dl") as ex,
            ThreadPoolExecutor(max_workers=max(1, min(HASHERS, len(self.files))), thread_name_prefix="wc-hash") as hx,
        ):
            try:
                while True:
                    self.restart_changed()
                    self.start_hashing(hx)
                    self.submit_parts(ex)
                    for f in self.queue:
                        self.job.read_ahead(f)
                    self.hand_over_finished()
                    if not self.queue:
                        return
                    self.record_state()
                    if self.cancelled.is_set():
                        raise DeadlineError("download cancelled")
                    if not self.fetching and not self.hashing and not any(f.restart_pending for f in self.queue):
                        if self.todo:
                            self.pool.wait(0.5)  # other jobs hold every buffer: our turn comes when one is put back
                            continue
                        raise SourceError(
                            f"download stalled with {len(self.queue)} file(s) incomplete"
                        )  # a bug if seen
                    self.wait()
                    self.collect_done()
            except BaseException:
                self.cancelled.set()
                raise
            finally:
                try:
                    self.record_state(force=True)
                except OSError:
                    pass

    def enqueue(self, f: _File) -> None:
        for i in range(f.parts_total):
            if f.state[i] == TODO:
                heapq.heappush(self.todo, (f.ranks[i], f.pos, i, f.generation))

    def restart_changed(self) -> None:
        """A file whose object changed starts over at its new version once nothing of it is in flight."""
        for f in self.queue:
            if f.restart_pending and f.in_flight == 0 and not f.hashing:
                if f.restarts >= self.cfg.max_restarts:
                    raise SourceError(f"{f.obj.uri} changed {f.restarts + 1} times during the download")
                f.restarts += 1
                current = self.source.stat(f.obj.relpath)
                with self.job.lock:
                    f.reset(current)
                self.enqueue(f)

    def start_hashing(self, hx: ThreadPoolExecutor) -> None:
        for f in self.queue:
            if self.job.start_hashing(f):
                fut = hx.submit(self.job.advance, f, f.generation)
                fut.add_done_callback(self.job.wake)
                self.hashing[fut] = f

    def submit_parts(self, ex: ThreadPoolExecutor) -> None:
        """The lowest-ranked parts, while a worker and a buffer are free."""
        while len(self.fetching) < self.cfg.concurrency and self.todo:
            _, pos, i, gen = self.todo[0]
            f = self.files[pos]
            if gen != f.generation:
                heapq.heappop(self.todo)
                continue
            buf = self.pool.try_get()  # a free buffer, else one a job kept for its cursor
            if buf is None:
                break
            heapq.heappop(self.todo)
            with self.job.lock:
                f.state[i] = FETCHING
            f.in_flight += 1
            fut = ex.submit(self.fetch, f, i, gen, buf, self.limiter.ticket())
            fut.add_done_callback(self.job.wake)
            self.fetching[fut] = f

    def hand_over_finished(self) -> None:
        for f in [f for f in self.queue if f.digest is not None and f.in_flight == 0 and not f.hashing]:
            self.queue.remove(f)
            f.finish()
            self.events.hashed(HashedFile(f.obj, f.path, f.digest or "", f.restarts, f.read_back))

    def wait(self) -> None:
        try:
            self.job.events.get(timeout=0.5)  # a task finished or a buffer came back
            while True:
                self.job.events.get_nowait()
        except queue.Empty:
            pass

    def collect_done(self) -> None:
        """Finished parts and hashes: a changed object voids its file; any other error ends the download."""
        for fut in [fut for fut in (*self.fetching, *self.hashing) if fut.done()]:
            exc = fut.exception()
            if fut in self.fetching:
                f = self.fetching.pop(fut)
                f.in_flight -= 1
                if isinstance(exc, ObjectChanged):
                    if self.job.void(f):
                        self.events.restarted(f.obj)
                    continue
            else:
                self.hashing.pop(fut)
            if isinstance(exc, _Cancelled):
                raise DeadlineError("download cancelled")
            if exc is not None:
                raise exc

    def record_state(self, force: bool = False) -> None:
        if not force and time.monotonic() - self.last_state < STATE_EVERY:
            return
        self.last_state = time.monotonic()
        snapshot = []
        for f in self.files:
            with self.job.lock:
                written = sorted(f.written)
            if not f.direct and written:
                os.fdatasync(f.fd)  # buffered writes must be on disk before they are recorded
            snapshot.append((f.obj, f.path.name, written))
        self.events.resume_state(snapshot)

    def fetch(self, f: _File, i: int, gen: int, buf: mmap.mmap, ticket: int) -> None:
        """One part into its buffer, written and reported in WRITE_PIECE pieces as it arrives (a worker thread)."""
        start, length = f.part_range(i)
        got = 0  # bytes of the part in buf (read_retrying fills it in order, retries included)
        flushed = 0  # bytes of it written and reported
        job, cancelled = self.job, self.cancelled

        def landed(n: int) -> None:
            nonlocal got, flushed
            if cancelled.is_set():
                raise _Cancelled()
            self.limiter.take(n, ticket, cancelled)
            self.events.received(n)
            got += n
            upto = got - got % WRITE_PIECE
            if upto > flushed and upto < length:  # the last piece is written below, with the rest
                f.write(buf, start, upto, flushed)
                job.wrote(f, gen, start + flushed, start + upto)
                flushed = upto

        try:
            view = memoryview(buf)[:length]
            try:
                read_retrying(self.source, f.obj, start, view, landed)
            finally:
                view.release()
            f.write(buf, start, length, flushed)
        except BaseException:
            self.pool.put(buf)
            raise
        job.landed(f, i, gen, buf, length, flushed)


class _Cancelled(Exception):
    """Raised inside a part when the job is cancelled; never retried."""
