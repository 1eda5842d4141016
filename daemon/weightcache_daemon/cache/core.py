"""The cache core: the one object the gRPC handlers and the descriptor server call.

It coordinates the parts that decide, each in its own module, and owns only what spans them:
fetching a model (resolve or download, then name it, then its manifest), resuming
interrupted downloads, and granting a snapshot's files over fd.sock.

- naming.py: model references, names and who may point them (resolve, check_snapshot)
- catalog.py: manifests and model views; list, show, pin
- admission.py: usage and capacity admission for downloads; stats
- eviction.py: eviction and gc plans (immutable records with their effect) and their execution
- verify.py: verify, quarantine, the damaged check, repair
- tenants.py: what a tenant sees (`Scope`) and its download bounds (`TenantQuotas`)
- ingest.jobs: the download jobs (`Jobs`)

None of them is built here: assembly.py builds them and passes them in (`CoreParts`).

A fetch reads as its steps: resolve (`_fetch_reference` for a name or snapshot id) → cached?
(`_cached_for_client`) → admit (`Admission.fetching`, then the job's own admission) → start
or follow (`Jobs.start`) → name → manifest (`_follow`, or `_stream_job` for an early answer).

The one-line methods at the end stay: the edges depend on this one object, which keeps a
handler's construction and its tests to one collaborator, and the services behind them are
free to move without touching the edges.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import structlog

from weightcache.contract.errors import (
    BusyError,
    ExhaustedError,
    InternalError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
    WeightcacheError,
)
from weightcache_daemon import uris
from weightcache_daemon.cache.admission import Admission
from weightcache_daemon.cache.catalog import Catalog
from weightcache_daemon.cache.eviction import Evictor, EvictPlan, GCPlan
from weightcache_daemon.cache.leases import Leases
from weightcache_daemon.cache.naming import Names, check_name, default_name, snapshot_not_found
from weightcache_daemon.cache.tenants import Scope, TenantQuotas
from weightcache_daemon.cache.verify import Verifier
from weightcache_daemon.config import Config
from weightcache_daemon.ingest.early import EarlySnapshot
from weightcache_daemon.ingest.jobs import TICK, Job, Jobs
from weightcache_daemon.ingest.resume import IngestState
from weightcache_daemon.observe.metrics import Metrics
from weightcache_daemon.records import (
    ActiveDownload,
    FileRow,
    JobKey,
    Lease,
    Manifest,
    ModelRow,
    ModelView,
    ProgressState,
    Readiness,
    Span,
    Stats,
    layer_spans,
    qualified_name,
    split_name,
)
from weightcache_daemon.storage.blobs import BlobStore
from weightcache_daemon.storage.index import Index

__all__ = ["Core", "CoreParts", "Grant"]

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
    early: EarlySnapshot | None = None

    def open(self, store: BlobStore, f: FileRow) -> int:
        """A read-only descriptor of one granted file."""
        if self.early is not None:
            return self.early.open(f.path, store.open_file)
        return store.open(f.sha256)


@dataclass(frozen=True)
class CoreParts:
    """The services a Core coordinates, built once and passed in (cache/assembly.py builds the
    daemon's; a test may pass fakes): nothing below the core is built by the core itself."""

    names: Names
    catalog: Catalog
    evictor: Evictor
    admission: Admission
    verifier: Verifier
    scopes: dict[str, Scope]  # every tenant whose sockets are bound, by namespace ("" = the default)
    quotas: TenantQuotas
    jobs: Jobs


class Core:
    def __init__(
        self, cfg: Config, store: BlobStore, index: Index, leases: Leases, metrics: Metrics, parts: CoreParts
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.store = store
        self.index = index
        self.leases = leases
        self.names = parts.names
        self.catalog = parts.catalog
        self.evictor = parts.evictor
        self.admission = parts.admission
        self.verifier = parts.verifier
        self.capacity = self.admission.capacity
        self.scopes = parts.scopes
        self.quotas = parts.quotas
        self.jobs = parts.jobs
        # Client names being fetched, with the source and filters they are fetched for (_claim).
        self._claims: dict[str, JobKey] = {}
        # Client-serving work (manifests, listings, ReadRange; also the loop's default executor)
        # has its own threads: downloads run in the job registry's pool and admin work (verify,
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
        scope: Scope | None = None,
    ) -> AsyncIterator[ProgressState | Manifest | Readiness]:
        """Ensure (client) and Prefetch (admin): progress events, then the Manifest.

        `early` (Ensure only): a model that must be downloaded is answered as soon as every
        header is known, with an early Manifest; Readiness and progress events follow, and
        the committed Manifest ends the stream (see _stream_job).

        `owner` is who names the model (index.OWNERS): "client" for Ensure, "admin" for
        Prefetch by default, "models.d" for declared models. See Index.set_model for what each
        may name. `scope` (required for a client): the tenant whose socket the request came
        in on; it sees, names and downloads only as tenants.py says."""
        if not admin and scope is None:
            raise InternalError("a client fetch needs its tenant's scope")
        owner = owner or ("admin" if admin else "client")
        shown: list[str] = []  # the name a declared tenant's manifests carry (its namespace, unprefixed)
        async for ev in self._fetch(model, name, include, exclude, admin, pin, owner, early, scope, shown):
            if scope is not None and scope.ns and isinstance(ev, Manifest):
                # A snapshot keeps the source of whoever committed its bytes first, maybe another
                # tenant's private one: a tenant is shown its own name and a source it knows.
                asked = uris.normalize(model) if "://" in model else ""
                ev = replace(ev, model=shown[-1] if shown else "", source=self._source_for(scope, ev, asked))
            yield ev

    def _source_for(self, scope: Scope, manifest: Manifest, asked: str) -> str:
        """The source a tenant's manifest names: the one it asked for, else that of a name it
        sees pointing at the snapshot, else none."""
        if asked:
            return asked
        rows = [r for r in self.index.models_of_snapshot(manifest.snapshot_id) if scope.sees(r)]
        rows.sort(key=lambda r: scope.display(r.name) != manifest.model)  # its own name first
        return rows[0].source if rows else ""

    async def _fetch(self, model: str, name: str, include: Sequence[str], exclude: Sequence[str], admin: bool,
                     pin: bool | None, owner: str, early: bool, scope: Scope | None,
                     shown: list[str]) -> AsyncIterator[ProgressState | Manifest | Readiness]:  # fmt: skip
        if "://" not in model:
            if name or include or exclude:
                raise InvalidInputError(f"model {model[:200]!r}: name/include/exclude apply to source URIs only")
            async for ev in self._fetch_reference(model, admin=admin, pin=pin, early=early, scope=scope, shown=shown):
                yield ev
            return
        # Everything below sees the canonical URI only (uris.py): the allow-list, the job key,
        # the index and the source.
        uri = uris.normalize(model)
        key = self.names.key(uri, include, exclude)
        if scope is not None:
            pin = None  # a client never pins
            self._check_client_source(uri, scope)
            cached = self._cached_for_client(key, name, scope)
            if cached is not None:
                self.metrics.hits.labels("ensure").inc()
                self.index.touch(cached.name)
                shown.append(scope.display(cached.name))
                yield await self.manifest_async(cached.snapshot_id, cached.name)
                return
            name = self._client_name(name, key, scope)
            self._check_names_left(name, scope)
            self.names.check_owner(name, key, owner)
            shown.append(scope.display(name))
        else:
            name = self._admin_name(name, uri)
        self.metrics.misses.labels("prefetch" if admin else "ensure").inc()
        claimed = self._claim(name, key) if scope is not None else False
        try:
            # admitted downloads never evict the name being made; a tenant's downloads are bounded
            with self.admission.fetching(name):
                await self._after_same_source(key)
                await self._after_other_tenants(key, scope)
                running = self.jobs.running()
                if scope is not None and not any(j.key == key for j in running):  # a new job of this tenant's
                    self.quotas.may_start(scope, [j.label for j in running])
                job = self.jobs.start(key, name, pin, owner)  # a new job, or the running one to follow
                if claimed:
                    job.result.add_done_callback(functools.partial(self._unclaimed, name, key))
                    claimed = False
                follow = self._stream_job(job, name, (pin, owner)) if early else self._follow(job, name, pin, owner)
                async for ev in follow:
                    yield ev
        finally:
            if claimed:  # no job was started for it
                self._unclaim(name, key)

    def _client_name(self, name: str, key: JobKey, scope: Scope) -> str:
        """The index name a client's request makes: its own name in its tenant's namespace (never
        a shared model's name it sees), or an unpredictable default one."""
        if not name:
            return self.names.client_default_name(key, scope, self._claims.get)
        check_name(name)
        shared = self.index.model(name) if scope.ns else None
        if shared is not None and scope.sees(shared):
            raise PermissionDeniedError(
                f"model name {name!r} is a shared model's name (source {shared.source}); a tenant's name never "
                "shadows a shared one: use another name"
            )
        return scope.key(name)

    def _check_names_left(self, name: str, scope: Scope) -> None:
        """A new name of a declared tenant's counts toward its max_names (each filter variant of
        a source is a name of its own, with its own view directory)."""
        cap = scope.tenant.max_names
        if not cap or self.index.model(name) is not None or name in self._claims:
            return
        mine = {r.name for r in self.index.models() if r.tenant == scope.ns}
        mine |= {n for n in self._claims if split_name(n)[0] == scope.ns}
        if len(mine) >= cap:
            raise ExhaustedError(
                f"tenant {scope.label}: model name {split_name(name)[1]!r} would be its {len(mine) + 1}th; its "
                f"max_names is {cap}: ask for a model it already has by name, or have the admin evict unused ones"
            )

    def _admin_name(self, name: str, uri: str) -> str:
        """An admin's name: shared, or '<tenant>:<name>' in a declared tenant's namespace."""
        tenant, bare = split_name(name or default_name(uri))
        check_name(bare)
        if tenant and tenant not in self.scopes:
            raise InvalidInputError(
                f"model name {name!r}: no tenant {tenant[:80]!r} is declared in the daemon's config (a name "
                "'<tenant>:<name>' puts a model in that tenant's namespace)"
            )
        return qualified_name(tenant, bare)

    def _claim(self, name: str, key: JobKey) -> bool:
        """Reserve a client's name for its source and filters until the download ends, so a
        concurrent request for the same name with other filters fails now, before any byte is
        fetched, instead of after its download. True if this call made the claim."""
        other = self._claims.get(name)
        if other is not None and other != key:
            raise BusyError(
                f"model name {split_name(name)[1]!r} is being fetched right now from {other.uri} with other "
                "include/exclude filters; wait for that download, or use another name"
            )
        if other is None:
            self._claims[name] = key
            return True
        return False

    def _unclaimed(self, name: str, key: JobKey, _done: asyncio.Future[str]) -> None:
        self._unclaim(name, key)

    def _unclaim(self, name: str, key: JobKey) -> None:
        if self._claims.get(name) == key:
            del self._claims[name]

    async def _after_same_source(self, key: JobKey) -> None:
        """Filter variants of one source share the bytes already fetched: a download waits for
        running downloads of the same source with other filters, then starts and reuses every
        file they fetched (index.known_object), instead of fetching the same files at once."""
        while True:
            running = self.jobs.running()
            if any(j.key == key for j in running):
                return
            others = [j.result for j in running if j.key.uri == key.uri and j.key != key]
            if not others:
                return
            await asyncio.wait(others)

    async def _after_other_tenants(self, key: JobKey, scope: Scope | None) -> None:
        """A declared tenant never joins another tenant's download: a job carries its starter's
        name, quota and errors. It waits for that job to end (without its outcome), then starts
        its own, admitted against its own quota, which reuses every file already fetched
        (index.known_object): the bytes are still shared by content, the job is not."""
        if scope is None:
            return
        while True:
            job = next((j for j in self.jobs.running() if j.key == key), None)
            if job is None or split_name(job.label)[0] == scope.ns:
                return
            await asyncio.wait([job.result])

    async def _fetch_reference(
        self, model: str, *, admin: bool, pin: bool | None, early: bool, scope: Scope | None, shown: list[str]
    ) -> AsyncIterator[ProgressState | Manifest | Readiness]:
        """A name or snapshot id: its first download if that is still running (early only),
        else what it resolves to (fetched again first if a blob of it is damaged)."""
        job = self._downloading(model, scope) if early else None
        if job is not None:  # a name whose first download is running: read it as it arrives
            if scope is not None:
                shown.append(scope.display(job.label))
            async for ev in self._stream_job(job, job.label, None):
                yield ev
            return
        try:
            snapshot, row = self.names.resolve(model, scope)
        except NotFoundError as exc:
            allow = None if scope is None else (lambda u: uris.allowed(u, scope.tenant.client_sources))
            whose = f"tenant {scope.tenant.name}'s" if scope is not None and scope.tenant.name else "the daemon's"
            raise NotFoundError(f"{exc}{uris.path_hint(model, allow, whose)}") from None
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
            if scope is not None:
                shown.append(scope.display(row.name))
        yield await self.manifest_async(snapshot, row.name if row else "")

    def _check_client_source(self, uri: str, scope: Scope) -> None:
        if not uris.allowed(uri, scope.tenant.client_sources):
            whose = f"tenant {scope.tenant.name}'s" if scope.tenant.name else "the daemon's"
            raise PermissionDeniedError(
                f"source {uri}: clients may not trigger this download (not in {whose} client_sources "
                f"allow-list); an admin can run: cachectl prefetch {uri}"
            )

    def _cached_for_client(self, key: JobKey, name: str, scope: Scope) -> ModelRow | None:
        """A client asks for presence, not freshness: a cached copy of the same source that its
        tenant sees answers at once."""
        same = [r for r in self.index.models_by_source(key.uri, key.filters) if scope.sees(r)]
        if name:
            target = scope.find(name)
            same = [r for r in same if target is not None and r.name == target.name]
        return same[0] if same else None

    async def _follow(
        self, job: Job, name: str, pin: bool | None, owner: str
    ) -> AsyncIterator[ProgressState | Manifest | Readiness]:
        """Progress until the job ends, then name the snapshot for this caller and its manifest."""
        async for p in job.watch():
            if not job.result.done():
                yield p
        snapshot = await asyncio.shield(job.result)
        self.names.name_model(name, job.key, snapshot, pin, owner)
        yield await self.manifest_async(snapshot, name)

    def _downloading(self, name: str, scope: Scope | None = None) -> Job | None:
        """The running job that will record `name`, if its name is not in the index yet (for a
        tenant: one it would resolve `name` to)."""
        keys = [name] if scope is None else scope.candidates(name)
        for k in keys:
            if self.index.model(k) is not None:
                return None
            job = next((j for j in self.jobs.running() if j.label == k), None)
            if job is not None:
                return job
        return None

    async def _stream_job(
        self, job: Job, name: str, naming: tuple[bool | None, str] | None
    ) -> AsyncIterator[ProgressState | Manifest | Readiness]:
        """Follow a job for an early Ensure: progress until its early snapshot is published, the
        early manifest, then every change of readiness (coalesced: a slow reader gets the
        merged state) and progress now and then, then the committed manifest or the job's error.
        The job never depends on this caller: one that goes away leaves the download going.
        `naming` (pin, owner): record `name` for the caller as fetch() does; None when `name`
        is the job's own (the job names it)."""
        loop = asyncio.get_running_loop()
        seen: dict[str, int] = {}
        announced: EarlySnapshot | None = None
        last_progress = 0.0
        while True:
            early = job.early
            pulse = early.pulse() if early is not None else None  # taken before the state is read
            if announced is not None and announced.error is not None:
                # Revoked (a file changed at the source mid-download): what this reader was told
                # is void even if the job goes on and commits the new version.
                raise announced.error
            if early is not None and announced is None and early.error is None and not job.result.done():
                announced = early
                yield early.manifest
            if announced is not None:
                ready = announced.changes(seen)
                if ready is not None:
                    yield ready
            if job.result.done():
                break
            if loop.time() - last_progress >= TICK:
                last_progress = loop.time()
                yield ProgressState(**vars(job.progress))
            # Wake at the next readiness change, the early snapshot's publication, the job's end,
            # or the next progress tick, whichever comes first.
            waits: list[asyncio.Future[Any]] = []
            if pulse is not None:
                waits.append(asyncio.ensure_future(pulse.wait()))
            if announced is None and not job.early_set.is_set():
                waits.append(asyncio.ensure_future(job.early_set.wait()))
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
        """Downloads in flight, with their early readers."""
        out = []
        for job in self.jobs.running():
            early = job.early
            sid = early.snapshot_id if early is not None else ""
            out.append(ActiveDownload(job.label, job.key.uri, sid, ProgressState(**vars(job.progress)),
                                self.jobs.readers(sid) if sid else 0, job.started))  # fmt: skip
        return sorted(out, key=lambda d: d.name)

    def _refetch(self, row: ModelRow) -> AsyncIterator[ProgressState | Manifest | Readiness]:
        """Fetch a named model again from its source, as the admin would (damaged or repaired)."""
        f = row.filters
        return self.fetch(row.source, row.name, f.include, f.exclude, admin=True, owner=row.owner)

    async def _repair_one(self, row: ModelRow) -> None:
        async for _ in self._refetch(row):
            pass

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
        self,
        snapshot_id: str,
        file: tuple[str, int, int] | None = None,
        layers: tuple[int, int] | None = None,
        scope: Scope | None = None,
    ) -> list[Span]:
        """What a ReadRange reads: a (path, offset, length) file range or a (first, last) layer range."""
        sid, early = self._visible(snapshot_id, scope)
        if early is not None:
            if file is not None:
                return [early.file_span(*file)]
            if layers is not None:
                return layer_spans(early.manifest, *layers)
        elif file is not None:
            return [self.catalog.file_span(sid, *file)]
        elif layers is not None:
            return layer_spans(await self.manifest_async(sid), *layers)
        raise InvalidInputError("ReadRange needs a file range or a layer range")

    def open_span(self, snapshot_id: str, span: Span) -> int:
        """A read-only descriptor of the file a span reads (a blob, or a file still downloading)."""
        early = self.jobs.early_snapshot(snapshot_id)
        if early is not None:
            return early.open(span.path, self.store.open_file)
        if not span.sha256:  # an early span whose download committed since: the blob has the bytes
            sid, _ = self._early_or_committed(snapshot_id)
            digest = next((f.sha256 for f in self.index.files(sid) if f.path == span.path), None)
            if digest is None:
                raise NotFoundError(f"file {span.path[:200]!r} of snapshot {sid} is no longer in the cache")
            return self.store.open(digest)
        return self.store.open(span.sha256)

    async def wait_span(self, snapshot_id: str, path: str, offset: int, length: int) -> None:
        """Return once bytes [offset, offset+length) of `path` are on disk (at once for a
        committed snapshot); raises the download's error if it failed meanwhile."""
        early = self.jobs.early_snapshot(snapshot_id)
        if early is not None:
            await early.wait_ready(path, offset, offset + length)
        else:
            self._early_or_committed(snapshot_id)  # ended in failure: raise it

    def _early_or_committed(self, snapshot_id: str) -> tuple[str, EarlySnapshot | None]:
        """A snapshot id as clients may hold it: an early (downloading) snapshot; a provisional id
        whose download ended (its content id, or its error); or a committed snapshot."""
        early = self.jobs.early_snapshot(snapshot_id)
        if early is not None:
            return snapshot_id, early
        ended = self.jobs.ended_as(snapshot_id)
        if isinstance(ended, WeightcacheError):
            raise ended
        if isinstance(ended, str):
            return ended, None
        return self.names.check_snapshot(snapshot_id), None

    def _visible(self, snapshot_id: str, scope: Scope | None) -> tuple[str, EarlySnapshot | None]:
        """_early_or_committed, for a tenant: a committed snapshot no name it sees points at is
        answered exactly like one that does not exist. A provisional id (of a download in
        flight, or just ended) is unguessable and told only to those who asked for that download,
        so holding one is the right to read it."""
        sid, early = self._early_or_committed(snapshot_id)
        if scope is not None and early is None and sid == snapshot_id and not scope.sees_snapshot(sid):
            raise snapshot_not_found(sid)
        return sid, early

    # ---------------------------------------------------------------- fd.sock

    def open_snapshot_for(self, pid: int, uid: int, gid: int, snapshot_id: str, lease: Lease | None = None,
                          scope: Scope | None = None) -> Grant:  # fmt: skip
        """Grant a snapshot to a peer: validate, lease, check every blob is usable, mark use.

        The lease comes first: from then on eviction sees the snapshot as in use (or, if it
        already planned it, counts its bytes as held), so what the caller opens stays
        accounted. `lease` is the connection's existing lease on this snapshot, kept as it
        is; a new one is released again if the snapshot cannot be granted.

        A provisional id of a download in flight grants the files being written (early.py);
        the lease moves to the content id when the download commits."""
        sid, early = self._visible(snapshot_id, scope)
        tenant = scope.ns if scope is not None else ""
        if early is not None:
            return self._grant_early(pid, uid, gid, early, lease, tenant)
        files = self.index.files(sid)
        new = lease is None
        if lease is None:
            lease = self.leases.acquire(sid, pid, uid, gid, sum(f.size for f in files), tenant)
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

    def _grant_early(self, pid: int, uid: int, gid: int, early: EarlySnapshot, lease: Lease | None,
                     tenant: str = "") -> Grant:  # fmt: skip
        new = lease is None
        if lease is None:
            lease = self.leases.acquire(early.snapshot_id, pid, uid, gid, early.bytes_total, tenant)
        if early.committed is not None:  # committed while we leased: the lease protects the content id
            self.leases.rename(early.snapshot_id, early.committed)
        if early.error is not None:
            if new:
                self.leases.release(lease.token)
            raise early.error
        self.metrics.grants.inc()
        return Grant(early.snapshot_id, tuple(early.file_rows()), lease, early)

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

    def list_models(self, scope: Scope | None = None) -> list[ModelView]:
        """Every model (the admin), or those a tenant sees, under the names it knows them by."""
        if scope is None:
            return self.catalog.list_models()
        return [
            replace(v, row=replace(v.row, name=scope.display(v.row.name))) for v in map(self.catalog.view, scope.rows())
        ]

    def show(self, model: str) -> tuple[ModelView | None, Manifest, ActiveDownload | None]:
        """A model's record and manifest; for a name whose first download is in flight, its
        early manifest and where the download stands."""
        job = self._downloading(model)
        if job is not None and job.early is not None:
            return None, job.early.manifest, next((d for d in self.downloads() if d.name == job.label), None)
        try:
            view, manifest = self.catalog.show(model)
        except NotFoundError as exc:  # the hint open() gives: a directory is named by its URI
            raise NotFoundError(f"{exc}{uris.path_hint(model, None)}") from None
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
