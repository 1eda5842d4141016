"""The ingest pipeline of one job on fakes: a source in memory, a fake admitter and publisher,
the real blob store and index on tmp_path. No daemon, no event loop running, no network."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from fakes import FakeAdmitter, FakePublisher, FakeSource, config_in, safetensors_bytes

from weightcache.contract.errors import CorruptedError, ExhaustedError, InvalidInputError, NotFoundError
from weightcache_daemon.ingest.engine import BufferPool, HashedFile, RateLimiter
from weightcache_daemon.ingest.job import Job
from weightcache_daemon.ingest.ledger import Ledger
from weightcache_daemon.ingest.pipeline import Parts, Pipeline, check_listing, snapshot_id_of, verify_file
from weightcache_daemon.ingest.resume import ingest_dir_name
from weightcache_daemon.observe.metrics import Metrics
from weightcache_daemon.records import JobKey
from weightcache_daemon.safetensors_format import parse_header
from weightcache_daemon.sources import RemoteObject
from weightcache_daemon.storage.blobs import LocalBlobStore
from weightcache_daemon.storage.index import Index

MiB = 1 << 20
URI = "file:///models/tiny/"


def _model() -> dict[str, bytes]:
    emb = bytes(range(256)) * 4096  # 1 MiB
    l0 = hashlib.sha256(b"l0").digest() * 40000  # ~1.2 MiB: parts cross a tensor boundary
    return {
        "config.json": b'{"model_type": "llama"}',
        "model.safetensors": safetensors_bytes({
            "model.embed_tokens.weight": ("U8", [len(emb)], emb),
            "model.layers.0.mlp.weight": ("U8", [len(l0)], l0),
        }),
    }  # fmt: skip


class World:
    """One store, index and set of fakes; `run(source)` runs a job's pipeline to its snapshot id."""

    def __init__(self, tmp: Path, capacity: int = 0) -> None:
        self.cfg = config_in(tmp)
        self.cfg = replace(self.cfg, download=replace(self.cfg.download, part_size=MiB, concurrency=2))
        self.store = LocalBlobStore(self.cfg.cache_dir)
        self.index = Index(self.cfg.cache_dir / "index.db")
        self.ledger = Ledger()
        self.admitter = FakeAdmitter(capacity)
        self.publisher = FakePublisher()
        self.sources: dict[str, FakeSource] = {}
        self.loop = asyncio.new_event_loop()
        self.parts = Parts(self.cfg, self.store, self.index, Metrics(), self.ledger, self.admitter, self.publisher,
                           lambda uri, links: self.sources[uri], BufferPool(4, MiB), RateLimiter(0))  # fmt: skip

    def job(self, uri: str = URI, include: tuple[str, ...] = ("*",)) -> Job:
        async def make() -> Job:
            return Job(JobKey(uri, include, ()), "tiny")

        return self.loop.run_until_complete(make())

    def run(self, source: FakeSource, job: Job | None = None) -> str:
        self.sources[source.uri] = source
        job = job or self.job(source.uri)
        ingest = self.store.ingest / ingest_dir_name(job.key)
        ingest.mkdir(exist_ok=True)
        return Pipeline(self.parts, job, ingest, self.loop).run()

    def close(self) -> None:
        self.index.close()
        self.loop.close()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.close()


def test_a_job_commits_every_file_as_a_blob_and_one_snapshot(world: World) -> None:
    files = _model()
    source = FakeSource(URI, files)
    job = world.job()
    snapshot = world.run(source, job)

    want = {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}
    assert snapshot == snapshot_id_of(list(want.items()))
    assert {f.path: f.sha256 for f in world.index.files(snapshot)} == want
    for digest, data in zip(want.values(), files.values(), strict=True):
        assert world.store.path(digest).read_bytes() == data
    tensors = world.index.tensors(want["model.safetensors"])
    assert [t.name for t in tensors] == ["model.embed_tokens.weight", "model.layers.0.mlp.weight"]
    # admitted once for every byte, released after the commit; the early snapshot was published
    # before the download and handed its provisional id over to the content id
    assert world.admitter.calls == [("admit", job.id, sum(map(len, files.values()))), ("release", job.id, 0)]
    (early,) = world.publisher.published
    assert early.manifest.early and world.publisher.content_ids == [(early.snapshot_id, snapshot)]
    assert job.progress.files_done == 2 and job.progress.bytes_done == job.progress.bytes_total
    assert source.closed


def test_objects_already_stored_are_not_fetched_again(world: World) -> None:
    files = _model()
    first = world.run(FakeSource(URI, files))
    again = FakeSource(URI, files)
    job = world.job()
    assert world.run(again, job) == first
    assert again.reads == {}  # same object versions: nothing read, not even a header
    assert world.admitter.calls[-2:] == [("admit", job.id, 0), ("release", job.id, 0)]
    # the reused blobs were protected from eviction while the job ran
    assert world.ledger.blobs_in_use() == frozenset(world.index.blobs())


def test_same_bytes_under_another_uri_are_reused_by_checksum(world: World) -> None:
    files = _model()
    world.run(FakeSource(URI, files))
    other = FakeSource("file:///elsewhere/tiny/", files, checksums=True)
    world.run(other)
    assert other.reads == {}


def test_admission_refused_fetches_nothing_and_releases(tmp_path: Path) -> None:
    w = World(tmp_path, capacity=1000)
    try:
        source = FakeSource(URI, _model())
        with pytest.raises(ExhaustedError, match="needs"):
            w.run(source)
        assert source.reads == {} and w.publisher.published == [] and w.index.snapshot_ids() == []
    finally:
        w.close()


def test_a_corrupted_transfer_is_refused_before_the_commit(world: World) -> None:
    files = _model()
    source = FakeSource(URI, files, checksums=True)
    real_read = source.read_into

    def flip(obj: RemoteObject, offset: int, buf: memoryview, on_bytes) -> None:  # type: ignore[no-untyped-def]
        real_read(obj, offset, buf, on_bytes)
        if obj.relpath == "model.safetensors" and offset >= MiB:
            buf[0] ^= 0xFF  # in the tensor data of the second part: the header read first is intact

    source.read_into = flip  # type: ignore[method-assign]
    with pytest.raises(CorruptedError, match="corrupted in transit"):
        world.run(source)
    assert world.index.snapshot_ids() == [] and list(world.store.digests()) == []


def test_check_listing_names_the_rule() -> None:
    key = JobKey(URI, ("*.safetensors",), ())
    pt = [RemoteObject("pytorch_model.bin", 10, "v", URI + "pytorch_model.bin")]
    with pytest.raises(NotFoundError, match=r"no files match include \['\*.safetensors'\]"):
        check_listing(key, pt)
    with pytest.raises(InvalidInputError, match=r"no safetensors weights; skipped pytorch_model\.bin"):
        check_listing(JobKey(URI, ("*",), ()), pt)
    many = [RemoteObject(f"f{i}.safetensors", 1, "v", URI) for i in range(10_001)]
    with pytest.raises(InvalidInputError, match="a model may have at most 10000"):
        check_listing(JobKey(URI, ("*",), ()), many)


def test_verify_file_compares_checksum_and_header(tmp_path: Path) -> None:
    data = _model()["model.safetensors"]
    path = tmp_path / "f"
    path.write_bytes(data)
    n = int.from_bytes(data[:8], "little")
    header, _ = parse_header(data[8 : 8 + n], len(data), "f")
    obj = RemoteObject("model.safetensors", len(data), "v", URI)
    good = HashedFile(obj, path, hashlib.sha256(data).hexdigest(), 0)
    assert [t.name for t in verify_file(good, good.sha256, header, "tiny")] == [t.name for t in header]
    with pytest.raises(CorruptedError, match="source's checksum is sha256:0000"):
        verify_file(good, "0" * 64, header, "tiny")
    with pytest.raises(CorruptedError, match="downloaded header differs"):
        verify_file(good, None, header[:1], "tiny")
