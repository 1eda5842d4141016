from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FileEntry(_message.Message):
    __slots__ = ("path", "sha256", "size")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    path: str
    sha256: str
    size: int
    def __init__(self, path: _Optional[str] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("name", "file", "dtype", "shape", "offset", "length", "layer", "layer_index")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    LAYER_INDEX_FIELD_NUMBER: _ClassVar[int]
    name: str
    file: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    length: int
    layer: str
    layer_index: int
    def __init__(self, name: _Optional[str] = ..., file: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., layer: _Optional[str] = ..., layer_index: _Optional[int] = ...) -> None: ...

class Manifest(_message.Message):
    __slots__ = ("model", "snapshot_id", "source", "files", "tensors", "layers", "path", "early")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    EARLY_FIELD_NUMBER: _ClassVar[int]
    model: str
    snapshot_id: str
    source: str
    files: _containers.RepeatedCompositeFieldContainer[FileEntry]
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    layers: _containers.RepeatedScalarFieldContainer[str]
    path: str
    early: bool
    def __init__(self, model: _Optional[str] = ..., snapshot_id: _Optional[str] = ..., source: _Optional[str] = ..., files: _Optional[_Iterable[_Union[FileEntry, _Mapping]]] = ..., tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., layers: _Optional[_Iterable[str]] = ..., path: _Optional[str] = ..., early: _Optional[bool] = ...) -> None: ...

class Readiness(_message.Message):
    __slots__ = ("snapshot_id", "files", "bytes_ready", "bytes_total")
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    BYTES_READY_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    files: _containers.RepeatedCompositeFieldContainer[FileReady]
    bytes_ready: int
    bytes_total: int
    def __init__(self, snapshot_id: _Optional[str] = ..., files: _Optional[_Iterable[_Union[FileReady, _Mapping]]] = ..., bytes_ready: _Optional[int] = ..., bytes_total: _Optional[int] = ...) -> None: ...

class FileReady(_message.Message):
    __slots__ = ("path", "ranges")
    PATH_FIELD_NUMBER: _ClassVar[int]
    RANGES_FIELD_NUMBER: _ClassVar[int]
    path: str
    ranges: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, path: _Optional[str] = ..., ranges: _Optional[_Iterable[int]] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("phase", "bytes_done", "bytes_total", "files_done", "files_total", "bytes_per_second", "current_file")
    class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        PHASE_UNSPECIFIED: _ClassVar[Progress.Phase]
        LISTING: _ClassVar[Progress.Phase]
        DOWNLOADING: _ClassVar[Progress.Phase]
        VERIFYING: _ClassVar[Progress.Phase]
        COMMITTING: _ClassVar[Progress.Phase]
        DONE: _ClassVar[Progress.Phase]
    PHASE_UNSPECIFIED: Progress.Phase
    LISTING: Progress.Phase
    DOWNLOADING: Progress.Phase
    VERIFYING: Progress.Phase
    COMMITTING: Progress.Phase
    DONE: Progress.Phase
    PHASE_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    FILES_DONE_FIELD_NUMBER: _ClassVar[int]
    FILES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FILE_FIELD_NUMBER: _ClassVar[int]
    phase: Progress.Phase
    bytes_done: int
    bytes_total: int
    files_done: int
    files_total: int
    bytes_per_second: float
    current_file: str
    def __init__(self, phase: _Optional[_Union[Progress.Phase, str]] = ..., bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ..., files_done: _Optional[int] = ..., files_total: _Optional[int] = ..., bytes_per_second: _Optional[float] = ..., current_file: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "source", "snapshot_id", "size", "file_count", "pinned", "created_at", "last_used_at", "leases", "path")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    FILE_COUNT_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_AT_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    name: str
    source: str
    snapshot_id: str
    size: int
    file_count: int
    pinned: bool
    created_at: float
    last_used_at: float
    leases: _containers.RepeatedCompositeFieldContainer[Lease]
    path: str
    def __init__(self, name: _Optional[str] = ..., source: _Optional[str] = ..., snapshot_id: _Optional[str] = ..., size: _Optional[int] = ..., file_count: _Optional[int] = ..., pinned: _Optional[bool] = ..., created_at: _Optional[float] = ..., last_used_at: _Optional[float] = ..., leases: _Optional[_Iterable[_Union[Lease, _Mapping]]] = ..., path: _Optional[str] = ...) -> None: ...

class Lease(_message.Message):
    __slots__ = ("snapshot_id", "pid", "uid", "gid", "since")
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    GID_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    pid: int
    uid: int
    gid: int
    since: float
    def __init__(self, snapshot_id: _Optional[str] = ..., pid: _Optional[int] = ..., uid: _Optional[int] = ..., gid: _Optional[int] = ..., since: _Optional[float] = ...) -> None: ...

class EnsureRequest(_message.Message):
    __slots__ = ("model", "name", "include", "exclude", "early")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_FIELD_NUMBER: _ClassVar[int]
    EARLY_FIELD_NUMBER: _ClassVar[int]
    model: str
    name: str
    include: _containers.RepeatedScalarFieldContainer[str]
    exclude: _containers.RepeatedScalarFieldContainer[str]
    early: bool
    def __init__(self, model: _Optional[str] = ..., name: _Optional[str] = ..., include: _Optional[_Iterable[str]] = ..., exclude: _Optional[_Iterable[str]] = ..., early: _Optional[bool] = ...) -> None: ...

class EnsureResponse(_message.Message):
    __slots__ = ("progress", "manifest", "ready")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    manifest: Manifest
    ready: Readiness
    def __init__(self, progress: _Optional[_Union[Progress, _Mapping]] = ..., manifest: _Optional[_Union[Manifest, _Mapping]] = ..., ready: _Optional[_Union[Readiness, _Mapping]] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("models", "downloads")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DOWNLOADS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    downloads: _containers.RepeatedCompositeFieldContainer[Download]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., downloads: _Optional[_Iterable[_Union[Download, _Mapping]]] = ...) -> None: ...

class Download(_message.Message):
    __slots__ = ("name", "source", "snapshot_id", "progress", "readers", "started_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    READERS_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    source: str
    snapshot_id: str
    progress: Progress
    readers: int
    started_at: float
    def __init__(self, name: _Optional[str] = ..., source: _Optional[str] = ..., snapshot_id: _Optional[str] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., readers: _Optional[int] = ..., started_at: _Optional[float] = ...) -> None: ...

class ReadRangeRequest(_message.Message):
    __slots__ = ("snapshot_id", "file", "layers", "chunk_size")
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    file: FileRange
    layers: LayerRange
    chunk_size: int
    def __init__(self, snapshot_id: _Optional[str] = ..., file: _Optional[_Union[FileRange, _Mapping]] = ..., layers: _Optional[_Union[LayerRange, _Mapping]] = ..., chunk_size: _Optional[int] = ...) -> None: ...

class FileRange(_message.Message):
    __slots__ = ("path", "offset", "length")
    PATH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    path: str
    offset: int
    length: int
    def __init__(self, path: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class LayerRange(_message.Message):
    __slots__ = ("first", "last")
    FIRST_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    first: int
    last: int
    def __init__(self, first: _Optional[int] = ..., last: _Optional[int] = ...) -> None: ...

class ReadRangeChunk(_message.Message):
    __slots__ = ("file", "file_offset", "tensor", "tensor_offset", "data")
    FILE_FIELD_NUMBER: _ClassVar[int]
    FILE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    TENSOR_OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    file: str
    file_offset: int
    tensor: str
    tensor_offset: int
    data: bytes
    def __init__(self, file: _Optional[str] = ..., file_offset: _Optional[int] = ..., tensor: _Optional[str] = ..., tensor_offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class PrefetchRequest(_message.Message):
    __slots__ = ("uri", "name", "pin", "include", "exclude")
    URI_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_FIELD_NUMBER: _ClassVar[int]
    uri: str
    name: str
    pin: bool
    include: _containers.RepeatedScalarFieldContainer[str]
    exclude: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, uri: _Optional[str] = ..., name: _Optional[str] = ..., pin: _Optional[bool] = ..., include: _Optional[_Iterable[str]] = ..., exclude: _Optional[_Iterable[str]] = ...) -> None: ...

class PrefetchResponse(_message.Message):
    __slots__ = ("progress", "model")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    model: ModelInfo
    def __init__(self, progress: _Optional[_Union[Progress, _Mapping]] = ..., model: _Optional[_Union[ModelInfo, _Mapping]] = ...) -> None: ...

class EvictRequest(_message.Message):
    __slots__ = ("models", "all_unpinned", "dry_run", "force")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    ALL_UNPINNED_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedScalarFieldContainer[str]
    all_unpinned: bool
    dry_run: bool
    force: bool
    def __init__(self, models: _Optional[_Iterable[str]] = ..., all_unpinned: _Optional[bool] = ..., dry_run: _Optional[bool] = ..., force: _Optional[bool] = ...) -> None: ...

class EvictResponse(_message.Message):
    __slots__ = ("models", "snapshots", "blobs", "bytes_freed", "dry_run")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    BLOBS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FREED_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedScalarFieldContainer[str]
    snapshots: _containers.RepeatedScalarFieldContainer[str]
    blobs: _containers.RepeatedScalarFieldContainer[str]
    bytes_freed: int
    dry_run: bool
    def __init__(self, models: _Optional[_Iterable[str]] = ..., snapshots: _Optional[_Iterable[str]] = ..., blobs: _Optional[_Iterable[str]] = ..., bytes_freed: _Optional[int] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class PinRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ShowRequest(_message.Message):
    __slots__ = ("model", "tensors")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    model: str
    tensors: bool
    def __init__(self, model: _Optional[str] = ..., tensors: _Optional[bool] = ...) -> None: ...

class ShowResponse(_message.Message):
    __slots__ = ("model", "manifest", "download")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    DOWNLOAD_FIELD_NUMBER: _ClassVar[int]
    model: ModelInfo
    manifest: Manifest
    download: Download
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ..., manifest: _Optional[_Union[Manifest, _Mapping]] = ..., download: _Optional[_Union[Download, _Mapping]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("models", "snapshots", "blobs", "logical_bytes", "stored_bytes", "bytes_downloaded", "active_downloads", "leases", "cache_dir", "max_size", "filesystem_free", "held_bytes", "client_sockets")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    BLOBS_FIELD_NUMBER: _ClassVar[int]
    LOGICAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    STORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    BYTES_DOWNLOADED_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_DOWNLOADS_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    CACHE_DIR_FIELD_NUMBER: _ClassVar[int]
    MAX_SIZE_FIELD_NUMBER: _ClassVar[int]
    FILESYSTEM_FREE_FIELD_NUMBER: _ClassVar[int]
    HELD_BYTES_FIELD_NUMBER: _ClassVar[int]
    CLIENT_SOCKETS_FIELD_NUMBER: _ClassVar[int]
    models: int
    snapshots: int
    blobs: int
    logical_bytes: int
    stored_bytes: int
    bytes_downloaded: int
    active_downloads: int
    leases: int
    cache_dir: str
    max_size: int
    filesystem_free: int
    held_bytes: int
    client_sockets: _containers.RepeatedCompositeFieldContainer[ClientSockets]
    def __init__(self, models: _Optional[int] = ..., snapshots: _Optional[int] = ..., blobs: _Optional[int] = ..., logical_bytes: _Optional[int] = ..., stored_bytes: _Optional[int] = ..., bytes_downloaded: _Optional[int] = ..., active_downloads: _Optional[int] = ..., leases: _Optional[int] = ..., cache_dir: _Optional[str] = ..., max_size: _Optional[int] = ..., filesystem_free: _Optional[int] = ..., held_bytes: _Optional[int] = ..., client_sockets: _Optional[_Iterable[_Union[ClientSockets, _Mapping]]] = ...) -> None: ...

class ClientSockets(_message.Message):
    __slots__ = ("tenant", "socket_dir", "device", "client_socket_inode", "fd_socket_inode")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SOCKET_DIR_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_SOCKET_INODE_FIELD_NUMBER: _ClassVar[int]
    FD_SOCKET_INODE_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    socket_dir: str
    device: int
    client_socket_inode: int
    fd_socket_inode: int
    def __init__(self, tenant: _Optional[str] = ..., socket_dir: _Optional[str] = ..., device: _Optional[int] = ..., client_socket_inode: _Optional[int] = ..., fd_socket_inode: _Optional[int] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("model", "repair")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REPAIR_FIELD_NUMBER: _ClassVar[int]
    model: str
    repair: bool
    def __init__(self, model: _Optional[str] = ..., repair: _Optional[bool] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    result: VerifyResult
    def __init__(self, progress: _Optional[_Union[Progress, _Mapping]] = ..., result: _Optional[_Union[VerifyResult, _Mapping]] = ...) -> None: ...

class VerifyResult(_message.Message):
    __slots__ = ("blobs_checked", "bytes_checked", "corrupt", "missing", "repaired", "quarantined", "damaged")
    BLOBS_CHECKED_FIELD_NUMBER: _ClassVar[int]
    BYTES_CHECKED_FIELD_NUMBER: _ClassVar[int]
    CORRUPT_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    REPAIRED_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_FIELD_NUMBER: _ClassVar[int]
    DAMAGED_FIELD_NUMBER: _ClassVar[int]
    blobs_checked: int
    bytes_checked: int
    corrupt: _containers.RepeatedScalarFieldContainer[str]
    missing: _containers.RepeatedScalarFieldContainer[str]
    repaired: _containers.RepeatedScalarFieldContainer[str]
    quarantined: _containers.RepeatedScalarFieldContainer[str]
    damaged: _containers.RepeatedCompositeFieldContainer[BlobUse]
    def __init__(self, blobs_checked: _Optional[int] = ..., bytes_checked: _Optional[int] = ..., corrupt: _Optional[_Iterable[str]] = ..., missing: _Optional[_Iterable[str]] = ..., repaired: _Optional[_Iterable[str]] = ..., quarantined: _Optional[_Iterable[str]] = ..., damaged: _Optional[_Iterable[_Union[BlobUse, _Mapping]]] = ...) -> None: ...

class BlobUse(_message.Message):
    __slots__ = ("sha256", "models", "paths")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    PATHS_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    models: _containers.RepeatedScalarFieldContainer[str]
    paths: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, sha256: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., paths: _Optional[_Iterable[str]] = ...) -> None: ...

class GCRequest(_message.Message):
    __slots__ = ("dry_run",)
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    dry_run: bool
    def __init__(self, dry_run: _Optional[bool] = ...) -> None: ...

class GCResponse(_message.Message):
    __slots__ = ("blobs", "ingests", "snapshots", "bytes_freed", "dry_run")
    BLOBS_FIELD_NUMBER: _ClassVar[int]
    INGESTS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FREED_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    blobs: _containers.RepeatedScalarFieldContainer[str]
    ingests: _containers.RepeatedScalarFieldContainer[str]
    snapshots: _containers.RepeatedScalarFieldContainer[str]
    bytes_freed: int
    dry_run: bool
    def __init__(self, blobs: _Optional[_Iterable[str]] = ..., ingests: _Optional[_Iterable[str]] = ..., snapshots: _Optional[_Iterable[str]] = ..., bytes_freed: _Optional[int] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class DoctorRequest(_message.Message):
    __slots__ = ("timeout_seconds",)
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    timeout_seconds: float
    def __init__(self, timeout_seconds: _Optional[float] = ...) -> None: ...

class DoctorResponse(_message.Message):
    __slots__ = ("checks",)
    CHECKS_FIELD_NUMBER: _ClassVar[int]
    checks: _containers.RepeatedCompositeFieldContainer[Check]
    def __init__(self, checks: _Optional[_Iterable[_Union[Check, _Mapping]]] = ...) -> None: ...

class Check(_message.Message):
    __slots__ = ("name", "status", "detail", "hint")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[Check.Status]
        PASS: _ClassVar[Check.Status]
        WARN: _ClassVar[Check.Status]
        FAIL: _ClassVar[Check.Status]
    STATUS_UNSPECIFIED: Check.Status
    PASS: Check.Status
    WARN: Check.Status
    FAIL: Check.Status
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    HINT_FIELD_NUMBER: _ClassVar[int]
    name: str
    status: Check.Status
    detail: str
    hint: str
    def __init__(self, name: _Optional[str] = ..., status: _Optional[_Union[Check.Status, str]] = ..., detail: _Optional[str] = ..., hint: _Optional[str] = ...) -> None: ...

class FdRequest(_message.Message):
    __slots__ = ("acquire", "release")
    ACQUIRE_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    acquire: AcquireRequest
    release: ReleaseRequest
    def __init__(self, acquire: _Optional[_Union[AcquireRequest, _Mapping]] = ..., release: _Optional[_Union[ReleaseRequest, _Mapping]] = ...) -> None: ...

class AcquireRequest(_message.Message):
    __slots__ = ("snapshot_id",)
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    def __init__(self, snapshot_id: _Optional[str] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("snapshot_id",)
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    def __init__(self, snapshot_id: _Optional[str] = ...) -> None: ...

class FdResponse(_message.Message):
    __slots__ = ("acquire", "release", "error", "more_fds")
    ACQUIRE_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MORE_FDS_FIELD_NUMBER: _ClassVar[int]
    acquire: AcquireResponse
    release: ReleaseResponse
    error: FdError
    more_fds: int
    def __init__(self, acquire: _Optional[_Union[AcquireResponse, _Mapping]] = ..., release: _Optional[_Union[ReleaseResponse, _Mapping]] = ..., error: _Optional[_Union[FdError, _Mapping]] = ..., more_fds: _Optional[int] = ...) -> None: ...

class AcquireResponse(_message.Message):
    __slots__ = ("snapshot_id", "files")
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    files: _containers.RepeatedCompositeFieldContainer[FileEntry]
    def __init__(self, snapshot_id: _Optional[str] = ..., files: _Optional[_Iterable[_Union[FileEntry, _Mapping]]] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("snapshot_id",)
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    def __init__(self, snapshot_id: _Optional[str] = ...) -> None: ...

class FdError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...
