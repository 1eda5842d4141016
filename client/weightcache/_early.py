"""Using a model while the daemon is still downloading it (an early ``Ensure`` answer).

The stream of an early Ensure call, and what a handle does with each part::

    Progress* ─► Manifest(early, provisional id) ─► (Readiness | Progress)* ─┬► Manifest(committed)
                 open() returns here                     ranges become readable  │  complete: real id
                                                                                 └► gRPC error: failed

``EarlyDownload`` follows the rest of that stream on a daemon thread and keeps, under one
condition variable, the byte ranges of each file that are on disk, then the outcome:
*complete* (the committed manifest arrived; its content snapshot id replaces the provisional
one) or *failed* (an error that every later call raises again, so no handle goes on as if
nothing happened). Two backings sit on it:

- ``EarlyFiles``: the descriptors fd.sock grants for the files being written, mapped whole
  exactly like ``MappedFiles`` (the files are preallocated to their full size); a read waits
  for exactly its range.
- ``FetchedRanges``: for a client without descriptors, exactly the asked ranges over the gRPC
  ``ReadRange`` stream (the daemon answers once they are on disk), into one buffer per file.

Why a reported range is safe to read: the daemon reports a range only after the write that
put it on disk returned. Bytes outside reported ranges read as zeros and are never handed out.
What is *not* known yet while the model downloads is whether the bytes are the right ones: sha256 and
safetensors validation finish with the download. Hence the rule the users of a backing follow
(``Model.state_dict``/``path``, ``LayerStream``, ``weightcache.nn``): whole-model results and
the final layer group are delivered only after ``wait_complete()``, so a forward pass that uses
every group cannot finish on bytes that later fail verification.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Callable, Iterable, Mapping
from itertools import pairwise
from typing import TYPE_CHECKING

import grpc

from ._backing import MappedFiles, check_range
from ._records import Manifest, Progress
from .contract.errors import (
    CorruptedError,
    DaemonUnavailableError,
    InternalError,
    NotFoundError,
    WeightcacheError,
    from_rpc_error,
)
from .contract.ranges import Ranges, covered, merge

if TYPE_CHECKING:
    from ._fd import FdConnection
    from .v1 import weightcache_pb2 as pb

__all__ = ["EarlyDownload", "EarlyFiles", "FetchedRanges", "FollowingBacking"]


# How long a read waits for the committed manifest when the provisional id it used has just
# ended (the download committed between the early answer and the read).
_COMMIT_GRACE = 120.0


def _within(ranges: Ranges, start: int, end: int) -> Ranges:
    """The parts of [start, end) that the ranges cover."""
    return [(max(s, start), min(e, end)) for s, e in ranges if s < end and e > start]


def _gaps(ranges: Ranges, start: int, end: int) -> Ranges:
    """The parts of [start, end) that the ranges do not cover."""
    out: Ranges = []
    pos = start
    for s, e in _within(ranges, start, end):
        if s > pos:
            out.append((pos, s))
        pos = max(pos, e)
    if pos < end:
        out.append((pos, end))
    return out


class EarlyDownload:
    """The rest of an early Ensure stream: ready ranges per file, then complete or failed.

    ``events`` is the call's remaining responses (the gRPC call object itself, which raises
    ``grpc.RpcError`` when the call fails); ``cancel`` ends the call (``close()``: the daemon
    keeps downloading for its other clients and its store). ``label`` names the model in
    errors. ``on_progress`` gets the Progress events (from this object's thread); ``on_end``
    runs once the stream ended, however it ended. Nothing is read before ``start()``.
    """

    def __init__(
        self,
        manifest: Manifest,
        label: str,
        events: Iterable[pb.EnsureResponse],
        cancel: Callable[[], object],
        *,
        on_progress: Callable[[Progress], None] | None = None,
        on_end: Callable[[], None] | None = None,
    ) -> None:
        if not manifest.early:
            raise InternalError(f"EarlyDownload of model {label}: the manifest is already committed")
        self.label = label
        self._manifest = manifest
        self._sizes = {f.path: f.size for f in manifest.files}
        self._events = events
        self._cancel = cancel
        self._on_progress = on_progress
        self._on_end = on_end
        self._cond = threading.Condition()
        self._ranges: dict[str, Ranges] = {p: [] for p in self._sizes}
        self._complete = False
        self._failure: WeightcacheError | None = None
        self._closed = False
        self.bytes_ready = 0
        self.bytes_total = sum(self._sizes.values())
        self._thread = threading.Thread(target=self._follow, name="wc-ensure", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # ---------------------------------------------------------------- state

    @property
    def manifest(self) -> Manifest:
        """The early manifest, then the committed one once complete."""
        return self._manifest

    @property
    def snapshot_id(self) -> str:
        """The provisional id while early; the content id once complete."""
        return self._manifest.snapshot_id

    def _raise_if_unusable(self) -> None:
        """Under the lock: the failure (a fresh copy for each raise: several threads may raise
        it at once), or the closed state."""
        if self._failure is not None:
            raise type(self._failure)(str(self._failure))
        if self._closed:
            raise NotFoundError(f"model {self.label} is closed: open it again")

    def check(self) -> None:
        """Raise the failure (or the closed state), if any."""
        with self._cond:
            self._raise_if_unusable()

    def check_range(self, file: str, offset: int, length: int) -> None:
        """The failure, an unknown file or a range outside it."""
        with self._cond:
            self._raise_if_unusable()
            self._check_range_locked(file, offset, length)

    def _check_range_locked(self, file: str, offset: int, length: int) -> None:
        size = self._sizes.get(file)
        if size is None:
            raise NotFoundError(f"file {file!r} is not in snapshot {self.snapshot_id} (model {self.label})")
        check_range(file, size, offset, length)

    def ready(self, file: str, offset: int, length: int) -> bool:
        """Whether [offset, offset + length) of ``file`` is on disk now."""
        with self._cond:
            self._raise_if_unusable()
            self._check_range_locked(file, offset, length)
            return self._complete or covered(self._ranges[file], offset, offset + length)

    def ready_parts(self, file: str, offset: int, length: int) -> Ranges:
        """The parts of that range that are on disk now."""
        with self._cond:
            self._raise_if_unusable()
            self._check_range_locked(file, offset, length)
            if self._complete:
                return [(offset, offset + length)] if length else []
            return _within(self._ranges[file], offset, offset + length)

    def wait_ready(self, file: str, offset: int, length: int, timeout: float | None = None) -> bool:
        """Block until that range is on disk (True), ``timeout`` passed (False), or the download
        failed or the handle closed (raised)."""
        with self._cond:
            self._check_range_locked(file, offset, length)
            ranges = self._ranges
            ok = self._cond.wait_for(
                lambda: (
                    self._failure is not None
                    or self._closed
                    or self._complete
                    or covered(ranges[file], offset, offset + length)
                ),
                timeout,
            )
            self._raise_if_unusable()
            return ok

    def complete(self) -> bool:
        """Whether the committed manifest arrived (every file verified and in the store)."""
        with self._cond:
            if self._failure is not None or not self._complete:
                self._raise_if_unusable()
            return self._complete

    def wait_complete(self, timeout: float | None = None) -> bool:
        """Block until the committed manifest arrived (True) or ``timeout`` passed (False);
        the failure is raised."""
        with self._cond:
            self._cond.wait_for(lambda: self._failure is not None or self._closed or self._complete, timeout)
            if self._failure is not None or not self._complete:
                self._raise_if_unusable()
            return self._complete

    # ---------------------------------------------------------------- the follower thread

    def _follow(self) -> None:
        try:
            try:
                for ev in self._events:
                    kind = ev.WhichOneof("event")
                    if kind == "ready":
                        self._on_ready(ev.ready)
                    elif kind == "progress":
                        self._progress(Progress.from_pb(ev.progress))
                    elif kind == "manifest":
                        self._on_commit(ev.manifest)
                        return
                raise DaemonUnavailableError(
                    f"the daemon ended the download of model {self.label} without its committed manifest"
                )
            except grpc.RpcError as exc:
                err = self._error_of(exc)
                if err is not None:
                    raise err from None
        except WeightcacheError as exc:
            self._fail(exc)
        except Exception as exc:  # noqa: BLE001 - a bug here must still wake every waiter
            self._fail(InternalError(f"following the download of model {self.label}: {type(exc).__name__}: {exc}"))
        finally:
            if self._on_end is not None:
                self._on_end()

    def _progress(self, p: Progress) -> None:
        if self._on_progress is None:
            return
        try:
            self._on_progress(p)
        except Exception:  # noqa: BLE001 - the caller's callback, on our thread: nobody to raise it to
            # A broken progress display must not break the model: stop calling it, go on.
            self._on_progress = None

    def _error_of(self, exc: grpc.RpcError) -> WeightcacheError | None:
        """What a failed call means for the handles; None when we cancelled it ourselves."""
        with self._cond:
            if self._closed:
                return None
        code, details = exc.code(), exc.details() or ""
        if code == grpc.StatusCode.DATA_LOSS:
            return CorruptedError(f"verification of model {self.label} failed: {details}; nothing was published")
        if code == grpc.StatusCode.CANCELLED and "Channel closed" in details:
            return DaemonUnavailableError(
                f"the client was closed while model {self.label} was downloading: close the model (or wait for "
                "wait_complete()) before its client"
            )
        err = from_rpc_error(exc)
        if isinstance(err, DaemonUnavailableError) or code == grpc.StatusCode.CANCELLED:
            # CANCELLED that this side did not ask for: the daemon (or the channel) ended the call.
            return DaemonUnavailableError(f"daemon went away while model {self.label} was downloading: {details}")
        return type(err)(f"download of model {self.label} failed: {details}")

    def _on_ready(self, r: pb.Readiness) -> None:
        with self._cond:
            for f in r.files:
                size = self._sizes.get(f.path)
                flat = list(f.ranges)
                if size is None or len(flat) % 2:
                    raise InternalError(
                        f"readiness of model {self.label}: file {f.path!r} is not in the manifest or its ranges "
                        f"are not [start, end) pairs"
                    )
                new = [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
                if any(s >= e or e > size for s, e in new) or any(a[1] > b[0] for a, b in pairwise(new)):
                    raise InternalError(
                        f"readiness of model {self.label}: ranges of {f.path} are not sorted, disjoint and inside "
                        f"its {size} bytes"
                    )
                # Ranges replace the earlier ones and only ever grow: a range withdrawn means the
                # bytes behind it changed (the file restarted at a new source version), and what
                # a reader already took from it may be stale.
                if not all(covered(new, s, e) for s, e in self._ranges[f.path]):
                    raise CorruptedError(
                        f"file {f.path} of model {self.label}: bytes reported on disk were withdrawn (the file "
                        "changed at the source while it was being read); bytes already read may be stale"
                    )
                self._ranges[f.path] = new
            self.bytes_ready, self.bytes_total = r.bytes_ready, r.bytes_total or self.bytes_total
            self._cond.notify_all()

    def _on_commit(self, m: pb.Manifest) -> None:
        if m.early:
            raise InternalError(f"the daemon sent a second early manifest for model {self.label}")
        committed = Manifest.from_pb(m)
        had = self._manifest
        if [(f.path, f.size) for f in committed.files] != [(f.path, f.size) for f in had.files] or (
            committed.tensors != had.tensors
        ):
            raise CorruptedError(
                f"the committed manifest of model {self.label} ({committed.snapshot_id}) has other files or tensors "
                f"than the one it was opened with ({had.snapshot_id}); bytes already read may not be its bytes"
            )
        with self._cond:
            self._manifest = committed
            self._complete = True
            self.bytes_ready = self.bytes_total
            self._cond.notify_all()

    def _fail(self, exc: WeightcacheError) -> None:
        with self._cond:
            if not self._complete and self._failure is None:
                self._failure = exc
            self._cond.notify_all()
        if self._failure is exc:
            self._cancel()  # a stream we stopped reading (a bad event) must not stay open

    def close(self) -> None:
        """Stop following (the daemon keeps downloading); every waiter wakes and raises."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            running = not (self._complete or self._failure is not None)
            self._cond.notify_all()
        if running:
            self._cancel()


class FollowingBacking:
    """What both early backings share: readiness and completion from their ``EarlyDownload``."""

    def __init__(self, download: EarlyDownload) -> None:
        self.download = download

    @property
    def manifest(self) -> Manifest:
        """The early manifest, the committed one once complete."""
        return self.download.manifest

    def ready(self, file: str, offset: int, length: int) -> bool:
        return self.download.ready(file, offset, length)

    def wait_ready(self, file: str, offset: int, length: int, timeout: float | None = None) -> bool:
        return self.download.wait_ready(file, offset, length, timeout)

    def complete(self) -> bool:
        return self.download.complete()

    def wait_complete(self, timeout: float | None = None) -> bool:
        return self.download.wait_complete(timeout)


class EarlyFiles(FollowingBacking):
    """Descriptors of files still being written, mapped like ``MappedFiles`` (which does the
    mapping and holds the lease); every read first waits for its range.

    ``connect`` opens an fd.sock connection. The provisional id is acquired; if the download
    committed in between (the id is gone), the committed id is acquired instead.
    """

    zero_copy = True

    def __init__(self, connect: Callable[[], FdConnection], download: EarlyDownload) -> None:
        super().__init__(download)
        sid = download.snapshot_id
        try:
            self._mapped = MappedFiles(connect(), sid)
        except NotFoundError:
            if not download.wait_complete(timeout=_COMMIT_GRACE) or download.snapshot_id == sid:
                raise
            self._mapped = MappedFiles(connect(), download.snapshot_id)

    def read_into(self, file: str, offset: int, dest: memoryview) -> None:
        self.download.wait_ready(file, offset, len(dest))
        self._mapped.read_into(file, offset, dest)

    def view(self, file: str, offset: int, length: int) -> memoryview:
        self.download.wait_ready(file, offset, length)
        return self._mapped.view(file, offset, length)

    def advise(self, file: str, offset: int, length: int) -> None:
        # Only what is on disk: readahead of unwritten bytes would cache zeros for nothing.
        for s, e in self.download.ready_parts(file, offset, length):
            self._mapped.advise(file, s, e - s)

    def prefault(self, file: str, offset: int, length: int) -> None:
        """``MappedFiles.prefault`` of a range once it is on disk."""
        self.download.wait_ready(file, offset, length)
        self._mapped.prefault(file, offset, length)

    def descriptors(self) -> Mapping[str, int] | None:
        return self._mapped.descriptors()

    def close(self) -> None:
        self.download.close()
        self._mapped.close()


class FetchedRanges(FollowingBacking):
    """Exactly the asked ranges over gRPC, into one private buffer per file; each range is
    fetched once (readers of different ranges fetch in parallel; two readers of one missing
    range may both fetch it, and write the same bytes). A buffer is an anonymous mapping of the
    file's size: only the pages of fetched ranges take memory.

    ``fetch(snapshot_id, path, offset, dest)`` fills ``dest`` with the bytes at ``offset``;
    the daemon answers once they are on disk. Unlike ``FetchedFiles`` (whole files), a file
    still being downloaded is read only as far as it is asked for.
    """

    zero_copy = False

    def __init__(self, download: EarlyDownload, fetch: Callable[[str, str, int, memoryview], None]) -> None:
        super().__init__(download)
        self._fetch = fetch
        self._sizes = {f.path: f.size for f in download.manifest.files}
        self._lock = threading.Lock()
        self._bufs: dict[str, mmap.mmap | bytearray] = {}
        self._have: dict[str, Ranges] = {p: [] for p in self._sizes}

    def ready(self, file: str, offset: int, length: int) -> bool:
        with self._lock:
            have = covered(self._have.get(file, []), offset, offset + length)
        return self.download.ready(file, offset, length) or have

    def _bytes(self, file: str, offset: int, length: int) -> memoryview:
        self.download.check_range(file, offset, length)
        end = offset + length
        with self._lock:
            buf = self._bufs.get(file)
            if buf is None:
                size = self._sizes[file]
                # Never closed explicitly: views handed out keep the mapping alive.
                buf = self._bufs[file] = mmap.mmap(-1, size) if size else bytearray()
            missing = _gaps(self._have[file], offset, end)
        for s, e in missing:
            self._fetch_range(file, s, memoryview(buf)[s:e])
            with self._lock:
                self._have[file] = merge(self._have[file], s, e)
        self.download.check()  # a download that failed meanwhile hands out nothing more
        return memoryview(buf)[offset:end]

    def _fetch_range(self, file: str, offset: int, dest: memoryview) -> None:
        sid = self.download.snapshot_id
        try:
            self._fetch(sid, file, offset, dest)
        except WeightcacheError as exc:
            self.download.check()  # the download's own failure says more than the read's
            # The provisional id ends when the download commits: read again by the content id.
            if not isinstance(exc, NotFoundError) or not self.download.wait_complete(timeout=_COMMIT_GRACE):
                raise
            if self.download.snapshot_id == sid:
                raise
            self._fetch(self.download.snapshot_id, file, offset, dest)

    def read_into(self, file: str, offset: int, dest: memoryview) -> None:
        dest[:] = self._bytes(file, offset, len(dest))

    def view(self, file: str, offset: int, length: int) -> memoryview:
        return self._bytes(file, offset, length)

    def advise(self, file: str, offset: int, length: int) -> None:
        pass

    def descriptors(self) -> Mapping[str, int] | None:
        return None

    def close(self) -> None:
        self.download.close()
        self._bufs = {}  # views handed out keep their buffers alive
