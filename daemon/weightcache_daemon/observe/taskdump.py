"""`kill -USR2 <pid>`: every asyncio task of the daemon and what it awaits, to stderr.

A thread dump (`kill -USR1`, faulthandler) shows the event loop only as a thread waiting in
select(): an RPC that never ends is a coroutine suspended somewhere, and only its await chain
says where (a stream waiting for a job, a handler waiting on a pool). ``Task.print_stack`` shows
the outermost frame of a suspended task only, so the chain is walked here.
"""

from __future__ import annotations

import asyncio
import gc
import sys
from collections.abc import Iterable
from types import AsyncGeneratorType, CoroutineType, FrameType
from typing import Any

__all__ = ["format_tasks", "install"]


def _frame(obj: Any) -> FrameType | None:
    return getattr(obj, "cr_frame", None) or getattr(obj, "ag_frame", None) or getattr(obj, "gi_frame", None)


def _awaited(obj: Any) -> Any:
    """What a coroutine, async generator or generator is suspended on (None at the bottom)."""
    for attr in ("cr_await", "ag_await", "gi_yieldfrom"):
        nxt = getattr(obj, attr, None)
        if nxt is not None:
            return nxt
    if type(obj).__name__ in ("async_generator_asend", "async_generator_athrow"):
        # `async for` awaits one of these, which exposes no attribute for its generator: the
        # daemon's streams are async generators inside async generators, so find it by reference.
        return next((r for r in gc.get_referents(obj) if isinstance(r, AsyncGeneratorType)), None)
    if type(obj).__name__ == "coroutine_wrapper":
        # What `coro.__await__()` returns, which is what gRPC's Cython server awaits a handler
        # coroutine through (the streaming handlers, edges/handlers.py): the coroutine by reference.
        return next((r for r in gc.get_referents(obj) if isinstance(r, CoroutineType)), None)
    return None


def format_tasks(tasks: Iterable[asyncio.Task[Any]]) -> str:
    """Each task's name and state, then its await chain, outermost first."""
    tasks = sorted(tasks, key=lambda t: t.get_name())
    out = [f"asyncio tasks ({len(tasks)}), each from its outermost coroutine to what it waits on:"]
    for task in tasks:
        out.append(f"Task {task.get_name()} ({'done' if task.done() else 'pending'}):")
        obj: Any = task.get_coro()
        seen = 0
        while obj is not None and seen < 100:  # a bound: a chain is never this deep in practice
            frame, below = _frame(obj), _awaited(obj)
            if frame is not None:
                code = frame.f_code
                out.append(f'  File "{code.co_filename}", line {frame.f_lineno}, in {code.co_qualname}')
            elif below is None:  # the bottom: a future or a C-level awaitable
                out.append(f"  awaiting {obj!r}"[:300])
            obj = below
            seen += 1
    return "\n".join(out) + "\n"


def install(loop: asyncio.AbstractEventLoop, signum: int) -> None:
    """Dump the loop's tasks to stderr (journald) on ``signum``."""

    def dump() -> None:
        sys.stderr.write(format_tasks(asyncio.all_tasks(loop)))
        sys.stderr.flush()

    loop.add_signal_handler(signum, dump)
