"""Leases (docs/architecture.md, decision 4): a snapshot acquired over fd.sock is in use until that
connection closes. Kept in memory: a daemon restart closes every connection anyway.

The table is shared by the event loop (fd.sock grants and releases) and the download worker
threads (capacity admission plans evictions around leased snapshots), so every access goes
through one lock, and so do the held bytes: blobs evicted while leased are unlinked but still
open, they use disk until the last lease on their snapshot goes, and that "last lease" is only
known under the same lock that releases it.

Lease quota (docs/security.md, "Leases and disk"): one uid may lease at most ``quota`` bytes
of distinct snapshots at a time, however many connections it opens; an Acquire past it is an
ExhaustedError for that uid only. Everything no lease protects stays evictable, so a tenant
cannot hold the node's disk hostage beyond its quota.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import replace

from weightcache.contract.errors import ExhaustedError
from weightcache.progress import human
from weightcache_daemon.records import Lease

__all__ = ["Lease", "Leases"]


class Leases:
    def __init__(self, quota: int = 0, tenant_quotas: dict[str, int] | None = None) -> None:
        self.quota = quota  # bytes of distinct leased snapshots per uid; 0 = no quota
        # Declared tenants: bytes of distinct snapshots per tenant (all its uids together),
        # instead of per uid; a container picks its uid, not the socket it was given.
        self.tenant_quotas = dict(tenant_quotas or {})
        self._by_token: dict[int, Lease] = {}
        self._held: dict[str, int] = {}  # snapshot -> bytes unlinked while leased
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def acquire(self, snapshot_id: str, pid: int, uid: int, gid: int, size: int = 0, tenant: str = "") -> Lease:
        with self._lock:
            if tenant in self.tenant_quotas:
                quota = self.tenant_quotas[tenant]
                ours = {le.snapshot_id: le.size for le in self._by_token.values() if le.tenant == tenant}
                if quota and snapshot_id not in ours and sum(ours.values()) + size > quota:
                    raise ExhaustedError(
                        f"tenant {tenant} leases {len(ours)} snapshot(s) of {human(sum(ours.values()))}; snapshot "
                        f"{snapshot_id} ({human(size)}) would pass its lease quota of {human(quota)} (all its uids "
                        "together): close models this tenant no longer uses"
                    )
            elif self.quota:
                mine = {le.snapshot_id: le.size for le in self._by_token.values() if le.uid == uid}
                if snapshot_id not in mine and sum(mine.values()) + size > self.quota:
                    raise ExhaustedError(
                        f"uid {uid} leases {len(mine)} snapshot(s) of {human(sum(mine.values()))}; snapshot "
                        f"{snapshot_id} ({human(size)}) would pass the per-uid lease quota of {human(self.quota)}: "
                        "close models this uid no longer uses"
                    )
            lease = Lease(next(self._ids), snapshot_id, pid, uid, gid, time.time(), size, tenant)
            self._by_token[lease.token] = lease
            return lease

    def release(self, token: int) -> None:
        """Drop a lease; the snapshot's held bytes go with its last lease."""
        with self._lock:
            lease = self._by_token.pop(token, None)
            if lease is not None and not any(le.snapshot_id == lease.snapshot_id for le in self._by_token.values()):
                self._held.pop(lease.snapshot_id, None)

    def rename(self, old: str, new: str) -> int:
        """Move every lease on snapshot `old` to `new` (an early snapshot got its content
        id at commit: same files, same inodes). Returns how many moved."""
        with self._lock:
            moved = [le for le in self._by_token.values() if le.snapshot_id == old]
            for le in moved:
                self._by_token[le.token] = replace(le, snapshot_id=new)
            return len(moved)

    def hold_if_leased(self, snapshot_id: str, nbytes: int) -> bool:
        """Count `nbytes` of a snapshot being evicted as held, if (and only if) it is still
        leased: checked and recorded atomically, so a release racing the eviction cannot leave
        bytes counted as held forever."""
        with self._lock:
            if not any(le.snapshot_id == snapshot_id for le in self._by_token.values()):
                return False
            self._held[snapshot_id] = self._held.get(snapshot_id, 0) + nbytes
            return True

    def held_bytes(self) -> int:
        with self._lock:
            return sum(self._held.values())

    def of(self, snapshot_id: str) -> list[Lease]:
        with self._lock:
            return [le for le in self._by_token.values() if le.snapshot_id == snapshot_id]

    def held(self) -> set[str]:
        """Snapshots with at least one lease."""
        with self._lock:
            return {le.snapshot_id for le in self._by_token.values()}

    def of_uid(self, uid: int) -> int:
        """Bytes of distinct snapshots `uid` leases now."""
        with self._lock:
            return sum({le.snapshot_id: le.size for le in self._by_token.values() if le.uid == uid}.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_token)
