"""Snapshot views: snapshots/<model>/<snapshot>/<relpath> -> relative symlinks to blobs.

A view lets path-based frameworks (vLLM, transformers) load a cached model unmodified.
It is built under a temporary name and renamed into place, so a view is either
complete or absent.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from weightcache_daemon.records import FileRow, split_name
from weightcache_daemon.storage.blobs import BlobStore, fsync_dir


def view_path(store: BlobStore, model: str, snapshot_id: str) -> Path:
    """snapshots/<name>/<snapshot> for a shared name; snapshots/@<tenant>/<name>/<snapshot> for
    a tenant's ("<tenant>:<name>"): no model name starts with '@', so tenants' views never land
    inside a shared model's directory or each other's."""
    tenant, name = split_name(model)
    base = store.snapshots / f"@{tenant}" if tenant else store.snapshots
    return base / name / snapshot_id


def build_view(store: BlobStore, model: str, snapshot_id: str, files: list[FileRow]) -> Path:
    final = view_path(store, model, snapshot_id)
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{snapshot_id}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    for f in files:
        link = tmp / f.path
        link.parent.mkdir(parents=True, exist_ok=True)
        # Relative from the link's final directory, so the view survives a moved store root.
        target = os.path.relpath(store.path(f.sha256), (final / f.path).parent)
        os.symlink(target, link)
    try:
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.is_dir():
            raise
    fsync_dir(final.parent)
    return final


def remove_view(store: BlobStore, model: str, snapshot_id: str) -> None:
    d = view_path(store, model, snapshot_id)
    if d.is_dir():
        shutil.rmtree(d)
    # Remove now-empty model directories (names may contain one '/').
    parent = d.parent
    while parent != store.snapshots and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent
