"""What one declared tenant's client calls hold at once, all its connections together
(docs/security.md, "Client socket bounds"): calls in progress, and bytes of ReadRange chunks
read for its streams and not yet taken by their readers.

gRPC bounds streams per connection only, and a tenant may open any number of connections:
without these, one tenant's unread ReadRange streams (a chunk of up to read_chunk_max each)
took the daemon past its memory limit, and every tenant with it. Each tenant's socket has its
own server, its own CacheService and so its own TenantLoad: one tenant at its bounds slows or
refuses only itself. Runs on the event loop only: no lock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog

from weightcache.contract.errors import ExhaustedError
from weightcache_daemon.config import ClientLimits

__all__ = ["TenantLoad"]

log = structlog.get_logger("weightcached.rpc")


class TenantLoad:
    def __init__(self, label: str, limits: ClientLimits, metrics: Any, bounded: bool) -> None:
        self.label = label
        self.metrics = metrics
        # The default tenant of a node that declares none keeps the per-connection bounds only.
        self.max_calls = limits.calls_per_tenant if bounded else 0
        self.max_buffered = limits.read_buffer_per_tenant if bounded else 0
        self.calls = 0
        self.buffered = 0
        self._freed = asyncio.Event()

    @contextmanager
    def call(self, rpc: str) -> Iterator[None]:
        """One call of this tenant's, refused past calls_per_tenant."""
        if self.max_calls and self.calls >= self.max_calls:
            self.metrics.rpc_bounds.labels("calls_per_tenant").inc()
            raise ExhaustedError(
                f"{rpc}: tenant {self.label} has {self.calls} calls in progress on its sockets, all its "
                f"connections together (limits.calls_per_tenant is {self.max_calls}); retry when some have ended"
            )
        self.calls += 1
        try:
            yield
        finally:
            self.calls -= 1

    async def reserve(self, n: int, rpc: str, timeout: float | None) -> None:
        """Room for n more bytes read for this tenant's readers; waits for its other streams'
        readers to take theirs (or for those streams to end), at most `timeout` seconds. A
        chunk larger than the whole budget goes alone."""
        if not self.max_buffered:
            return
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        if self.buffered and self.buffered + n > self.max_buffered:
            log.info("read_buffer_wait", rpc=rpc, tenant=self.label, buffered=self.buffered, limit=self.max_buffered)
        while self.buffered and self.buffered + n > self.max_buffered:
            self._freed.clear()
            left = None if deadline is None else deadline - loop.time()
            try:
                if left is not None and left <= 0:
                    raise TimeoutError
                await asyncio.wait_for(self._freed.wait(), left)
            except TimeoutError:
                self.metrics.rpc_bounds.labels("read_buffer_per_tenant").inc()
                raise ExhaustedError(
                    f"{rpc}: tenant {self.label}'s readers have not taken {self.buffered} bytes already read for "
                    f"them (limits.read_buffer_per_tenant is {self.max_buffered}); read the streams you "
                    "opened, or open fewer at once"
                ) from None
        self.buffered += n

    def release(self, n: int) -> None:
        if not self.max_buffered:
            return
        self.buffered -= n
        self._freed.set()
