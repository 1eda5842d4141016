"""Download jobs: one per (source URI, filters), shared by every caller (DESIGN decision 8).

A job lists the source, skips objects already in the store (same object URI and version
as a previous fetch), downloads the rest through the engine, validates each safetensors
file as soon as its hash is known, then commits: blobs into the store, one index
transaction for the snapshot. Nothing of a job is visible until that transaction; on any
failure its ingest directory is removed and the store is as before.
"""

from __future__ import annotations

import asyncio
import errno
import fnmatch
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from weightcache.errors import (
    CorruptedError,
    ExhaustedError,
    InternalError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
    WeightcacheError,
)
from weightcache.safetensors_format import TensorInfo, validate_file

from .config import Config
from .download import BufferPool, Downloaded, RateLimiter, download
from .index import Index, NewFile
from .metrics import Metrics, source_label
from .sources import RemoteObject, open_source
from .store import LocalBlobStore

log = structlog.get_logger("weightcached.jobs")

TICK = 0.2  # seconds between progress events


@dataclass(frozen=True)
class JobKey:
    uri: str
    include: tuple[str, ...]
    exclude: tuple[str, ...]

    @property
    def filters(self) -> str:
        return json.dumps({"include": list(self.include), "exclude": list(self.exclude)})


@dataclass
class ProgressState:
    phase: str = "LISTING"
    bytes_done: int = 0
    bytes_total: int = 0
    files_done: int = 0
    files_total: int = 0
    bytes_per_second: float = 0.0
    current_file: str = ""


@dataclass
class Job:
    key: JobKey
    label: str
    pin: bool | None = None
    progress: ProgressState = field(default_factory=ProgressState)
    version: int = 0
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    result: asyncio.Future[str] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    cancelled: threading.Event = field(default_factory=threading.Event)
    bytes_fetched: int = 0
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


def select(objects: list[RemoteObject], include: tuple[str, ...], exclude: tuple[str, ...]) -> list[RemoteObject]:
    def match(rel: str, patterns: tuple[str, ...]) -> bool:
        base = rel.rsplit("/", 1)[-1]
        return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(base, p) for p in patterns)

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
    return hashlib.sha256(f"{key.uri}\0{key.filters}".encode()).hexdigest()[:32]


STATE_FILE = "state.json"


def save_resume(
    ingest: Path, key: JobKey, job: Job, part_size: int, files: list[tuple[RemoteObject, str, list[int]]]
) -> None:
    state = {
        "uri": key.uri,
        "include": list(key.include),
        "exclude": list(key.exclude),
        "name": job.label,
        "pin": job.pin,
        "part_size": part_size,
        "files": [
            {"relpath": o.relpath, "version": o.version, "size": o.size, "file": name, "written": written}
            for o, name, written in files
        ],
    }
    tmp = ingest / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state))
    os.replace(tmp, ingest / STATE_FILE)


def read_state(ingest: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((ingest / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("uri"), str) else None


def load_resume(ingest: Path, key: JobKey, todo: list[RemoteObject], part_size: int) -> dict[str, set[int]]:
    """Parts a previous run of this job wrote, for objects whose version is unchanged."""
    state = read_state(ingest)
    if state is None or state.get("uri") != key.uri or state.get("part_size") != part_size:
        return {}
    current = {o.relpath: o for o in todo}
    out: dict[str, set[int]] = {}
    for f in state.get("files", []):
        o = current.get(f.get("relpath"))
        if o is None or o.version != f.get("version") or o.size != f.get("size"):
            continue  # changed at the source (or no longer wanted): that file starts over
        parts = {int(i) for i in f.get("written", [])}
        try:
            on_disk = (ingest / str(f.get("file"))).stat().st_size
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
        self.limiter = RateLimiter(cfg.download.rate_limit)
        self.pool = BufferPool(cfg.download.concurrency + max(4, cfg.download.concurrency // 4), cfg.download.part_size)
        self.jobs: dict[JobKey, Job] = {}
        self.bytes_downloaded = 0
        self.shutting_down = False
        self.reserved: dict[str, int] = {}  # bytes admitted per running job (label)
        # Set by the core: raises ExhaustedError or makes room (eviction) for a job's new bytes.
        self.make_room: Callable[[int, str], None] = lambda need, label: None
        self._tasks: set[asyncio.Task[None]] = set()
        self._admit_lock = threading.Lock()

    def start(self, key: JobKey, label: str, pin: bool | None = None) -> Job:
        """The running job for key, or a new one."""
        job = self.jobs.get(key)
        if job is not None:
            return job
        job = Job(key, label, pin)
        self.jobs[key] = job
        task = asyncio.get_running_loop().create_task(self._run(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    def admit(self, need: int, label: str) -> None:
        """Admission before the first byte: the core checks capacity (and evicts), then the
        bytes are reserved until the job ends."""
        self.make_room(need, label)
        with self._admit_lock:
            self.reserved[label] = self.reserved.get(label, 0) + need

    def release(self, label: str) -> None:
        with self._admit_lock:
            self.reserved.pop(label, None)

    async def shutdown(self) -> None:
        self.shutting_down = True
        for job in self.jobs.values():
            job.cancelled.set()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self, job: Job) -> None:
        ticker = asyncio.get_running_loop().create_task(self._tick(job))
        started = time.monotonic()
        source = source_label(job.key.uri)
        try:
            snapshot = await asyncio.to_thread(self._fetch, job)
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

    # ---------------------------------------------------------------- in a worker thread

    def _fetch(self, job: Job) -> str:
        key, p = job.key, job.progress
        source = open_source(key.uri, self.cfg)
        try:
            listed = source.list()
            objects = select(listed, key.include, key.exclude)
            if not objects:
                raise NotFoundError(
                    f"source {key.uri}: no files match include {list(key.include)} / exclude {list(key.exclude)} "
                    f"({len(listed)} object(s) listed)"
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
            self.admit(sum(o.size for o in todo), job.label)
            tensors: dict[str, tuple[TensorInfo, ...]] = {}
            ingest = self.store.ingest / ingest_dir_name(key)
            try:
                ingest.mkdir(mode=0o700, exist_ok=True)
            except BaseException:
                self.release(job.label)  # the try below, which releases it, is not reached
                raise
            resume = load_resume(ingest, key, todo, self.cfg.download.part_size)
            if resume:
                log.info("fetch_resume", source=key.uri, model=job.label, parts=sum(len(v) for v in resume.values()))
            keep_ingest = False
            try:
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
                            infos, _ = validate_file(str(d.path), f"file {d.obj.relpath} of model {job.label}")
                            tensors[d.obj.relpath] = tuple(infos)
                        p.files_done += 1

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
                    )
                p.phase = "COMMITTING"
                return self._commit(job, objects, known, got, tensors)
            except BaseException:
                # A daemon shutting down keeps what it fetched for the next start to resume.
                keep_ingest = self.shutting_down
                raise
            finally:
                self.release(job.label)
                if not keep_ingest:
                    self.store.remove_ingest(ingest)
        finally:
            source.close()

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
        for o in objects:
            if o.relpath in known:
                digest = known[o.relpath]
                files.append(NewFile(o.relpath, digest, o.size, tuple(self.index.tensors(digest))))
                continue
            d = by_rel[o.relpath]
            size = d.path.stat().st_size
            if size != d.obj.size:
                raise InvalidInputError(
                    f"file {o.relpath} of model {job.label}: expected {d.obj.size} bytes, got {size}"
                )
            self.store.commit(d.path, d.sha256)
            files.append(NewFile(o.relpath, d.sha256, d.obj.size, tensors.get(o.relpath, ())))
        snapshot = snapshot_id_of([(f.path, f.sha256) for f in files])
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
