"""The cache core: the one object the gRPC handlers and the descriptor server call.

It wires the parts that decide, each in its own module, and owns only what spans them:
fetching a model (resolve or download, then name it, then its manifest), resuming
interrupted downloads, and granting a snapshot's files over fd.sock.

- naming.py: model references, names and who may point them (resolve, check_snapshot)
- manifests.py: manifests and model views; list, show, pin
- admission.py: usage and capacity admission for downloads; stats
- eviction.py: eviction and gc plans (immutable records with their effect) and their execution
- verify.py: verify, quarantine, the damaged check, repair
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import structlog

from weightcache.contract.errors import InvalidInputError, NotFoundError, PermissionDeniedError, WeightcacheError
from weightcache_daemon import uris
from weightcache_daemon.cache.admission import Admission
from weightcache_daemon.cache.catalog import Catalog
from weightcache_daemon.cache.eviction import Evictor, EvictPlan, GCPlan
from weightcache_daemon.cache.leases import Leases
from weightcache_daemon.cache.naming import Names, check_name, default_name
from weightcache_daemon.cache.verify import Verifier
from weightcache_daemon.config import Config
from weightcache_daemon.ingest.early import EarlySnapshot
from weightcache_daemon.ingest.jobs import TICK, Fetcher, Job
from weightcache_daemon.ingest.resume import IngestState
from weightcache_daemon.observe.metrics import Metrics
from weightcache_daemon.records import (
    ActiveDownload,
    FileRow,
    Lease,
    Manifest,
    ModelRow,
    ModelView,
    ProgressState,
    Readiness,
    Span,
    Stats,
    layer_spans,
)
from weightcache_daemon.storage.blobs import LocalBlobStore
from weightcache_daemon.storage.index import Index

__all__ = ["Core", "Grant"]

log = structlog.get_logger("weightcached.core")

CLIENT_IO_THREADS = 16
ADMIN_IO_THREADS = 4


@dataclass(frozen=True)
class Grant:
    """A snapshot granted to one peer over fd.sock: its files (to open and send, in this
    order) and the lease that keeps them accounted until the connection closes."""

    snapshot_id: str
    files: tuple[FileRow, ...]
    lease: Lease
    # A snapshot still being downloaded: its files are the ingest files being written (or
    # blobs already in the store), opened through it instead of by digest.
    live: EarlySnapshot | None = None

    def open(self, store: LocalBlobStore, f: FileRow) -> int:
        """A read-only descriptor of one granted file."""
        if self.live is not None:
            return self.live.open(f.path, store.open_file)
        return store.open(f.sha256)


class Core:
    def __init__(
        self, cfg: Config, store: LocalBlobStore, index: Index, fetcher: Fetcher, leases: Leases, metrics: Metrics
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.store = store
        self.index = index
        self.fetcher = fetcher
        self.leases = leases
        self.names = Names(cfg, store, index)
        self.catalog = Catalog(store, index, leases, self.names)
        self.evictor = Evictor(store, index, leases, fetcher, self.names.resolve)
        self.admission = Admission(cfg, store, index, leases, fetcher, metrics, self.evictor)
        self.verifier = Verifier(store, index, self.names)
        self.capacity = self.admission.capacity
        fetcher.make_room = self.admission.make_room
        # The job names its snapshot itself: an accepted prefetch ends named even when its
        # caller has gone away or the daemon crashed and resumed it.
        fetcher.on_commit = self._name_job
        fetcher.on_snapshot_id = lambda provisional, real: self._lease_content_id(provisional, real)
        fetcher.count_readers = lambda sid: len(leases.of(sid))
        # Client-serving work (manifests, listings, ReadRange; also the loop's default executor)
        # has its own threads: downloads run in the fetcher's pool and admin work (verify,
        # doctor) in another, so none waits on the others.
        self.client_io = ThreadPoolExecutor(max_workers=CLIENT_IO_THREADS, thread_name_prefix="wc-client-io")
        self.admin_io = ThreadPoolExecutor(max_workers=ADMIN_IO_THREADS, thread_name_prefix="wc-admin-io")

    # ---------------------------------------------------------------- fetch

    async def fetch(
        self,
        model: str,
        name: str,
        include: Sequence[str],
        exclude: Sequence[str],
        *,
        admin: bool,
        pin: bool | None = None,
        owner: str | None = None,
        early: bool = False,
    ) -> AsyncIterator[ProgressState | Manifest | Readiness]:
        """Ensure (client) and Prefetch (admin): progress events, then the Manifest.

        `early` (Ensure only): a model that must be downloaded is answered as soon as every
        header is known, with a streaming Manifest; Readiness and progress events follow, and
        the committed Manifest ends the stream (see _stream_job).

        `owner` is who names the model (index.OWNERS): "client" for Ensure, "admin" for
        Prefetch by default, "models.d" for declared models. See Index.set_model for what each
        may name."""
        owner = owner or ("admin" if admin else "client")
        if "://" not in model:
            if name or include or exclude:
                raise InvalidInputError(f"model {model[:200]!r}: name/include/exclude apply to source URIs only")
            job = self._downloading(model) if early else None
            if job is not None:  # a name whose first download is running: read it as it arrives
                async for ev in self._stream_job(job, job.label, None):
                    yield ev
                return
            snapshot, row = self.names.resolve(model)
            if row is not None and self.verifier.damaged(snapshot):
                # A blob failed verification or vanished: fetch the model again, then go on.
                log.warning("refetching_damaged_model", model=row.name, snapshot=snapshot)
                async for ev in self._refetch(row):
                    if isinstance(ev, Manifest):
                        snapshot = ev.snapshot_id
                    else:
                        yield ev
            self.metrics.hits.labels("prefetch" if admin else "ensure").inc()
            if row is not None:
                self.index.touch(row.name)
                if pin is not None:
                    self.index.set_pinned(row.name, pin)
            yield await self.manifest_async(snapshot, row.name if row else "")
            return
        # Everything below sees the canonical URI only (uris.py): the allow-list, the job key,
        # the index and the source.
        uri = uris.normalize(model)
        key = self.names.key(uri, include, exclude)
        if not admin:
            pin = None  # a client never pins
            if not uris.allowed(uri, self.cfg.client_sources):
                raise PermissionDeniedError(
                    f"source {uri}: clients may not trigger this download (not in the daemon's client_sources "
                    f"allow-list); an admin can run: cachectl prefetch {uri}"
                )
            # A client asks for presence, not freshness: a cached copy of the same source answers at once.
            same = self.index.models_by_source(key.uri, key.filters)
            cached = [r for r in same if r.name == name] if name else same
            if cached:
                self.metrics.hits.labels("ensure").inc()
                self.index.touch(cached[0].name)
                yield await self.manifest_async(cached[0].snapshot_id, cached[0].name)
                return
            name = check_name(name) if name else self.names.client_default_name(key)
            self.names.check_owner(name, key, owner)
        else:
            name = check_name(name or default_name(uri))
        self.metrics.misses.labels("prefetch" if admin else "ensure").inc()
        with self.admission.fetching(name):
            job = self.fetcher.start(key, name, pin, owner)
            if early:
                async for ev in self._stream_job(job, name, (pin, owner)):
                    yield ev
                return
            async for p in job.watch():
                if not job.result.done():
                    yield p
            snapshot = await asyncio.shield(job.result)
            self.names.name_model(name, key, snapshot, pin, owner)
            yield await self.manifest_async(snapshot, name)

    def _downloading(self, name: str) -> Job | None:
        """The running job that will record `name`, if its name is not in the index yet."""
        if self.index.model(name) is not None:
            return None
        return next((j for j in list(self.fetcher.jobs.values()) if j.label == name), None)

    async def _stream_job(
        self, job: Job, name: str, naming: tuple[bool | None, str] | None
    ) -> AsyncIterator[ProgressState | Manifest | Readiness]:
        """Follow a job for an early Ensure: progress until its live snapshot is published, the
        streaming manifest, then every change of readiness (coalesced: a slow reader gets the
        merged state) and progress now and then, then the committed manifest or the job's error.
        The job never depends on this caller: one that goes away leaves the download going.
        `naming` (pin, owner): record `name` for the caller as fetch() does; None when `name`
        is the job's own (the job names it)."""
        loop = asyncio.get_running_loop()
        seen: dict[str, int] = {}
        announced: EarlySnapshot | None = None
        last_progress = 0.0
        while True:
            live = job.live
            pulse = live.pulse() if live is not None else None  # taken before the state is read
            if announced is not None and announced.error is not None:
                # Revoked (a file changed at the source mid-download): what this reader was told
                # is void even if the job goes on and commits the new version.
                raise announced.error
            if live is not None and announced is None and live.error is None and not job.result.done():
                announced = live
                yield live.manifest
            if announced is not None:
                ready = announced.changes(seen)
                if ready is not None:
                    yield ready
            if job.result.done():
                break
            if loop.time() - last_progress >= TICK:
                last_progress = loop.time()
                yield ProgressState(**vars(job.progress))
            # Wake at the next readiness change, the live snapshot's publication, the job's end,
            # or the next progress tick, whichever comes first.
            waits: list[asyncio.Future[Any]] = []
            if pulse is not None:
                waits.append(asyncio.ensure_future(pulse.wait()))
            if announced is None and not job.live_set.is_set():
                waits.append(asyncio.ensure_future(job.live_set.wait()))
            try:
                await asyncio.wait([*waits, job.result], timeout=TICK, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
        snapshot = await asyncio.shield(job.result)  # raises the job's error (CorruptedError, ...)
        if announced is not None and announced.error is not None:
            raise announced.error
        if naming is not None:
            self.names.name_model(name, job.key, snapshot, *naming)
        yield await self.manifest_async(snapshot, name)

    def downloads(self) -> list[ActiveDownload]:
        """Downloads in flight, with their streaming readers."""
        out = []
        for job in list(self.fetcher.jobs.values()):
            live = job.live
            sid = live.snapshot_id if live is not None else ""
            out.append(ActiveDownload(job.label, job.key.uri, sid, ProgressState(**vars(job.progress)),
                                self.fetcher.readers(sid) if sid else 0, job.started))  # fmt: skip
        return sorted(out, key=lambda d: d.name)

    def _refetch(self, row: ModelRow) -> AsyncIterator[ProgressState | Manifest | Readiness]:
        """Fetch a named model again from its source, as the admin would (damaged or repaired)."""
        f = row.filters
        return self.fetch(row.source, row.name, f.include, f.exclude, admin=True, owner=row.owner)

    async def _repair_one(self, row: ModelRow) -> None:
        async for _ in self._refetch(row):
            pass

    def _name_job(self, job: Job, snapshot: str) -> None:
        """Name a committed job's snapshot (from the job's thread). A client's name taken by an
        admin meanwhile fails only that client (its own fetch() names again and reports it);
        everyone else waiting on the job still gets the snapshot."""
        try:
            self.names.name_model(job.label, job.key, snapshot, job.pin, job.owner)
        except PermissionDeniedError as exc:
            if job.owner != "client":
                raise
            log.warning("client_name_refused", model=job.label, source=job.key.uri, error=str(exc))

    async def run_prefetch(self, uri: str, name: str, include: Sequence[str], exclude: Sequence[str], pin: bool | None,
                           why: str, owner: str = "admin") -> None:  # fmt: skip
        """A prefetch nobody waits on (resume after a restart, models.d): logged, never raised."""
        try:
            async for _ in self.fetch(uri, name, include, exclude, admin=True, pin=pin, owner=owner):
                pass
            log.info("background_prefetch_done", model=name, source=uri, reason=why)
        except WeightcacheError as exc:
            log.error("background_prefetch_failed", model=name, source=uri, reason=why, error=str(exc))

    def resume_ingests(self) -> list[asyncio.Task[None]]:
        """Restart the downloads a previous run left in ingest/ (they resume their parts)."""
        tasks = []
        for d in sorted(self.store.ingest.iterdir()):
            state = IngestState.load(d)
            if state is None:
                continue
            name = state.name or default_name(state.uri)
            # The job keeps the rights of whoever started it (IngestState.load reads a record
            # without an owner as a client's: it may create its name, never re-point one).
            tasks.append(asyncio.get_running_loop().create_task(self.run_prefetch(
                state.uri, name, state.include, state.exclude, state.pin, "resume", state.owner)))  # fmt: skip
            log.info("resuming_ingest", model=name, source=state.uri)
        return tasks

    # ---------------------------------------------------------------- reading

    async def manifest_async(self, snapshot_id: str, model: str = "") -> Manifest:
        """manifest(), built in the client I/O pool: a snapshot with a hundred thousand tensors
        takes a while, and the event loop serves everyone else meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self.client_io, self.manifest, snapshot_id, model)

    def manifest(self, snapshot_id: str, model: str = "", with_tensors: bool = True) -> Manifest:
        return self.catalog.manifest(snapshot_id, model, with_tensors)

    async def read_spans(
        self, snapshot_id: str, file: tuple[str, int, int] | None = None, layers: tuple[int, int] | None = None
    ) -> list[Span]:
        """What a ReadRange reads: a (path, offset, length) file range or a (first, last) layer range."""
        sid, live = self._live_or_committed(snapshot_id)
        if live is not None:
            if file is not None:
                return [live.file_span(*file)]
            if layers is not None:
                return layer_spans(live.manifest, *layers)
        elif file is not None:
            return [self.catalog.file_span(sid, *file)]
        elif layers is not None:
            return layer_spans(await self.manifest_async(sid), *layers)
        raise InvalidInputError("ReadRange needs a file range or a layer range")

    def open_span(self, snapshot_id: str, span: Span) -> int:
        """A read-only descriptor of the file a span reads (a blob, or a file still downloading)."""
        live = self.fetcher.live.get(snapshot_id)
        if live is not None:
            return live.open(span.path, self.store.open_file)
        if not span.sha256:  # a live span whose download committed since: the blob has the bytes
            sid, _ = self._live_or_committed(snapshot_id)
            digest = next((f.sha256 for f in self.index.files(sid) if f.path == span.path), None)
            if digest is None:
                raise NotFoundError(f"file {span.path[:200]!r} of snapshot {sid} is no longer in the cache")
            return self.store.open(digest)
        return self.store.open(span.sha256)

    async def wait_span(self, snapshot_id: str, path: str, offset: int, length: int) -> None:
        """Return once bytes [offset, offset+length) of `path` are on disk (at once for a
        committed snapshot); raises the download's error if it failed meanwhile."""
        live = self.fetcher.live.get(snapshot_id)
        if live is not None:
            await live.wait_ready(path, offset, offset + length)
        else:
            self._live_or_committed(snapshot_id)  # ended in failure: raise it

    def _live_or_committed(self, snapshot_id: str) -> tuple[str, EarlySnapshot | None]:
        """A snapshot id as clients may hold it: a live (downloading) snapshot; a provisional id
        whose download ended (its content id, or its error); or a committed snapshot."""
        live = self.fetcher.live.get(snapshot_id)
        if live is not None:
            return snapshot_id, live
        ended = self.fetcher.ended.get(snapshot_id)
        if isinstance(ended, WeightcacheError):
            raise ended
        if isinstance(ended, str):
            return ended, None
        return self.names.check_snapshot(snapshot_id), None

    # ---------------------------------------------------------------- fd.sock

    def open_snapshot_for(self, pid: int, uid: int, gid: int, snapshot_id: str, lease: Lease | None = None) -> Grant:
        """Grant a snapshot to a peer: validate, lease, check every blob is usable, mark use.

        The lease comes first: from then on eviction sees the snapshot as in use (or, if it
        already planned it, counts its bytes as held), so what the caller opens stays
        accounted. `lease` is the connection's existing lease on this snapshot, kept as it
        is; a new one is released again if the snapshot cannot be granted.

        A provisional id of a download in flight grants the files being written (live.py);
        the lease moves to the content id when the download commits."""
        sid, live = self._live_or_committed(snapshot_id)
        if live is not None:
            return self._grant_live(pid, uid, gid, live, lease)
        files = self.index.files(sid)
        new = lease is None
        if lease is None:
            lease = self.leases.acquire(sid, pid, uid, gid, sum(f.size for f in files))
        try:
            self.names.check_snapshot(sid)  # evicted between the lookup and the lease?
            self.verifier.check_usable(sid, files)
        except BaseException:
            if new:
                self.leases.release(lease.token)
            raise
        for row in self.index.models_of_snapshot(sid):
            self.index.touch(row.name)
        self.metrics.grants.inc()  # counted when granted, before the client can act on it
        return Grant(sid, tuple(files), lease)

    def _lease_content_id(self, provisional: str, real: str) -> None:
        moved = self.leases.rename(provisional, real)
        if moved:
            log.info("streaming_leases_moved", provisional=provisional, snapshot=real, leases=moved)

    def _grant_live(self, pid: int, uid: int, gid: int, live: EarlySnapshot, lease: Lease | None) -> Grant:
        new = lease is None
        if lease is None:
            lease = self.leases.acquire(live.snapshot_id, pid, uid, gid, live.bytes_total)
        if live.committed is not None:  # committed while we leased: the lease protects the content id
            self.leases.rename(live.snapshot_id, live.committed)
        if live.error is not None:
            if new:
                self.leases.release(lease.token)
            raise live.error
        self.metrics.grants.inc()
        return Grant(live.snapshot_id, tuple(live.file_rows()), lease, live)

    # ---------------------------------------------------------------- the parts, for the edges

    def check_snapshot(self, snapshot_id: str) -> str:
        return self.names.check_snapshot(snapshot_id)

    def view(self, row: ModelRow) -> ModelView:
        return self.catalog.view(row)

    def view_of(self, name: str) -> ModelView:
        """The view of a model name just fetched (NotFoundError if evicted since)."""
        row = self.index.model(name)
        if row is None:
            raise NotFoundError(f"model {name!r} is not in the cache")
        return self.catalog.view(row)

    def list_models(self) -> list[ModelView]:
        return self.catalog.list_models()

    def show(self, model: str) -> tuple[ModelView | None, Manifest, ActiveDownload | None]:
        """A model's record and manifest; for a name whose first download is in flight, its
        streaming manifest and where the download stands."""
        job = self._downloading(model)
        if job is not None and job.live is not None:
            return None, job.live.manifest, next((d for d in self.downloads() if d.name == job.label), None)
        view, manifest = self.catalog.show(model)
        return view, manifest, None

    def set_pin(self, model: str, pinned: bool) -> ModelView:
        return self.catalog.set_pin(model, pinned)

    def usage(self) -> int:
        return self.admission.usage()

    def stats(self) -> Stats:
        return self.admission.stats()

    def plan_evict(self, models: list[str], all_unpinned: bool, force: bool) -> EvictPlan:
        return self.evictor.plan_evict(models, all_unpinned, force)

    def evict(self, plan: EvictPlan) -> None:
        plan.execute(self.index, self.store, self.leases, self.metrics)

    def plan_gc(self) -> GCPlan:
        return self.evictor.plan_gc()

    def gc(self, plan: GCPlan) -> None:
        plan.execute(self.index, self.store)

    def verify_targets(self, model: str) -> dict[str, int]:
        return self.verifier.verify_targets(model)

    def verify_blob(self, digest: str) -> str:
        return self.verifier.verify_blob(digest)

    async def repair(self, digests: list[str]) -> list[str]:
        """Re-download every model that uses one of these blobs; the names repaired."""
        return await self.verifier.repair(digests, self._repair_one)
