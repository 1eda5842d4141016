"""Capacity: what the cache uses, and admission of new downloads against `max_size`.

A download is admitted before its first byte is fetched (its pipeline calls `admit` on the
job's worker thread): if the bytes it needs take usage past the high watermark, least
recently used models are evicted down to the low watermark; if even that cannot make room,
the download fails with ExhaustedError and nothing is fetched.

Thread safety: admission runs on download worker threads while the event loop grants and
releases leases. The lease table and the held bytes live in Leases behind its own lock; the
names being fetched right now live here, behind `_room`, which also serialises admissions,
so two of them never plan to evict the same bytes.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from weightcache.contract.errors import ExhaustedError
from weightcache.progress import human
from weightcache_daemon.cache.eviction import Evictor
from weightcache_daemon.cache.leases import Leases
from weightcache_daemon.config import Config, capacity_bytes
from weightcache_daemon.ingest.ledger import Ledger
from weightcache_daemon.observe.metrics import Metrics
from weightcache_daemon.records import Stats
from weightcache_daemon.storage.blobs import BlobStore
from weightcache_daemon.storage.index import Index

__all__ = ["Admission", "Stats"]


class Admission:
    def __init__(self, cfg: Config, store: BlobStore, index: Index, leases: Leases, ledger: Ledger,
                 metrics: Metrics, evictor: Evictor) -> None:  # fmt: skip
        self.cfg = cfg
        self.store = store
        self.index = index
        self.leases = leases
        self.ledger = ledger
        self.metrics = metrics
        self.evictor = evictor
        self.capacity = capacity_bytes(cfg)
        self._room = threading.Lock()
        self._admit = threading.Lock()  # admission and reservation as one step
        # Names a fetch is producing right now (count per name): admission for another
        # download never evicts them, so a model is not evicted between its commit and the
        # manifest its caller is waiting for. Changed and read under _room.
        self._fetching: dict[str, int] = {}

    @contextmanager
    def fetching(self, name: str) -> Iterator[None]:
        """Protect `name` from capacity eviction while a fetch produces it."""
        self._mark(name, +1)
        try:
            yield
        finally:
            self._mark(name, -1)

    def _mark(self, name: str, delta: int) -> None:
        with self._room:
            n = self._fetching.get(name, 0) + delta
            if n > 0:
                self._fetching[name] = n
            else:
                self._fetching.pop(name, None)

    def usage(self) -> int:
        """Bytes the cache is responsible for: stored blobs, held unlinked ones, admitted downloads."""
        return sum(self.index.blobs().values()) + self.leases.held_bytes() + self.ledger.reserved_bytes()

    def filesystem_free(self) -> int:
        st = os.statvfs(self.store.root)
        return st.f_bavail * st.f_frsize

    def admit(self, job_id: int, label: str, need: int) -> None:
        """Admission before the first byte: make room (or ExhaustedError), then reserve the
        bytes until the job releases them. One step under one lock: two jobs admitted at
        once would each see the other's bytes as free otherwise."""
        with self._admit:
            self.make_room(need, label)
            self.ledger.reserve(job_id, need)

    def release(self, job_id: int) -> None:
        self.ledger.release(job_id)

    def make_room(self, need: int, label: str) -> None:
        """Admit `need` new bytes for model `label`, evicting least recently used models if that
        takes usage past the high watermark; ExhaustedError before a byte is fetched otherwise."""
        free = self.filesystem_free()
        if self.capacity and need > self.capacity:
            raise ExhaustedError(
                f"model {label} needs {human(need)}, more than the cache capacity of {human(self.capacity)}: "
                "raise max_size (weightcached --max-size, or max_size / max_size_percent in its config), or fetch "
                "fewer files (include/exclude)"
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
            plan = self.evictor.plan_lru(max(used - target, 0), exclude={label, *self._fetching})
            if plan.models:
                plan.execute(self.index, self.store, self.leases, self.metrics, trigger="capacity")
            used_after = used - plan.bytes_freed
            fits_capacity = not self.capacity or used_after + need <= self.capacity
            if not fits_capacity or need > self.filesystem_free():
                raise ExhaustedError(
                    f"model {label} needs {human(need)} but only {human(max(self.capacity - used_after, 0))} of the "
                    f"capacity and {human(self.filesystem_free())} of the filesystem can be freed: the rest is pinned, "
                    "in use, or being downloaded (cachectl ls shows which; unpin or evict some, free the "
                    "filesystem, or raise max_size)"
                )

    def stats(self) -> Stats:
        blobs = self.index.blobs()
        return Stats(
            models=len(self.index.models()),
            snapshots=len(self.index.snapshot_ids()),
            blobs=len(blobs),
            logical_bytes=self.index.logical_bytes(),
            stored_bytes=sum(blobs.values()),
            bytes_downloaded=self.ledger.bytes_downloaded(),
            active_downloads=self.ledger.running(),
            leases=len(self.leases),
            filesystem_free=self.filesystem_free(),
            held_bytes=self.leases.held_bytes(),
            capacity=self.capacity,
        )
