"""Eviction and garbage collection as plans: decide first, then (unless it is a dry run) execute.

A plan is an immutable record of what would go and the bytes that frees; `--dry-run` shows
exactly the plan that would otherwise run. Planning reads the index and the lease table and
changes nothing; `execute` removes references before what they refer to (index rows, then
views, then blobs), so a crash midway leaves only orphans that gc or reconciliation remove.
Pinned models are never planned; leased ones only with force (unlinked, never truncated:
their holders keep reading, and the bytes count as held until the last lease goes).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import structlog

from weightcache.contract.errors import BusyError, InvalidInputError, NotFoundError
from weightcache_daemon.cache.leases import Leases
from weightcache_daemon.ingest.ledger import Ledger
from weightcache_daemon.observe.metrics import Metrics
from weightcache_daemon.records import ModelRow
from weightcache_daemon.storage.blobs import BlobStore
from weightcache_daemon.storage.index import Index
from weightcache_daemon.storage.views import remove_view

__all__ = ["EvictPlan", "Evictor", "GCPlan"]

log = structlog.get_logger("weightcached.core")


@dataclass(frozen=True)
class EvictPlan:
    models: tuple[str, ...] = ()
    snapshots: tuple[str, ...] = ()  # snapshots no remaining name uses
    views: tuple[tuple[str, str], ...] = ()  # (name, snapshot) symlink views to remove
    blobs: tuple[str, ...] = ()  # blobs no remaining snapshot or running download uses
    bytes_freed: int = 0

    def execute(self, index: Index, store: BlobStore, leases: Leases, metrics: Metrics,
                trigger: str = "admin") -> None:  # fmt: skip
        sizes = index.blobs()
        gone = set(self.blobs)
        for snap in self.snapshots:
            # unlinked, not truncated: its holders keep reading it (counted only while leased)
            leases.hold_if_leased(snap, sum(sizes.get(f.sha256, 0) for f in index.files(snap) if f.sha256 in gone))
        index.delete(list(self.models), list(self.snapshots), list(self.blobs))
        for name, snap in self.views:
            remove_view(store, name, snap)
        for b in self.blobs:
            store.remove(b)
        metrics.evictions.labels(trigger).inc(len(self.models))
        metrics.evicted_bytes.inc(self.bytes_freed)
        log.info("evicted", models=list(self.models), snapshots=list(self.snapshots), blobs=len(self.blobs),
                 bytes_freed=self.bytes_freed)  # fmt: skip


@dataclass(frozen=True)
class GCPlan:
    orphans: tuple[str, ...] = ()  # blobs on disk or in the index that no named snapshot uses
    stale_ingests: tuple[Path, ...] = ()  # ingest directories (no download is running)
    snapshots: tuple[str, ...] = ()  # snapshots without a name
    bytes_freed: int = 0

    def execute(self, index: Index, store: BlobStore) -> None:
        index.delete([], list(self.snapshots), list(self.orphans))
        for s in self.snapshots:
            for d in store.snapshots.glob(f"**/{s}"):
                shutil.rmtree(d, ignore_errors=True)
        for b in self.orphans:
            store.remove(b)
        for p in self.stale_ingests:
            store.remove_ingest(p)


class Evictor:
    """Plans evictions (by name, all unpinned, least recently used) and gc."""

    def __init__(self, store: BlobStore, index: Index, leases: Leases, ledger: Ledger,
                 resolve: Callable[[str], tuple[str, ModelRow | None]]) -> None:  # fmt: skip
        self.store = store
        self.index = index
        self.leases = leases
        self.ledger = ledger
        self.resolve = resolve

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
        out_models: list[str] = []
        out_snaps: list[str] = []
        out_views: list[tuple[str, str]] = []
        remaining = [r for r in self.index.models() if r.name not in names]
        # Unnamed snapshots keep their blobs too: a job that just committed one (and has not
        # named it yet) may share blobs with what is evicted; gc removes them when unneeded.
        kept_snaps = {r.snapshot_id for r in remaining} | (
            set(self.index.snapshot_ids()) - {r.snapshot_id for r in rows}
        )
        # Least recently used first; leased models (only ever with force) last.
        for r in sorted(rows, key=lambda r: (r.snapshot_id in held, r.last_used)):
            if r.snapshot_id in held and not force:
                if all_unpinned:
                    continue  # in use right now: skipped, not an error, when sweeping
                raise BusyError(
                    f"model {r.name} is in use by {len(self.leases.of(r.snapshot_id))} process(es); "
                    "use --force to evict anyway (running processes keep their mappings)"
                )
            out_models.append(r.name)
            out_views.append((r.name, r.snapshot_id))
            if r.snapshot_id not in kept_snaps and r.snapshot_id not in out_snaps:
                out_snaps.append(r.snapshot_id)
        kept_blobs = {f.sha256 for s in kept_snaps for f in self.index.files(s)}
        kept_blobs |= self.ledger.blobs_in_use()  # a running download reuses them: they stay
        sizes = self.index.blobs()
        out_blobs: list[str] = []
        freed = 0
        for s in out_snaps:
            for f in self.index.files(s):
                if f.sha256 not in kept_blobs and f.sha256 not in out_blobs:
                    out_blobs.append(f.sha256)
                    freed += sizes.get(f.sha256, 0)
        return EvictPlan(tuple(out_models), tuple(out_snaps), tuple(out_views), tuple(out_blobs), freed)

    def plan_lru(self, nbytes: int, exclude: Collection[str] = ()) -> EvictPlan:
        """The least recently used unpinned, unleased models (not named in `exclude`) whose
        removal frees >= nbytes (or all of them)."""
        plan = EvictPlan()
        if nbytes <= 0:
            return plan
        held = self.leases.held()
        chosen: list[str] = []
        for row in sorted(self.index.models(), key=lambda r: r.last_used):
            if row.pinned or row.snapshot_id in held or row.name in exclude:
                continue
            chosen.append(row.name)
            try:
                plan = self.plan_evict(chosen, all_unpinned=False, force=False)
            except (BusyError, NotFoundError):
                # leased, pinned or removed since the listing above (fd.sock and other jobs run
                # concurrently with admission): not a candidate any more
                chosen.pop()
                continue
            if plan.bytes_freed >= nbytes:
                break
        return plan

    def plan_gc(self) -> GCPlan:
        if self.ledger.running():
            # A running job has blobs committed but not yet indexed: they would look orphaned.
            raise BusyError(f"{self.ledger.running()} download(s) in progress; run gc when they finish")
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
        return GCPlan(tuple(orphans), tuple(stale), tuple(snapshots), freed)
