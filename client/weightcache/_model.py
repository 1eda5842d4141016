"""A model handle: tensors of one snapshot, zero-copy over the shared page cache."""

from __future__ import annotations

import gc
import math
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ._backing import Backing
from ._dtypes import torch_dtype, torch_module
from ._early import FollowingBacking
from ._pathdir import DescriptorDirectory
from ._records import FileInfo, Layer, Manifest, TensorMeta
from .contract.errors import InvalidInputError, NotFoundError, WeightcacheError

if TYPE_CHECKING:
    from ._stream import LayerStream

__all__ = ["FileInfo", "Layer", "Model", "TensorMeta"]


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause CPython's cyclic GC around bursts of long-lived allocations (a manifest's records,
    hundreds of tensors). With torch loaded, a full collection landing in the middle costs
    ~80 ms (measured in open()); these objects hold no cycles, so nothing is lost by waiting."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class Model:
    """Returned by ``Client.open``. Use as a context manager or call ``close()``.

    Tensors from ``get_tensor``/``state_dict`` stay valid after close (their mapping is
    kept alive by the tensors themselves); close gives the lease back.

    ``path`` is a directory that unmodified path-based loaders (transformers, vLLM) can open,
    on the host and inside a container that mounts only the socket directory alike: its
    entries are links to this process's descriptors (see ``_pathdir``). It lives until
    ``close()``; ``store_path`` is the daemon's snapshot view, which exists only where the
    store is visible (and is empty for a snapshot that no name points to).

    Opened while the daemon is still downloading (``manifest.early``), the handle is usable
    at once and each read waits for exactly its bytes: ``get_tensor``/``get_bytes``/``get_slice``
    for the tensor's range only, so their bytes may not be verified yet; ``stream()`` group by
    group, delivering the final group only once the snapshot is verified and committed;
    ``state_dict()`` and ``path`` for the whole verified snapshot. Once committed,
    ``snapshot_id``, ``manifest``, ``files`` and ``store_path`` are the committed ones. If
    verification fails, every later call raises CorruptedError (nothing was published); if the
    daemon goes away mid-download, DaemonUnavailableError. ``complete()`` and
    ``wait_complete()`` ask directly. A committed model is complete from the start.
    """

    def __init__(self, manifest: Manifest, backing: Backing) -> None:
        """A handle over ``manifest``'s tensors whose bytes come from ``backing``; the handle
        owns the backing (``close()`` closes it). ``Client.open`` builds both."""
        self._manifest = manifest
        # A backing that follows a download carries the committed manifest once there is one.
        self._following = backing if isinstance(backing, FollowingBacking) else None
        self.name: str = manifest.name
        self._tensors: dict[str, TensorMeta] = {t.name: t for t in manifest.tensors}
        self._order = [t.name for t in manifest.tensors]
        self._backing = backing
        self._streams: weakref.WeakSet[LayerStream] = weakref.WeakSet()
        self._pathdir: DescriptorDirectory | None = None
        self._pathdir_lock = threading.Lock()
        self._closed = False
        sequential = getattr(backing, "read_sequentially", None)
        if sequential is not None and self._following is None:
            sequential()  # committed files only (see MappedFiles.read_sequentially)
        if backing.zero_copy:
            self._hint_first_group()

    def _hint_first_group(self) -> None:
        """Queue the disk reads of the first layer group now, in the background: whatever reads
        first (a stream, a forward pass over the mapped tensors) starts there. From a cold page
        cache, touching mapped pages otherwise reads one readahead window per fault (128 KiB by
        default) and waits for it before the next.
        Only the first group: it is read next, while hinting the whole model could evict what
        was cached for a model larger than memory. WILLNEED only queues the reads, but queuing
        ~100 MiB takes tens of milliseconds, so open() does not wait for it."""
        if not self._order:
            return
        layer = self._tensors[self._order[0]].layer  # the group layers() and stream() give first
        ranges = _file_ranges([t for t in self._tensors.values() if t.layer == layer])

        def hint() -> None:
            for path, (start, end) in ranges.items():
                try:
                    self._backing.advise(path, start, end - start)
                except (OSError, WeightcacheError):
                    return  # closed or failed meanwhile: a hint, the next real read reports it

        threading.Thread(target=hint, name="wc-hint", daemon=True).start()

    @property
    def manifest(self) -> Manifest:
        """The manifest it was opened with; the committed one once an early open completed."""
        return self._following.manifest if self._following is not None else self._manifest

    @property
    def snapshot_id(self) -> str:
        """The snapshot's content id (a provisional id while the download is still running)."""
        return self.manifest.snapshot_id

    @property
    def store_path(self) -> str:
        return self.manifest.path

    @property
    def files(self) -> list[FileInfo]:
        return list(self.manifest.files)

    def complete(self) -> bool:
        """Whether every byte is downloaded, verified and committed (raises a failed download's error)."""
        return self._backing.complete()

    def wait_complete(self, timeout: float | None = None) -> bool:
        """Block until ``complete()``; False if ``timeout`` passed first (raises a failed download's error)."""
        return self._backing.wait_complete(timeout)

    @property
    def backing(self) -> Backing:
        """Where this handle's bytes come from (shared mapping, fetched memory, ...)."""
        return self._backing

    @property
    def zero_copy(self) -> bool:
        """True when tensors view the shared page cache (descriptors), False for private copies."""
        return self._backing.zero_copy

    # ---------------------------------------------------------------- paths

    @property
    def path(self) -> str:
        """A directory with every file of the snapshot, for path-based loaders (built once).
        Path-based loaders read everything, so an early open waits for the committed snapshot."""
        if not self._closed:
            self._backing.wait_complete()  # not under the lock: close() must be able to end the wait
        with self._pathdir_lock:
            if self._closed:
                raise InvalidInputError(
                    f"model {self.name or self.snapshot_id} is closed: its path went with its lease; open it again"
                )
            if self._pathdir is not None:
                return self._pathdir.path
            fds = self._backing.descriptors()
            if fds is None:
                # Read over gRPC: no descriptors to link to. The store's own view is the only
                # directory there is, and only where the store is visible.
                if self.store_path and os.path.isdir(self.store_path):
                    return self.store_path
                raise NotFoundError(
                    f"model {self.name or self.snapshot_id} was opened without descriptors (fallback), and the "
                    f"store's view {self.store_path or '(no name points to this snapshot)'} is not visible here; "
                    "mount the whole client socket directory (fd.sock included) to get a path"
                )
            self._pathdir = DescriptorDirectory(self.snapshot_id, fds)
            return self._pathdir.path

    # ---------------------------------------------------------------- metadata

    def keys(self) -> list[str]:
        """Tensor names in layer order."""
        return list(self._order)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __len__(self) -> int:
        return len(self._order)

    def meta(self, name: str) -> TensorMeta:
        try:
            return self._tensors[name]
        except KeyError:
            import difflib

            near = difflib.get_close_matches(str(name), self._tensors, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise NotFoundError(
                f"tensor {name!r} is not in model {self.name or self.snapshot_id} (model.keys() lists its "
                f"{len(self._tensors)} tensors){hint}"
            ) from None

    def layers(self) -> list[Layer]:
        """Layer groups in stream order."""
        groups: dict[str, list[TensorMeta]] = {}
        for n in self._order:
            t = self._tensors[n]
            groups.setdefault(t.layer, []).append(t)
        return [
            Layer(name, ts[0].layer_index, tuple(t.name for t in ts), sum(t.length for t in ts))
            for name, ts in groups.items()
        ]

    # ---------------------------------------------------------------- bytes and tensors

    def get_bytes(self, name: str) -> memoryview:
        """The raw bytes of a tensor (no torch needed)."""
        t = self.meta(name)
        return self._backing.view(t.file, t.offset, t.length)

    def get_tensor(self, name: str) -> Any:
        """A torch tensor viewing the shared pages (copy-on-write: writes stay in this process).

        While an early open downloads, this waits for the tensor's bytes only: they are on
        disk but may not be verified yet (``wait_complete()`` first if that matters)."""
        t = self.meta(name)
        torch = torch_module()
        dtype = torch_dtype(t.dtype)
        numel = math.prod(t.shape)
        if numel == 0:
            return torch.empty(t.shape, dtype=dtype)
        # The tensor keeps the view, and the view its mapping or buffer, alive after close().
        flat = torch.frombuffer(self._backing.view(t.file, t.offset, t.length), dtype=dtype, count=numel)
        return flat.view(t.shape)

    def get_slice(self, name: str) -> _Slice:
        """Like safetensors' get_slice: index it (``model.get_slice(n)[0:128]``) to read only that part."""
        return _Slice(self, self.meta(name))

    def state_dict(self) -> dict[str, Any]:
        """Every tensor, zero-copy, in layer order (of the verified snapshot: an early open
        waits for the download to be committed first)."""
        self._backing.wait_complete()
        with gc_paused():
            return {n: self.get_tensor(n) for n in self._order}

    def stream(
        self,
        device: Any = "cpu",
        prefetch: int = 2,
        copy: bool = True,
        layer_of: Callable[[str], str] | None = None,
        reuse: bool = False,
    ) -> LayerStream:
        """Yield (layer group, {name: tensor}) in layer order, at most ``prefetch`` groups read ahead.

        On CUDA the bytes go through a ring of pinned staging buffers and non_blocking copies
        on a side stream; each group carries one event and the caller's stream waits on it
        only. On CPU each tensor is copied into fresh memory (``copy=False``: zero-copy views,
        each group's pages read in and mapped before it is handed over; ``reuse=True``: views
        into a ring of prefetch+1 reused buffers, valid until the next iteration, which spares
        the cost of first-touching fresh memory).
        ``layer_of`` overrides the grouping (tensor name -> group name).
        """
        from ._stream import LayerStream

        stream = LayerStream(self, self.groups(layer_of), device, prefetch, copy, reuse)
        self._streams.add(stream)
        return stream

    def groups(self, layer_of: Callable[[str], str] | None = None) -> list[tuple[str, list[TensorMeta]]]:
        """(group name, its tensors' records) in stream order: the manifest's layer groups, or
        the groups ``layer_of`` (tensor name -> group name) makes, ordered like layers."""
        from .layers import order_layers

        if layer_of is None:
            return [(la.name, [self._tensors[n] for n in la.tensors]) for la in self.layers()]
        groups: dict[str, list[TensorMeta]] = {}
        for n in self._order:
            groups.setdefault(layer_of(n), []).append(self._tensors[n])
        return [(g, groups[g]) for g in order_layers(groups)]

    # ---------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Give the lease back. Tensors already handed out keep working."""
        with self._pathdir_lock:
            if self._closed:
                return
            self._closed = True
            if self._pathdir is not None:
                self._pathdir.close()  # before the descriptors it links to go away
                self._pathdir = None
        for stream in list(self._streams):
            stream.close()  # stop readers before the descriptors they read go away
        self._backing.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "zero-copy" if self.zero_copy else "streamed"
        return f"<weightcache.Model {self.name or '?'} snapshot={self.snapshot_id} tensors={len(self)} {mode}>"


def _file_ranges(metas: list[TensorMeta]) -> dict[str, tuple[int, int]]:
    """Per file, the [start, end) byte span covering these tensors."""
    out: dict[str, tuple[int, int]] = {}
    for t in metas:
        start, end = out.get(t.file, (t.offset, t.offset + t.length))
        out[t.file] = (min(start, t.offset), max(end, t.offset + t.length))
    return out


class _Slice:
    def __init__(self, model: Model, meta: TensorMeta) -> None:
        self._model = model
        self._meta = meta

    def get_shape(self) -> list[int]:
        return list(self._meta.shape)

    def get_dtype(self) -> str:
        return self._meta.dtype

    def __getitem__(self, index: Any) -> Any:
        return self._model.get_tensor(self._meta.name)[index]
