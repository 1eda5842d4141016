"""The resume record of one download job: ingest/<job>/state.json.

A job is accepted once this record is written (the intent, before a byte is fetched), and
the download engine rewrites it now and then with the parts already on disk. Three readers
rely on it: the job itself (which parts to skip on resume), start-up reconciliation (which
ingest directories to keep) and the core (which jobs to restart). They all read it through
`IngestState.load`, which answers None for a missing or unreadable record: such a directory
is stale, never an error. Fields that are present but malformed read as "nothing known"
(no name, no pin, a client's rights, no parts), so a damaged record can only cost a refetch.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightcache_daemon.records import JobKey
from weightcache_daemon.sources import RemoteObject
from weightcache_daemon.storage.index import OWNERS

__all__ = [
    "STATE_FILE",
    "IngestFile",
    "IngestState",
    "JobRecord",
    "ingest_dir_name",
    "load_committed",
    "load_resume",
    "record_intent",
    "save_resume",
]

STATE_FILE = "state.json"


@dataclass(frozen=True, slots=True)
class IngestFile:
    """One source object of the job: which ingest file holds it and which parts are written."""

    relpath: str
    version: str
    size: int
    file: str  # the ingest file's name inside the job's directory
    written: tuple[int, ...]
    # Set just before the commit moves the (sealed, verified) file into the store: a crash
    # between that move and the index transaction leaves the bytes as this blob, not here.
    sha256: str = ""

    def to_json(self) -> dict[str, Any]:
        d = {"relpath": self.relpath, "version": self.version, "size": self.size, "file": self.file,
             "written": list(self.written)}  # fmt: skip
        if self.sha256:
            d["sha256"] = self.sha256
        return d

    @classmethod
    def from_json(cls, d: object) -> IngestFile | None:
        if not isinstance(d, dict):
            return None
        relpath, version, size, file, written = (d.get(k) for k in ("relpath", "version", "size", "file", "written"))
        if not (isinstance(relpath, str) and isinstance(version, str) and isinstance(size, int)):
            return None
        if not isinstance(file, str) or not isinstance(written, list) or not all(isinstance(i, int) for i in written):
            return None
        digest = d.get("sha256", "")
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            digest = ""
        return cls(relpath, version, size, file, tuple(written), digest)


@dataclass(frozen=True, slots=True)
class IngestState:
    uri: str  # canonical source URI
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    name: str  # the model name the job produces ("" = derive it from the URI)
    pin: bool | None
    owner: str  # one of index.OWNERS: the rights the job keeps across a restart
    part_size: int
    files: tuple[IngestFile, ...] = ()

    def save(self, ingest_dir: Path) -> None:
        """Write atomically: a crash leaves the previous record or this one, never half of one."""
        state = {
            "uri": self.uri,
            "include": list(self.include),
            "exclude": list(self.exclude),
            "name": self.name,
            "pin": self.pin,
            "owner": self.owner,
            "part_size": self.part_size,
            "files": [f.to_json() for f in self.files],
        }
        tmp = ingest_dir / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, ingest_dir / STATE_FILE)

    @classmethod
    def load(cls, ingest_dir: Path) -> IngestState | None:
        try:
            d = json.loads((ingest_dir / STATE_FILE).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(d, dict) or not isinstance(d.get("uri"), str):
            return None
        name, pin, owner, part_size = d.get("name"), d.get("pin"), d.get("owner"), d.get("part_size")
        files = [IngestFile.from_json(f) for f in d.get("files") or []] if isinstance(d.get("files"), list) else []
        return cls(
            uri=d["uri"],
            include=_strings(d.get("include")),
            exclude=_strings(d.get("exclude")),
            name=name if isinstance(name, str) else "",
            pin=pin if isinstance(pin, bool) else None,
            # A record without a known owner is treated as a client's: it may create its
            # name, never re-point one.
            owner=owner if owner in OWNERS else "client",
            part_size=part_size if isinstance(part_size, int) else 0,
            files=tuple(f for f in files if f is not None),
        )


def _strings(v: object) -> tuple[str, ...]:
    return tuple(str(p) for p in v) if isinstance(v, list) else ()


def ingest_dir_name(key: JobKey) -> str:
    """One ingest directory per source and filters, so a restarted job finds its parts."""
    return hashlib.sha256(f"{key.uri}\0{key.filters.to_json()}".encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class JobRecord:
    """What a job's record says about the job itself (its parts aside): who asked, for what."""

    key: JobKey
    label: str
    pin: bool | None
    owner: str


def save_resume(
    ingest: Path,
    job: JobRecord,
    part_size: int,
    files: list[tuple[RemoteObject, str, list[int]]],
    digests: Mapping[str, str] | None = None,
) -> None:
    """The job's record with the parts on disk of each file; ``digests`` (relpath -> sha256) for
    files about to be moved into the store (see ``load_committed``)."""
    digests = digests or {}
    IngestState(
        uri=job.key.uri,
        include=job.key.include,
        exclude=job.key.exclude,
        name=job.label,
        pin=job.pin,
        owner=job.owner,
        part_size=part_size,
        files=tuple(
            IngestFile(o.relpath, o.version, o.size, name, tuple(written), digests.get(o.relpath, ""))
            for o, name, written in files
        ),
    ).save(ingest)


def record_intent(ingest: Path, job: JobRecord, part_size: int) -> bool:
    """Write the job's record before the job is accepted: from then on a crashed daemon
    resumes it at its next start, even if not a byte was fetched yet. A record a previous run
    left for the same job is kept (it says which parts are on disk). True when it was kept."""
    state = IngestState.load(ingest)
    if state is not None and state.uri == job.key.uri:
        return True
    ingest.mkdir(mode=0o700, exist_ok=True)
    save_resume(ingest, job, part_size, [])
    return False


def load_resume(ingest: Path, key: JobKey, todo: list[RemoteObject], part_size: int) -> dict[str, set[int]]:
    """Parts a previous run of this job wrote, for objects whose version is unchanged."""
    state = IngestState.load(ingest)
    if state is None or state.uri != key.uri or state.part_size != part_size:
        return {}
    current = {o.relpath: o for o in todo}
    out: dict[str, set[int]] = {}
    for f in state.files:
        o = current.get(f.relpath)
        if o is None or o.version != f.version or o.size != f.size:
            continue  # changed at the source (or no longer wanted): that file starts over
        parts = set(f.written)
        try:
            on_disk = (ingest / f.file).stat().st_size
        except OSError:
            continue
        if parts and max(min((i + 1) * part_size, o.size) for i in parts) <= on_disk:
            out[o.relpath] = parts
    return out


def load_committed(ingest: Path, key: JobKey, todo: list[RemoteObject]) -> dict[str, str]:
    """Files a previous run of this job had verified and moved into the store when it stopped
    (between the move and the index transaction, which start-up reconciliation then adopts as
    blobs): relpath -> sha256, for objects whose version is unchanged and whose ingest file is
    gone. The caller still checks that the store has each blob."""
    state = IngestState.load(ingest)
    if state is None or state.uri != key.uri:
        return {}
    current = {o.relpath: o for o in todo}
    out: dict[str, str] = {}
    for f in state.files:
        o = current.get(f.relpath)
        if not f.sha256 or o is None or o.version != f.version or o.size != f.size:
            continue
        if not (ingest / f.file).exists():
            out[o.relpath] = f.sha256
    return out
