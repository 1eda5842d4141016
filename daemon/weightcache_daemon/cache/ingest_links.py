"""What a download job needs from the cache around it (ingest.jobs.CacheLinks): the model name
of a committed snapshot, and the leases of processes that opened it early."""

from __future__ import annotations

import structlog

from weightcache.contract.errors import PermissionDeniedError
from weightcache_daemon.cache.leases import Leases
from weightcache_daemon.cache.naming import Names
from weightcache_daemon.ingest.job import Job

__all__ = ["IngestLinks"]

log = structlog.get_logger("weightcached.core")


class IngestLinks:
    def __init__(self, names: Names, leases: Leases) -> None:
        self.names = names
        self.leases = leases

    def name_committed(self, job: Job, snapshot: str) -> None:
        """The job names its snapshot itself: an accepted prefetch ends named even when its
        caller has gone away or the daemon crashed and resumed it. A client's name taken by an
        admin meanwhile fails only that client (its own fetch() names again and reports it);
        everyone else waiting on the job still gets the snapshot."""
        try:
            self.names.name_model(job.label, job.key, snapshot, job.pin, job.owner)
        except PermissionDeniedError as exc:
            if job.owner != "client":
                raise
            log.warning("client_name_refused", model=job.label, source=job.key.uri, error=str(exc))

    def move_leases(self, provisional: str, snapshot: str) -> None:
        moved = self.leases.rename(provisional, snapshot)
        if moved:
            log.info("early_leases_moved", provisional=provisional, snapshot=snapshot, leases=moved)

    def readers(self, provisional: str) -> int:
        return len(self.leases.of(provisional))
