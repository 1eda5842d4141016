"""Building the cache: every service the core coordinates, wired once, in dependency order.

    Names ─► Catalog
      │ └──► Verifier
      ▼
    Ledger (what running downloads hold) ─► Evictor ─► Admission ─┐
                                                                  ├─► TenantAdmission ─► JobRegistry
    Scope per tenant ─► TenantQuotas ─────────────────────────────┘   (IngestLinks: naming, leases)

The core receives them as ``CoreParts`` and builds nothing itself, so each service is built
(and tested) alone, and a test hands the core a fake job registry (tests/unit/test_core_fetch.py).
"""

from __future__ import annotations

from collections.abc import Callable

from weightcache_daemon.cache.admission import Admission
from weightcache_daemon.cache.catalog import Catalog
from weightcache_daemon.cache.core import Core, CoreParts
from weightcache_daemon.cache.eviction import Evictor
from weightcache_daemon.cache.ingest_links import IngestLinks
from weightcache_daemon.cache.leases import Leases
from weightcache_daemon.cache.naming import Names
from weightcache_daemon.cache.tenants import Scope, TenantAdmission, TenantQuotas
from weightcache_daemon.cache.verify import Verifier
from weightcache_daemon.config import Config, TenantConfig
from weightcache_daemon.ingest.jobs import JobRegistry, Jobs
from weightcache_daemon.ingest.ledger import Ledger
from weightcache_daemon.observe.metrics import Metrics
from weightcache_daemon.storage.blobs import BlobStore
from weightcache_daemon.storage.index import Index

__all__ = ["build_core", "build_parts"]


def _no_quota(tenant: TenantConfig) -> int:
    return 0


def build_parts(
    cfg: Config,
    store: BlobStore,
    index: Index,
    leases: Leases,
    metrics: Metrics,
    *,
    jobs: Jobs | None = None,
    download_quota: Callable[[TenantConfig], int] = _no_quota,
) -> CoreParts:
    """`jobs`: the download jobs; by default the daemon's own registry. `download_quota`: the
    bytes a tenant's names may take (its download_quota resolved against the capacity; 0 = none)."""
    names = Names(cfg, store, index)
    ledger = Ledger()  # what running downloads hold: admission and eviction read it
    evictor = Evictor(store, index, leases, ledger, names.resolve)
    admission = Admission(cfg, store, index, leases, ledger, metrics, evictor)
    scopes = {t.name: Scope(t, index) for t in cfg.tenants()}
    quotas = TenantQuotas(scopes, store, index, leases, evictor, metrics, download_quota)
    if jobs is None:
        admitter = TenantAdmission(quotas, admission)  # its tenant's share first, then capacity
        jobs = JobRegistry(cfg, store, index, metrics, ledger, admitter, IngestLinks(names, leases))
    return CoreParts(
        names=names,
        catalog=Catalog(store, index, leases, names),
        evictor=evictor,
        admission=admission,
        verifier=Verifier(store, index, names),
        scopes=scopes,
        quotas=quotas,
        jobs=jobs,
    )


def build_core(
    cfg: Config,
    store: BlobStore,
    index: Index,
    leases: Leases,
    metrics: Metrics,
    *,
    jobs: Jobs | None = None,
    download_quota: Callable[[TenantConfig], int] = _no_quota,
) -> Core:
    """The daemon's core with its services (build_parts)."""
    parts = build_parts(cfg, store, index, leases, metrics, jobs=jobs, download_quota=download_quota)
    return Core(cfg, store, index, leases, metrics, parts)
