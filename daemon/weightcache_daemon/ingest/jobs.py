"""Download jobs: one per (source URI, filters), shared by every caller (docs/architecture.md, decision 8).

A job is accepted once its record (ingest/<job>/state.json) is written: from then on a
crashed daemon resumes it at its next start. It lists the source, skips objects already in
the store (same object URI and version as a previous fetch), downloads the rest through the
engine, validates each safetensors file as soon as its hash is known, then commits: blobs
into the store, one index transaction for the snapshot, the model name. Nothing of a job is
visible until that transaction; on any failure its ingest directory is removed and the
store is as before.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from weightcache_daemon.ingest.engine import BufferPool, Downloaded, RateLimiter, download, ingest_name
from weightcache_daemon.ingest.globs import GlobCache
from weightcache_daemon.ingest.headers import read_headers
from weightcache_daemon.ingest.resume import IngestFile, IngestState
from weightcache_daemon.ingest.schedule import group_ranks, other_file_ranks, safetensors_ranks
from weightcache_daemon.observe.metrics import Metrics, source_label
from weightcache_daemon.records import FileRow, JobKey, NewFile, ProgressState, build_manifest
from weightcache_daemon.safetensors_format import TensorInfo, validate_file
from weightcache_daemon.sources import Clients, RemoteObject, Source, open_source
from weightcache_daemon.storage.blobs import LocalBlobStore
from weightcache_daemon.storage.index import Index

log = structlog.get_logger("weightcached.jobs")

TICK = 0.2  # seconds between progress events
MAX_JOBS = 8  # downloads running at once; more wait their turn
# Tensors one snapshot may have (each file is bounded by safetensors_format.MAX_TENSORS): its
# manifest must fit one gRPC message, and the largest public checkpoints have ~150k.
MAX_SNAPSHOT_TENSORS = 262_144
# Files per model: one Acquire answers with all of them (paths in one frame, descriptors in
# batches), so the count is bounded where it enters (docs/security.md, "fd.sock bounds").
MAX_SNAPSHOT_FILES = 10_000


_JOB_IDS = itertools.count(1)


@dataclass
class Job:
    key: JobKey
    label: str
    pin: bool | None = None
    owner: str = "admin"  # who names the result (index.OWNERS); kept in the resume record
    # Reservations are keyed by this, not by the model name: two jobs for one name (other
    # filters, or a re-point) must not release each other's bytes.
    id: int = field(default_factory=lambda: next(_JOB_IDS))
    progress: ProgressState = field(default_factory=ProgressState)
    version: int = 0
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    result: asyncio.Future[str] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    cancelled: threading.Event = field(default_factory=threading.Event)
    bytes_fetched: int = 0
    started: float = field(default_factory=time.time)
    # Set (from the job's thread) once every header is known and the ingest files exist: from
    # then on clients may open the snapshot while it downloads (live.py). `live_set` wakes them.
    live: EarlySnapshot | None = None
    live_set: asyncio.Event = field(default_factory=asyncio.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    async def watch(self) -> Any:
        """Yield ProgressState copies until the job ends (coalesced: a slow reader skips events)."""
        seen = -1

        def moved() -> bool:
            return self.version != seen or self.result.done()

        while True:
            async with self.changed:
                await self.changed.wait_for(moved)
                seen = self.version
                snap = ProgressState(**vars(self.progress))
            yield snap
            if self.result.done():
                return


# Weight files in formats the store does not serve; a listing with these and no safetensors is refused.
NON_SAFETENSORS_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


_GLOBS = GlobCache(ClientLimits.glob_cache_size)


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


def ingest_dir_name(key: JobKey) -> str:
    """One ingest directory per source and filters, so a restarted job finds its parts."""
    return hashlib.sha256(f"{key.uri}\0{key.filters.to_json()}".encode()).hexdigest()[:32]


def save_resume(
    ingest: Path, key: JobKey, job: Job, part_size: int, files: list[tuple[RemoteObject, str, list[int]]]
) -> None:
    IngestState(
        uri=key.uri,
        include=key.include,
        exclude=key.exclude,
        name=job.label,
        pin=job.pin,
        owner=job.owner,
        part_size=part_size,
        files=tuple(IngestFile(o.relpath, o.version, o.size, name, tuple(written)) for o, name, written in files),
    ).save(ingest)


def record_intent(ingest: Path, key: JobKey, job: Job, part_size: int) -> bool:
    """Write the job's record before the job is accepted: from then on a crashed daemon
    resumes it at its next start, even if not a byte was fetched yet. A record a previous run
    left for the same job is kept (it says which parts are on disk). True when it was kept."""
    state = IngestState.load(ingest)
    if state is not None and state.uri == key.uri:
        return True
    ingest.mkdir(mode=0o700, exist_ok=True)
    save_resume(ingest, key, job, part_size, [])
    return False


def load_resume(ingest: Path, key: JobKey, todo: list[RemoteObject], part_size: int) -> dict[str, set[int]]:
    """Parts a previous run of this job wrote, for objects whose version is unchanged."""
    state = IngestState.load(ingest)
    if state is None or state.uri != key.uri or state.part_size != part_size:
        return {}
    current = {o.relpath: o for o in todo}
    out: dict[str, set[int]] = {}
    for f in state.files:
        o = current.get(f.relpath)
        if o is None or o.version != f.version or o.size != f.size:
            continue  # changed at the source (or no longer wanted): that file starts over
        parts = set(f.written)
        try:
            on_disk = (ingest / f.file).stat().st_size
        except OSError:
            continue
        if parts and max(min((i + 1) * part_size, o.size) for i in parts) <= on_disk:
            out[o.relpath] = parts
    return out


class Fetcher:
    def __init__(self, cfg: Config, store: LocalBlobStore, index: Index, metrics: Metrics) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.store = store
        self.index = index
        self.globs = GlobCache(cfg.limits.glob_cache_size)  # include/exclude come from clients: bounded
        self.limiter = RateLimiter(cfg.download.rate_limit)
        self.pool = BufferPool(cfg.download.concurrency + max(4, cfg.download.concurrency // 4), cfg.download.part_size)
        self.jobs: dict[JobKey, Job] = {}
        self.bytes_downloaded = 0
        self.shutting_down = False
        self.reserved: dict[int, int] = {}  # bytes admitted per running job (Job.id)
        # Set by the core: raises ExhaustedError or makes room (eviction) for a job's new bytes.
        self.make_room: Callable[[int, str], None] = lambda need, label: None
        # Set by the core: gives a committed job's snapshot its model name. Called before the
        # job's record goes, so a crash in between leaves a record whose resume names it.
        self.on_commit: Callable[[Job, str], None] = lambda job, snapshot: None
        self._tasks: set[asyncio.Task[None]] = set()
        # Snapshots being downloaded, by provisional id, and how recent ones ended (the real id,
        # or the error): a client told a provisional id just before its job ended still gets an
        # answer. Set by the core: moves a live snapshot's leases to its content id at commit.
        self.live: dict[str, EarlySnapshot] = {}
        self.ended: OrderedDict[str, str | WeightcacheError] = OrderedDict()
        self.on_snapshot_id: Callable[[str, str], None] = lambda provisional, real: None
        self.count_readers: Callable[[str], int] = lambda provisional: 0  # set by the core (leases)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.clients = Clients()  # S3 clients kept for the next download from the same source
        self.clients_ready = self.clients.prewarm(cfg.sources, cfg.download.concurrency)
        self._admit_lock = threading.RLock()  # admission and reservation as one step
        # Blobs already in the store that a running job's snapshot will reference (dedupe), by
        # Job.id: eviction must keep them (Evictor.plan_evict), or the new model commits over holes.
        self.in_use: dict[int, frozenset[str]] = {}
        # Jobs run in their own threads, never in the loop's default executor: client reads
        # (ReadRange, fd.sock helpers) never queue behind downloads. A job past MAX_JOBS waits
        # its turn here (LISTING) rather than taking a thread from everyone else.
        self.job_pool = ThreadPoolExecutor(max_workers=MAX_JOBS, thread_name_prefix="wc-job")

    def start(self, key: JobKey, label: str, pin: bool | None = None, owner: str = "admin") -> Job:
        """The running job for key, or a new one, accepted only once its record is on disk
        (see record_intent): every caller that sees the job can count on it being resumed."""
        job = self.jobs.get(key)
        if job is not None:
            return job
        self._loop = asyncio.get_running_loop()
        job = Job(key, label, pin, owner=owner)
        ingest = self.store.ingest / ingest_dir_name(key)
        try:
            resumed = record_intent(ingest, key, job, self.cfg.download.part_size)
        except OSError as exc:
            self.store.remove_ingest(ingest)  # no record of a previous run was there: nothing lost
            raise store_error(exc, label) from None
        log.info("fetch_accepted", source=key.uri, model=label, resumed=resumed)
        self.jobs[key] = job
        task = asyncio.get_running_loop().create_task(self._run(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    def admit(self, need: int, label: str, job_id: int) -> None:
        """Admission before the first byte: the core checks capacity (and evicts), then the
        bytes are reserved until the job ends. One step under one lock: two jobs admitted at
        once would each see the other's bytes as free otherwise."""
        with self._admit_lock:
            self.make_room(need, label)
            self.reserved[job_id] = self.reserved.get(job_id, 0) + need

    def release(self, job_id: int) -> None:
        with self._admit_lock:
            self.reserved.pop(job_id, None)

    def reserved_bytes(self) -> int:
        with self._admit_lock:
            return sum(self.reserved.values())

    def blobs_in_use(self) -> frozenset[str]:
        return frozenset().union(*list(self.in_use.values()))

    async def shutdown(self) -> None:
        self.shutting_down = True
        for job in self.jobs.values():
            job.cancelled.set()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self.job_pool.shutdown(wait=False, cancel_futures=True)
        self.clients.close()

    async def _run(self, job: Job) -> None:
        ticker = asyncio.get_running_loop().create_task(self._tick(job))
        started = time.monotonic()
        source = source_label(job.key.uri)
        try:
            snapshot = await asyncio.get_running_loop().run_in_executor(self.job_pool, self._fetch, job)
            job.progress.phase = "DONE"
            job.result.set_result(snapshot)
        except (WeightcacheError, OSError) as exc:
            err = exc if isinstance(exc, WeightcacheError) else store_error(exc, job.label)
            self.metrics.ingest_failures.labels(type(err).__name__).inc()
            log.warning("fetch_failed", source=job.key.uri, model=job.label, error=str(err), kind=type(err).__name__)
            job.result.set_exception(err)
        except Exception as exc:
            log.exception("fetch_crashed", source=job.key.uri, model=job.label)
            self.metrics.ingest_failures.labels("InternalError").inc()
            job.result.set_exception(InternalError(f"fetching {job.key.uri}: {type(exc).__name__}: {exc}"))
        finally:
            self.metrics.download_seconds.labels(source).inc(time.monotonic() - started)
            ticker.cancel()
            del self.jobs[job.key]
            self.in_use.pop(job.id, None)
            self._end_live(job)
            async with job.changed:
                job.version += 1
                job.changed.notify_all()

    async def _tick(self, job: Job) -> None:
        last_bytes, last_t = 0, time.monotonic()
        while True:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            with job._lock:
                fetched = job.bytes_fetched
            rate = (fetched - last_bytes) / max(now - last_t, 1e-6)
            job.progress.bytes_per_second = 0.7 * job.progress.bytes_per_second + 0.3 * rate if last_bytes else rate
            last_bytes, last_t = fetched, now
            async with job.changed:
                job.version += 1
                job.changed.notify_all()

    def _end_live(self, job: Job) -> None:
        """A job's live snapshot ends with the job: committed (its readers now hold the content
        snapshot) or failed (every reader gets the error, counted and logged)."""
        live = job.live
        if live is None:
            return
        self.live.pop(live.snapshot_id, None)
        outcome: str | WeightcacheError
        if job.result.cancelled() or job.result.exception() is not None:
            exc = None if job.result.cancelled() else job.result.exception()
            err = exc if isinstance(exc, WeightcacheError) else InternalError(f"download of {job.label} failed")
            live.fail(err)
            outcome = live.error or err
            readers = self.readers(live.snapshot_id)
            self.metrics.streaming_failures.labels(type(outcome).__name__).inc()
            log.warning("streaming_readers_failed", model=job.label, snapshot=live.snapshot_id, readers=readers,
                        error=str(outcome))  # fmt: skip
        elif live.error is not None:  # revoked: the job committed a newer version; its readers failed
            outcome = live.error
            log.warning("streaming_readers_failed", model=job.label, snapshot=live.snapshot_id,
                        readers=self.readers(live.snapshot_id), error=str(outcome))  # fmt: skip
        else:
            outcome = job.result.result()
            live.commit(outcome)
            # Leases taken between the commit's rename (job thread) and now (the loop) are still
            # on the provisional id: move them too, or eviction would see the snapshot unleased.
            self.on_snapshot_id(live.snapshot_id, outcome)
        self.ended[live.snapshot_id] = outcome
        while len(self.ended) > 1024:
            self.ended.popitem(last=False)

    def readers(self, provisional: str) -> int:
        """Processes holding a live snapshot over fd.sock."""
        return self.count_readers(provisional)

    # ---------------------------------------------------------------- in a worker thread

    def _fetch(self, job: Job) -> str:
        """Run the job, then name its snapshot. Its ingest directory (and record) goes when the
        job ends, whatever the outcome, except when the daemon is shutting down: the next start
        resumes it."""
        ingest = self.store.ingest / ingest_dir_name(job.key)
        keep_ingest = False
        try:
            snapshot = self._fetch_into(job, ingest)
            self.on_commit(job, snapshot)
            return snapshot
        except BaseException:
            keep_ingest = self.shutting_down
            raise
        finally:
            if not keep_ingest:
                self.store.remove_ingest(ingest)

    def _fetch_into(self, job: Job, ingest: Path) -> str:
        key, p = job.key, job.progress
        source = open_source(key.uri, self.cfg, self.clients)
        try:
            listed = source.list()
            objects = select(listed, key.include, key.exclude, self.globs)
            echo = self.cfg.limits.echo
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
            p.files_total = len(objects)
            p.bytes_total = sum(o.size for o in objects)
            known: dict[str, str] = {}
            todo: list[RemoteObject] = []
            for o in objects:
                digest = self.index.known_object(o.uri, o.version, o.size)
                if digest is not None and self.store.has(digest):
                    known[o.relpath] = digest
                else:
                    todo.append(o)
            expected = source.expected_sha256(todo) if todo else {}
            for o in list(todo):
                digest = expected.get(o.relpath)
                if digest is not None and self.store.has(digest):  # same bytes under another name
                    known[o.relpath] = digest
                    todo.remove(o)
            for o in objects:
                if o.relpath in known:
                    p.bytes_done += o.size
                    p.files_done += 1
            log.info(
                "fetch_start",
                source=key.uri,
                model=job.label,
                files=len(objects),
                cached=len(known),
                bytes=p.bytes_total,
            )
            self.in_use[job.id] = frozenset(known.values())  # before admission can evict anything
            self.admit(sum(o.size for o in todo), job.label, job.id)
            tensors: dict[str, tuple[TensorInfo, ...]] = {}
            try:
                # Every header first (a small ranged read each): a malformed file fails the job
                # before its bytes are fetched, the download runs in layer order, and clients may
                # use the snapshot while it arrives.
                live, priority, headers, heads = self._prepare_live(job, source, objects, known, todo, ingest)

                # ingest (made with the job's record in start()) is removed by _fetch
                resume = load_resume(ingest, key, todo, self.cfg.download.part_size)
                if resume:
                    log.info(
                        "fetch_resume", source=key.uri, model=job.label, parts=sum(len(v) for v in resume.values())
                    )
                got: list[Downloaded] = []
                if todo:
                    p.phase = "DOWNLOADING"

                    downloaded = self.metrics.downloaded.labels(source_label(key.uri))

                    def on_bytes(n: int) -> None:
                        downloaded.inc(n)
                        with job._lock:
                            job.bytes_fetched += n
                            self.bytes_downloaded += n
                            p.bytes_done += n

                    def on_resumed(obj: RemoteObject, parts: set[int]) -> None:
                        ps = self.cfg.download.part_size
                        p.bytes_done += sum(min(ps, obj.size - i * ps) for i in parts)

                    for o in todo:
                        if o.relpath in resume:
                            on_resumed(o, resume[o.relpath])

                    def on_state(files: list[tuple[RemoteObject, str, list[int]]]) -> None:
                        save_resume(ingest, key, job, self.cfg.download.part_size, files)

                    def on_file(d: Downloaded) -> None:
                        p.current_file = d.obj.relpath
                        want = expected.get(d.obj.relpath)
                        if want is not None and d.sha256 != want:
                            raise CorruptedError(
                                f"file {d.obj.relpath} of model {job.label}: downloaded bytes hash to sha256:{d.sha256[:16]}… "
                                f"but the source's checksum is sha256:{want[:16]}… (corrupted in transit); nothing published"
                            )
                        if d.obj.relpath.endswith(".safetensors"):
                            try:
                                infos, _ = validate_file(str(d.path), f"file {d.obj.relpath} of model {job.label}")
                            except InvalidInputError as exc:
                                # Its header was read valid before the download: the bytes changed on the way.
                                raise CorruptedError(
                                    f"{exc} (its header was valid when read before the download: corrupted in "
                                    "transit, or changed at the source); nothing published"
                                ) from None
                            if infos != headers.get(d.obj.relpath):
                                # Readers were given the header read first: it must be the one downloaded.
                                raise CorruptedError(
                                    f"file {d.obj.relpath} of model {job.label}: the downloaded header differs from the "
                                    "one read before the download (corrupted in transit, or changed at the source); "
                                    "nothing published"
                                )
                            tensors[d.obj.relpath] = tuple(infos)
                        p.files_done += 1
                        log.info("fetch_file_verified", model=job.label, file=d.obj.relpath, bytes=d.obj.size,
                                 read_back=d.read_back, restarts=d.restarts)  # fmt: skip

                    def published() -> None:
                        self._publish(job, live)

                    got = download(
                        source,
                        todo,
                        ingest,
                        self.cfg.download,
                        self.pool,
                        self.limiter,
                        on_bytes,
                        on_file,
                        job.cancelled,
                        resume,
                        on_state,
                        priority=priority if self.cfg.download.order == "layer" else None,
                        on_written=lambda obj, start, end: live.mark(obj.relpath, start, end),
                        on_restart=lambda obj: live.revoke(obj.relpath),
                        on_started=published,
                        heads=heads,
                    )
                p.phase = "COMMITTING"
                return self._commit(job, objects, known, got, tensors)
            finally:
                self.release(job.id)
        finally:
            source.close()

    def _prepare_live(
        self,
        job: Job,
        source: Source,
        objects: list[RemoteObject],
        known: dict[str, str],
        todo: list[RemoteObject],
        ingest: Path,
    ) -> tuple[EarlySnapshot, dict[str, list[int]], dict[str, list[TensorInfo]], dict[str, bytes]]:
        """Read every header not already in the index, build the snapshot's manifest under a
        provisional id, and rank each part to download by the first layer group that needs it.
        Also returns the headers' bytes, which the engine writes before fetching any part."""
        label = job.label
        tensors: dict[str, Sequence[TensorInfo]] = {}
        data_offset: dict[str, int] = {}
        heads: dict[str, bytes] = {}
        for rel, digest in known.items():
            if rel.endswith(".safetensors"):
                tensors[rel] = self.index.tensors(digest)
        shards = [o for o in todo if o.relpath.endswith(".safetensors")]
        for rel, h in read_headers(source, shards, label, self.cfg.download.concurrency).items():
            data_offset[rel], tensors[rel], heads[rel] = h.data_offset, h.tensors, h.head
        files = sorted((FileRow(o.relpath, known.get(o.relpath, ""), o.size) for o in objects), key=lambda f: f.path)
        manifest = build_manifest(label, EarlySnapshot.new_id(), job.key.uri, files, tensors, streaming=True)
        live_files = [
            EarlyFile(
                o.relpath,
                o.size,
                self.store.path(known[o.relpath]) if o.relpath in known else ingest / ingest_name(o.relpath),
            )
            for o in objects
        ]
        first_group = [
            (t.file, t.info.offset, t.info.offset + t.info.length) for t in manifest.tensors if t.layer_index == 0
        ]
        assert self._loop is not None

        def first() -> None:
            self.metrics.time_to_first_group.observe(time.time() - job.started)

        live = EarlySnapshot(manifest, live_files, first_group, self._loop, first)
        for rel in known:
            live.mark_whole(rel)
        rank = group_ranks(manifest.layers)
        layer_of: dict[str, list[tuple[int, int, int]]] = {}
        for t in manifest.tensors:
            layer_of.setdefault(t.file, []).append((t.info.offset, t.info.offset + t.info.length, rank[t.layer_index]))
        last = max(rank, default=0) + 1  # bytes no tensor covers (none in a valid file)
        part = self.cfg.download.part_size
        priority: dict[str, list[int]] = {}
        for o in todo:
            if o.relpath in data_offset:
                priority[o.relpath] = safetensors_ranks(
                    o.size, part, data_offset[o.relpath], layer_of.get(o.relpath, []), last, bool(heads[o.relpath])
                )
            else:  # configs, tokenizers: small, and a loader reads them first
                priority[o.relpath] = other_file_ranks(o.size, part)
        if not todo:
            self._publish(job, live)
        return live, priority, {rel: list(tensors[rel]) for rel in data_offset}, heads

    def _publish(self, job: Job, live: EarlySnapshot) -> None:
        """Let clients in (from the job's thread): the ingest files exist at full size."""
        self.live[live.snapshot_id] = live
        job.live = live
        log.info("fetch_live", model=job.label, snapshot=live.snapshot_id, files=len(live.files),
                 tensors=len(live.manifest.tensors))  # fmt: skip
        assert self._loop is not None
        self._loop.call_soon_threadsafe(job.live_set.set)

    def _commit(
        self,
        job: Job,
        objects: list[RemoteObject],
        known: dict[str, str],
        got: list[Downloaded],
        tensors: dict[str, tuple[TensorInfo, ...]],
    ) -> str:
        files: list[NewFile] = []
        by_rel = {d.obj.relpath: d for d in got}
        known_tensors = {rel: tuple(self.index.tensors(digest)) for rel, digest in known.items()}
        total = sum(map(len, known_tensors.values())) + sum(map(len, tensors.values()))
        if total > MAX_SNAPSHOT_TENSORS:
            raise InvalidInputError(
                f"model {job.label} ({job.key.uri}): {total} tensors, more than the {MAX_SNAPSHOT_TENSORS} one "
                "snapshot may have (its manifest must fit one message); nothing published"
            )
        # The content id is read back from the disk once nothing can change the file any more.
        changed = self.store.seal([(d.path, d.sha256) for d in got])
        if changed:
            self.metrics.commit_mismatches.inc(len(changed))
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
        for o in objects:
            if o.relpath in known:
                digest = known[o.relpath]
                files.append(NewFile(o.relpath, digest, o.size, known_tensors[o.relpath]))
                continue
            d = by_rel[o.relpath]
            size = d.path.stat().st_size
            if size != d.obj.size:
                raise InvalidInputError(
                    f"file {o.relpath} of model {job.label}: expected {d.obj.size} bytes, got {size}"
                )
            if job.live is not None:
                job.live.moved(o.relpath, self.store.path(d.sha256))
            self.store.commit(d.path, d.sha256)
            files.append(NewFile(o.relpath, d.sha256, d.obj.size, tensors.get(o.relpath, ())))
        snapshot = snapshot_id_of([(f.path, f.sha256) for f in files])
        if job.live is not None:
            # Before the snapshot exists: its streaming readers' leases must protect it from
            # the moment eviction can see it.
            self.on_snapshot_id(job.live.snapshot_id, snapshot)
        digests = {f.path: f.sha256 for f in files}
        objs = [(o.uri, o.version, o.size, digests[o.relpath]) for o in objects]
        self.index.add_snapshot(snapshot, job.key.uri, files, objs)
        log.info(
            "fetch_done",
            source=job.key.uri,
            model=job.label,
            snapshot=snapshot,
            downloaded=job.bytes_fetched,
            files=len(files),
        )
        return snapshot
