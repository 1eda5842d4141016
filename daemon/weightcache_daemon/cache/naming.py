"""Names: what a model reference means, and who may point a name at a snapshot.

A reference is a model name, a snapshot id or the source URI of a cached model. Names are
checked here (shape), resolved here (reference -> snapshot), derived here (a client's unnamed
Ensure) and written here (the view first, then the index row, with the ownership rule of
Index.set_model checked before any byte is fetched and again when the name is written).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence

import structlog

from weightcache.contract.errors import ExhaustedError, InvalidInputError, NotFoundError, PermissionDeniedError
from weightcache_daemon import uris
from weightcache_daemon.cache.tenants import Scope
from weightcache_daemon.config import Config
from weightcache_daemon.records import JobKey, ModelRow, split_name
from weightcache_daemon.sources import parse_uri
from weightcache_daemon.storage.blobs import BlobStore
from weightcache_daemon.storage.index import Index
from weightcache_daemon.storage.views import build_view

__all__ = ["Names", "check_name", "default_name", "not_found", "snapshot_not_found"]

log = structlog.get_logger("weightcached.core")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}(/[A-Za-z0-9][A-Za-z0-9._-]{0,127})?")
_SNAPSHOT = re.compile(r"[0-9a-f]{32}")
# A segment that could be read as a snapshot id (or any content id): refused in names, so
# open(<snapshot id>) and the view snapshots/<name>/<snapshot>/ can only ever mean a snapshot.
_HEXLIKE = re.compile(r"[0-9a-fA-F]{32,}")


def check_name(name: str) -> str:
    """A model name: never readable as a snapshot id, a URI ("://" needs ':') or a path."""
    if not _NAME.fullmatch(name) or ".." in name:
        raise InvalidInputError(
            f"model name {name[:200]!r}: use letters, digits, '.', '_', '-' (at most 128), optionally one 'org/' prefix"
        )
    if any(_HEXLIKE.fullmatch(seg) for seg in name.split("/")):
        raise InvalidInputError(
            f"model name {name[:200]!r}: a name (or its part after 'org/') of 32 or more hex digits could be read as a "
            "snapshot id; choose another name"
        )
    return name


def not_found(model: str) -> NotFoundError:
    """The one answer for a model that does not exist, or that the caller may not see."""
    return NotFoundError(f"model {model[:200]!r} is not in the cache (cachectl prefetch URI --name NAME adds it)")


def snapshot_not_found(snapshot_id: str) -> NotFoundError:
    return NotFoundError(f"snapshot {snapshot_id} is not in the cache")


def default_name(uri: str) -> str:
    _, _, path = parse_uri(uri)
    last = [p for p in path.split("/") if p]
    name = re.sub(r"[^A-Za-z0-9._-]", "-", last[-1] if last else "model").lstrip("._-") or "model"
    if _HEXLIKE.fullmatch(name[:128]):  # e.g. a commit hash as the last segment: not a snapshot id
        name = f"model-{name}"
    return name[:128]


class Names:
    def __init__(self, cfg: Config, store: BlobStore, index: Index) -> None:
        self.cfg = cfg
        self.store = store
        self.index = index

    def resolve(self, model: str, scope: Scope | None = None) -> tuple[str, ModelRow | None]:
        """A name, snapshot id or source URI of a cached model -> (snapshot id, model row).

        A snapshot id is read as one before any name (no name may look like one, and one that
        predates that rule cannot capture an id). With a tenant's `scope`, only what it sees
        resolves; the rest is answered exactly as a model that does not exist."""
        if not model:
            raise InvalidInputError("model is empty: give a name, a snapshot id or a source URI")
        if _SNAPSHOT.fullmatch(model) and self.index.snapshot_source(model) is not None:
            if scope is not None and not scope.sees_snapshot(model):
                raise not_found(model)
            rows = [r for r in self.index.models_of_snapshot(model) if scope is None or scope.sees(r)]
            return model, rows[0] if rows else None
        row = self.index.model(model) if scope is None else scope.find(model)
        if row is not None:
            return row.snapshot_id, row
        if "://" in model:
            try:
                canonical = uris.normalize(model)
            except InvalidInputError:
                canonical = model
            for r in self.index.models() if scope is None else scope.rows():
                if r.source in (model, canonical):
                    return r.snapshot_id, r
        raise not_found(model)

    def check_snapshot(self, snapshot_id: str, scope: Scope | None = None) -> str:
        if not _SNAPSHOT.fullmatch(snapshot_id):
            raise InvalidInputError(f"snapshot id {snapshot_id[:80]!r} is not 32 lowercase hex characters")
        if self.index.snapshot_source(snapshot_id) is None:
            raise snapshot_not_found(snapshot_id)
        if scope is not None and not scope.sees_snapshot(snapshot_id):
            raise snapshot_not_found(snapshot_id)
        return snapshot_id

    def key(self, uri: str, include: Sequence[str], exclude: Sequence[str]) -> JobKey:
        parse_uri(uri)  # validates the shape
        return JobKey(uri, tuple(include) or self.cfg.include, tuple(exclude))

    def client_default_name(self, key: JobKey, scope: Scope | None = None,
                            claimed: Callable[[str], JobKey | None] = lambda name: None) -> str:  # fmt: skip
        """The name (index key) of an unnamed client Ensure, in the requester's namespace: the
        URI's last segment when that name is free (not in the index, not being fetched for
        another source or filters, not a visible shared name), else that plus a hash of the
        source and filters, so it never lands on someone else's name."""
        base = default_name(key.uri)
        k = scope.key(base) if scope is not None else base
        row = self.index.model(k)
        other = claimed(k)
        shadows = scope is not None and scope.ns != "" and scope.find(base) not in (None, row)
        if (
            not shadows
            and (row is None or (row.source, row.filters) == (key.uri, key.filters))
            and other in (None, key)
        ):
            return k
        tag = hashlib.sha256(f"{key.uri}\0{key.filters.to_json()}".encode()).hexdigest()[:12]
        return scope.key(f"{base[:115]}-{tag}") if scope is not None else f"{base[:115]}-{tag}"

    def check_owner(self, name: str, key: JobKey, owner: str) -> None:
        """Refuse, before any byte is fetched, a client request that would re-point an existing
        name; Index.set_model checks again atomically when the name is written."""
        row = self.index.model(name)
        if owner == "client" and row is not None and (row.source, row.filters) != (key.uri, key.filters):
            raise PermissionDeniedError(
                f"model name {split_name(name)[1]!r} already exists (created by {row.owner}, source {row.source}); "
                "clients may not re-point an existing name: use another name, or ask an admin "
                "(cachectl prefetch URI --name NAME)"
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
