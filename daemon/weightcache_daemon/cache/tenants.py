"""Tenants (docs/security.md, "Tenants"): what one tenant's connections see, and its fair share.

A tenant is a client socket directory the admin declared; a connection's tenant is the socket
it came in on, never its uid (a container picks its uid). Each tenant gets a ``Scope``:

    index key            whose         who sees it
    ------------------   -----------   ------------------------------------------------
    "llama-8b"           shared        the admin; a tenant whose shared_models match it
    "team-a:llama-8b"    team-a's      the admin; team-a (as "llama-8b")

A tenant's name resolves to a visible shared name first (so a shared name can never be
shadowed), then to its own; a snapshot id is visible when a visible name points at it. Anything
not visible is answered exactly like something that does not exist (naming.Names.resolve,
check_snapshot). The default tenant of a node that declares none is the shared namespace itself
and sees every shared name: the node behaves as before tenants.

``TenantQuotas`` keeps the per-tenant download bounds: its download jobs running at once
(max_downloads) and the bytes its own names may take in the store (download_quota), made room
for by evicting its own least recently used, unleased, unpinned models, never anyone else's.
``TenantAdmission`` is what the download jobs admit through: the tenant's share first, then
the cache's capacity (admission.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase

import structlog

from weightcache.contract.errors import BusyError, ExhaustedError, NotFoundError
from weightcache.progress import human
from weightcache_daemon.cache.admission import Admission
from weightcache_daemon.cache.eviction import Evictor
from weightcache_daemon.cache.leases import Leases
from weightcache_daemon.config import TenantConfig
from weightcache_daemon.observe.metrics import Metrics
from weightcache_daemon.records import ModelRow, qualified_name, split_name
from weightcache_daemon.storage.blobs import BlobStore
from weightcache_daemon.storage.index import Index

__all__ = ["Scope", "TenantAdmission", "TenantQuotas"]

log = structlog.get_logger("weightcached.tenants")


class Scope:
    """One tenant's view of the names and snapshots in the index."""

    def __init__(self, tenant: TenantConfig, index: Index) -> None:
        self.tenant = tenant
        self.index = index
        self.ns = tenant.name  # "" = the shared namespace (the default tenant)

    @property
    def label(self) -> str:
        """For logs and messages."""
        return self.ns or "default"

    def key(self, name: str) -> str:
        """The index key of a name this tenant creates."""
        return qualified_name(self.ns, name)

    def display(self, key: str) -> str:
        """How this tenant is shown an index key it sees: its own names without the prefix."""
        tenant, name = split_name(key)
        return name if tenant and tenant == self.ns else key

    def sees_shared(self, name: str) -> bool:
        return self.tenant.default or any(fnmatchcase(name, p) for p in self.tenant.shared_models)

    def sees(self, row: ModelRow) -> bool:
        if row.tenant:
            return row.tenant == self.ns
        return self.sees_shared(row.name)

    def rows(self) -> list[ModelRow]:
        return [r for r in self.index.models() if self.sees(r)]

    def find(self, name: str) -> ModelRow | None:
        """The row `name` means to this tenant: a visible shared name first, then its own."""
        if ":" in name:  # never a name (check_name); an index key of someone's namespace
            return None
        shared = self.index.model(name)
        if shared is not None and self.sees(shared):
            return shared
        if self.ns:
            return self.index.model(self.key(name))
        return None

    def candidates(self, name: str) -> list[str]:
        """Index keys `name` may mean to this tenant, in resolution order (for downloads whose
        name is not in the index yet)."""
        if ":" in name:
            return []
        out = [name] if self.sees_shared(name) else []
        if self.ns:
            out.append(self.key(name))
        return out

    def sees_snapshot(self, snapshot_id: str) -> bool:
        """Whether a name this tenant sees points at the snapshot. A snapshot no name points at
        (its name re-pointed since, say) is the default tenant's to read, as before tenants;
        a declared tenant cannot tell whose it was, so it is nobody's."""
        rows = self.index.models_of_snapshot(snapshot_id)
        if not rows:
            return self.tenant.default
        return any(self.sees(r) for r in rows)


class TenantQuotas:
    """Per-tenant download bounds; one lock, shared by the event loop and the job threads."""

    def __init__(
        self,
        scopes: dict[str, Scope],
        store: BlobStore,
        index: Index,
        leases: Leases,
        evictor: Evictor,
        metrics: Metrics,
        quota_of: Callable[[TenantConfig], int],
    ) -> None:
        self.scopes = scopes
        self.store = store
        self.index = index
        self.leases = leases
        self.evictor = evictor
        self.metrics = metrics
        self.quota_of = quota_of  # bytes a tenant's names may take (download_quota resolved); 0 = none
        self._lock = threading.Lock()
        self._admitted: dict[int, tuple[str, int]] = {}  # running job id -> (its label, bytes admitted)

    def may_start(self, scope: Scope, running: Sequence[str]) -> None:
        """Before this tenant starts a new download job (`running`: the labels of every job
        running or waiting now): refused past its max_downloads (ExhaustedError for it alone:
        other tenants' downloads do not count). A job counts until it ends, whether or not
        anyone still waits on it: cancelling requests never frees the tenant's share."""
        cap = scope.tenant.max_downloads
        n = sum(1 for label in running if split_name(label)[0] == scope.ns)
        if cap and n >= cap:
            raise ExhaustedError(
                f"tenant {scope.label}: {n} download(s) of this tenant are running, its max_downloads is {cap}; "
                "retry when one has finished"
            )

    def usage(self, tenant: str, without: frozenset[str] = frozenset()) -> int:
        """Bytes this tenant's names (but those in `without`) take: every distinct blob they
        reference, counted in full even when another tenant's names share it (a tenant cannot
        learn from its own usage whether someone else holds the same bytes)."""
        sizes = self.index.blobs()
        rows = [r for r in self.index.models() if r.tenant == tenant and r.name not in without]
        digests = {f.sha256 for r in rows for f in self.index.files(r.snapshot_id)}
        return sum(sizes.get(d, 0) for d in digests)

    def _in_flight(self, tenant: str, label: str) -> int:
        """Bytes admitted to this tenant's other running downloads (the caller holds the lock)."""
        return sum(n for lbl, n in self._admitted.values() if split_name(lbl)[0] == tenant and lbl != label)

    def admit(self, job_id: int, label: str, need: int) -> None:
        """Called before a download's first byte: a tenant's download that would take its names
        past its download_quota first evicts its own least recently used models (never leased,
        never pinned, never another tenant's or a shared one); ExhaustedError, for this tenant
        only, if that is not enough. The bytes count as the tenant's until release()."""
        with self._lock:
            self._admit(label, need)
            self._admitted[job_id] = (label, need)

    def release(self, job_id: int) -> None:
        """The job's bytes are committed (then its names count them) or will never be."""
        with self._lock:
            self._admitted.pop(job_id, None)

    def _admit(self, label: str, need: int) -> None:
        tenant = split_name(label)[0]
        scope = self.scopes.get(tenant)
        if not tenant or scope is None:
            return
        quota = self.quota_of(scope.tenant)
        if not quota:
            return
        used = self.usage(tenant) + self._in_flight(tenant, label)
        if used + need <= quota:
            return
        held = self.leases.held()
        own = sorted(
            (
                r
                for r in self.index.models()
                if r.tenant == tenant and r.name != label and not r.pinned and r.snapshot_id not in held
            ),
            key=lambda r: r.last_used,
        )
        # Plan first: if evicting all of them would not be enough, evict nothing.
        floor = self.usage(tenant, frozenset(r.name for r in own)) + self._in_flight(tenant, label)
        for row in own if floor + need <= quota else ():
            try:
                plan = self.evictor.plan_evict([row.name], all_unpinned=False, force=False)
            except (BusyError, NotFoundError):
                continue  # leased, pinned or gone since the listing above
            plan.execute(self.index, self.store, self.leases, self.metrics, trigger="tenant_quota")
            used = self.usage(tenant) + self._in_flight(tenant, label)
            if used + need <= quota:
                return
        raise ExhaustedError(
            f"tenant {tenant}: model {split_name(label)[1]} needs {human(need)}; this tenant's models and downloads "
            f"take {human(used)} of its download_quota of {human(quota)} and the rest is in use: close or evict "
            "models this tenant no longer uses"
        )


class TenantAdmission:
    """The download jobs' admission (ingest.pipeline.Admitter): a tenant's share first, then the
    cache's capacity; a download refused by either fetches nothing and holds nothing."""

    def __init__(self, quotas: TenantQuotas, capacity: Admission) -> None:
        self.quotas = quotas
        self.capacity = capacity

    def admit(self, job_id: int, label: str, need: int) -> None:
        self.quotas.admit(job_id, label, need)
        try:
            self.capacity.admit(job_id, label, need)
        except BaseException:
            self.quotas.release(job_id)
            raise

    def release(self, job_id: int) -> None:
        self.capacity.release(job_id)
        self.quotas.release(job_id)
