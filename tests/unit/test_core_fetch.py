"""Core.fetch's steps (resolve → cached? → admit → start or follow → name → manifest) on a fake
job registry: the real index, store and naming rules, no download, no daemon."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeJobs, commit_snapshot, config_in

from weightcache.contract.errors import CorruptedError, PermissionDeniedError
from weightcache_daemon.cache.assembly import build_core
from weightcache_daemon.cache.leases import Leases
from weightcache_daemon.observe.metrics import Metrics
from weightcache_daemon.records import Manifest, ProgressState
from weightcache_daemon.storage.blobs import LocalBlobStore
from weightcache_daemon.storage.index import Index

URI = "file:///models/tiny/"
FILES = {"config.json": b"{}", "model.safetensors": b"x" * 64}


class World:
    def __init__(self, tmp: Path, client_sources: tuple[str, ...] = ("*",)) -> None:
        self.tmp = tmp
        self.cfg = replace(config_in(tmp), client_sources=client_sources)
        self.store = LocalBlobStore(self.cfg.cache_dir)
        self.index = Index(self.cfg.cache_dir / "index.db")
        self.jobs = FakeJobs()
        self.core = build_core(self.cfg, self.store, self.index, Leases(), Metrics(), jobs=self.jobs)

    def close(self) -> None:
        self.core.client_io.shutdown()
        self.core.admin_io.shutdown()
        self.index.close()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.close()


async def _collect(events: AsyncIterator[Any]) -> list[Any]:
    return [ev async for ev in events]


async def _until_started(jobs: FakeJobs, n: int = 1) -> None:
    while len(jobs.started) < n:  # the fetch runs up to jobs.start at its first await
        await asyncio.sleep(0)


def test_a_prefetch_starts_one_job_names_its_snapshot_and_answers_the_manifest(world: World) -> None:
    async def scenario() -> tuple[list[Any], list[Any]]:
        first = asyncio.ensure_future(_collect(world.core.fetch(URI, "tiny", (), (), admin=True, pin=True)))
        second = asyncio.ensure_future(_collect(world.core.fetch(URI, "tiny", (), (), admin=True)))
        await _until_started(world.jobs)
        for _ in range(20):  # both callers are following by now: still one job
            await asyncio.sleep(0)
        assert len(world.jobs.started) == 1
        job = world.jobs.started[0]
        job.progress.phase = "DOWNLOADING"
        await job.notify()
        snapshot = commit_snapshot(world.store, world.index, world.tmp, URI, FILES)
        await world.jobs.finish(job, snapshot)
        return await first, await second

    first, second = asyncio.run(scenario())
    for events in (first, second):
        *progress, manifest = events
        assert isinstance(manifest, Manifest) and manifest.model == "tiny"
        assert all(isinstance(p, ProgressState) for p in progress)
        assert sorted(f.path for f in manifest.files) == sorted(FILES)
    row = world.index.model("tiny")
    assert row is not None and row.pinned and row.snapshot_id == first[-1].snapshot_id
    assert (world.store.snapshots / "tiny" / row.snapshot_id / "config.json").read_bytes() == b"{}"


def test_a_failed_job_fails_its_callers_and_names_nothing(world: World) -> None:
    async def scenario() -> None:
        fetch = asyncio.ensure_future(_collect(world.core.fetch(URI, "tiny", (), (), admin=True)))
        await _until_started(world.jobs)
        await world.jobs.fail(world.jobs.started[0], CorruptedError("file x of model tiny: bad"))
        await fetch

    with pytest.raises(CorruptedError, match="file x of model tiny"):
        asyncio.run(scenario())
    assert world.index.model("tiny") is None


def test_a_client_outside_the_allow_list_starts_nothing(tmp_path: Path) -> None:
    w = World(tmp_path, client_sources=("s3://models-prod/*",))
    try:
        with pytest.raises(PermissionDeniedError, match="an admin can run: cachectl prefetch file:///models/tiny/"):
            asyncio.run(_collect(w.core.fetch(URI, "", (), (), admin=False, scope=w.core.scopes[""])))
        assert w.jobs.started == []
    finally:
        w.close()


def test_a_client_asking_for_a_cached_source_gets_it_without_a_job(world: World) -> None:
    async def prefetch() -> None:
        fetch = asyncio.ensure_future(_collect(world.core.fetch(URI, "tiny", (), (), admin=True)))
        await _until_started(world.jobs)
        await world.jobs.finish(world.jobs.started[0], commit_snapshot(world.store, world.index, world.tmp, URI, FILES))
        await fetch

    asyncio.run(prefetch())
    (manifest,) = asyncio.run(
        _collect(world.core.fetch(URI + "./", "", (), (), admin=False, scope=world.core.scopes[""]))
    )
    assert manifest.model == "tiny" and len(world.jobs.started) == 1
    # and by name, as a reference: resolved, no job either
    (by_name,) = asyncio.run(_collect(world.core.fetch("tiny", "", (), (), admin=False, scope=world.core.scopes[""])))
    assert by_name.snapshot_id == manifest.snapshot_id and len(world.jobs.started) == 1
