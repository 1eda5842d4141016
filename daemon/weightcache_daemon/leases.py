"""Leases (docs/architecture.md, decision 4): a snapshot acquired over fd.sock is in use until that
connection closes. Kept in memory: a daemon restart closes every connection anyway."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Lease:
    token: int
    snapshot_id: str
    pid: int
    uid: int
    gid: int
    since: float


class Leases:
    def __init__(self) -> None:
        self._by_token: dict[int, Lease] = {}
        self._ids = itertools.count(1)

    def acquire(self, snapshot_id: str, pid: int, uid: int, gid: int) -> Lease:
        lease = Lease(next(self._ids), snapshot_id, pid, uid, gid, time.time())
        self._by_token[lease.token] = lease
        return lease

    def release(self, token: int) -> None:
        self._by_token.pop(token, None)

    def of(self, snapshot_id: str) -> list[Lease]:
        return [le for le in self._by_token.values() if le.snapshot_id == snapshot_id]

    def held(self) -> set[str]:
        return {le.snapshot_id for le in self._by_token.values()}

    def __len__(self) -> int:
        return len(self._by_token)
