"""The cache core: what the gRPC handlers and the descriptor server call.

Handlers validate and convert; everything that decides lives here.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from weightcache.errors import (
    BusyError,
    ExhaustedError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
    WeightcacheError,
)
from weightcache.layers import default_layer_of, order_layers
from weightcache.safetensors_format import TensorInfo

from .config import Config, capacity_bytes
from .index import FileRow, Index, ModelRow
from .jobs import Fetcher, JobKey, ProgressState, read_state
from .leases import Lease, Leases
from .metrics import Metrics
from .progress import human
from .sources import parse_uri
from .store import LocalBlobStore, check_digest, hash_file
from .views import build_view, remove_view, view_path

log = structlog.get_logger("weightcached.core")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}(/[A-Za-z0-9][A-Za-z0-9._-]{0,127})?")
_SNAPSHOT = re.compile(r"[0-9a-f]{32}")


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name) or ".." in name:
        raise InvalidInputError(
            f"model name {name[:200]!r}: use letters, digits, '.', '_', '-' (at most 128), optionally one 'org/' prefix"
        )
    return name


def default_name(uri: str) -> str:
    _, _, path = parse_uri(uri)
    last = [p for p in path.split("/") if p]
    name = re.sub(r"[^A-Za-z0-9._-]", "-", last[-1] if last else "model").lstrip("._-") or "model"
    return name[:128]


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


@dataclass(frozen=True)
class ModelView:
    row: ModelRow
    size: int
    file_count: int
    leases: list[Lease]
    path: str


@dataclass
class EvictPlan:
    models: list[str] = field(default_factory=list)
    snapshots: list[str] = field(default_factory=list)
    views: list[tuple[str, str]] = field(default_factory=list)
    blobs: list[str] = field(default_factory=list)
    bytes_freed: int = 0


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
        self.capacity = capacity_bytes(cfg)
        # Bytes of blobs unlinked while a process still had them open (evicted with --force):
        # they use disk until the last lease on their snapshot goes.
        self.held: dict[str, int] = {}
        self._room = threading.Lock()
        fetcher.make_room = self.make_room

    # ---------------------------------------------------------------- resolution

    def resolve(self, model: str) -> tuple[str, ModelRow | None]:
        """A name, snapshot id or source URI of a cached model -> (snapshot id, model row)."""
        if not model:
            raise InvalidInputError("model is empty: give a name, a snapshot id or a source URI")
        row = self.index.model(model)
        if row is not None:
            return row.snapshot_id, row
        if _SNAPSHOT.fullmatch(model) and self.index.snapshot_source(model) is not None:
            rows = self.index.models_of_snapshot(model)
            return model, rows[0] if rows else None
        if "://" in model:
            for r in self.index.models():
                if r.source == model:
                    return r.snapshot_id, r
        raise NotFoundError(f"model {model[:200]!r} is not in the cache (cachectl prefetch URI --name NAME adds it)")

    def check_snapshot(self, snapshot_id: str) -> str:
        if not _SNAPSHOT.fullmatch(snapshot_id):
            raise InvalidInputError(f"snapshot id {snapshot_id[:80]!r} is not 32 lowercase hex characters")
        if self.index.snapshot_source(snapshot_id) is None:
            raise NotFoundError(f"snapshot {snapshot_id} is not in the cache")
        return snapshot_id

    def _key(self, uri: str, include: list[str], exclude: list[str]) -> JobKey:
        parse_uri(uri)  # validates the shape
        return JobKey(uri, tuple(include) or self.cfg.include, tuple(exclude))

    # ---------------------------------------------------------------- fetch

    async def fetch(
        self,
        model: str,
        name: str,
        include: list[str],
        exclude: list[str],
        *,
        admin: bool,
        pin: bool | None = None,
    ) -> AsyncIterator[ProgressState | Manifest]:
        """Ensure (client) and Prefetch (admin): progress events, then the Manifest."""
        if "://" not in model:
            if name or include or exclude:
                raise InvalidInputError(f"model {model[:200]!r}: name/include/exclude apply to source URIs only")
            snapshot, row = self.resolve(model)
            if row is not None and self.damaged(snapshot):
                # A blob failed verification or vanished: fetch the model again, then go on.
                log.warning("refetching_damaged_model", model=row.name, snapshot=snapshot)
                filters = json.loads(row.filters)
                async for ev in self.fetch(row.source, row.name, filters["include"], filters["exclude"], admin=True):
                    if isinstance(ev, Manifest):
                        snapshot = ev.snapshot_id
                    else:
                        yield ev
            self.metrics.hits.labels("prefetch" if admin else "ensure").inc()
            if row is not None:
                self.index.touch(row.name)
                if pin is not None:
                    self.index.set_pinned(row.name, pin)
            yield self.manifest(snapshot, row.name if row else "")
            return
        key = self._key(model, include, exclude)
        name = check_name(name or default_name(model))
        if not admin:
            if not self.cfg.client_may_fetch(model):
                raise PermissionDeniedError(
                    f"source {model}: clients may not trigger this download (not in the daemon's client_sources "
                    f"allow-list); an admin can run: cachectl prefetch {model}"
                )
            # A client asks for presence, not freshness: a cached copy of the same source answers at once.
            cached = [
                r for r in self.index.models_by_source(key.uri, key.filters) if r.name == name
            ] or self.index.models_by_source(key.uri, key.filters)
            if cached:
                self.metrics.hits.labels("ensure").inc()
                self.index.touch(cached[0].name)
                yield self.manifest(cached[0].snapshot_id, cached[0].name)
                return
        self.metrics.misses.labels("prefetch" if admin else "ensure").inc()
        job = self.fetcher.start(key, name, pin)
        async for p in job.watch():
            if not job.result.done():
                yield p
        snapshot = await asyncio.shield(job.result)
        self.name_model(name, key, snapshot, pin)
        yield self.manifest(snapshot, name)

    def name_model(self, name: str, key: JobKey, snapshot: str, pin: bool | None) -> None:
        build_view(self.store, name, snapshot, self.index.files(snapshot))
        old = self.index.model(name)
        self.index.set_model(name, key.uri, snapshot, key.filters, pin)
        if old is not None and old.snapshot_id != snapshot:
            log.info("model_updated", model=name, old_snapshot=old.snapshot_id, snapshot=snapshot)

    async def run_prefetch(self, uri: str, name: str, include: list[str], exclude: list[str], pin: bool | None,
                           why: str) -> None:  # fmt: skip
        """A prefetch nobody waits on (resume after a restart, models.d): logged, never raised."""
        try:
            async for _ in self.fetch(uri, name, include, exclude, admin=True, pin=pin):
                pass
            log.info("background_prefetch_done", model=name, source=uri, reason=why)
        except WeightcacheError as exc:
            log.error("background_prefetch_failed", model=name, source=uri, reason=why, error=str(exc))

    def resume_ingests(self) -> list[asyncio.Task[None]]:
        """Restart the downloads a previous run left in ingest/ (they resume their parts)."""
        tasks = []
        for d in sorted(self.store.ingest.iterdir()):
            state = read_state(d)
            if state is None:
                continue
            name = str(state.get("name") or default_name(state["uri"]))
            pin = state.get("pin")
            tasks.append(asyncio.get_running_loop().create_task(self.run_prefetch(
                state["uri"], name, list(state.get("include", [])), list(state.get("exclude", [])),
                pin if isinstance(pin, bool) else None, "resume")))  # fmt: skip
            log.info("resuming_ingest", model=name, source=state["uri"])
        return tasks

    # ---------------------------------------------------------------- reading

    def manifest(self, snapshot_id: str, model: str = "", with_tensors: bool = True) -> Manifest:
        files = self.index.files(snapshot_id)
        entries: list[tuple[TensorInfo, str, str]] = []
        if with_tensors:
            for f in files:
                if f.path.endswith(".safetensors"):
                    entries.extend((t, f.path, default_layer_of(t.name)) for t in self.index.tensors(f.sha256))
        layers = order_layers(e[2] for e in entries)
        pos = {name: i for i, name in enumerate(layers)}
        file_pos = {f.path: i for i, f in enumerate(files)}
        entries.sort(key=lambda e: (pos[e[2]], file_pos[e[1]], e[0].offset))
        names = self.index.models_of_snapshot(snapshot_id)
        view_model = model or (names[0].name if names else "")
        path = str(view_path(self.store, view_model, snapshot_id)) if view_model else ""
        return Manifest(
            model=model,
            snapshot_id=snapshot_id,
            source=self.index.snapshot_source(snapshot_id) or "",
            files=files,
            tensors=[TensorEntry(t, fp, layer, pos[layer]) for t, fp, layer in entries],
            layers=layers,
            path=path,
        )

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
        snapshot, row = self.resolve(model)
        return (self.view(row) if row else None), self.manifest(snapshot, row.name if row else "")

    def set_pin(self, model: str, pinned: bool) -> ModelView:
        _, row = self.resolve(model)
        if row is None:
            raise NotFoundError(f"snapshot {model} has no name to pin; pin a model name")
        self.index.set_pinned(row.name, pinned)
        new = self.index.model(row.name)
        assert new is not None
        return self.view(new)

    # ---------------------------------------------------------------- capacity

    def usage(self) -> int:
        """Bytes the cache is responsible for: stored blobs, held unlinked ones, admitted downloads."""
        return sum(self.index.blobs().values()) + sum(self.held.values()) + sum(self.fetcher.reserved.values())

    def make_room(self, need: int, label: str) -> None:
        """Admit `need` new bytes for model `label`, evicting least recently used models if that
        takes usage past the high watermark; ExhaustedError before a byte is fetched otherwise."""
        free = self.filesystem_free()
        if self.capacity and need > self.capacity:
            raise ExhaustedError(
                f"model {label} needs {human(need)}, more than the cache capacity of {human(self.capacity)}"
            )
        with self._room:
            used = self.usage()
            target = None
            if self.capacity and used + need > self.capacity * self.cfg.high_watermark:
                target = int(self.capacity * self.cfg.low_watermark) - need
            if need > free:
                target = min(target if target is not None else used, used - (need - free))
            if target is None:
                return
            plan = self.plan_lru(max(used - target, 0), exclude={label})
            if plan.models:
                self.execute_evict(plan, trigger="capacity")
            used_after = used - plan.bytes_freed
            fits_capacity = not self.capacity or used_after + need <= self.capacity
            if not fits_capacity or need > self.filesystem_free():
                raise ExhaustedError(
                    f"model {label} needs {human(need)} but only {human(max(self.capacity - used_after, 0))} of the "
                    f"capacity and {human(self.filesystem_free())} of the filesystem can be freed: the rest is pinned, "
                    "in use, or being downloaded"
                )

    def plan_lru(self, nbytes: int, exclude: set[str] | None = None) -> EvictPlan:
        """The least recently used unpinned, unleased models whose removal frees >= nbytes (or all of them)."""
        plan = EvictPlan()
        if nbytes <= 0:
            return plan
        held = self.leases.held()
        chosen: list[str] = []
        for row in sorted(self.index.models(), key=lambda r: r.last_used):
            if row.pinned or row.snapshot_id in held or row.name in (exclude or set()):
                continue
            chosen.append(row.name)
            plan = self.plan_evict(chosen, all_unpinned=False, force=False)
            if plan.bytes_freed >= nbytes:
                break
        return plan

    def filesystem_free(self) -> int:
        st = os.statvfs(self.store.root)
        return st.f_bavail * st.f_frsize

    def lease_released(self, snapshot_id: str) -> None:
        if snapshot_id in self.held and not self.leases.of(snapshot_id):
            del self.held[snapshot_id]

    def stats(self) -> Stats:
        blobs = self.index.blobs()
        st = os.statvfs(self.store.root)
        return Stats(
            models=len(self.index.models()),
            snapshots=len(self.index.snapshot_ids()),
            blobs=len(blobs),
            logical_bytes=self.index.logical_bytes(),
            stored_bytes=sum(blobs.values()),
            bytes_downloaded=self.fetcher.bytes_downloaded,
            active_downloads=len(self.fetcher.jobs),
            leases=len(self.leases),
            filesystem_free=st.f_bavail * st.f_frsize,
            held_bytes=sum(self.held.values()),
            capacity=self.capacity,
        )

    # ---------------------------------------------------------------- eviction

    def plan_evict(self, models: list[str], all_unpinned: bool, force: bool) -> EvictPlan:
        if models and all_unpinned:
            raise InvalidInputError("give model names or --all-unpinned, not both")
        if not models and not all_unpinned:
            raise InvalidInputError("nothing to evict: give model names or --all-unpinned")
        rows: list[ModelRow] = []
        if all_unpinned:
            rows = [r for r in self.index.models() if not r.pinned]
        for m in models:
            _, row = self.resolve(m)
            if row is None:
                raise NotFoundError(f"snapshot {m} has no name; evict by name, or run cachectl gc")
            if row.pinned:
                raise BusyError(f"model {row.name} is pinned; cachectl unpin {row.name} first")
            rows.append(row)
        names = {r.name for r in rows}
        held = self.leases.held()
        plan = EvictPlan()
        remaining = [r for r in self.index.models() if r.name not in names]
        kept_snaps = {r.snapshot_id for r in remaining}
        # Least recently used first; leased models (only ever with force) last.
        for r in sorted(rows, key=lambda r: (r.snapshot_id in held, r.last_used)):
            if r.snapshot_id in held and not force:
                if all_unpinned:
                    continue  # in use right now: skipped, not an error, when sweeping
                raise BusyError(
                    f"model {r.name} is in use by {len(self.leases.of(r.snapshot_id))} process(es); "
                    "use --force to evict anyway (running processes keep their mappings)"
                )
            plan.models.append(r.name)
            plan.views.append((r.name, r.snapshot_id))
            if r.snapshot_id not in kept_snaps and r.snapshot_id not in plan.snapshots:
                plan.snapshots.append(r.snapshot_id)
        kept_blobs = {f.sha256 for s in kept_snaps for f in self.index.files(s)}
        sizes = self.index.blobs()
        for s in plan.snapshots:
            for f in self.index.files(s):
                if f.sha256 not in kept_blobs and f.sha256 not in plan.blobs:
                    plan.blobs.append(f.sha256)
                    plan.bytes_freed += sizes.get(f.sha256, 0)
        return plan

    def execute_evict(self, plan: EvictPlan, trigger: str = "admin") -> None:
        # References go before what they refer to: index rows, then views, then blobs.
        sizes = self.index.blobs()
        for snap in plan.snapshots:
            if self.leases.of(snap):  # unlinked, not truncated: its holders keep reading it
                self.held[snap] = sum(sizes.get(f.sha256, 0) for f in self.index.files(snap) if f.sha256 in plan.blobs)
        self.index.delete(plan.models, plan.snapshots, plan.blobs)
        for name, snap in plan.views:
            remove_view(self.store, name, snap)
        for b in plan.blobs:
            self.store.remove(b)
        self.metrics.evictions.labels(trigger).inc(len(plan.models))
        self.metrics.evicted_bytes.inc(plan.bytes_freed)
        log.info(
            "evicted", models=plan.models, snapshots=plan.snapshots, blobs=len(plan.blobs), bytes_freed=plan.bytes_freed
        )

    # ---------------------------------------------------------------- verify / gc

    def verify_targets(self, model: str) -> dict[str, int]:
        sizes = self.index.blobs()
        if not model:
            return sizes
        snapshot, _ = self.resolve(model)
        return {f.sha256: f.size for f in self.index.files(snapshot)}

    def damaged(self, snapshot_id: str) -> list[str]:
        """Blobs of a snapshot that are quarantined or missing."""
        bad = self.index.quarantined()
        return [f.sha256 for f in self.index.files(snapshot_id) if f.sha256 in bad or not self.store.has(f.sha256)]

    def quarantine(self, digest: str, reason: str) -> None:
        self.index.quarantine(digest, reason)
        moved = self.store.quarantine(digest)
        log.error("blob_quarantined", blob=digest, reason=reason, moved_to=str(moved) if moved else None)

    async def repair(self, digests: list[str]) -> list[str]:
        """Re-download every model that uses one of these blobs; the names repaired."""
        bad = set(digests)
        repaired = []
        for row in self.index.models():
            if any(f.sha256 in bad for f in self.index.files(row.snapshot_id)):
                filters = json.loads(row.filters)
                async for _ in self.fetch(row.source, row.name, filters["include"], filters["exclude"], admin=True):
                    pass
                repaired.append(row.name)
        return repaired

    def verify_blob(self, digest: str) -> str:
        """'ok', 'missing' or 'corrupt' for one blob; a corrupt blob is quarantined at once."""
        check_digest(digest)
        path = self.store.path(digest)
        if not path.is_file() or path.is_symlink():
            return "missing"
        if hash_file(path) == digest:
            return "ok"
        self.quarantine(digest, "sha256 mismatch")
        return "corrupt"

    def plan_gc(self) -> tuple[list[str], list[Path], list[str], int]:
        """(orphan blobs, stale ingest dirs, unnamed snapshots, bytes freed)."""
        if self.fetcher.jobs:
            # A running job has blobs committed but not yet indexed: they would look orphaned.
            raise BusyError(f"{len(self.fetcher.jobs)} download(s) in progress; run gc when they finish")
        named = {r.snapshot_id for r in self.index.models()}
        snapshots = [s for s in self.index.snapshot_ids() if s not in named]
        keep = {f.sha256 for s in named for f in self.index.files(s)}
        on_disk = set(self.store.digests())
        indexed = self.index.blobs()
        orphans = sorted((on_disk | set(indexed)) - keep)
        freed = 0
        for b in orphans:
            try:
                freed += self.store.path(b).lstat().st_size
            except FileNotFoundError:
                pass
        stale = sorted(self.store.ingest.iterdir())
        for p in stale:
            freed += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        return orphans, stale, snapshots, freed

    def execute_gc(self, orphans: list[str], stale: list[Path], snapshots: list[str]) -> None:
        self.index.delete([], snapshots, orphans)
        for s in snapshots:
            for d in self.store.snapshots.glob(f"**/{s}"):
                shutil.rmtree(d, ignore_errors=True)
        for b in orphans:
            self.store.remove(b)
        for p in stale:
            self.store.remove_ingest(p)
