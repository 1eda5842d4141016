"""Core records -> protobuf messages (the only place that knows both)."""

from __future__ import annotations

from weightcache.v1 import weightcache_pb2 as pb
from weightcache_daemon.cache.eviction import EvictPlan, GCPlan
from weightcache_daemon.records import (
    ActiveDownload,
    ClientSockets,
    Lease,
    Manifest,
    ModelView,
    ProgressState,
    Readiness,
    Stats,
)


def progress(p: ProgressState) -> pb.Progress:
    return pb.Progress(
        phase=pb.Progress.Phase.Value(p.phase),  # type: ignore[arg-type]
        bytes_done=p.bytes_done,
        bytes_total=p.bytes_total,
        files_done=p.files_done,
        files_total=p.files_total,
        bytes_per_second=p.bytes_per_second,
        current_file=p.current_file,
    )


def manifest(m: Manifest) -> pb.Manifest:
    return pb.Manifest(
        model=m.model,
        snapshot_id=m.snapshot_id,
        source=m.source,
        files=[pb.FileEntry(path=f.path, sha256=f.sha256, size=f.size) for f in m.files],
        tensors=[
            pb.Tensor(
                name=t.info.name,
                file=t.file,
                dtype=t.info.dtype,
                shape=list(t.info.shape),
                offset=t.info.offset,
                length=t.info.length,
                layer=t.layer,
                layer_index=t.layer_index,
            )
            for t in m.tensors
        ],
        layers=m.layers,
        path=m.path,
        early=m.early,
    )


def readiness(r: Readiness) -> pb.Readiness:
    return pb.Readiness(
        snapshot_id=r.snapshot_id,
        files=[pb.FileReady(path=path, ranges=list(ranges)) for path, ranges in r.files],
        bytes_ready=r.bytes_ready,
        bytes_total=r.bytes_total,
    )


def download(d: ActiveDownload) -> pb.Download:
    return pb.Download(
        name=d.name,
        source=d.source,
        snapshot_id=d.snapshot_id,
        progress=progress(d.progress),
        readers=d.readers,
        started_at=d.started_at,
    )


def lease(le: Lease) -> pb.Lease:
    return pb.Lease(snapshot_id=le.snapshot_id, pid=le.pid, uid=le.uid, gid=le.gid, since=le.since)


def model(v: ModelView, with_leases: bool = True) -> pb.ModelInfo:
    r = v.row
    return pb.ModelInfo(
        name=r.name,
        source=r.source,
        snapshot_id=r.snapshot_id,
        size=v.size,
        file_count=v.file_count,
        pinned=r.pinned,
        created_at=r.created,
        last_used_at=r.last_used,
        leases=[lease(le) for le in v.leases] if with_leases else [],
        path=v.path,
    )


def stats(s: Stats, cache_dir: str, client_sockets: list[ClientSockets]) -> pb.StatsResponse:
    return pb.StatsResponse(
        models=s.models,
        snapshots=s.snapshots,
        blobs=s.blobs,
        logical_bytes=s.logical_bytes,
        stored_bytes=s.stored_bytes,
        bytes_downloaded=s.bytes_downloaded,
        active_downloads=s.active_downloads,
        leases=s.leases,
        cache_dir=cache_dir,
        max_size=s.capacity,
        held_bytes=s.held_bytes,
        filesystem_free=s.filesystem_free,
        client_sockets=[
            pb.ClientSockets(
                tenant=c.tenant,
                socket_dir=c.socket_dir,
                device=c.device,
                client_socket_inode=c.client_socket_inode,
                fd_socket_inode=c.fd_socket_inode,
            )
            for c in client_sockets
        ],
    )


def evict_plan(p: EvictPlan, dry_run: bool) -> pb.EvictResponse:
    return pb.EvictResponse(
        models=p.models, snapshots=p.snapshots, blobs=p.blobs, bytes_freed=p.bytes_freed, dry_run=dry_run
    )


def gc_plan(p: GCPlan, dry_run: bool) -> pb.GCResponse:
    return pb.GCResponse(
        blobs=p.orphans,
        ingests=[d.name for d in p.stale_ingests],
        snapshots=p.snapshots,
        bytes_freed=p.bytes_freed,
        dry_run=dry_run,
    )
