"""index.db: what the store holds, in SQLite (WAL mode, one writer).

models -> snapshots -> snapshot_files -> blobs, plus the tensors of each safetensors blob
and a cache of source objects already fetched (object URI + version -> blob), so an
unchanged object is never downloaded twice. The blobs on disk are the truth; this index
is written only after a blob is committed, and can be rebuilt from them.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from weightcache.contract.errors import CorruptedError, NotFoundError, PermissionDeniedError
from weightcache_daemon.records import FileRow, Filters, ModelRow, NewFile, split_name
from weightcache_daemon.safetensors_format import TensorInfo

# 2: models.owner (who created the name: admin, models.d or client); a version-1 index is
# migrated in place at open, its names becoming admin-owned (clients can never re-point them).
# 3: models.tenant (the namespace: "" shared, else a declared tenant whose names are keyed
# "<tenant>:<name>"); a version-2 index is migrated in place, its names all shared.
SCHEMA_VERSION = 3
OWNERS = ("admin", "models.d", "client")
_MODEL_SELECT = "SELECT name, source, snapshot_id, filters, pinned, created, last_used, owner, tenant FROM models"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS blobs (
    sha256 TEXT PRIMARY KEY, size INTEGER NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS tensors (
    sha256 TEXT NOT NULL REFERENCES blobs(sha256) ON DELETE CASCADE,
    name TEXT NOT NULL, dtype TEXT NOT NULL, shape TEXT NOT NULL,
    offset INTEGER NOT NULL, length INTEGER NOT NULL, PRIMARY KEY (sha256, name));
CREATE TABLE IF NOT EXISTS snapshots (
    id TEXT PRIMARY KEY, source TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS snapshot_files (
    snapshot_id TEXT NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
    path TEXT NOT NULL, sha256 TEXT NOT NULL REFERENCES blobs(sha256),
    PRIMARY KEY (snapshot_id, path));
CREATE INDEX IF NOT EXISTS snapshot_files_blob ON snapshot_files(sha256);
CREATE TABLE IF NOT EXISTS models (
    name TEXT PRIMARY KEY, source TEXT NOT NULL, snapshot_id TEXT NOT NULL REFERENCES snapshots(id),
    filters TEXT NOT NULL, pinned INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL, last_used REAL NOT NULL, owner TEXT NOT NULL DEFAULT 'admin',
    tenant TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS quarantine (
    sha256 TEXT PRIMARY KEY, since REAL NOT NULL, reason TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS source_objects (
    uri TEXT PRIMARY KEY, version TEXT NOT NULL, size INTEGER NOT NULL,
    sha256 TEXT NOT NULL REFERENCES blobs(sha256) ON DELETE CASCADE);
"""


class Index:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._uses: dict[str, float] = {}
        self._ulock = threading.Lock()
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise CorruptedError(f"index {path} is unreadable ({exc})") from None
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) == 1:
            self._migrate_1_to_2()
            self._migrate_2_to_3()
        elif int(row[0]) == 2:
            self._migrate_2_to_3()
        elif int(row[0]) != SCHEMA_VERSION:
            raise CorruptedError(f"index {path} has schema {row[0]}, this daemon expects {SCHEMA_VERSION}")
        # Reads get their own connection: in WAL mode they never wait for the writer's fsync,
        # so an open() does not stall behind a commit.
        self._rlock = threading.Lock()
        self._rdb = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._rdb.execute("PRAGMA foreign_keys=ON")

    def _migrate_1_to_2(self) -> None:
        """Add models.owner; names that existed before are the admin's (the safe side: a client
        cannot re-point them). One transaction, so a crash leaves version 1 intact."""
        with self._tx() as db:
            cols = {str(r[1]) for r in db.execute("PRAGMA table_info(models)").fetchall()}
            if "owner" not in cols:
                db.execute("ALTER TABLE models ADD COLUMN owner TEXT NOT NULL DEFAULT 'admin'")
            db.execute("UPDATE meta SET value='2' WHERE key='schema'")

    def _migrate_2_to_3(self) -> None:
        """Add models.tenant; names that existed before are shared (the namespace they were in)."""
        with self._tx() as db:
            cols = {str(r[1]) for r in db.execute("PRAGMA table_info(models)").fetchall()}
            if "tenant" not in cols:
                db.execute("ALTER TABLE models ADD COLUMN tenant TEXT NOT NULL DEFAULT ''")
            db.execute("UPDATE meta SET value='3' WHERE key='schema'")

    def close(self) -> None:
        self.flush_uses()
        with self._lock, self._rlock:
            self._db.close()
            self._rdb.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _q(self, sql: str, args: Iterable[object] = ()) -> list[tuple[object, ...]]:
        with self._rlock:
            return self._rdb.execute(sql, tuple(args)).fetchall()

    # ---------------------------------------------------------------- source objects

    def known_object(self, uri: str, version: str, size: int) -> str | None:
        rows = self._q("SELECT sha256 FROM source_objects WHERE uri=? AND version=? AND size=?", (uri, version, size))
        return str(rows[0][0]) if rows else None

    # ---------------------------------------------------------------- commit

    def adopt_blob(self, sha256: str, size: int) -> None:
        """Record a verified blob found on disk without a row (its tensors are re-read on use)."""
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO blobs VALUES (?,?,?)", (sha256, size, time.time()))

    def quarantine(self, sha256: str, reason: str) -> None:
        """Mark a blob bad: never handed out again; its source objects must be fetched anew."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO quarantine VALUES (?,?,?)", (sha256, time.time(), reason))
            db.execute("DELETE FROM source_objects WHERE sha256=?", (sha256,))

    def quarantined(self) -> dict[str, str]:
        return {str(s): str(r) for s, r in self._q("SELECT sha256, reason FROM quarantine")}

    def add_snapshot(
        self,
        snapshot_id: str,
        source: str,
        files: list[NewFile],
        objects: list[tuple[str, str, int, str]],
    ) -> None:
        """Record committed blobs and a snapshot made of them, in one transaction."""
        now = time.time()
        with self._tx() as db:
            for f in files:
                db.execute("INSERT OR IGNORE INTO blobs VALUES (?,?,?)", (f.sha256, f.size, now))
                if f.tensors:  # also fills in a blob adopted at start-up without its tensors
                    db.executemany(
                        "INSERT OR IGNORE INTO tensors VALUES (?,?,?,?,?,?)",
                        [(f.sha256, t.name, t.dtype, json.dumps(t.shape), t.offset, t.length) for t in f.tensors],
                    )
            db.execute("INSERT OR IGNORE INTO snapshots VALUES (?,?,?)", (snapshot_id, source, now))
            db.executemany(
                "INSERT OR IGNORE INTO snapshot_files VALUES (?,?,?)", [(snapshot_id, f.path, f.sha256) for f in files]
            )
            db.executemany("INSERT OR REPLACE INTO source_objects VALUES (?,?,?,?)", objects)
            db.executemany("DELETE FROM quarantine WHERE sha256=?", [(f.sha256,) for f in files])

    def set_model(
        self, name: str, source: str, snapshot_id: str, filters: Filters, pinned: bool | None, owner: str = "admin"
    ) -> None:
        """Point `name` at a snapshot, checking ownership in the same transaction (so a name
        created meanwhile by someone else is never overwritten by a client).

        A client may create a name that does not exist; it may not re-point an existing one
        (its own included: gRPC cannot tell clients apart) unless the request is the same
        source and filters. The admin and models.d may re-point any name; the name then
        becomes theirs (and keeps its pin unless `pinned` says otherwise)."""
        if owner not in OWNERS:
            raise ValueError(f"owner {owner!r}")
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT pinned, created, source, filters, owner FROM models WHERE name=?",
                             (name,)).fetchone()  # fmt: skip
            same = row is not None and (row[2], Filters.from_json(row[3])) == (source, filters)
            if row is not None and owner == "client" and not same:
                raise PermissionDeniedError(
                    f"model name {name!r} already exists (created by {row[4]}, source {row[2]}); clients may not "
                    "re-point an existing name: use another name, or ask an admin (cachectl prefetch URI --name NAME)"
                )
            keep_pin = bool(row[0]) if row is not None else False
            new_owner = str(row[4]) if row is not None and owner == "client" else owner
            db.execute(
                "INSERT OR REPLACE INTO models (name, source, snapshot_id, filters, pinned, created, last_used, owner, "
                "tenant) VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    name,
                    source,
                    snapshot_id,
                    filters.to_json(),
                    int(keep_pin if pinned is None else pinned),
                    row[1] if row else now,
                    now,
                    new_owner,
                    split_name(name)[0],
                ),
            )

    # ---------------------------------------------------------------- lookups

    def _rows(self, sql: str, args: Iterable[object] = ()) -> list[ModelRow]:
        rows = [_model(r) for r in self._q(sql, args)]
        with self._ulock:
            uses = dict(self._uses)
        return [replace(r, last_used=uses[r.name]) if r.name in uses else r for r in rows]

    def model(self, name: str) -> ModelRow | None:
        rows = self._rows(_MODEL_SELECT + " WHERE name=?", (name,))
        return rows[0] if rows else None

    def models(self) -> list[ModelRow]:
        return self._rows(_MODEL_SELECT + " ORDER BY name")

    def models_by_source(self, source: str, filters: Filters) -> list[ModelRow]:
        rows = self._rows(_MODEL_SELECT + " WHERE source=? AND filters=?", (source, filters.to_json()))
        return sorted(rows, key=lambda r: r.last_used, reverse=True)

    def models_of_snapshot(self, snapshot_id: str) -> list[ModelRow]:
        return self._rows(_MODEL_SELECT + " WHERE snapshot_id=? ORDER BY name", (snapshot_id,))

    def snapshot_source(self, snapshot_id: str) -> str | None:
        rows = self._q("SELECT source FROM snapshots WHERE id=?", (snapshot_id,))
        return str(rows[0][0]) if rows else None

    def snapshot_ids(self) -> list[str]:
        return [str(r[0]) for r in self._q("SELECT id FROM snapshots ORDER BY id")]

    def files(self, snapshot_id: str) -> list[FileRow]:
        rows = self._q(
            "SELECT f.path, f.sha256, b.size FROM snapshot_files f JOIN blobs b USING (sha256) "
            "WHERE f.snapshot_id=? ORDER BY f.path",
            (snapshot_id,),
        )
        if not rows and self.snapshot_source(snapshot_id) is None:
            raise NotFoundError(f"snapshot {snapshot_id} is not in the cache")
        return [FileRow(str(p), str(s), int(z)) for p, s, z in rows]  # type: ignore[call-overload]

    def tensors(self, sha256: str) -> list[TensorInfo]:
        rows = self._q(
            "SELECT name, dtype, shape, offset, length FROM tensors WHERE sha256=? ORDER BY offset", (sha256,)
        )
        return [TensorInfo(str(n), str(d), tuple(json.loads(str(s))), int(o), int(ln)) for n, d, s, o, ln in rows]  # type: ignore[call-overload]

    def blobs(self) -> dict[str, int]:
        return {str(s): int(z) for s, z in self._q("SELECT sha256, size FROM blobs")}  # type: ignore[call-overload]

    def blob_refs(self) -> set[str]:
        return {str(r[0]) for r in self._q("SELECT DISTINCT sha256 FROM snapshot_files")}

    def touch(self, name: str) -> None:
        """Record a use. Uses are on the hot path of every open, so they are batched in memory
        and written by flush_uses() (every few seconds, and at shutdown) instead of costing an
        fsync per open; listings merge the pending ones in."""
        with self._ulock:
            self._uses[name] = time.time()

    def flush_uses(self) -> int:
        with self._ulock:
            pending, self._uses = self._uses, {}
        if pending:
            with self._tx() as db:
                db.executemany("UPDATE models SET last_used=? WHERE name=?", [(t, n) for n, t in pending.items()])
        return len(pending)

    def set_pinned(self, name: str, pinned: bool) -> None:
        with self._tx() as db:
            db.execute("UPDATE models SET pinned=? WHERE name=?", (int(pinned), name))

    def logical_bytes(self) -> int:
        rows = self._q(
            "SELECT COALESCE(SUM(b.size), 0) FROM models m JOIN snapshot_files f ON f.snapshot_id = m.snapshot_id "
            "JOIN blobs b ON b.sha256 = f.sha256"
        )
        return int(rows[0][0])  # type: ignore[call-overload, no-any-return]

    # ---------------------------------------------------------------- removal

    def delete(self, names: Iterable[str], snapshots: Iterable[str], blobs: Iterable[str]) -> None:
        """Drop names, then snapshots, then blobs, in one transaction (references before referents)."""
        with self._tx() as db:
            db.executemany("DELETE FROM models WHERE name=?", [(n,) for n in names])
            db.executemany("DELETE FROM snapshots WHERE id=?", [(s,) for s in snapshots])
            db.executemany("DELETE FROM blobs WHERE sha256=?", [(b,) for b in blobs])


def _model(r: tuple[object, ...]) -> ModelRow:
    name, source, snap, filters, pinned, created, last_used, owner, tenant = r
    return ModelRow(str(name), str(source), str(snap), Filters.from_json(str(filters)), bool(pinned), float(created), float(last_used),  # type: ignore[arg-type]
                    str(owner), str(tenant))  # fmt: skip
