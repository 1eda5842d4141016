"""The job registry: one download job per (source URI, filters), shared by every caller
(docs/architecture.md, decision 8), and the early snapshots of the jobs running now.

A job is accepted once its record (ingest/<job>/state.json, resume.py) is written: from then
on a crashed daemon resumes it at its next start. Its pipeline (pipeline.py: list → headers →
download → verify → commit) runs on a job thread; nothing of a job is visible until the
commit's index transaction; on any failure its ingest directory is removed and the store is as
before. When a job ends, its early snapshot ends with it (committed or failed), and the
outcome stays findable by provisional id for a while.

Callers (cache/core.py, server.py) see the registry through `Jobs`; what it needs from the
cache (admission, naming a committed snapshot, the leases of early readers) comes in at
construction as `Admitter` and `CacheLinks`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import structlog

from weightcache.contract.errors import InternalError, WeightcacheError
from weightcache_daemon.config import Config
from weightcache_daemon.ingest.early import EarlySnapshot
from weightcache_daemon.ingest.engine import BufferPool, RateLimiter
from weightcache_daemon.ingest.globs import GlobCache
from weightcache_daemon.ingest.job import Job
from weightcache_daemon.ingest.ledger import Ledger
from weightcache_daemon.ingest.pipeline import Admitter, Parts, Pipeline, store_error
from weightcache_daemon.ingest.resume import ingest_dir_name, record_intent
from weightcache_daemon.ingest.slots import FairSlots
from weightcache_daemon.observe.metrics import Metrics, source_label
from weightcache_daemon.records import JobKey, split_name
from weightcache_daemon.sources import Clients, Source, open_source
from weightcache_daemon.storage.blobs import BlobStore
from weightcache_daemon.storage.index import Index

__all__ = ["MAX_JOBS", "TICK", "CacheLinks", "Job", "JobRegistry", "Jobs"]

log = structlog.get_logger("weightcached.jobs")

TICK = 0.2  # seconds between progress events
MAX_JOBS = 8  # downloads running at once; more wait their turn
ENDED_KEPT = 1024  # outcomes of ended early snapshots kept for late askers


class CacheLinks(Protocol):
    """What a job needs from the cache around it (cache/ingest_links.py)."""

    def name_committed(self, job: Job, snapshot: str) -> None:
        """Give a committed job's snapshot its model name (from the job's thread), before the
        job's record goes: a crash in between leaves a record whose resume names it."""

    def move_leases(self, provisional: str, snapshot: str) -> None:
        """Early readers' leases now protect the committed snapshot."""

    def readers(self, provisional: str) -> int:
        """Processes holding an early snapshot over fd.sock."""


class Jobs(Protocol):
    """The job registry as its callers see it."""

    clients_ready: threading.Event

    def start(self, key: JobKey, label: str, pin: bool | None = None, owner: str = "admin") -> Job: ...

    def running(self) -> list[Job]: ...

    def early_snapshot(self, snapshot_id: str) -> EarlySnapshot | None: ...

    def ended_as(self, snapshot_id: str) -> str | WeightcacheError | None: ...

    def early_ids(self) -> list[str]: ...

    def readers(self, snapshot_id: str) -> int: ...

    async def shutdown(self) -> None: ...


class JobRegistry:
    def __init__(self, cfg: Config, store: BlobStore, index: Index, metrics: Metrics, ledger: Ledger,
                 admitter: Admitter, links: CacheLinks) -> None:  # fmt: skip
        self.cfg = cfg
        self.store = store
        self.metrics = metrics
        self.ledger = ledger
        self.links = links
        self.clients = Clients()  # S3 clients kept for the next download from the same source
        self.clients_ready = self.clients.prewarm(cfg.sources, cfg.download.concurrency)
        pool = BufferPool(cfg.download.concurrency + max(4, cfg.download.concurrency // 4), cfg.download.part_size)
        self.parts = Parts(cfg, store, index, metrics, ledger, admitter, self, self._open_source, pool,
                           RateLimiter(cfg.download.rate_limit), GlobCache(cfg.limits.glob_cache_size))  # fmt: skip
        self._jobs: dict[JobKey, Job] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Snapshots being downloaded, by provisional id, and how recent ones ended (the real id,
        # or the error): a client told a provisional id just before its job ended still gets an answer.
        self._early: dict[str, EarlySnapshot] = {}
        self._ended: OrderedDict[str, str | WeightcacheError] = OrderedDict()
        self._shutting_down = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # Jobs run in their own threads, never in the loop's default executor: client reads
        # (ReadRange, fd.sock helpers) never queue behind downloads. A job past MAX_JOBS waits
        # its turn here (LISTING) rather than taking a thread from everyone else.
        self.job_pool = ThreadPoolExecutor(max_workers=MAX_JOBS, thread_name_prefix="wc-job")
        # Which waiting job gets a freed thread: fair between tenants (slots.py).
        self.slots = FairSlots(MAX_JOBS, len(cfg.tenants()))

    def _open_source(self, uri: str, links: bool) -> Source:
        return open_source(uri, self.cfg, self.clients, links=links)

    # ---------------------------------------------------------------- Jobs

    def start(self, key: JobKey, label: str, pin: bool | None = None, owner: str = "admin") -> Job:
        """The running job for key, or a new one, accepted only once its record is on disk
        (see record_intent): every caller that sees the job can count on it being resumed."""
        job = self._jobs.get(key)
        if job is not None:
            return job
        self._loop = asyncio.get_running_loop()
        job = Job(key, label, pin, owner=owner)
        ingest = self.store.ingest / ingest_dir_name(key)
        try:
            resumed = record_intent(ingest, job.record, self.cfg.download.part_size)
        except OSError as exc:
            self.store.remove_ingest(ingest)  # no record of a previous run was there: nothing lost
            raise store_error(exc, label) from None
        log.info("fetch_accepted", source=key.uri, model=label, resumed=resumed)
        self._jobs[key] = job
        self.ledger.opened(job.id)
        task = self._loop.create_task(self._run(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    def running(self) -> list[Job]:
        return list(self._jobs.values())

    def early_snapshot(self, snapshot_id: str) -> EarlySnapshot | None:
        return self._early.get(snapshot_id)

    def ended_as(self, snapshot_id: str) -> str | WeightcacheError | None:
        """How a recent early snapshot ended: its content id, or its error."""
        return self._ended.get(snapshot_id)

    def early_ids(self) -> list[str]:
        return list(self._early)

    def readers(self, snapshot_id: str) -> int:
        return self.links.readers(snapshot_id)

    async def shutdown(self) -> None:
        self._shutting_down = True
        for job in self.running():
            job.cancelled.set()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self.job_pool.shutdown(wait=False, cancel_futures=True)
        self.clients.close()

    # ---------------------------------------------------------------- Publisher (job threads)

    def publish(self, job: Job, early: EarlySnapshot) -> None:
        """Let clients in: the ingest files exist at full size."""
        self._early[early.snapshot_id] = early
        job.early = early
        log.info("fetch_early", model=job.label, snapshot=early.snapshot_id, files=len(early.files),
                 tensors=len(early.manifest.tensors))  # fmt: skip
        assert self._loop is not None
        self._loop.call_soon_threadsafe(job.early_set.set)

    def content_id(self, job: Job, snapshot: str) -> None:
        if job.early is not None:
            self.links.move_leases(job.early.snapshot_id, snapshot)

    # ---------------------------------------------------------------- one job

    async def _run(self, job: Job) -> None:
        loop = asyncio.get_running_loop()
        ticker = loop.create_task(self._tick(job))
        started = time.monotonic()
        tenant = split_name(job.label)[0]
        slot = False
        try:
            await self.slots.acquire(tenant)
            slot = True
            snapshot = await loop.run_in_executor(self.job_pool, self._fetch, job, loop)
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
            if slot:
                self.slots.release(tenant)
            self.metrics.download_seconds.labels(source_label(job.key.uri)).inc(time.monotonic() - started)
            ticker.cancel()
            del self._jobs[job.key]
            self.ledger.closed(job.id)
            self._end_early(job)
            await job.notify()

    def _fetch(self, job: Job, loop: asyncio.AbstractEventLoop) -> str:
        """Run the job's pipeline, then name its snapshot (on the job's thread). Its ingest
        directory (and record) goes when the job ends, whatever the outcome, except when the
        daemon is shutting down: the next start resumes it."""
        ingest = self.store.ingest / ingest_dir_name(job.key)
        keep_ingest = False
        try:
            snapshot = Pipeline(self.parts, job, ingest, loop).run()
            self.links.name_committed(job, snapshot)
            return snapshot
        except BaseException:
            keep_ingest = self._shutting_down
            raise
        finally:
            if not keep_ingest:
                self.store.remove_ingest(ingest)

    async def _tick(self, job: Job) -> None:
        last_bytes, last_t = 0, time.monotonic()
        while True:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            fetched = job.fetched()
            rate = (fetched - last_bytes) / max(now - last_t, 1e-6)
            job.progress.bytes_per_second = 0.7 * job.progress.bytes_per_second + 0.3 * rate if last_bytes else rate
            last_bytes, last_t = fetched, now
            await job.notify()

    def _end_early(self, job: Job) -> None:
        """A job's early snapshot ends with the job: committed (its readers now hold the content
        snapshot) or failed (every reader gets the error, counted and logged)."""
        early = job.early
        if early is None:
            return
        self._early.pop(early.snapshot_id, None)
        outcome: str | WeightcacheError
        if job.result.cancelled() or job.result.exception() is not None:
            exc = None if job.result.cancelled() else job.result.exception()
            err = exc if isinstance(exc, WeightcacheError) else InternalError(f"download of {job.label} failed")
            early.fail(err)
            outcome = early.error or err
            self.metrics.streaming_failures.labels(type(outcome).__name__).inc()
            log.warning("early_readers_failed", model=job.label, snapshot=early.snapshot_id,
                        readers=self.readers(early.snapshot_id), error=str(outcome))  # fmt: skip
        elif early.error is not None:  # revoked: the job committed a newer version; its readers failed
            outcome = early.error
            log.warning("early_readers_failed", model=job.label, snapshot=early.snapshot_id,
                        readers=self.readers(early.snapshot_id), error=str(outcome))  # fmt: skip
        else:
            outcome = job.result.result()
            early.commit(outcome)
            # Leases taken between the commit's rename (job thread) and now (the loop) are still
            # on the provisional id: move them too, or eviction would see the snapshot unleased.
            self.links.move_leases(early.snapshot_id, outcome)
        self._ended[early.snapshot_id] = outcome
        while len(self._ended) > ENDED_KEPT:
            self._ended.popitem(last=False)
