"""Records: the daemon's value types, shared by every package and importing none of them.

Index rows (files, models, filters), download keys and progress, manifests and the spans
read out of them, leases, readiness events, stats and downloads in flight. Services build and
pass these; none of them does I/O. This module imports only the standard library, the client
contract and ``safetensors_format`` (the tensor record), so any package may import it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from weightcache.contract.errors import InvalidInputError, NotFoundError
from weightcache.layers import default_layer_of, order_layers
from weightcache_daemon.safetensors_format import TensorInfo


@dataclass(frozen=True, slots=True)
class FileRow:
    path: str
    sha256: str
    size: int


@dataclass(frozen=True, slots=True)
class Filters:
    """The include/exclude patterns a model was fetched with. Stored as a JSON column; this
    record is what the rest of the daemon sees. `to_json()` is the one spelling written to
    the index and hashed into ingest directory names, so it must never change."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps({"include": list(self.include), "exclude": list(self.exclude)})

    @classmethod
    def from_json(cls, text: str) -> Filters:
        # An older or hand-written row may lack a key ('{}'): no patterns.
        d = json.loads(text)
        return cls(tuple(str(p) for p in d.get("include", ())), tuple(str(p) for p in d.get("exclude", ())))


@dataclass(frozen=True, slots=True)
class ModelRow:
    name: str
    source: str
    snapshot_id: str
    filters: Filters
    pinned: bool
    created: float
    last_used: float
    owner: str = "admin"  # who created the name: one of OWNERS
    # The namespace: "" for shared (admin, models.d, the default tenant) names; a declared
    # tenant's names are stored as "<tenant>:<name>" (qualified_name) with tenant set.
    tenant: str = ""


def qualified_name(tenant: str, name: str) -> str:
    """The index key of `name` in `tenant`'s namespace. ':' is never part of a model name
    (naming.check_name), so a tenant's key can never equal a shared name or another tenant's."""
    return f"{tenant}:{name}" if tenant else name


def split_name(key: str) -> tuple[str, str]:
    """(tenant, name) of an index key; ("", key) for a shared name."""
    tenant, sep, name = key.partition(":")
    return (tenant, name) if sep else ("", key)


@dataclass(frozen=True, slots=True)
class NewFile:
    path: str
    sha256: str
    size: int
    tensors: tuple[TensorInfo, ...]


@dataclass(frozen=True)
class JobKey:
    uri: str
    include: tuple[str, ...]
    exclude: tuple[str, ...]

    @property
    def filters(self) -> Filters:
        return Filters(self.include, self.exclude)


@dataclass
class ProgressState:
    phase: str = "LISTING"
    bytes_done: int = 0
    bytes_total: int = 0
    files_done: int = 0
    files_total: int = 0
    bytes_per_second: float = 0.0
    current_file: str = ""


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
    early: bool = False  # files still being downloaded (early.py); snapshot_id is provisional


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


@dataclass(frozen=True, slots=True)
class Lease:
    token: int
    snapshot_id: str
    pid: int
    uid: int
    gid: int
    since: float
    size: int = 0  # bytes of the snapshot's files, for the lease quota
    tenant: str = ""  # the tenant whose socket it came in on ("" = the default tenant)


@dataclass(frozen=True, slots=True)
class Readiness:
    """An event for one reader: the files whose ranges grew since its previous event."""

    snapshot_id: str
    files: tuple[tuple[str, tuple[int, ...]], ...]  # (path, flat [start, end) pairs)
    bytes_ready: int
    bytes_total: int


@dataclass(frozen=True)
class Stats:
    models: int
    snapshots: int
    blobs: int
    logical_bytes: int
    stored_bytes: int
    bytes_downloaded: int
    active_downloads: int
    leases: int
    filesystem_free: int
    held_bytes: int
    capacity: int


@dataclass(frozen=True)
class ClientSockets:
    """One tenant's client socket directory and the identity (st_dev, st_ino) of the sockets
    this daemon bound there; 0 where one is not bound (yet). A checker compares them with what
    the path holds now: another process may have bound a socket at the same path since."""

    tenant: str  # "" for the single default tenant
    socket_dir: str
    device: int
    client_socket_inode: int
    fd_socket_inode: int


@dataclass(frozen=True)
class ActiveDownload:
    """A download in flight, for listings."""

    name: str
    source: str
    snapshot_id: str  # provisional, "" before the headers are known
    progress: ProgressState
    readers: int
    started_at: float


def build_manifest(
    model: str,
    snapshot_id: str,
    source: str,
    files: list[FileRow],
    tensors: dict[str, Sequence[TensorInfo]],
    path: str = "",
    early: bool = False,
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
        early=early,
    )
