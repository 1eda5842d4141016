"""A snapshot that is still being downloaded, as clients may already use it.

A download job that knows every safetensors header (read first, with one small ranged read
per file) publishes a ``EarlySnapshot``: a provisional snapshot id, the manifest (tensor map
and layer order, files without their sha256 yet), and, per file, the byte ranges that are on
disk. A range is added only after the ``pwrite`` that put it there returned, so a client that
reads a granted descriptor within a reported range always sees the downloaded bytes (the
files are preallocated to their full size; unwritten bytes read as zeros and are never
reported).

The snapshot ends one of two ways: ``commit(real_id)`` (every file hashed, validated, moved
into the store under its content address; the ingest files are renamed, so descriptors
already granted stay valid) or ``fail(error)`` (verification failed, or the job did): every
reader then gets the error at its next call, and nothing was published. A file that restarts
at a new source version (``revoke``) fails the snapshot too: bytes already handed out
belonged to the old version, and a reader must not mix the two.

Everything here is called from download threads and read from the event loop: one lock, and
a wake-up posted to the loop (coalesced) whenever readiness changes.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from weightcache.contract.errors import CorruptedError, NotFoundError, WeightcacheError
from weightcache.contract.ranges import covered, merge
from weightcache_daemon.records import FileRow, Manifest, Readiness, Span, file_span

__all__ = ["EarlyFile", "EarlySnapshot", "Readiness"]


@dataclass(frozen=True, slots=True)
class EarlyFile:
    path: str  # relative path in the snapshot
    size: int
    disk: Path  # the ingest file being written, or the blob already in the store


class EarlySnapshot:
    def __init__(
        self,
        manifest: Manifest,
        files: Sequence[EarlyFile],
        first_group: Sequence[tuple[str, int, int]],
        loop: asyncio.AbstractEventLoop,
        on_first_group: Callable[[], None] | None = None,
    ) -> None:
        self.snapshot_id = manifest.snapshot_id
        self.manifest = manifest
        self.files = {f.path: f for f in files}
        self.bytes_total = sum(f.size for f in files)
        self.started = time.time()
        self._first_group = list(first_group)
        self._on_first_group = on_first_group
        self._loop = loop
        self._lock = threading.Lock()
        self._ranges: dict[str, list[tuple[int, int]]] = {f.path: [] for f in files}
        self._versions: dict[str, int] = {f.path: 0 for f in files}
        self._ready_bytes = 0
        self._wake_posted = False
        self._pulse = asyncio.Event()
        self._blobs: dict[str, Path] = {}
        self.committed: str | None = None
        self.error: WeightcacheError | None = None
        for f in files:
            if f.size == 0:
                self._versions[f.path] = 1  # announce empty files once (nothing to wait for)

    @staticmethod
    def new_id() -> str:
        """A provisional id: same shape as a content id, unguessable (it names bytes only the
        callers of this download were told about)."""
        return secrets.token_hex(16)

    # ---------------------------------------------------------------- from download threads

    def mark(self, path: str, start: int, end: int) -> None:
        """Bytes [start, end) of `path` are on disk (the write returned)."""
        with self._lock:
            f = self.files.get(path)
            if f is None:
                return
            end = min(end, f.size)
            before = sum(e - s for s, e in self._ranges[path])
            self._ranges[path] = merge(self._ranges[path], start, end)
            self._ready_bytes += sum(e - s for s, e in self._ranges[path]) - before
            self._versions[path] += 1
            first = self._first_group_ready_locked()
        if first and self._on_first_group is not None:
            self._on_first_group()
        self._post_wake()

    def mark_whole(self, path: str) -> None:
        f = self.files.get(path)
        if f is not None:
            self.mark(path, 0, f.size)

    def revoke(self, path: str) -> None:
        """The source object changed mid-download: what was reported of it is void."""
        self.fail(
            CorruptedError(
                f"file {path} of model {self.manifest.model or self.snapshot_id} changed at the source while it was "
                "being read; the download starts that file over: open the model again"
            )
        )

    def _first_group_ready_locked(self) -> bool:
        if not self._first_group:
            return False
        if all(covered(self._ranges.get(p, []), s, e) for p, s, e in self._first_group):
            self._first_group = []
            return True
        return False

    # ---------------------------------------------------------------- the end

    def commit(self, real_id: str) -> None:
        with self._lock:
            self.committed = real_id
            for path, f in self.files.items():
                self._ranges[path] = [(0, f.size)] if f.size else []
            self._ready_bytes = self.bytes_total
        self._post_wake()

    def fail(self, error: WeightcacheError) -> None:
        with self._lock:
            if self.error is None and self.committed is None:
                self.error = error
        self._post_wake()

    @property
    def done(self) -> bool:
        return self.committed is not None or self.error is not None

    # ---------------------------------------------------------------- readers (event loop)

    def ready(self, path: str, start: int, end: int) -> bool:
        with self._lock:
            return covered(self._ranges.get(path, []), start, end)

    def bytes_ready(self) -> int:
        with self._lock:
            return self._ready_bytes

    def changes(self, seen: dict[str, int]) -> Readiness | None:
        """The files whose ranges changed since `seen` (path -> version, updated in place)."""
        out = []
        with self._lock:
            for path, v in self._versions.items():
                if seen.get(path, 0) != v:
                    seen[path] = v
                    out.append((path, tuple(x for r in self._ranges[path] for x in r)))
            ready = self._ready_bytes
        if not out:
            return None
        return Readiness(self.snapshot_id, tuple(out), ready, self.bytes_total)

    def pulse(self) -> asyncio.Event:
        """An event set at the next change; take it before looking at the state."""
        return self._pulse

    async def wait_ready(self, path: str, start: int, end: int) -> None:
        """Wait until [start, end) of `path` is on disk; raise the snapshot's error if it failed."""
        while True:
            pulse = self._pulse
            if self.error is not None:
                raise self.error
            if self.ready(path, start, end):
                return
            await pulse.wait()

    def _post_wake(self) -> None:
        with self._lock:
            if self._wake_posted:
                return
            self._wake_posted = True
        try:
            self._loop.call_soon_threadsafe(self._wake)
        except RuntimeError:  # the loop is closed: the daemon is stopping, nobody waits
            pass

    def _wake(self) -> None:
        with self._lock:
            self._wake_posted = False
        pulse, self._pulse = self._pulse, asyncio.Event()
        pulse.set()

    def file_rows(self) -> list[FileRow]:
        return [FileRow(f.path, "", f.size) for f in sorted(self.files.values(), key=lambda f: f.path)]

    # ---------------------------------------------------------------- the files

    def moved(self, path: str, blob: Path) -> None:
        """Called just before an ingest file is renamed into the store (same inode)."""
        with self._lock:
            self._blobs[path] = blob

    def open(self, path: str, opener: Callable[[Path], int]) -> int:
        """A read-only descriptor of one file: the ingest file, or the blob it became (the job
        renames it at commit, possibly between our lookup and our open). `opener` opens a store
        path read-only (through the store's read-only view: the descriptor goes to a client,
        and the daemon keeps writing the file through its own path)."""
        f = self.files.get(path)
        label = self.manifest.model or self.snapshot_id
        if f is None:
            raise NotFoundError(f"file {path[:200]!r} is not in model {label} (snapshot {self.snapshot_id})")
        for _ in range(2):  # the rename may fall between reading the blob path and opening
            with self._lock:
                candidates = [f.disk, self._blobs.get(path)]
            for disk in candidates:
                if disk is None:
                    continue
                try:
                    return opener(disk)
                except FileNotFoundError:
                    continue
        if self.error is not None:
            raise self.error
        raise NotFoundError(
            f"file {path} of model {label} (snapshot {self.snapshot_id}) is gone: its download ended; open it again"
        )

    def file_span(self, path: str, offset: int, length: int) -> Span:
        return file_span(self.snapshot_id, self.file_rows(), path, offset, length)
