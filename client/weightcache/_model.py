"""A model handle: tensors of one snapshot, zero-copy over the shared page cache."""

from __future__ import annotations

import gc
import math
import mmap
import os
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._dtypes import torch_dtype, torch_module
from .errors import CorruptedError, NotFoundError
from .v1 import weightcache_pb2 as pb

if TYPE_CHECKING:
    from ._client import Client
    from ._fd import FdConnection

__all__ = ["FileInfo", "Layer", "Model", "TensorMeta"]


@dataclass(frozen=True, slots=True)
class FileInfo:
    path: str
    sha256: str
    size: int


@dataclass(frozen=True, slots=True)
class TensorMeta:
    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    length: int
    layer: str
    layer_index: int


@dataclass(frozen=True, slots=True)
class Layer:
    name: str
    index: int
    tensors: tuple[str, ...]
    nbytes: int


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


class _Backing:
    """Where a file's bytes come from: a private mapping (plus the descriptor, for copies that
    read straight into their destination), or private memory read over gRPC."""

    def __init__(self, size: int, buf: mmap.mmap | bytearray, fd: int = -1) -> None:
        self.size = size
        self.buf = buf
        self.fd = fd

    def read_into(self, offset: int, dest: memoryview) -> None:
        """Copy bytes [offset, offset+len(dest)) into dest: pread from the page cache (one copy,
        kernel readahead when cold), or memcpy from private memory."""
        if self.fd < 0:
            dest[:] = memoryview(self.buf)[offset : offset + len(dest)]
            return
        done = 0
        while done < len(dest):
            n = os.preadv(self.fd, [dest[done:]], offset + done)
            if n <= 0:
                raise CorruptedError(f"file ended at {offset + done}, expected {offset + len(dest)}")
            done += n

    def advise(self, offset: int, length: int) -> None:
        if self.fd >= 0:
            os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Model:
    """Returned by ``Client.open``. Use as a context manager or call ``close()``.

    Tensors from ``get_tensor``/``state_dict`` stay valid after close (their mapping is
    kept alive by the tensors themselves); close gives the lease back.
    """

    def __init__(self, client: Client, manifest: pb.Manifest, fdconn: FdConnection | None) -> None:
        self._client = client
        self.manifest = manifest
        self.snapshot_id: str = manifest.snapshot_id
        self.name: str = manifest.model
        self.path: str = manifest.path
        self.files: list[FileInfo] = [FileInfo(f.path, f.sha256, f.size) for f in manifest.files]
        self._tensors: dict[str, TensorMeta] = {
            t.name: TensorMeta(t.name, t.file, t.dtype, tuple(t.shape), t.offset, t.length, t.layer, t.layer_index)
            for t in manifest.tensors
        }
        self._order = [t.name for t in manifest.tensors]
        self._fdconn = fdconn
        self._backings: dict[str, _Backing] = {}
        self._streams: weakref.WeakSet[Any] = weakref.WeakSet()
        self.zero_copy = fdconn is not None
        if fdconn is not None:
            granted = fdconn.acquire(self.snapshot_id)
            try:
                for g in granted:
                    if g.size == 0:
                        self._backings[g.path] = _Backing(0, bytearray())
                        os.close(g.fd)
                        continue
                    # MAP_PRIVATE: pages are shared with every process until one writes; a write
                    # makes a private copy, never touching the blob or another process.
                    mm = mmap.mmap(g.fd, g.size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
                    self._backings[g.path] = _Backing(g.size, mm, g.fd)
            except BaseException:
                for g in granted:
                    if g.path not in self._backings:
                        os.close(g.fd)
                for b in self._backings.values():
                    b.close()
                raise
        self._closed = False

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
            raise NotFoundError(f"tensor {name!r} is not in model {self.name or self.snapshot_id}") from None

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

    def _backing(self, path: str) -> _Backing:
        b = self._backings.get(path)
        if b is None:
            if self._fdconn is not None:
                raise NotFoundError(f"file {path!r} is not in snapshot {self.snapshot_id}")
            # Fallback: the whole file into private memory over ReadRange, once.
            size = next((f.size for f in self.files if f.path == path), None)
            if size is None:
                raise NotFoundError(f"file {path!r} is not in snapshot {self.snapshot_id}")
            buf = bytearray(size)
            self._client._read_file_into(self.snapshot_id, path, buf)
            b = self._backings[path] = _Backing(size, buf)
        return b

    def get_bytes(self, name: str) -> memoryview:
        """The raw bytes of a tensor (no torch needed)."""
        t = self.meta(name)
        b = self._backing(t.file)
        return memoryview(b.buf)[t.offset : t.offset + t.length]

    def get_tensor(self, name: str) -> Any:
        """A torch tensor viewing the shared pages (copy-on-write: writes stay in this process)."""
        t = self.meta(name)
        return self._tensor(t, self._backing(t.file))

    def _tensor(self, t: TensorMeta, b: _Backing) -> Any:
        torch = torch_module()
        dtype = torch_dtype(t.dtype)
        numel = math.prod(t.shape)
        if numel == 0:
            return torch.empty(t.shape, dtype=dtype)
        flat = torch.frombuffer(b.buf, dtype=dtype, count=numel, offset=t.offset)
        return flat.view(t.shape)

    def get_slice(self, name: str) -> _Slice:
        """Like safetensors' get_slice: index it (``model.get_slice(n)[0:128]``) to read only that part."""
        return _Slice(self, self.meta(name))

    def state_dict(self) -> dict[str, Any]:
        """Every tensor, zero-copy, in layer order."""
        with gc_paused():
            return {n: self.get_tensor(n) for n in self._order}

    def stream(
        self,
        device: Any = "cpu",
        prefetch: int = 2,
        copy: bool = True,
        layer_of: Callable[[str], str] | None = None,
        reuse: bool = False,
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield (layer group, {name: tensor}) in layer order, at most ``prefetch`` groups read ahead.

        On CUDA the bytes go through a ring of pinned staging buffers and non_blocking copies
        on a side stream; each group carries one event and the caller's stream waits on it
        only. On CPU each tensor is copied into fresh memory (``copy=False``: zero-copy views;
        ``reuse=True``: views into a ring of prefetch+1 reused buffers, valid until the next
        iteration, which spares the cost of first-touching fresh memory).
        ``layer_of`` overrides the grouping (tensor name -> group name).
        """
        from ._stream import LayerStream

        stream = LayerStream(self, self._groups(layer_of), device, prefetch, copy, reuse)
        self._streams.add(stream)
        return stream

    def _groups(self, layer_of: Callable[[str], str] | None) -> list[tuple[str, list[TensorMeta]]]:
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
        if self._closed:
            return
        self._closed = True
        for stream in list(self._streams):
            stream.close()  # stop readers before the descriptors they read go away
        if self._fdconn is not None:
            self._fdconn.close()
        for b in self._backings.values():
            b.close()
        self._backings = {}

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "zero-copy" if self.zero_copy else "streamed"
        return f"<weightcache.Model {self.name or '?'} snapshot={self.snapshot_id} tensors={len(self)} {mode}>"


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
