"""model.stream(): layer groups read ahead in the background, bounded by ``prefetch``.

CPU: each group's bytes are read straight into freshly allocated tensors (pread from the
shared page cache), or handed out as
zero-copy views with ``copy=False``: where the backing maps its files, the reader faults
each group's pages in (``prefault``: read into the page cache in large requests and mapped,
piece by piece, like a copy) before handing it over, so the consumer computes on resident
pages while the next group is brought in.

Threads: every piece of a copy is one read (``READ_SPLIT`` bytes at most), and up to
``READ_THREADS`` reads are in flight, across groups: once the reader has submitted a group's
reads it hands the group to a second thread (``_hand_over``), which waits for them and hands
groups over in order, while the reader goes on to the next group within the ``prefetch``
bound. So no thread idles at the end of a group waiting for the slowest read of it, and the
loader keeps as many threads runnable as a disk or a busy CPU needs: on 2 CPUs with two other
processes spinning, 1.07 GB was copied in 0.79 s this way against 1.24 s with one thread per
CPU and a barrier at each group's end, for about the same CPU seconds per GB; with nothing
else running the two were alike (docs/benchmarks.md, "Load"). Views (``copy=False``)
are faulted in one group at a time: the first group's reads must not share the disk with the
next's.

CUDA: a ring of ``prefetch + 1`` pinned host buffers, each as large as the largest group.
The reader fills a slot (waiting first for that slot's previous H2D copy to finish); once
the slot's reads are done, the hand-over thread issues ``non_blocking`` copies on a side
stream and records one event per group. The
consumer's current stream waits on that event only, so layer i+1 is copied while layer i
computes; tensors are marked with ``record_stream`` for the caching allocator.

A model still downloading (an early open): the reader waits for exactly each group's byte
ranges, each piece of a copy read as soon as its own bytes are on disk; while a group's bytes
are still arriving, a later group that is wholly on disk is read meanwhile (see
``_start_early``; handed over in order all the same). ``__next__`` delivers the final group
only after ``backing.wait_complete()``, i.e. once every file is verified and committed; a
failed download raises at the next ``__next__`` and the final group is never delivered, so no
forward pass that uses every group can finish on bytes that fail verification.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from ._backing import Prefaulting, populate_write
from ._dtypes import torch_dtype, torch_module
from ._model import _file_ranges
from .contract.errors import InvalidInputError, WeightcacheError

if TYPE_CHECKING:
    from ._model import Model, TensorMeta

READ_SPLIT = 8 << 20  # bytes per parallel read
READ_THREADS = 8  # reads in flight, from the page cache or the disk

_DONE = object()


def _done(out: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    return out, None


# A piece of a group to read: (file, offset, length, destination); no destination for views,
# whose pieces are faulted in (prefault) rather than copied.
_Piece = tuple[str, int, int, memoryview | None]


@dataclass
class _Group:
    """A layer group being read: the pieces not submitted yet, the reads in flight, and what
    makes the group's tensors once they are done."""

    index: int
    pieces: deque[_Piece]
    futures: list[Future[None]]
    finish: Callable[[], tuple[dict[str, Any], Any]]


def _flat_u8(t: Any) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's storage."""
    torch = torch_module()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class LayerStream:
    """Iterator of (group name, {tensor name: tensor}). ``groups_read`` and ``groups_yielded``
    are public so the prefetch bound can be observed; ``close()`` stops the reader early."""

    def __init__(
        self,
        model: Model,
        groups: list[tuple[str, list[TensorMeta]]],
        device: Any,
        prefetch: int,
        copy: bool,
        reuse: bool = False,
    ) -> None:
        self._stop = threading.Event()  # first: __del__ relies on it even if __init__ fails
        if prefetch < 1:
            raise InvalidInputError(f"prefetch={prefetch}: must be at least 1")
        torch = torch_module()
        self.model = model
        self.groups = groups
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError):
            raise InvalidInputError(
                f"device {device!r}: not a torch device; give 'cpu', 'cuda', 'cuda:N' or a torch.device"
            ) from None
        self.prefetch = prefetch
        self.copy = copy
        self.reuse = reuse
        self.groups_read = 0
        self.groups_yielded = 0
        self.max_ahead = 0
        self._finished = False
        self._slots = threading.Semaphore(prefetch)
        self._queue: queue.Queue[Any] = queue.Queue()
        self._pool = ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="wc-read")
        self._cuda = self.device.type == "cuda"
        self._views_only = not copy and not self._cuda and not reuse
        backing = model.backing
        self._prefault = backing.prefault if self._views_only and isinstance(backing, Prefaulting) else None
        biggest = max((_packed_size(ts) for _, ts in groups), default=0)
        if self._cuda:
            if not torch.cuda.is_available():
                raise InvalidInputError(
                    f"device {self.device} requested but CUDA is not available (torch {torch.__version__}, "
                    f"{'a CPU-only build' if torch.version.cuda is None else 'no CUDA device visible'}); "
                    "stream to 'cpu', or run where a GPU is"
                )
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            self._side = torch.cuda.Stream(device=self.device)
            self._ring = [torch.empty(max(biggest, 1), dtype=torch.uint8, pin_memory=True) for _ in range(prefetch + 1)]
            self._ring_free: list[Any] = [None] * (prefetch + 1)
        elif self.device.type != "cpu":
            raise InvalidInputError(f"device {self.device}: stream() supports cpu and cuda")
        elif reuse:
            self._ring = [torch.empty(max(biggest, 1), dtype=torch.uint8) for _ in range(prefetch + 1)]
        # Groups whose reads are all submitted, in order, for _hand_over; then _DONE or the
        # reader's failure.
        self._submitted: queue.Queue[Any] = queue.Queue()
        self._begun: set[int] = set()  # groups the reader has started (for _hint_next)
        self._thread = threading.Thread(target=self._reader, name="wc-stream", daemon=True)
        self._handing = threading.Thread(target=self._hand_over, name="wc-stream-out", daemon=True)
        self._thread.start()
        self._handing.start()

    # ---------------------------------------------------------------- reader thread

    def _start(self, i: int, metas: list[TensorMeta]) -> _Group:
        """Group i's destinations, and its reads cut into READ_SPLIT pieces (not submitted)."""
        torch = torch_module()
        self._begun.add(i)
        spans: list[tuple[TensorMeta, memoryview | None]] = []
        finish: Callable[[], tuple[dict[str, Any], Any]]
        if self._cuda:
            slot = i % len(self._ring)
            if self._ring_free[slot] is not None:
                self._ring_free[slot].synchronize()  # that slot's previous H2D copy is finished
            staging = self._ring[slot]
            sview = _flat_u8(staging)
            layout = _layout(metas)
            spans = [(t, sview[p : p + t.length]) for t, p in layout if t.length]
            finish = partial(self._to_cuda, slot, layout)
        elif self.reuse:
            # Views into ring slot i % (prefetch+1). The reader refills a slot only after the
            # consumer asked for the group after the one it held, so a group's tensors stay
            # valid until the next iteration.
            staging = self._ring[i % len(self._ring)]
            layout = _layout(metas)
            spans = [(t, _flat_u8(staging[p : p + t.length])) for t, p in layout if t.length]
            out: dict[str, Any] = {}
            for t, p in layout:
                dtype = torch_dtype(t.dtype)
                out[t.name] = (staging[p : p + t.length].view(dtype).view(t.shape) if t.length
                               else torch.empty(t.shape, dtype=dtype))  # fmt: skip
            finish = partial(_done, out)
        elif self.copy:
            out = {}
            for t in metas:
                dst = torch.empty(t.shape, dtype=torch_dtype(t.dtype))
                if t.length:
                    spans.append((t, _flat_u8(dst)))
                out[t.name] = dst
            finish = partial(_done, out)
        else:  # views: only faulted in where the backing can, else only waited for (see _reader)
            if self._prefault is not None:
                spans = [(t, None) for t in metas if t.length]
            finish = partial(self._views, metas)
        pieces: deque[_Piece] = deque()
        for t, dest in spans:
            for o in range(0, t.length, READ_SPLIT):
                n = min(READ_SPLIT, t.length - o)
                pieces.append((t.file, t.offset + o, n, None if dest is None else dest[o : o + n]))
        return _Group(i, pieces, [], finish)

    def _submit_ready(self, g: _Group) -> None:
        """Queue every next piece of g whose bytes are on disk (all of them, unless the model is
        still downloading): a group's reading overlaps its download, and what is left once its
        last part lands is one piece. Several pieces in flight keep a cold disk busy."""
        backing = self.model.backing
        while g.pieces and backing.ready(*g.pieces[0][:3]):
            file, offset, length, dest = g.pieces.popleft()
            if dest is not None:
                g.futures.append(self._pool.submit(_copy_piece, backing.read_into, file, offset, dest))
                continue
            # Views: one prefault for the run of ready pieces that follow in the file (a whole
            # group, on a committed model), so that the kernel's readahead streams it: faulted
            # in piece by piece, a cold group took twice as long.
            end = offset + length
            while g.pieces and g.pieces[0][:2] == (file, end) and backing.ready(*g.pieces[0][:3]):
                end += g.pieces.popleft()[2]
            if self._prefault is not None:
                g.futures.append(self._pool.submit(self._prefault, file, offset, end - offset))

    def _finish(self, g: _Group) -> tuple[Any, ...]:
        for f in g.futures:
            f.result()
        out, event = g.finish()
        self.groups_read += 1
        self.max_ahead = max(self.max_ahead, self.groups_read - self.groups_yielded)
        return (self.groups[g.index][0], out, event)

    def _start_early(self, i: int, early: dict[int, _Group]) -> bool:
        """Group i's bytes are still downloading: start reading a later group whose bytes are
        all on disk (in layer-order downloads the final norm and the output head arrive right
        after the first layer; read at the end, they would put their read between the last byte
        and the result). True if one was started. Groups are still handed over in order, and a
        group read early holds one of the ``prefetch`` slots until it is. Ring buffers (CUDA
        staging, ``reuse=True``) only take groups up to groups_yielded + prefetch - 1, so the
        slots (i % (prefetch + 1)) of the groups in flight and of the one the consumer holds
        differ."""
        last = len(self.groups) - 1
        if self._cuda or self.reuse:
            last = min(last, self.groups_yielded + self.prefetch - 1)
        for j in range(i + 1, last + 1):
            if j in early or not self._ready(self.groups[j][1]):
                continue
            if not self._slots.acquire(blocking=False):
                return False
            try:
                g = early[j] = self._start(j, self.groups[j][1])
            except BaseException:
                self._slots.release()
                raise
            self._submit_ready(g)
            return True
        return False

    def _to_cuda(self, slot: int, layout: list[tuple[TensorMeta, int]]) -> tuple[dict[str, Any], Any]:
        """Issue the H2D copies of a group read into ring slot ``slot`` on the side stream."""
        torch = torch_module()
        staging = self._ring[slot]
        out: dict[str, Any] = {}
        with torch.cuda.stream(self._side):
            for t, p in layout:
                dst = torch.empty(t.shape, dtype=torch_dtype(t.dtype), device=self.device)
                if t.length:
                    dst.reshape(-1).view(torch.uint8).copy_(staging[p : p + t.length], non_blocking=True)
                out[t.name] = dst
            done = torch.cuda.Event()
            done.record(self._side)
        self._ring_free[slot] = done
        return out, done

    def _views(self, metas: list[TensorMeta]) -> tuple[dict[str, Any], Any]:
        return {t.name: self.model.get_tensor(t.name) for t in metas}, None

    def _advise(self, metas: list[TensorMeta]) -> None:
        """Ask the kernel to start reading a later group now (asynchronous readahead)."""
        for path, (start, end) in _file_ranges(metas).items():
            self.model.backing.advise(path, start, end - start)

    def _wait_on_disk(self, metas: list[TensorMeta]) -> bool:
        """Views on a backing without ``prefault``: until every byte of the group is on disk (immediate
        unless the model is still being downloaded); False if the stream was closed meanwhile.
        Waiting here in short steps, rather than inside ``get_tensor``, lets ``close()`` stop a
        reader that waits for bytes."""
        backing = self.model.backing
        for t in metas:
            while not backing.wait_ready(t.file, t.offset, t.length, timeout=0.1):
                if self._stop.is_set():
                    return False
        return True

    def _ready(self, metas: list[TensorMeta]) -> bool:
        backing = self.model.backing
        return all(backing.ready(t.file, t.offset, t.length) for t in metas)

    def _reader(self) -> None:
        backing = self.model.backing
        views = self._views_only
        wait_whole = views and self._prefault is None
        try:
            early: dict[int, _Group] = {}  # groups being read out of order, not handed over yet
            for i, (_name, metas) in enumerate(self.groups):
                g = early.pop(i, None)
                if g is None:
                    while not self._slots.acquire(timeout=0.1):
                        if self._stop.is_set():
                            return
                    if self._stop.is_set() or (wait_whole and not self._wait_on_disk(metas)):
                        return
                    g = self._start(i, metas)
                while True:
                    self._submit_ready(g)
                    if not g.pieces:
                        break
                    if not self._start_early(i, early):
                        file, offset, length, _ = g.pieces[0]
                        # In short steps, so close() stops a reader that waits for bytes.
                        if not backing.wait_ready(file, offset, length, timeout=0.1) and self._stop.is_set():
                            return
                if views:
                    for f in g.futures:  # one group at a time (see the module docstring)
                        f.result()
                self._submitted.put(g)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            self._submitted.put(exc)
        finally:
            self._submitted.put(_DONE)  # the end; after a failure or a stop too, so that _hand_over ends

    def _hand_over(self) -> None:
        """Wait for each submitted group's reads and hand the groups over in order; forward the
        end (or the reader's failure) after the last one."""
        while True:
            item = self._submitted.get()
            if not isinstance(item, _Group):
                self._queue.put(item)
                return
            try:
                self._queue.put(self._finish(item))
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
                self._queue.put(exc)
                return
            self._hint_next(item.index)

    def _hint_next(self, i: int) -> None:
        """Group i is in: if the reader has not started group i + 1 (all ``prefetch`` slots are
        held by groups the consumer has not taken), ask the kernel to read it meanwhile. Not
        for views: they are faulted in as the next group starts, and a hint would only add a
        second request for the same pages."""
        if self._views_only or i + 1 >= len(self.groups) or i + 1 in self._begun:
            return
        try:
            self._advise(self.groups[i + 1][1])
        except (OSError, WeightcacheError):
            pass  # closed or failed meanwhile: a hint; the reader's next read reports it

    # ---------------------------------------------------------------- consumer

    def __iter__(self) -> LayerStream:
        return self

    def __next__(self) -> tuple[str, dict[str, Any]]:
        backing = self.model.backing
        try:
            # A failed download raises here at every call, even with groups already read ahead.
            backing.wait_complete(timeout=0)
            if self._finished:
                raise StopIteration  # like a generator: once ended (or raised), it stays ended
            item = self._queue.get()
            if item is _DONE:
                self._finished = True
                self.close()
                raise StopIteration
            if isinstance(item, BaseException):
                raise item
            if self.groups_yielded + 1 == len(self.groups):
                # The final group: only on a verified, committed snapshot (raises if it failed).
                backing.wait_complete()
        except StopIteration:
            raise
        except BaseException:
            self._finished = True  # the failure is raised once here; the backing raises it again
            self.close()
            raise
        name, tensors, event = item
        if event is not None:
            torch = torch_module()
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in tensors.values():
                t.record_stream(current)
        self.groups_yielded += 1
        self._slots.release()
        return name, tensors

    def close(self) -> None:
        self._stop.set()
        self._slots.release()
        for t in (self._thread, self._handing):
            if t.is_alive() and threading.current_thread() is not t:
                t.join(timeout=30)
        self._pool.shutdown(wait=True)

    def __del__(self) -> None:
        self._stop.set()


def _copy_piece(read_into: Callable[[str, int, memoryview], None], file: str, offset: int, dest: memoryview) -> None:
    """Copy one piece, its destination's pages made first in one call rather than faulted one
    by one inside the copy (the same one fault per page; it saved a little CPU, within noise)."""
    populate_write(dest)
    read_into(file, offset, dest)


ALIGN = 64  # each tensor in a staging buffer starts aligned for any dtype view


def _layout(metas: list[TensorMeta]) -> list[tuple[TensorMeta, int]]:
    out, pos = [], 0
    for t in metas:
        out.append((t, pos))
        pos += -(-t.length // ALIGN) * ALIGN
    return out


def _packed_size(metas: list[TensorMeta]) -> int:
    return sum(-(-t.length // ALIGN) * ALIGN for t in metas)
