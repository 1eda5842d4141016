"""Start-up reconciliation (docs/architecture.md, decision 5): the blobs are the truth.

Runs before the sockets are bound, so nobody sees the store before it is consistent:

* ingest directories with a readable resume state are kept (the daemon resumes them once it
  is up), also one whose job was accepted and fetched nothing yet: its record alone is the
  intent; any other ingest directory is removed;
* temporary view directories are removed;
* blob files with no index row (a crash between the rename and the index transaction) are
  re-hashed: adopted when the bytes match their name (gc removes them if nothing refers to
  them), removed otherwise; stray files in blobs/ are removed;
* index rows whose blob file is gone are dropped, with the snapshots and names that need them.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import structlog

from weightcache_daemon.ingest.resume import IngestState
from weightcache_daemon.storage.blobs import BlobStore, hash_file
from weightcache_daemon.storage.index import Index

log = structlog.get_logger("weightcached.reconcile")


def reconcile(store: BlobStore, index: Index) -> dict[str, Any]:
    resumable: list[Path] = []
    stale = 0
    for p in sorted(store.ingest.iterdir()):
        if p.is_dir() and IngestState.load(p) is not None:
            resumable.append(p)
        else:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
            stale += 1
    for tmp in store.snapshots.glob("**/.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    indexed = index.blobs()
    adopted, removed = [], []
    for sub in sorted(store.blobs.iterdir()):
        for f in sorted(sub.iterdir()) if sub.is_dir() else []:
            name = f.name
            if name in indexed:
                continue
            if f.is_file() and not f.is_symlink() and len(name) == 64 and hash_file(f) == name:
                index.adopt_blob(name, f.stat().st_size)
                adopted.append(name)
            else:
                store.unfreeze(f)  # an immutable blob whose bytes rotted: the flag goes first
                f.unlink()
                removed.append(name)
    missing = [d for d in indexed if not store.has(d)]
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
    return {
        "resumable_ingests": len(resumable),
        "stale_ingests": stale,
        "adopted_blobs": len(adopted),
        "removed_files": len(removed),
        "missing_blobs": len(missing),
        "dropped_models": dropped_models,
    }
