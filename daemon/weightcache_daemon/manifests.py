"""What the cache holds, as records: a snapshot's manifest (files and tensor map in layer
order) and a model's view (size, files, leases, path), plus listing, showing and pinning.

Read-only over the index except for pinning; the records are immutable and convert.py turns
them into wire messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from weightcache.contract.errors import InvalidInputError, NotFoundError
from weightcache.layers import default_layer_of, order_layers

from .index import FileRow, Index, ModelRow
from .leases import Lease, Leases
from .safetensors_format import TensorInfo
from .store import LocalBlobStore
from .views import view_path

if TYPE_CHECKING:  # naming imports the jobs, which build manifests with this module
    from .naming import Names

__all__ = ["Catalog", "Manifest", "ModelView", "Span", "TensorEntry", "build_manifest", "layer_spans"]


@dataclass(frozen=True)
class TensorEntry:
    info: TensorInfo
    file: str
    layer: str
    layer_index: int


@dataclass(frozen=True)
class Manifest:
    model: str
    snapshot_id: str
    source: str
    files: list[FileRow]
    tensors: list[TensorEntry]
    layers: list[str]
    path: str
    streaming: bool = False  # files still being downloaded (live.py); snapshot_id is provisional


def file_span(snapshot_id: str, files: Sequence[FileRow], path: str, offset: int, length: int) -> Span:
    """Bytes [offset, offset+length) of one of a snapshot's files (length 0: to its end)."""
    f = next((f for f in files if f.path == path), None)
    if f is None:
        raise NotFoundError(f"file {path[:200]!r} is not in snapshot {snapshot_id}")
    length = length or max(f.size - offset, 0)
    if offset > f.size or offset + length > f.size:
        raise InvalidInputError(
            f"range [{offset}, {offset + length}) is outside file {f.path} of snapshot {snapshot_id} ({f.size} bytes)"
        )
    return Span(f.path, f.sha256, offset, length)


def build_manifest(
    model: str,
    snapshot_id: str,
    source: str,
    files: list[FileRow],
    tensors: dict[str, Sequence[TensorInfo]],
    path: str = "",
    streaming: bool = False,
) -> Manifest:
    """A manifest from files and each safetensors file's tensors: tensors grouped into layers
    (default_layer_of), in layer order, then file order, then offset."""
    entries: list[tuple[TensorInfo, str, str]] = []
    for f in files:
        entries.extend((t, f.path, default_layer_of(t.name)) for t in tensors.get(f.path, ()))
    layers = order_layers(e[2] for e in entries)
    pos = {name: i for i, name in enumerate(layers)}
    file_pos = {f.path: i for i, f in enumerate(files)}
    entries.sort(key=lambda e: (pos[e[2]], file_pos[e[1]], e[0].offset))
    return Manifest(
        model=model,
        snapshot_id=snapshot_id,
        source=source,
        files=files,
        tensors=[TensorEntry(t, fp, layer, pos[layer]) for t, fp, layer in entries],
        layers=layers,
        path=path,
        streaming=streaming,
    )


@dataclass(frozen=True)
class ModelView:
    row: ModelRow
    size: int
    file_count: int
    leases: list[Lease]
    path: str


@dataclass(frozen=True)
class Span:
    """A byte range of one blob to read out (ReadRange): a file range, or one tensor."""

    path: str
    sha256: str
    offset: int
    length: int
    tensor: str = ""


def layer_spans(m: Manifest, first: int, last: int) -> list[Span]:
    """The tensors of layers first..last (inclusive, layer order), one span each."""
    if first > last or last >= len(m.layers):
        raise InvalidInputError(
            f"layer range {first}..{last} is outside snapshot {m.snapshot_id}'s {len(m.layers)} layers"
        )
    digests = {f.path: f.sha256 for f in m.files}
    return [
        Span(t.file, digests[t.file], t.info.offset, t.info.length, t.info.name)
        for t in m.tensors
        if first <= t.layer_index <= last
    ]


class Catalog:
    def __init__(self, store: LocalBlobStore, index: Index, leases: Leases, names: Names) -> None:
        self.store = store
        self.index = index
        self.leases = leases
        self.names = names

    def manifest(self, snapshot_id: str, model: str = "", with_tensors: bool = True) -> Manifest:
        files = self.index.files(snapshot_id)
        tensors: dict[str, Sequence[TensorInfo]] = {}
        if with_tensors:
            for f in files:
                if f.path.endswith(".safetensors"):
                    tensors[f.path] = self.index.tensors(f.sha256)
        names = self.index.models_of_snapshot(snapshot_id)
        view_model = model or (names[0].name if names else "")
        path = str(view_path(self.store, view_model, snapshot_id)) if view_model else ""
        source = self.index.snapshot_source(snapshot_id) or ""
        return build_manifest(model, snapshot_id, source, files, tensors, path)

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
