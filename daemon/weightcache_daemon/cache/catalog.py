"""The catalog: what the cache holds, read as records (``records.Manifest``, ``records.ModelView``)
for listing, showing and pinning.

Read-only over the index except for pinning; the records are immutable and edges/convert.py
turns them into wire messages.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace

from weightcache.contract.errors import NotFoundError
from weightcache_daemon.cache.leases import Leases
from weightcache_daemon.cache.naming import Names
from weightcache_daemon.records import Manifest, ModelRow, ModelView, Span, build_manifest, file_span
from weightcache_daemon.safetensors_format import TensorInfo
from weightcache_daemon.storage.blobs import BlobStore
from weightcache_daemon.storage.index import Index
from weightcache_daemon.storage.views import view_path

__all__ = ["MANIFESTS_KEPT", "Catalog"]

# Committed snapshots whose manifests are kept built (least recently used dropped). A snapshot
# id names its content, so a kept manifest never goes stale; one of 131,072 tensors took seconds
# of a client I/O thread to build, and every Ensure of it built it again.
MANIFESTS_KEPT = 8


class Catalog:
    def __init__(self, store: BlobStore, index: Index, leases: Leases, names: Names) -> None:
        self.store = store
        self.index = index
        self.leases = leases
        self.names = names
        self._kept: OrderedDict[str, Manifest] = OrderedDict()
        self._kept_lock = threading.Lock()
        self._building: dict[str, threading.Lock] = {}

    def manifest(self, snapshot_id: str, model: str = "", with_tensors: bool = True) -> Manifest:
        if not with_tensors:
            return self._build(snapshot_id, model, with_tensors)
        if self.index.snapshot_source(snapshot_id) is None:  # gone (evicted) since it was kept
            with self._kept_lock:
                self._kept.pop(snapshot_id, None)
            self.index.files(snapshot_id)  # raises its NotFoundError
        with self._kept_lock:
            lock = self._building.setdefault(snapshot_id, threading.Lock())
        with lock:  # one build per snapshot at a time: concurrent askers take the one built
            with self._kept_lock:
                kept = self._kept.get(snapshot_id)
                if kept is not None:
                    self._kept.move_to_end(snapshot_id)
            if kept is None:
                kept = self._build(snapshot_id, "", with_tensors)
                with self._kept_lock:
                    self._kept[snapshot_id] = kept
                    while len(self._kept) > MANIFESTS_KEPT:
                        self._kept.popitem(last=False)
        with self._kept_lock:
            if self._building.get(snapshot_id) is lock and not lock.locked():
                del self._building[snapshot_id]
        return replace(kept, model=model, path=self._view(snapshot_id, model))

    def _view(self, snapshot_id: str, model: str) -> str:
        names = self.index.models_of_snapshot(snapshot_id)
        view_model = model or (names[0].name if names else "")
        return str(view_path(self.store, view_model, snapshot_id)) if view_model else ""

    def _build(self, snapshot_id: str, model: str, with_tensors: bool) -> Manifest:
        files = self.index.files(snapshot_id)
        tensors: dict[str, Sequence[TensorInfo]] = {}
        if with_tensors:
            for f in files:
                if f.path.endswith(".safetensors"):
                    tensors[f.path] = self.index.tensors(f.sha256)
        source = self.index.snapshot_source(snapshot_id) or ""
        return build_manifest(model, snapshot_id, source, files, tensors, self._view(snapshot_id, model))

    def file_span(self, snapshot_id: str, path: str, offset: int, length: int) -> Span:
        """Bytes [offset, offset+length) of one file of a snapshot (length 0: to its end)."""
        return file_span(snapshot_id, self.index.files(snapshot_id), path, offset, length)

    def view(self, row: ModelRow) -> ModelView:
        files = self.index.files(row.snapshot_id)
        return ModelView(
            row,
            sum(f.size for f in files),
            len(files),
            self.leases.of(row.snapshot_id),
            str(view_path(self.store, row.name, row.snapshot_id)),
        )

    def list_models(self) -> list[ModelView]:
        return [self.view(r) for r in self.index.models()]

    def show(self, model: str) -> tuple[ModelView | None, Manifest]:
        snapshot, row = self.names.resolve(model)
        return (self.view(row) if row else None), self.manifest(snapshot, row.name if row else "")

    def set_pin(self, model: str, pinned: bool) -> ModelView:
        _, row = self.names.resolve(model)
        if row is None:
            raise NotFoundError(f"snapshot {model} has no name to pin; pin a model name")
        self.index.set_pinned(row.name, pinned)
        new = self.index.model(row.name)
        assert new is not None
        return self.view(new)
