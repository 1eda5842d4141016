"""Naming, admission and eviction alone: the real index and blob store on tmp_path, leases and
the ledger of running downloads in memory. No daemon, no download."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from fakes import commit_snapshot, config_in

from weightcache.contract.errors import BusyError, ExhaustedError, NotFoundError, PermissionDeniedError
from weightcache_daemon.cache.admission import Admission
from weightcache_daemon.cache.eviction import Evictor
from weightcache_daemon.cache.leases import Leases
from weightcache_daemon.cache.naming import Names
from weightcache_daemon.ingest.ledger import Ledger
from weightcache_daemon.observe.metrics import Metrics
from weightcache_daemon.storage.blobs import LocalBlobStore
from weightcache_daemon.storage.index import Index

SIZE = 1000  # bytes per model below


class Cache:
    def __init__(self, tmp: Path, max_size: int = 0) -> None:
        self.cfg = replace(config_in(tmp), max_size=max_size)
        self.store = LocalBlobStore(self.cfg.cache_dir)
        self.index = Index(self.cfg.cache_dir / "index.db")
        self.leases = Leases()
        self.ledger = Ledger()
        self.names = Names(self.cfg, self.store, self.index)
        self.evictor = Evictor(self.store, self.index, self.leases, self.ledger, self.names.resolve)
        self.admission = Admission(self.cfg, self.store, self.index, self.leases, self.ledger, Metrics(), self.evictor)
        self.tmp = tmp

    def add(self, name: str, files: dict[str, bytes], owner: str = "admin", pin: bool | None = None) -> str:
        """A committed, named model, as a finished job leaves it."""
        uri = f"file:///models/{name}/"
        snapshot = commit_snapshot(self.store, self.index, self.tmp, uri, files)
        self.names.name_model(name, self.names.key(uri, (), ()), snapshot, pin, owner)
        return snapshot

    def use(self, *names: str) -> None:
        """Mark uses in this order (least recently used first)."""
        for name in names:
            self.index.touch(name)
            self.index.flush_uses()
            time.sleep(0.002)  # distinct last-use stamps; the order is what is asserted, not a time


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[Cache]:
    c = Cache(tmp_path, max_size=4 * SIZE)
    yield c
    c.index.close()


def _bytes(tag: str, n: int = SIZE) -> bytes:
    return (tag.encode() * n)[:n]


# ---------------------------------------------------------------- naming


def test_a_client_cannot_repoint_a_name_and_gets_a_derived_default(cache: Cache) -> None:
    cache.add("llama", {"w.safetensors": _bytes("a")})
    other = cache.names.key("file:///elsewhere/llama/", (), ())
    with pytest.raises(PermissionDeniedError, match="clients may not re-point an existing name"):
        cache.names.check_owner("llama", other, "client")
    cache.names.check_owner("llama", other, "admin")  # an admin may
    derived = cache.names.client_default_name(other)
    assert derived.startswith("llama-") and derived != "llama"
    same = cache.names.key("file:///models/llama/", (), ())
    assert cache.names.client_default_name(same) == "llama"


def test_resolve_by_name_snapshot_and_uri(cache: Cache) -> None:
    snap = cache.add("llama", {"w.safetensors": _bytes("a")})
    assert cache.names.resolve("llama")[0] == snap
    assert cache.names.resolve(snap)[1] is not None
    assert cache.names.resolve("file:///models/llama/")[0] == snap
    with pytest.raises(NotFoundError, match="cachectl prefetch URI --name NAME adds it"):
        cache.names.resolve("nothing")


# ---------------------------------------------------------------- admission


def test_admission_reserves_and_evicts_least_recently_used(cache: Cache) -> None:
    for tag in "abc":
        cache.add(tag, {"w.safetensors": _bytes(tag)})
    cache.use("b", "a", "c")  # b, then a, are the least recently used
    # 3 stored + 2 needed passes the high watermark (95% of 4): evict down to the low one (85%)
    cache.admission.admit(job_id=7, label="new", need=2 * SIZE)
    assert {r.name for r in cache.index.models()} == {"c"}
    assert not cache.store.has(hashlib.sha256(_bytes("b")).hexdigest())
    assert cache.store.has(hashlib.sha256(_bytes("c")).hexdigest())
    assert cache.ledger.reserved_bytes() == 2 * SIZE
    assert cache.admission.usage() == 3 * SIZE  # one model stored + the reservation
    cache.admission.release(7)
    assert cache.ledger.reserved_bytes() == 0


def test_admission_refuses_what_cannot_fit_and_keeps_pinned_and_leased(cache: Cache) -> None:
    cache.add("pinned", {"w.safetensors": _bytes("p")}, pin=True)
    leased = cache.add("leased", {"w.safetensors": _bytes("l")})
    cache.leases.acquire(leased, pid=1, uid=1000, gid=1000, size=SIZE)
    with pytest.raises(ExhaustedError, match="more than the cache capacity"):
        cache.admission.admit(1, "huge", 5 * SIZE)
    with pytest.raises(ExhaustedError, match="the rest is pinned, in use, or being downloaded"):
        cache.admission.admit(2, "big", 3 * SIZE)
    assert {r.name for r in cache.index.models()} == {"pinned", "leased"}
    assert cache.ledger.reserved_bytes() == 0  # refused: nothing reserved


# ---------------------------------------------------------------- eviction and gc


def test_blobs_a_running_download_reuses_survive_eviction(cache: Cache) -> None:
    shared = _bytes("s")
    cache.add("old", {"w.safetensors": shared, "x.json": _bytes("x", 10)})
    cache.ledger.opened(3)
    cache.ledger.protect(3, frozenset({hashlib.sha256(shared).hexdigest()}))
    plan = cache.evictor.plan_evict(["old"], all_unpinned=False, force=False)
    assert plan.models == ("old",) and plan.blobs == (hashlib.sha256(_bytes("x", 10)).hexdigest(),)
    cache.ledger.closed(3)
    plan = cache.evictor.plan_evict(["old"], all_unpinned=False, force=False)
    assert len(plan.blobs) == 2


def test_a_leased_model_is_evicted_only_with_force(cache: Cache) -> None:
    snap = cache.add("m", {"w.safetensors": _bytes("m")})
    cache.leases.acquire(snap, pid=1, uid=1000, gid=1000, size=SIZE)
    with pytest.raises(BusyError, match="in use by 1 process"):
        cache.evictor.plan_evict(["m"], all_unpinned=False, force=False)
    assert cache.evictor.plan_evict(["m"], all_unpinned=False, force=True).models == ("m",)
    assert cache.evictor.plan_evict([], all_unpinned=True, force=False).models == ()


def test_gc_waits_for_running_downloads(cache: Cache) -> None:
    cache.ledger.opened(9)
    with pytest.raises(BusyError, match="1 download"):
        cache.evictor.plan_gc()
    cache.ledger.closed(9)
    assert cache.evictor.plan_gc().orphans == ()
