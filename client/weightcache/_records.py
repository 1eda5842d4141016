"""The client's own records: what ``ensure()``, ``list()``, ``open()`` and progress callbacks hand out.

Frozen dataclasses rather than the generated protobuf messages, so the public API does not
change shape when the wire contract gains a field, type checkers see real types, and a record
can be hashed, compared and kept after its connection is gone. The ``from_pb`` constructors
are the one place that knows both shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

from .v1 import weightcache_pb2 as pb

__all__ = ["FileInfo", "Layer", "Lease", "Manifest", "ModelInfo", "Progress", "TensorMeta"]


@dataclass(frozen=True, slots=True)
class FileInfo:
    """One file of a snapshot: its path inside the snapshot, sha256 (hex) and size in bytes."""

    path: str
    sha256: str
    size: int

    @classmethod
    def from_pb(cls, f: pb.FileEntry) -> FileInfo:
        return cls(f.path, f.sha256, f.size)


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """Where one tensor lives: ``file``, byte ``offset`` and ``length``, safetensors ``dtype``,
    ``shape``, and its layer group (``layer``, at position ``layer_index`` in layer order)."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    length: int
    layer: str
    layer_index: int

    @classmethod
    def from_pb(cls, t: pb.Tensor) -> TensorMeta:
        return cls(t.name, t.file, t.dtype, tuple(t.shape), t.offset, t.length, t.layer, t.layer_index)


@dataclass(frozen=True, slots=True)
class Layer:
    """A layer group in stream order: its tensors' names and their total bytes."""

    name: str
    index: int
    tensors: tuple[str, ...]
    nbytes: int


@dataclass(frozen=True, slots=True)
class Manifest:
    """What ``Client.ensure`` returns: a snapshot's files and tensor map.

    ``name`` is the name it was asked for by (empty for a snapshot id or an unnamed URI);
    ``path`` is the daemon's snapshot view on the host (visible only where the store is);
    ``tensors`` are in layer order, ``layers`` the group names in that order.

    ``early`` is True for an early answer (``open()``, ``ensure(verified=False)``) while the
    daemon is still downloading: ``snapshot_id`` is then a provisional id, valid only until the
    download ends, and files still downloading carry no sha256 yet. ``streaming`` is its
    former name, kept for callers written against it.
    """

    snapshot_id: str
    name: str
    source: str
    path: str
    files: tuple[FileInfo, ...]
    tensors: tuple[TensorMeta, ...]
    layers: tuple[str, ...]
    early: bool = False

    @property
    def streaming(self) -> bool:
        """Former name of ``early``."""
        return self.early

    @classmethod
    def from_pb(cls, m: pb.Manifest) -> Manifest:
        return cls(
            snapshot_id=m.snapshot_id,
            name=m.model,
            source=m.source,
            path=m.path,
            files=tuple(FileInfo.from_pb(f) for f in m.files),
            tensors=tuple(TensorMeta.from_pb(t) for t in m.tensors),
            layers=tuple(m.layers),
            early=m.early,
        )


@dataclass(frozen=True, slots=True)
class Lease:
    """A process holding a snapshot over fd.sock, as the kernel identified it."""

    snapshot_id: str
    pid: int
    uid: int
    gid: int
    since: float  # unix seconds

    @classmethod
    def from_pb(cls, le: pb.Lease) -> Lease:
        return cls(le.snapshot_id, le.pid, le.uid, le.gid, le.since)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """One named model in the cache (``Client.list``): ``size`` is logical bytes, times are
    unix seconds, ``path`` the snapshot view on the host."""

    name: str
    source: str
    snapshot_id: str
    size: int
    file_count: int
    pinned: bool
    created_at: float
    last_used_at: float
    leases: tuple[Lease, ...]
    path: str

    @classmethod
    def from_pb(cls, m: pb.ModelInfo) -> ModelInfo:
        return cls(
            name=m.name,
            source=m.source,
            snapshot_id=m.snapshot_id,
            size=m.size,
            file_count=m.file_count,
            pinned=m.pinned,
            created_at=m.created_at,
            last_used_at=m.last_used_at,
            leases=tuple(Lease.from_pb(le) for le in m.leases),
            path=m.path,
        )


@dataclass(frozen=True, slots=True)
class Progress:
    """A progress event of a download (``progress=`` callbacks).

    ``phase`` is one of ``PHASES`` ("listing", "downloading", "verifying", "committing",
    "done"; "" when the daemon did not say). ``bytes_total`` is 0 until the listing is done.
    """

    PHASES = ("listing", "downloading", "verifying", "committing", "done")

    phase: str
    bytes_done: int
    bytes_total: int
    files_done: int
    files_total: int
    bytes_per_second: float
    current_file: str

    @property
    def fraction(self) -> float:
        """bytes_done / bytes_total, 0.0 while the total is unknown."""
        return self.bytes_done / self.bytes_total if self.bytes_total else 0.0

    @classmethod
    def from_pb(cls, p: pb.Progress) -> Progress:
        phase = "" if p.phase == pb.Progress.PHASE_UNSPECIFIED else pb.Progress.Phase.Name(p.phase).lower()
        return cls(phase, p.bytes_done, p.bytes_total, p.files_done, p.files_total, p.bytes_per_second, p.current_file)
