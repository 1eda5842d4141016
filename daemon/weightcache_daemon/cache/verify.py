"""Verify and repair: is every blob still the bytes its name says, and what to do when not.

A blob that fails its hash is quarantined (index row plus the file moved aside) at once;
quarantined or missing blobs make their snapshot damaged: it is not granted over fd.sock
(`check_usable`), an Ensure of it fetches the model again, and `repair` re-downloads every
model that uses one of them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import structlog

from weightcache.contract.errors import CorruptedError
from weightcache_daemon.cache.naming import Names
from weightcache_daemon.records import FileRow, ModelRow
from weightcache_daemon.storage.blobs import BlobStore, check_digest, hash_file
from weightcache_daemon.storage.index import Index

__all__ = ["Verifier"]

log = structlog.get_logger("weightcached.core")


class Verifier:
    def __init__(self, store: BlobStore, index: Index, names: Names) -> None:
        self.store = store
        self.index = index
        self.names = names

    def verify_targets(self, model: str) -> dict[str, int]:
        """Blobs to verify (digest -> size): every blob, or those of one model."""
        sizes = self.index.blobs()
        if not model:
            return sizes
        snapshot, _ = self.names.resolve(model)
        return {f.sha256: f.size for f in self.index.files(snapshot)}

    def damaged(self, snapshot_id: str) -> list[str]:
        """Blobs of a snapshot that are quarantined or missing."""
        bad = self.index.quarantined()
        return [f.sha256 for f in self.index.files(snapshot_id) if f.sha256 in bad or not self.store.has(f.sha256)]

    def check_usable(self, snapshot_id: str, files: Sequence[FileRow]) -> None:
        """Raise unless every file of the snapshot may be handed out: CorruptedError for a
        quarantined blob, NotFoundError for a missing one, CorruptedError (DATA_LOSS) for one
        that is not a plain file (store.check)."""
        bad = self.index.quarantined()
        for f in files:
            if f.sha256 in bad:
                raise CorruptedError(
                    f"blob sha256:{f.sha256} ({f.path}) of snapshot {snapshot_id} failed verification "
                    f"({bad[f.sha256]}) and is quarantined; open the model again, or run cachectl verify --repair, "
                    "to re-download it"
                )
            self.store.check(f.sha256)

    def quarantine(self, digest: str, reason: str) -> None:
        self.index.quarantine(digest, reason)
        moved = self.store.quarantine(digest)
        log.error("blob_quarantined", blob=digest, reason=reason, moved_to=str(moved) if moved else None)

    def verify_blob(self, digest: str) -> str:
        """'ok', 'missing' or 'corrupt' for one blob; a corrupt blob is quarantined at once."""
        check_digest(digest)
        path = self.store.path(digest)
        if not path.is_file() or path.is_symlink():
            return "missing"
        if hash_file(path) == digest:
            return "ok"
        self.quarantine(digest, "sha256 mismatch")
        return "corrupt"

    def users(self, digests: Sequence[str]) -> dict[str, tuple[list[str], list[str]]]:
        """For each blob, the models whose snapshot holds it and its paths there (both sorted):
        one bad blob can break several models (dedup), and the operator acts on models."""
        out: dict[str, tuple[set[str], set[str]]] = {d: (set(), set()) for d in digests}
        for row in self.index.models():
            for f in self.index.files(row.snapshot_id):
                if f.sha256 in out:
                    out[f.sha256][0].add(row.name)
                    out[f.sha256][1].add(f.path)
        return {d: (sorted(m), sorted(p)) for d, (m, p) in out.items()}

    async def repair(self, digests: list[str], refetch: Callable[[ModelRow], Awaitable[None]]) -> list[str]:
        """Re-download (with `refetch`) every model that uses one of these blobs; the names repaired."""
        bad = set(digests)
        repaired = []
        for row in self.index.models():
            if any(f.sha256 in bad for f in self.index.files(row.snapshot_id)):
                await refetch(row)
                repaired.append(row.name)
        return repaired
