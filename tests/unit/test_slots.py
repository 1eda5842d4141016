"""Fair job slots (ingest/slots.py): one tenant never holds every slot while another waits,
and a freed slot goes to the tenant running the fewest jobs. Pure asyncio, no daemon needed."""

from __future__ import annotations

import asyncio

from weightcache_daemon.ingest.slots import FairSlots


async def _granted(slots: FairSlots, tenant: str) -> asyncio.Task[None]:
    task = asyncio.ensure_future(slots.acquire(tenant))
    await asyncio.sleep(0)  # let it queue (and be granted, if a slot is free)
    return task


def test_one_tenant_leaves_a_slot_for_others() -> None:
    async def run() -> None:
        slots = FairSlots(4, tenants=2)
        b = [await _granted(slots, "b") for _ in range(5)]
        assert [t.done() for t in b] == [True, True, True, False, False]  # b holds at most 3 of 4
        a = await _granted(slots, "a")
        assert a.done()  # a starts at once
        slots.release("b")
        await asyncio.sleep(0)
        assert b[3].done() and not b[4].done()

    asyncio.run(run())


def test_a_freed_slot_goes_to_the_tenant_running_fewest() -> None:
    async def run() -> None:
        slots = FairSlots(2, tenants=3)
        b1, a1 = await _granted(slots, "b"), await _granted(slots, "a")
        b2, c1 = await _granted(slots, "b"), await _granted(slots, "c")  # b asked first
        assert b1.done() and a1.done() and not b2.done() and not c1.done()
        slots.release("a")
        await asyncio.sleep(0)
        assert c1.done() and not b2.done()  # c runs none, b runs one

    asyncio.run(run())


def test_without_tenants_it_is_first_come_first_served() -> None:
    async def run() -> None:
        slots = FairSlots(2, tenants=1)
        tasks = [await _granted(slots, "") for _ in range(3)]
        assert [t.done() for t in tasks] == [True, True, False]
        slots.release("")
        await asyncio.sleep(0)
        assert tasks[2].done()

    asyncio.run(run())


def test_a_waiter_that_goes_away_holds_nothing() -> None:
    async def run() -> None:
        slots = FairSlots(1, tenants=1)
        first, second = await _granted(slots, ""), await _granted(slots, "")
        second.cancel()
        await asyncio.gather(second, return_exceptions=True)
        slots.release("")
        assert first.done() and slots.running("") == 0

    asyncio.run(run())
