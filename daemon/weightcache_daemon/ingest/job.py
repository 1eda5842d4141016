"""One download job as everyone who waits on it sees it: its key, progress, result, early snapshot.

A job is one per (source URI, filters), shared by every caller (docs/architecture.md, decision 8).
The registry (jobs.py) creates it and runs its pipeline (pipeline.py) on a job thread; waiters
on the event loop follow `watch()`, `result` and, for early readers, `early`/`early_set`.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from weightcache_daemon.ingest.early import EarlySnapshot
from weightcache_daemon.ingest.resume import JobRecord
from weightcache_daemon.records import JobKey, ProgressState

__all__ = ["Job"]

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
    # then on clients may open the snapshot while it downloads (early.py). `early_set` wakes them.
    early: EarlySnapshot | None = None
    early_set: asyncio.Event = field(default_factory=asyncio.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def record(self) -> JobRecord:
        return JobRecord(self.key, self.label, self.pin, self.owner)

    def add_fetched(self, n: int) -> None:
        """n more bytes arrived (from the engine's threads)."""
        with self._lock:
            self.bytes_fetched += n
            self.progress.bytes_done += n

    def fetched(self) -> int:
        with self._lock:
            return self.bytes_fetched

    async def watch(self) -> AsyncIterator[ProgressState]:
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

    async def notify(self) -> None:
        """Wake every watcher (a progress tick, or the end)."""
        async with self.changed:
            self.version += 1
            self.changed.notify_all()
