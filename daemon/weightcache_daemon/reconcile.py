"""Start-up reconciliation (DESIGN decision 5): the blobs are the truth.

Run before the sockets are bound, so nobody sees the store before it is consistent:
ingests of a previous run are removed (resuming them is lifecycle work, see README),
index rows whose blob file is gone are dropped with the snapshots and names that need
them, and temporary view directories are removed.
"""

from __future__ import annotations

import shutil
from typing import Any

import structlog

from .index import Index
from .store import LocalBlobStore

log = structlog.get_logger("weightcached.reconcile")


def reconcile(store: LocalBlobStore, index: Index) -> dict[str, Any]:
    stale = [p for p in store.ingest.iterdir()]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    for tmp in store.snapshots.glob("**/.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    missing = [d for d in index.blobs() if not store.has(d)]
    dropped_models: list[str] = []
    dropped_snapshots: list[str] = []
    if missing:
        gone = set(missing)
        for sid in index.snapshot_ids():
            if any(f.sha256 in gone for f in index.files(sid)):
                dropped_snapshots.append(sid)
                dropped_models.extend(r.name for r in index.models_of_snapshot(sid))
        index.delete(dropped_models, dropped_snapshots, missing)
        log.warning("blobs_missing", blobs=missing, models=dropped_models, snapshots=dropped_snapshots)
    return {"stale_ingests": len(stale), "missing_blobs": len(missing), "dropped_models": dropped_models}
