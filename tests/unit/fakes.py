"""Fakes at the daemon's seams, for unit tests that run in milliseconds without a daemon.

- FakeSource: a sources.base.Source over bytes in memory (the real sources are tested by the
  conformance suite, tests/system/test_source_conformance.py; this one lets a test change an object or
  count the reads).
- FakeAdmitter: an ingest.pipeline.Admitter that records what it was asked and can refuse.
- FakePublisher: an ingest.pipeline.Publisher that records the early snapshot and the content id.
- FakeJobs: an ingest.jobs.Jobs registry whose jobs end when the test ends them.

The blob store and the index are the real ones on tmp_path: a fake of either would only
restate their code, and both are fast on a temporary directory.
"""

from __future__ import annotations

import hashlib
import json
import struct
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from weightcache.contract.errors import ExhaustedError, WeightcacheError
from weightcache_daemon import config
from weightcache_daemon.ingest.early import EarlySnapshot
from weightcache_daemon.ingest.job import Job
from weightcache_daemon.ingest.pipeline import snapshot_id_of
from weightcache_daemon.records import JobKey, NewFile
from weightcache_daemon.sources import RemoteObject
from weightcache_daemon.storage.blobs import BlobStore
from weightcache_daemon.storage.index import Index

__all__ = ["FakeAdmitter", "FakePublisher", "FakeSource", "config_in", "safetensors_bytes"]


def safetensors_bytes(tensors: dict[str, tuple[str, list[int], bytes]]) -> bytes:
    """A safetensors file: {name: (dtype, shape, data)}, data laid out in the order given."""
    header: dict[str, object] = {}
    at = 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + len(data)]}
        at += len(data)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"".join(d for _, _, d in tensors.values())


def config_in(tmp: Path) -> config.Config:
    return config.load(
        {},
        overrides={"cache_dir": str(tmp / "store"), "socket_dir": str(tmp / "sock"),
                   "admin_socket": str(tmp / "admin" / "admin.sock")},
    )  # fmt: skip


class FakeSource:
    """Objects in memory under a URI; `reads` counts ranged reads per relative path."""

    def __init__(self, uri: str, files: dict[str, bytes], *, checksums: bool = False) -> None:
        self.uri = uri.rstrip("/") + "/"
        self.files = dict(files)
        self.checksums = checksums
        self.reads: dict[str, int] = {}
        self.closed = False

    def _obj(self, rel: str) -> RemoteObject:
        data = self.files[rel]
        return RemoteObject(rel, len(data), hashlib.md5(data).hexdigest(), self.uri + rel)

    def list(self) -> list[RemoteObject]:
        return [self._obj(rel) for rel in sorted(self.files)]

    def stat(self, relpath: str) -> RemoteObject:
        return self._obj(relpath)

    def read_into(self, obj: RemoteObject, offset: int, buf: memoryview, on_bytes: Callable[[int], None]) -> None:
        data = self.files[obj.relpath][offset : offset + len(buf)]
        buf[: len(data)] = data
        self.reads[obj.relpath] = self.reads.get(obj.relpath, 0) + 1
        on_bytes(len(data))

    def expected_sha256(self, objects: Sequence[RemoteObject]) -> dict[str, str]:
        if not self.checksums:
            return {}
        return {o.relpath: hashlib.sha256(self.files[o.relpath]).hexdigest() for o in objects}

    def close(self) -> None:
        self.closed = True


class FakeAdmitter:
    """Admits up to `capacity` bytes in all (0: anything); records every call."""

    def __init__(self, capacity: int = 0) -> None:
        self.capacity = capacity
        self.admitted: dict[int, int] = {}
        self.calls: list[tuple[str, int, int]] = []

    def admit(self, job_id: int, label: str, need: int) -> None:
        self.calls.append(("admit", job_id, need))
        if self.capacity and sum(self.admitted.values()) + need > self.capacity:
            raise ExhaustedError(f"model {label} needs {need} bytes; the fake cache holds {self.capacity}")
        self.admitted[job_id] = self.admitted.get(job_id, 0) + need

    def release(self, job_id: int) -> None:
        self.calls.append(("release", job_id, 0))
        self.admitted.pop(job_id, None)


class FakePublisher:
    def __init__(self) -> None:
        self.published: list[EarlySnapshot] = []
        self.content_ids: list[tuple[str, str]] = []

    def publish(self, job: Job, early: EarlySnapshot) -> None:
        job.early = early
        self.published.append(early)

    def content_id(self, job: Job, snapshot: str) -> None:
        assert job.early is not None
        self.content_ids.append((job.early.snapshot_id, snapshot))


def commit_snapshot(store: BlobStore, index: Index, tmp: Path, uri: str, files: dict[str, bytes]) -> str:
    """Blobs and a snapshot in the store and index, as a job's commit leaves them (unnamed)."""
    new = []
    for rel, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        part = tmp / f"ingest-{digest}"
        part.write_bytes(data)
        store.commit(part, digest)
        new.append(NewFile(rel, digest, len(data), ()))
    snapshot = snapshot_id_of([(f.path, f.sha256) for f in new])
    index.add_snapshot(snapshot, uri, new, [(uri + f.path, "v1", f.size, f.sha256) for f in new])
    return snapshot


class FakeJobs:
    """A job registry that runs nothing: a test ends a job with `finish` or `fail`."""

    def __init__(self) -> None:
        self.clients_ready = threading.Event()
        self.started: list[Job] = []

    def start(self, key: JobKey, label: str, pin: bool | None = None, owner: str = "admin") -> Job:
        for job in self.running():
            if job.key == key:
                return job
        job = Job(key, label, pin, owner=owner)
        self.started.append(job)
        return job

    def running(self) -> list[Job]:
        return [j for j in self.started if not j.result.done()]

    def early_snapshot(self, snapshot_id: str) -> EarlySnapshot | None:
        return None

    def ended_as(self, snapshot_id: str) -> str | WeightcacheError | None:
        return None

    def early_ids(self) -> list[str]:
        return []

    def readers(self, snapshot_id: str) -> int:
        return 0

    async def shutdown(self) -> None:
        for job in self.running():
            job.result.cancel()

    async def finish(self, job: Job, snapshot: str) -> None:
        job.progress.phase = "DONE"
        job.result.set_result(snapshot)
        await job.notify()

    async def fail(self, job: Job, err: WeightcacheError) -> None:
        job.result.set_exception(err)
        await job.notify()
