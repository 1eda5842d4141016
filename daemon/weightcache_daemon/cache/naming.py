"""Names: what a model reference means, and who may point a name at a snapshot.

A reference is a model name, a snapshot id or the source URI of a cached model. Names are
checked here (shape), resolved here (reference -> snapshot), derived here (a client's unnamed
Ensure) and written here (the view first, then the index row, with the ownership rule of
Index.set_model checked before any byte is fetched and again when the name is written).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import structlog

from weightcache.contract.errors import ExhaustedError, InvalidInputError, NotFoundError, PermissionDeniedError
from weightcache_daemon import uris
from weightcache_daemon.config import Config
from weightcache_daemon.records import JobKey, ModelRow
from weightcache_daemon.sources import parse_uri
from weightcache_daemon.storage.blobs import BlobStore
from weightcache_daemon.storage.index import Index
from weightcache_daemon.storage.views import build_view

__all__ = ["Names", "check_name", "default_name"]

log = structlog.get_logger("weightcached.core")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}(/[A-Za-z0-9][A-Za-z0-9._-]{0,127})?")
_SNAPSHOT = re.compile(r"[0-9a-f]{32}")


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name) or ".." in name:
        raise InvalidInputError(
            f"model name {name[:200]!r}: use letters, digits, '.', '_', '-' (at most 128), optionally one 'org/' prefix"
        )
    return name


def default_name(uri: str) -> str:
    _, _, path = parse_uri(uri)
    last = [p for p in path.split("/") if p]
    name = re.sub(r"[^A-Za-z0-9._-]", "-", last[-1] if last else "model").lstrip("._-") or "model"
    return name[:128]


class Names:
    def __init__(self, cfg: Config, store: BlobStore, index: Index) -> None:
        self.cfg = cfg
        self.store = store
        self.index = index

    def resolve(self, model: str) -> tuple[str, ModelRow | None]:
        """A name, snapshot id or source URI of a cached model -> (snapshot id, model row)."""
        if not model:
            raise InvalidInputError("model is empty: give a name, a snapshot id or a source URI")
        row = self.index.model(model)
        if row is not None:
            return row.snapshot_id, row
        if _SNAPSHOT.fullmatch(model) and self.index.snapshot_source(model) is not None:
            rows = self.index.models_of_snapshot(model)
            return model, rows[0] if rows else None
        if "://" in model:
            try:
                canonical = uris.normalize(model)
            except InvalidInputError:
                canonical = model
            for r in self.index.models():
                if r.source in (model, canonical):
                    return r.snapshot_id, r
        raise NotFoundError(f"model {model[:200]!r} is not in the cache (cachectl prefetch URI --name NAME adds it)")

    def check_snapshot(self, snapshot_id: str) -> str:
        if not _SNAPSHOT.fullmatch(snapshot_id):
            raise InvalidInputError(f"snapshot id {snapshot_id[:80]!r} is not 32 lowercase hex characters")
        if self.index.snapshot_source(snapshot_id) is None:
            raise NotFoundError(f"snapshot {snapshot_id} is not in the cache")
        return snapshot_id

    def key(self, uri: str, include: Sequence[str], exclude: Sequence[str]) -> JobKey:
        parse_uri(uri)  # validates the shape
        return JobKey(uri, tuple(include) or self.cfg.include, tuple(exclude))

    def client_default_name(self, key: JobKey) -> str:
        """The name of an unnamed client Ensure: the URI's last segment when that name is free,
        else that plus a hash of the source and filters, so it never lands on someone else's name."""
        base = default_name(key.uri)
        row = self.index.model(base)
        if row is None or (row.source, row.filters) == (key.uri, key.filters):
            return base
        tag = hashlib.sha256(f"{key.uri}\0{key.filters.to_json()}".encode()).hexdigest()[:12]
        return f"{base[:115]}-{tag}"

    def check_owner(self, name: str, key: JobKey, owner: str) -> None:
        """Refuse, before any byte is fetched, a client request that would re-point an existing
        name; Index.set_model checks again atomically when the name is written."""
        row = self.index.model(name)
        if owner == "client" and row is not None and (row.source, row.filters) != (key.uri, key.filters):
            raise PermissionDeniedError(
                f"model name {name!r} already exists (created by {row.owner}, source {row.source}); clients may not "
                "re-point an existing name: use another name, or ask an admin (cachectl prefetch URI --name NAME)"
            )

    def name_model(self, name: str, key: JobKey, snapshot: str, pin: bool | None, owner: str = "admin") -> None:
        self.check_owner(name, key, owner)  # before a view appears under a name that is not ours
        if self.index.snapshot_source(snapshot) is None:
            # Admission for a concurrent download evicted it (unnamed or just named, unleased).
            raise ExhaustedError(
                f"model {name}: its snapshot {snapshot} was evicted to make room for other downloads before it "
                "could be used; the cache is too small for the models fetched at once (retry, or raise max_size)"
            )
        build_view(self.store, name, snapshot, self.index.files(snapshot))
        old = self.index.model(name)
        self.index.set_model(name, key.uri, snapshot, key.filters, pin, owner)
        if old is not None and old.snapshot_id != snapshot:
            log.info("model_updated", model=name, old_snapshot=old.snapshot_id, snapshot=snapshot)
