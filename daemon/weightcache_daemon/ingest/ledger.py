"""What running downloads hold while they run: bytes admitted, blobs they reuse, bytes fetched.

Capacity admission (cache/admission.py) and eviction (cache/eviction.py) must see running
downloads, and the job registry and its pipelines must record them; this small account sits
between them so that neither side reaches into the other. Every method is thread-safe: the
pipelines write from their job threads, admission and eviction read from anywhere.

    registry.start ─► opened(job) ─► protect(job, blobs) ─► reserve(job, bytes) ─► release(job)
                                           │ eviction keeps them       │ usage counts them
                                           ▼                           ▼
                              closed(job): everything of the job goes
"""

from __future__ import annotations

import threading

__all__ = ["Ledger"]


class Ledger:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: set[int] = set()
        self._reserved: dict[int, int] = {}  # bytes admitted per running job (Job.id)
        # Blobs already in the store that a running job's snapshot will reference (dedupe):
        # eviction must keep them, or the new model commits over holes.
        self._reused: dict[int, frozenset[str]] = {}
        self._downloaded = 0

    def opened(self, job_id: int) -> None:
        with self._lock:
            self._running.add(job_id)

    def closed(self, job_id: int) -> None:
        """The job ended (any outcome): nothing of it is held any more."""
        with self._lock:
            self._running.discard(job_id)
            self._reserved.pop(job_id, None)
            self._reused.pop(job_id, None)

    def protect(self, job_id: int, blobs: frozenset[str]) -> None:
        """Blobs the job will reuse, kept from eviction from now until it ends."""
        with self._lock:
            self._reused[job_id] = blobs

    def reserve(self, job_id: int, need: int) -> None:
        with self._lock:
            self._reserved[job_id] = self._reserved.get(job_id, 0) + need

    def release(self, job_id: int) -> None:
        """The job's bytes are committed (or will never be): its reservation goes."""
        with self._lock:
            self._reserved.pop(job_id, None)

    def downloaded(self, n: int) -> None:
        with self._lock:
            self._downloaded += n

    def running(self) -> int:
        with self._lock:
            return len(self._running)

    def reserved_bytes(self) -> int:
        with self._lock:
            return sum(self._reserved.values())

    def blobs_in_use(self) -> frozenset[str]:
        with self._lock:
            return frozenset().union(*self._reused.values())

    def bytes_downloaded(self) -> int:
        with self._lock:
            return self._downloaded
