"""Fair job slots: which waiting download job runs next when the registry's MAX_JOBS job
threads are all busy (docs/security.md, "Tenants").

A job belongs to the tenant whose namespace its label is in ("" = shared names and the
default tenant). Two rules keep one tenant from holding every slot while others wait:

- a freed slot goes to the waiting job whose tenant runs the fewest jobs (first come first
  served among equals), never simply to the oldest waiter;
- where tenants are declared, no tenant holds more than ``total - 1`` slots at once, so a
  slot is always left for another tenant's job to start without waiting for a long one.

With one tenant (no tenants declared) this is plain first come, first served over ``total``.
Runs on the event loop only: no lock.
"""

from __future__ import annotations

import asyncio
import itertools

__all__ = ["FairSlots"]


class FairSlots:
    def __init__(self, total: int, tenants: int) -> None:
        self.total = total
        self.per_tenant = total if tenants <= 1 else max(1, total - 1)
        self._running: dict[str, int] = {}
        self._order = itertools.count()
        self._waiting: list[tuple[int, str, asyncio.Future[None]]] = []

    def running(self, tenant: str) -> int:
        return self._running.get(tenant, 0)

    async def acquire(self, tenant: str) -> None:
        """Wait for a slot for one job of `tenant`; release() it when the job ends."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((next(self._order), tenant, fut))
        self._grant()
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():  # granted, but the waiter went: give it back
                self.release(tenant)
            else:
                self._waiting = [w for w in self._waiting if w[2] is not fut]
            raise

    def release(self, tenant: str) -> None:
        left = self._running.get(tenant, 1) - 1
        if left:
            self._running[tenant] = left
        else:
            self._running.pop(tenant, None)
        self._grant()

    def _grant(self) -> None:
        while sum(self._running.values()) < self.total:
            eligible = [w for w in self._waiting if self.running(w[1]) < self.per_tenant]
            if not eligible:
                return
            pick = min(eligible, key=lambda w: (self.running(w[1]), w[0]))
            self._waiting.remove(pick)
            self._running[pick[1]] = self.running(pick[1]) + 1
            pick[2].set_result(None)
