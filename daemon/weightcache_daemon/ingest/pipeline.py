"""The ingest pipeline of one job, as small named steps, run on the job's thread:

    list ──► skip known ──► admit ──► headers ──► download ──► verify (per file) ──► commit
     │          │             │          │            │              │                  │
     │          │             │          │            │              │   blobs into the store,
     │          │             │          │            │              │   one index transaction
     │          │             │          │            │   sha256 vs the source, safetensors
     │          │             │          │            │   header vs the one read first
     │          │             │          │   parts in layer order (engine.py), reported
     │          │             │          │   through one DownloadEvents object
     │          │             │   every header read: the early snapshot, the parts' ranks
     │          │   capacity admitted (and eviction) before the first byte
     │   objects already in the store (same object version, or the same bytes) are not fetched
     filters, file count and format checked before anything else

Nothing of a job is visible until the commit's index transaction; the registry (jobs.py)
removes the ingest directory on failure. Collaborators come in at construction (`Parts`):
the pipeline never reaches back into the registry except through `Publisher`.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import structlog

from weightcache.contract.errors import (
    CorruptedError,
    ExhaustedError,
    InternalError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
    WeightcacheError,
)
from weightcache_daemon.config import ClientLimits, Config
from weightcache_daemon.ingest.early import EarlyFile, EarlySnapshot
from weightcache_daemon.ingest.engine import BufferPool, HashedFile, IgnoredEvents, RateLimiter, download, ingest_name
from weightcache_daemon.ingest.globs import GlobCache
from weightcache_daemon.ingest.headers import read_headers
from weightcache_daemon.ingest.job import Job
from weightcache_daemon.ingest.layout import check_layout
from weightcache_daemon.ingest.ledger import Ledger
from weightcache_daemon.ingest.resume import load_committed, load_resume, save_resume
from weightcache_daemon.ingest.schedule import group_ranks, other_file_ranks, part_count, safetensors_ranks
from weightcache_daemon.observe.metrics import Metrics, source_label
from weightcache_daemon.records import FileRow, JobKey, NewFile, build_manifest
from weightcache_daemon.safetensors_format import TensorInfo, validate_file
from weightcache_daemon.sources import RemoteObject, Source
from weightcache_daemon.storage.blobs import BlobStore
from weightcache_daemon.storage.index import Index

__all__ = [
    "MAX_SNAPSHOT_FILES",
    "MAX_SNAPSHOT_TENSORS",
    "Admitter",
    "Parts",
    "Pipeline",
    "Publisher",
    "select",
    "snapshot_id_of",
    "store_error",
    "verify_file",
]

log = structlog.get_logger("weightcached.jobs")

# Tensors one snapshot may have (each file is bounded by safetensors_format.MAX_TENSORS): its
# manifest must fit one gRPC message, and the largest public checkpoints have ~150k.
MAX_SNAPSHOT_TENSORS = 262_144
# Files per model: one Acquire answers with all of them (paths in one frame, descriptors in
# batches), so the count is bounded where it enters (docs/security.md, "fd.sock bounds").
MAX_SNAPSHOT_FILES = 10_000
# Weight files in formats the store does not serve; a listing with these and no safetensors is refused.
NON_SAFETENSORS_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


class Admitter(Protocol):
    """Capacity admission (cache/admission.py): admit raises ExhaustedError or makes room."""

    def admit(self, job_id: int, label: str, need: int) -> None: ...

    def release(self, job_id: int) -> None: ...


class Publisher(Protocol):
    """The registry, told from the job's thread what becomes of the job's early snapshot."""

    def publish(self, job: Job, early: EarlySnapshot) -> None:
        """The ingest files exist at full size: clients may open the early snapshot."""

    def content_id(self, job: Job, snapshot: str) -> None:
        """The committed snapshot's id, before it exists in the index: the early readers'
        leases must protect it from the moment eviction can see it."""


@dataclass(frozen=True)
class Parts:
    """What every job's pipeline works with, built once by the registry."""

    cfg: Config
    store: BlobStore
    index: Index
    metrics: Metrics
    ledger: Ledger
    admitter: Admitter
    publisher: Publisher
    # A source for a URI (sources.open_source, kept clients); True: it may follow a Hugging Face
    # cache snapshot's links (admin jobs only).
    open_source: Callable[[str, bool], Source]
    pool: BufferPool
    limiter: RateLimiter
    # include/exclude come from clients: their compiled patterns are kept in a bounded cache.
    globs: GlobCache = field(default_factory=lambda: GlobCache(ClientLimits.glob_cache_size))


@dataclass(frozen=True)
class Listed:
    """The list step's answer: the objects to have, which are already stored, which to fetch."""

    objects: list[RemoteObject]
    known: dict[str, str]  # relpath -> sha256 of a blob already in the store
    todo: list[RemoteObject]
    expected: dict[str, str]  # relpath -> sha256 the source vouches for
    # relpath -> sha256 of objects in todo whose verified bytes a previous run of the job moved
    # into the store before it stopped short of the index transaction: not fetched again
    committed: dict[str, str]


@dataclass(frozen=True)
class Plan:
    """The headers step's answer: the early snapshot, each part's rank, the headers read."""

    early: EarlySnapshot
    priority: dict[str, list[int]]
    headers: dict[str, list[TensorInfo]]
    heads: dict[str, bytes]


_GLOBS = GlobCache(ClientLimits.glob_cache_size)
_LIMITS = ClientLimits()


def select(
    objects: list[RemoteObject], include: tuple[str, ...], exclude: tuple[str, ...], globs: GlobCache = _GLOBS
) -> list[RemoteObject]:
    def match(rel: str, patterns: tuple[str, ...]) -> bool:
        base = rel.rsplit("/", 1)[-1]
        return any(globs.match(rel, p) or globs.match(base, p) for p in patterns)

    return [o for o in objects if match(o.relpath, include) and not match(o.relpath, exclude)]


def snapshot_id_of(files: list[tuple[str, str]]) -> str:
    """Content id of a snapshot: same relative paths with the same bytes -> same id."""
    h = hashlib.sha256()
    for path, digest in sorted(files):
        h.update(f"{path}\0{digest}\n".encode())
    return h.hexdigest()[:32]


def store_error(exc: OSError, label: str) -> WeightcacheError:
    """An OSError from the store's filesystem, as the category an operator can act on."""
    where = f"store, while fetching model {label}: {exc.strerror or exc} ({exc.filename or 'no path'})"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ExhaustedError(f"no space left in the {where}")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PermissionDeniedError(f"cannot write the {where}")
    return InternalError(f"I/O error in the {where}")


def check_listing(
    key: JobKey, listed: list[RemoteObject], globs: GlobCache = _GLOBS, limits: ClientLimits = _LIMITS
) -> list[RemoteObject]:
    """The objects of a listing the job wants, or the error that names why there are none fit
    (the caller's globs echoed within `limits`: they come from clients)."""
    objects = select(listed, key.include, key.exclude, globs)
    echo = limits.echo
    if not objects:
        raise NotFoundError(
            f"source {key.uri}: no files match include {echo(key.include)} / exclude {echo(key.exclude)} "
            f"({len(listed)} object(s) listed)"
        )
    if len(objects) > MAX_SNAPSHOT_FILES:
        raise InvalidInputError(
            f"source {key.uri}: {len(objects)} files match include {echo(key.include)}; a model may have at "
            f"most {MAX_SNAPSHOT_FILES} (narrow it with include/exclude)"
        )
    # Only safetensors are validated, indexed and mapped: weights in any other format
    # (pytorch_model.bin, …) would publish a model with a config and no tensors.
    if not any(o.relpath.endswith(".safetensors") for o in objects):
        other = sorted(o.relpath for o in listed if o.relpath.endswith(NON_SAFETENSORS_WEIGHTS))
        if other:
            raise InvalidInputError(
                f"source {key.uri}: no safetensors weights; skipped {', '.join(other[:10])}"
                f"{f' (+{len(other) - 10} more)' if len(other) > 10 else ''}: weightcache serves only "
                "safetensors; convert them (transformers save_pretrained(..., safe_serialization=True), or "
                "safetensors.torch.save_file) and fetch again"
            )
    return objects


def verify_file(
    d: HashedFile, expected: str | None, header: list[TensorInfo] | None, label: str
) -> tuple[TensorInfo, ...]:
    """The verify step for one downloaded file: its sha256 against the source's checksum (when
    the source gave one), and a safetensors file validated and its header compared with the
    one read before the download (readers were given that one). Its tensors, or an error."""
    rel = d.obj.relpath
    if expected is not None and d.sha256 != expected:
        raise CorruptedError(
            f"file {rel} of model {label}: downloaded bytes hash to sha256:{d.sha256[:16]}… "
            f"but the source's checksum is sha256:{expected[:16]}… (corrupted in transit); nothing published"
        )
    if not rel.endswith(".safetensors"):
        return ()
    try:
        infos, _ = validate_file(str(d.path), f"file {rel} of model {label}")
    except InvalidInputError as exc:
        # Its header was read valid before the download: the bytes changed on the way.
        raise CorruptedError(
            f"{exc} (its header was valid when read before the download: corrupted in "
            "transit, or changed at the source); nothing published"
        ) from None
    if infos != header:
        raise CorruptedError(
            f"file {rel} of model {label}: the downloaded header differs from the "
            "one read before the download (corrupted in transit, or changed at the source); "
            "nothing published"
        )
    return tuple(infos)


class _JobEvents(IgnoredEvents):
    """What the engine reports, turned into the job's progress, its early snapshot's readiness,
    its resume record and the verify step."""

    def __init__(self, pipe: Pipeline, listed: Listed, plan: Plan) -> None:
        self.pipe, self.listed, self.plan = pipe, listed, plan
        self.job = pipe.job
        self.counter = pipe.parts.metrics.downloaded.labels(source_label(self.job.key.uri))
        self.tensors: dict[str, tuple[TensorInfo, ...]] = {}

    def started(self) -> None:
        self.pipe.parts.publisher.publish(self.job, self.plan.early)

    def received(self, n: int) -> None:
        self.counter.inc(n)
        self.job.add_fetched(n)
        self.pipe.parts.ledger.downloaded(n)

    def written(self, obj: RemoteObject, start: int, end: int) -> None:
        self.plan.early.mark(obj.relpath, start, end)

    def restarted(self, obj: RemoteObject) -> None:
        self.plan.early.revoke(obj.relpath)

    def resume_state(self, files: list[tuple[RemoteObject, str, list[int]]]) -> None:
        save_resume(self.pipe.ingest, self.job.record, self.pipe.parts.cfg.download.part_size, files)

    def hashed(self, f: HashedFile) -> None:
        rel, label = f.obj.relpath, self.job.label
        self.job.progress.current_file = rel
        infos = verify_file(f, self.listed.expected.get(rel), self.plan.headers.get(rel), label)
        if rel.endswith(".safetensors"):
            self.tensors[rel] = infos
        self.job.progress.files_done += 1
        log.info("fetch_file_verified", model=label, file=rel, bytes=f.obj.size, read_back=f.read_back,
                 restarts=f.restarts)  # fmt: skip


class Pipeline:
    """One job's way from a source URI to a committed snapshot id (on the job's thread)."""

    def __init__(self, parts: Parts, job: Job, ingest: Path, loop: asyncio.AbstractEventLoop) -> None:
        self.parts = parts
        self.job = job
        self.ingest = ingest  # made with the job's record when it was accepted
        self.loop = loop  # where the early snapshot wakes its readers

    def run(self) -> str:
        # Only an admin's job (cachectl, models.d, a repair) may read a Hugging Face cache snapshot's links.
        source = self.parts.open_source(self.job.key.uri, self.job.owner != "client")
        try:
            listed = self.list_source(source)
            self.admit(listed)
            try:
                plan = self.headers(source, listed)
                tensors = self.download(source, listed, plan)
                self.job.progress.phase = "COMMITTING"
                return self.commit(listed, tensors)
            finally:
                self.parts.admitter.release(self.job.id)
        finally:
            source.close()

    # ---------------------------------------------------------------- list

    def list_source(self, source: Source) -> Listed:
        """List and filter the source, and skip what the store has: the same object version
        fetched before, or (by the source's checksum) the same bytes under another name."""
        job, p = self.job, self.job.progress
        objects = check_listing(job.key, source.list(), self.parts.globs, self.parts.cfg.limits)
        check_layout(
            job.key.uri, objects, chosen=job.key.include != self.parts.cfg.include, filtered=bool(job.key.exclude)
        )
        p.files_total = len(objects)
        p.bytes_total = sum(o.size for o in objects)
        known: dict[str, str] = {}
        todo: list[RemoteObject] = []
        for o in objects:
            digest = self.parts.index.known_object(o.uri, o.version, o.size)
            if digest is not None and self.parts.store.has(digest):
                known[o.relpath] = digest
            else:
                todo.append(o)
        expected = source.expected_sha256(todo) if todo else {}
        for o in list(todo):
            digest = expected.get(o.relpath)
            if digest is not None and self._stored_with_records(o.relpath, digest):  # same bytes, another name
                known[o.relpath] = digest
                todo.remove(o)
        committed = {
            rel: digest
            for rel, digest in load_committed(self.ingest, job.key, todo).items()
            if self.parts.store.has(digest)
        }
        for o in objects:
            if o.relpath in known:
                p.bytes_done += o.size
                p.files_done += 1
        log.info("fetch_start", source=job.key.uri, model=job.label, files=len(objects), cached=len(known),
                 committed=len(committed), bytes=p.bytes_total)  # fmt: skip
        return Listed(objects, known, todo, expected, committed)

    def _stored_with_records(self, rel: str, digest: str) -> bool:
        """Whether the store has the blob and, for a safetensors file, the index its tensors: a
        blob that start-up adopted (a crash between a commit's moves and its index transaction)
        has no tensor records, and reused as it is it would publish a model without tensors."""
        if not self.parts.store.has(digest):
            return False
        return not rel.endswith(".safetensors") or bool(self.parts.index.tensors(digest))

    # ---------------------------------------------------------------- admit

    def admit(self, listed: Listed) -> None:
        """Protect the blobs the snapshot reuses, then admit the bytes still to fetch."""
        reused = frozenset(listed.known.values()) | frozenset(listed.committed.values())
        self.parts.ledger.protect(self.job.id, reused)  # before eviction can run
        self.parts.admitter.admit(self.job.id, self.job.label, sum(o.size for o in listed.todo))

    # ---------------------------------------------------------------- headers

    def headers(self, source: Source, listed: Listed) -> Plan:
        """Read every header not already in the index (a small ranged read each, all at once):
        a malformed file fails the job before its bytes are fetched. Build the snapshot's
        manifest under a provisional id, and rank each part by the first layer group that needs it."""
        job, cfg = self.job, self.parts.cfg
        tensors: dict[str, Sequence[TensorInfo]] = {}
        data_offset: dict[str, int] = {}
        heads: dict[str, bytes] = {}
        for rel, digest in listed.known.items():
            if rel.endswith(".safetensors"):
                tensors[rel] = self.parts.index.tensors(digest)
        shards = [o for o in listed.todo if o.relpath.endswith(".safetensors")]
        for rel, h in read_headers(source, shards, job.label, cfg.download.concurrency).items():
            data_offset[rel], tensors[rel], heads[rel] = h.data_offset, h.tensors, h.head
        early = self._early_snapshot(listed, tensors)
        priority = self._ranks(listed.todo, early, data_offset, heads)
        if not listed.todo:
            self.parts.publisher.publish(job, early)
        return Plan(early, priority, {rel: list(tensors[rel]) for rel in data_offset}, heads)

    def _early_snapshot(self, listed: Listed, tensors: dict[str, Sequence[TensorInfo]]) -> EarlySnapshot:
        job, store = self.job, self.parts.store
        files = sorted((FileRow(o.relpath, listed.known.get(o.relpath, ""), o.size) for o in listed.objects),
                       key=lambda f: f.path)  # fmt: skip
        manifest = build_manifest(job.label, EarlySnapshot.new_id(), job.key.uri, files, tensors, early=True)
        known = listed.known
        early_files = [
            EarlyFile(
                o.relpath,
                o.size,
                store.path(known[o.relpath]) if o.relpath in known else self.ingest / ingest_name(o.relpath),
            )
            for o in listed.objects
        ]
        first_group = [
            (t.file, t.info.offset, t.info.offset + t.info.length) for t in manifest.tensors if t.layer_index == 0
        ]
        metrics = self.parts.metrics

        def first() -> None:
            metrics.time_to_first_group.observe(time.time() - job.started)

        early = EarlySnapshot(manifest, early_files, first_group, self.loop, first)
        for rel in listed.known:
            early.mark_whole(rel)
        return early

    def _ranks(self, todo: list[RemoteObject], early: EarlySnapshot, data_offset: dict[str, int],
               heads: dict[str, bytes]) -> dict[str, list[int]]:  # fmt: skip
        manifest = early.manifest
        rank = group_ranks(manifest.layers)
        layer_of: dict[str, list[tuple[int, int, int]]] = {}
        for t in manifest.tensors:
            layer_of.setdefault(t.file, []).append((t.info.offset, t.info.offset + t.info.length, rank[t.layer_index]))
        last = max(rank, default=0) + 1  # bytes no tensor covers (none in a valid file)
        part = self.parts.cfg.download.part_size
        priority: dict[str, list[int]] = {}
        for o in todo:
            if o.relpath in data_offset:
                priority[o.relpath] = safetensors_ranks(
                    o.size, part, data_offset[o.relpath], layer_of.get(o.relpath, []), last, bool(heads[o.relpath])
                )
            else:  # configs, tokenizers: small, and a loader reads them first
                priority[o.relpath] = other_file_ranks(o.size, part)
        return priority

    # ---------------------------------------------------------------- download (and verify)

    def download(
        self, source: Source, listed: Listed, plan: Plan
    ) -> tuple[list[HashedFile], dict[str, tuple[TensorInfo, ...]]]:
        """Fetch what the store lacks, resuming parts a previous run wrote; each file is verified
        as soon as its hash is known (verify_file)."""
        job, cfg = self.job, self.parts.cfg
        fetch = [o for o in listed.todo if o.relpath not in listed.committed]
        resume = load_resume(self.ingest, job.key, fetch, cfg.download.part_size)
        if resume:
            log.info("fetch_resume", source=job.key.uri, model=job.label, parts=sum(len(v) for v in resume.values()))
        if not listed.todo:
            return [], {}
        job.progress.phase = "DOWNLOADING"
        ps = cfg.download.part_size
        for o in fetch:
            job.progress.bytes_done += sum(min(ps, o.size - i * ps) for i in resume.get(o.relpath, ()))
        events = _JobEvents(self, listed, plan)
        got = self._already_committed(listed, plan, events)
        if not fetch:
            events.started()
            return got, events.tensors
        got += download(
            source, fetch, self.ingest, cfg.download, self.parts.pool, self.parts.limiter, events, job.cancelled,
            resume=resume, priority=plan.priority if cfg.download.order == "layer" else None, heads=plan.heads,
        )  # fmt: skip
        return got, events.tensors

    def _already_committed(self, listed: Listed, plan: Plan, events: _JobEvents) -> list[HashedFile]:
        """The files a cut-short commit of a previous run moved into the store: verified again
        from their blobs as a download would be (their header against the one read), ready for
        early readers at once, and committed with the rest."""
        out: list[HashedFile] = []
        for o in listed.todo:
            digest = listed.committed.get(o.relpath)
            if digest is None:
                continue
            blob = self.parts.store.path(digest)
            plan.early.moved(o.relpath, blob)
            f = HashedFile(o, blob, digest, restarts=0, read_back=o.size)
            events.hashed(f)
            plan.early.mark_whole(o.relpath)
            self.job.progress.bytes_done += o.size
            out.append(f)
        return out

    # ---------------------------------------------------------------- commit

    def _in_store(self, d: HashedFile) -> bool:
        """Whether the file is its blob already (moved in by a previous run's cut-short commit)."""
        return d.path == self.parts.store.path(d.sha256)

    def seal(self, got: list[HashedFile]) -> None:
        """The content id is read back from the disk once nothing can change the files any more
        (made read-only, writers closed): a change that slipped in after the bytes were hashed
        on the way in fails the job here, before anything is published."""
        # Blobs a previous run moved in are sealed already (and re-hashed when start-up adopted them).
        changed = self.parts.store.seal([(d.path, d.sha256) for d in got if not self._in_store(d)])
        if not changed:
            return
        job = self.job
        self.parts.metrics.commit_mismatches.inc(len(changed))
        rel_of = {d.path: d.obj.relpath for d in got}
        want = {d.path: d.sha256 for d in got}
        for tmp, on_disk in changed:
            log.error("commit_hash_mismatch", model=job.label, file=rel_of[tmp], downloaded=want[tmp],
                      on_disk=on_disk)  # fmt: skip
        tmp, on_disk = changed[0]
        raise CorruptedError(
            f"file {rel_of[tmp]} of model {job.label} changed on disk after it was downloaded (downloaded "
            f"sha256:{want[tmp][:16]}…, on disk sha256:{on_disk[:16]}…; {len(changed)} file(s) changed); "
            "nothing published"
        )

    def commit(self, listed: Listed, fetched: tuple[list[HashedFile], dict[str, tuple[TensorInfo, ...]]]) -> str:
        """Blobs into the store, then one index transaction: only now is the snapshot visible."""
        job, store, index = self.job, self.parts.store, self.parts.index
        got, tensors = fetched
        by_rel = {d.obj.relpath: d for d in got}
        known_tensors = {rel: tuple(index.tensors(digest)) for rel, digest in listed.known.items()}
        total = sum(map(len, known_tensors.values())) + sum(map(len, tensors.values()))
        if total > MAX_SNAPSHOT_TENSORS:
            raise InvalidInputError(
                f"model {job.label} ({job.key.uri}): {total} tensors, more than the {MAX_SNAPSHOT_TENSORS} one "
                "snapshot may have (its manifest must fit one message); nothing published"
            )
        self.seal(got)
        # From here files move into the store: the record names their digests, so that a crash
        # before the index transaction below costs a re-check of their blobs, not a refetch.
        ps = self.parts.cfg.download.part_size
        save_resume(
            self.ingest, job.record, ps,
            [(d.obj, ingest_name(d.obj.relpath), list(range(part_count(d.obj.size, ps)))) for d in got],
            {d.obj.relpath: d.sha256 for d in got},
        )  # fmt: skip
        files: list[NewFile] = []
        for o in listed.objects:
            if o.relpath in listed.known:
                files.append(NewFile(o.relpath, listed.known[o.relpath], o.size, known_tensors[o.relpath]))
                continue
            d = by_rel[o.relpath]
            size = d.path.stat().st_size
            if size != d.obj.size:
                raise InvalidInputError(
                    f"file {o.relpath} of model {job.label}: expected {d.obj.size} bytes, got {size}"
                )
            if self._in_store(d):  # moved by a previous run (_already_committed)
                files.append(NewFile(o.relpath, d.sha256, d.obj.size, tensors.get(o.relpath, ())))
                continue
            if job.early is not None:
                job.early.moved(o.relpath, store.path(d.sha256))
            store.commit(d.path, d.sha256)
            files.append(NewFile(o.relpath, d.sha256, d.obj.size, tensors.get(o.relpath, ())))
        snapshot = snapshot_id_of([(f.path, f.sha256) for f in files])
        self.parts.publisher.content_id(job, snapshot)
        digests = {f.path: f.sha256 for f in files}
        index.add_snapshot(
            snapshot, job.key.uri, files, [(o.uri, o.version, o.size, digests[o.relpath]) for o in listed.objects]
        )
        log.info("fetch_done", source=job.key.uri, model=job.label, snapshot=snapshot, downloaded=job.fetched(),
                 files=len(files))  # fmt: skip
        return snapshot
