"""gRPC handlers: validate, call the core, convert, map errors. Nothing else.

Errors are mapped through the one table in weightcache.contract.errors; anything unexpected is
logged with its traceback and answered INTERNAL with the handler's name, never UNKNOWN.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from contextlib import AbstractContextManager, nullcontext
from typing import Any, TypeVar

import grpc
import structlog

from weightcache.contract.errors import (
    CorruptedError,
    ExhaustedError,
    InvalidInputError,
    WeightcacheError,
    code_for,
)
from weightcache.v1 import weightcache_pb2 as pb
from weightcache.v1 import weightcache_pb2_grpc as pb_grpc
from weightcache_daemon import uris
from weightcache_daemon.cache.core import Core
from weightcache_daemon.cache.tenants import Scope
from weightcache_daemon.config import ClientLimits
from weightcache_daemon.edges import convert
from weightcache_daemon.edges.tenant_load import TenantLoad
from weightcache_daemon.records import ClientSockets, Manifest, ProgressState, Readiness

log = structlog.get_logger("weightcached.rpc")

DEFAULT_CHUNK = 1 << 20
MAX_LIST = 4096  # bounds on repeated fields of admin requests (the client's: config.ClientLimits)
MAX_STR = 4096
# A manifest must fit one message (the server's send limit is 64 MiB); the job already bounds
# a snapshot's tensors, this turns anything that still does not fit into a clear error.
MAX_MANIFEST_BYTES = 60 << 20

T = TypeVar("T")


async def _abort(context: grpc.aio.ServicerContext[Any, Any], name: str, exc: BaseException) -> None:
    if isinstance(exc, WeightcacheError):
        log.info("rpc_error", rpc=name, code=code_for(exc).name, error=str(exc))
        await context.abort(code_for(exc), str(exc))
    log.exception("rpc_crashed", rpc=name)
    await context.abort(grpc.StatusCode.INTERNAL, f"{name}: internal error: {type(exc).__name__}: {exc}")


def _observe(self: Any, rpc: str, started: float, code: str) -> None:
    self.core.metrics.rpc_seconds.labels(self.SERVICE, rpc, code).observe(time.monotonic() - started)


def _code(exc: BaseException) -> str:
    return code_for(exc).name if isinstance(exc, WeightcacheError) else "INTERNAL"


def _call(self: Any, rpc: str) -> AbstractContextManager[None]:
    """One call of the service's tenant, counted toward its bounds (the admin's: none)."""
    load: TenantLoad | None = self.load
    return load.call(rpc) if load is not None else nullcontext()


def unary(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> T:
        started = time.monotonic()
        try:
            with _call(self, fn.__name__):
                out = await fn(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            _observe(self, fn.__name__, started, "CANCELLED")
            raise
        except Exception as exc:
            _observe(self, fn.__name__, started, _code(exc))
            await _abort(context, fn.__name__, exc)  # mapped, never UNKNOWN
            raise  # unreachable: abort raises
        _observe(self, fn.__name__, started, "OK")
        return out

    return wrapper


def streaming(fn: Callable[..., AsyncIterator[T]]) -> Callable[..., Awaitable[None]]:
    """A server-streaming handler written as an async generator, served with ``context.write``
    so that each message has a deadline: a reader that takes no message for the service's
    ``stall_timeout`` ends its own stream (RESOURCE_EXHAUSTED), and the generator is closed at
    once, releasing what it held (a model's protection from eviction, a chunk of bytes)."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        started = time.monotonic()
        items = fn(self, request, context)
        try:
            with _call(self, fn.__name__):
                async for item in items:
                    await _write(self, fn.__name__, context, item)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            _observe(self, fn.__name__, started, "CANCELLED")
            raise
        except Exception as exc:  # noqa: BLE001 - mapped, never UNKNOWN
            if isinstance(exc, _ReaderGone):  # nobody is left to answer, and nothing crashed
                _observe(self, fn.__name__, started, "CANCELLED")
                return
            _observe(self, fn.__name__, started, _code(exc))
            await items.aclose()  # type: ignore[attr-defined]
            await _abort(context, fn.__name__, exc)
            return
        finally:
            await items.aclose()  # type: ignore[attr-defined]
        _observe(self, fn.__name__, started, "OK")

    return wrapper


class _ReaderGone(Exception):
    """A message could not be sent: the call is over (the reader cancelled or its connection went)."""


async def _write(self: Any, rpc: str, context: grpc.aio.ServicerContext[Any, Any], item: Any) -> None:
    stall: float | None = self.stall_timeout
    try:
        await asyncio.wait_for(context.write(item), stall)
    except TimeoutError:
        self.core.metrics.rpc_bounds.labels("stream_stall_timeout").inc()
        raise ExhaustedError(
            f"{rpc}: the reader took no message for {stall:g} s (limits.stream_stall_timeout); stream closed"
        ) from None
    except (asyncio.CancelledError, grpc.aio.AbortError):
        raise
    except Exception as exc:  # gRPC fails a send to a finished call with an error of its internals
        raise _ReaderGone(f"{rpc}: the reader went away") from exc


def _strings(values: Any, what: str) -> list[str]:
    out = list(values)
    if len(out) > MAX_LIST or any(len(v) > MAX_STR for v in out):
        raise InvalidInputError(f"{what}: at most {MAX_LIST} entries of {MAX_STR} characters")
    return out


def _str(value: str, what: str) -> str:
    if len(value) > MAX_STR or "\x00" in value:
        raise InvalidInputError(f"{what}: longer than {MAX_STR} characters or contains NUL")
    return value


class _Bounds:
    """The client socket's request bounds (config.ClientLimits): each breach is an
    INVALID_ARGUMENT naming the input and the limit, and is counted."""

    def __init__(self, limits: ClientLimits, metrics: Any) -> None:
        self.limits = limits
        self.metrics = metrics

    def _breach(self, bound: str, message: str) -> InvalidInputError:
        self.metrics.rpc_bounds.labels(bound).inc()
        return InvalidInputError(message)

    def ref(self, value: str, what: str) -> str:
        n = self.limits.reference_length_max
        if len(value) > n:
            raise self._breach(
                "reference_length_max",
                f"{what}: {len(value)} characters, more than {n} (limits.reference_length_max)",
            )
        if "\x00" in value:
            raise InvalidInputError(f"{what}: contains NUL")
        return value

    def globs(self, include: Any, exclude: Any) -> tuple[list[str], list[str]]:
        inc, exc = list(include), list(exclude)
        n, length = self.limits.globs_max, self.limits.glob_length_max
        if len(inc) + len(exc) > n:
            raise self._breach(
                "globs_max", f"include/exclude: {len(inc)} + {len(exc)} globs, more than {n} (limits.globs_max)"
            )
        for what, values in (("include", inc), ("exclude", exc)):
            for i, v in enumerate(values):
                if len(v) > length or "\x00" in v:
                    raise self._breach(
                        "glob_length_max",
                        f"{what}[{i}]: {len(v)} characters, more than {length} (limits.glob_length_max), or NUL",
                    )
        return inc, exc


def _manifest_message(m: Manifest) -> pb.Manifest:
    msg = convert.manifest(m)
    size = msg.ByteSize()
    if size > MAX_MANIFEST_BYTES:
        raise ExhaustedError(
            f"manifest of snapshot {m.snapshot_id} ({len(m.tensors)} tensors) is {size} bytes, more than the "
            f"{MAX_MANIFEST_BYTES}-byte message limit"
        )
    return msg


def _manifest_estimate(m: Manifest) -> int:
    """About the bytes of a manifest's message, before building it (names, paths, shapes)."""
    return 4096 + 200 * len(m.files) + 160 * len(m.tensors)


async def _in(pool: Executor, fn: Callable[..., T], *args: Any) -> T:
    """Run blocking work in one of the core's pools (never the event loop, never the downloads')."""
    return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)


class CacheService(pb_grpc.CacheServicer):
    """The client API (weightcache.sock), under the client socket's bounds (config.ClientLimits)."""

    SERVICE = "Cache"

    def __init__(self, core: Core, scope: Scope) -> None:
        self.core = core
        # The tenant of every request on this server's socket (one server per tenant socket).
        self.scope = scope
        self.limits = core.cfg.limits
        self.stall_timeout: float | None = self.limits.stream_stall_timeout
        self.bounds = _Bounds(self.limits, core.metrics)
        self.load: TenantLoad | None = TenantLoad(scope.label, self.limits, core.metrics, not scope.tenant.default)

    @streaming
    async def Ensure(self, request: pb.EnsureRequest, context: Any) -> AsyncIterator[pb.EnsureResponse]:
        include, exclude = self.bounds.globs(request.include, request.exclude)
        events = self.core.fetch(
            self.bounds.ref(request.model, "model"),
            self.bounds.ref(request.name, "name"),
            include,
            exclude,
            admin=False,
            early=request.early,
            scope=self.scope,
        )
        # A manifest message (tens of MiB for a model of 131,072 tensors) counts toward the
        # tenant's read buffer from before it is built until the stream's next message has been
        # handed to gRPC, as a ReadRange chunk does: unread Ensures of a huge model wait for
        # room instead of each holding a message and a client I/O thread to build it.
        assert self.load is not None
        held = 0
        try:
            async for ev in events:
                if isinstance(ev, Manifest):
                    size = _manifest_estimate(ev)
                    await self.load.reserve(size, "Ensure", self.stall_timeout)
                    held += size
                    yield pb.EnsureResponse(manifest=await _in(self.core.client_io, _manifest_message, ev))
                    self.load.release(held - size)  # an earlier manifest has left the transport
                    held = size
                    continue
                if isinstance(ev, Readiness):
                    yield pb.EnsureResponse(ready=convert.readiness(ev))
                else:
                    yield pb.EnsureResponse(progress=convert.progress(ev))
                self.load.release(held)  # the manifest before this message has left the transport
                held = 0
        finally:
            self.load.release(held)

    @unary
    async def List(self, request: pb.ListRequest, context: Any) -> pb.ListResponse:
        # Clients see names and snapshots, not who else holds them. Built off the loop, so a
        # slow index read (another client's huge manifest) never stalls the others' requests.
        def build() -> pb.ListResponse:
            views = self.core.list_models(self.scope)
            return pb.ListResponse(models=[convert.model(v, with_leases=False) for v in views])

        return await _in(self.core.client_io, build)

    @streaming
    async def ReadRange(self, request: pb.ReadRangeRequest, context: Any) -> AsyncIterator[pb.ReadRangeChunk]:
        """A descriptor is held only around each read, never while a message waits for the
        reader: a stream whose reader stalls holds one chunk of bytes and nothing else."""
        chunk = min(request.chunk_size or DEFAULT_CHUNK, self.limits.read_chunk_max)
        kind = request.WhichOneof("range")
        rf, rl = request.file, request.layers
        sid = self.bounds.ref(request.snapshot_id, "snapshot_id")
        spans = await self.core.read_spans(
            sid,
            file=(self.bounds.ref(rf.path, "file.path"), rf.offset, rf.length) if kind == "file" else None,
            layers=(rl.first, rl.last) if kind == "layers" else None,
            scope=self.scope,
        )
        # A chunk counts toward the tenant's read buffer from its read until the stream's next
        # message has been handed to gRPC: a write returns once its message is queued in the
        # transport, not once the reader has taken it, so the last chunk sent may still be there.
        assert self.load is not None
        held = 0
        try:
            for sp in spans:
                path, off, length, tensor = sp.path, sp.offset, sp.length, sp.tensor
                if length == 0:  # an empty tensor still announces itself
                    yield pb.ReadRangeChunk(file=path, file_offset=off, tensor=tensor)
                    continue
                done = 0
                while done < length:
                    n = min(chunk, length - done)
                    await self.core.wait_span(sid, path, off + done, n)  # a file still downloading
                    await self.load.reserve(n, "ReadRange", self.stall_timeout)
                    held += n
                    fd = self.core.open_span(sid, sp)
                    try:
                        data = await _in(self.core.client_io, os.pread, fd, n, off + done)
                    finally:
                        os.close(fd)
                    if len(data) != n:
                        raise CorruptedError(f"file {path} of snapshot {sid} is shorter than its manifest says")
                    yield pb.ReadRangeChunk(
                        file=path, file_offset=off + done, tensor=tensor, tensor_offset=done, data=data
                    )
                    self.load.release(held - n)  # every chunk before this one has left the transport
                    held = n
                    done += n
        finally:
            self.load.release(held)


class AdminService(pb_grpc.AdminServicer):
    """The operator API (admin.sock)."""

    SERVICE = "Admin"

    def __init__(self, core: Core, client_sockets: Callable[[], list[ClientSockets]] = list) -> None:
        self.core = core
        self.stall_timeout: float | None = None  # the operator's own CLI: not bounded
        # The daemon's own record of the client sockets it bound (Stats reports it).
        self.client_sockets = client_sockets
        self.load: TenantLoad | None = None

    @streaming
    async def Prefetch(self, request: pb.PrefetchRequest, context: Any) -> AsyncIterator[pb.PrefetchResponse]:
        uri = _str(request.uri, "uri")
        if "://" not in uri:
            raise InvalidInputError(
                f"prefetch needs a source URI (s3://bucket/prefix/ or file:///dir/), got {uri[:300]!r}"
                f"{uris.path_hint(uri, None)}"
            )
        events = self.core.fetch(
            uri,
            _str(request.name, "name"),
            _strings(request.include, "include"),
            _strings(request.exclude, "exclude"),
            admin=True,
            pin=request.pin or None,
        )
        async for ev in events:
            if isinstance(ev, Manifest):
                yield pb.PrefetchResponse(model=convert.model(self.core.view_of(ev.model)))
            elif isinstance(ev, ProgressState):
                yield pb.PrefetchResponse(progress=convert.progress(ev))

    @unary
    async def Evict(self, request: pb.EvictRequest, context: Any) -> pb.EvictResponse:
        plan = self.core.plan_evict(_strings(request.models, "models"), request.all_unpinned, request.force)
        if not request.dry_run:
            self.core.evict(plan)
        return convert.evict_plan(plan, request.dry_run)

    @unary
    async def Pin(self, request: pb.PinRequest, context: Any) -> pb.ModelInfo:
        return convert.model(self.core.set_pin(_str(request.model, "model"), True))

    @unary
    async def Unpin(self, request: pb.PinRequest, context: Any) -> pb.ModelInfo:
        return convert.model(self.core.set_pin(_str(request.model, "model"), False))

    @unary
    async def List(self, request: pb.ListRequest, context: Any) -> pb.ListResponse:
        def build() -> pb.ListResponse:
            return pb.ListResponse(
                models=[convert.model(v) for v in self.core.list_models()],
                downloads=[convert.download(d) for d in self.core.downloads()],
            )

        return await _in(self.core.admin_io, build)

    @unary
    async def Show(self, request: pb.ShowRequest, context: Any) -> pb.ShowResponse:
        model = _str(request.model, "model")

        def build() -> pb.ShowResponse:
            view, m, download = self.core.show(model)
            out = pb.ShowResponse(manifest=_manifest_message(m))
            if not request.tensors:
                del out.manifest.tensors[:]
            if view is not None:
                out.model.CopyFrom(convert.model(view))
            if download is not None:
                out.download.CopyFrom(convert.download(download))
            return out

        return await _in(self.core.admin_io, build)

    @unary
    async def Stats(self, request: pb.StatsRequest, context: Any) -> pb.StatsResponse:
        return convert.stats(self.core.stats(), str(self.core.cfg.cache_dir), self.client_sockets())

    @streaming
    async def Verify(self, request: pb.VerifyRequest, context: Any) -> AsyncIterator[pb.VerifyResponse]:
        targets = self.core.verify_targets(_str(request.model, "model"))
        total = sum(targets.values())
        result = pb.VerifyResult()
        done_bytes = 0
        last = 0.0
        sem = asyncio.Semaphore(max(1, min(4, os.cpu_count() or 1)))

        async def check(digest: str) -> tuple[str, str]:
            async with sem:
                return digest, await _in(self.core.admin_io, self.core.verify_blob, digest)

        for fut in asyncio.as_completed([check(d) for d in sorted(targets)]):
            digest, state = await fut
            result.blobs_checked += 1
            done_bytes += targets[digest]
            if state == "corrupt":
                result.corrupt.append(digest)
                result.quarantined.append(digest)
            elif state == "missing":
                result.missing.append(digest)
                log.error("blob_missing", blob=digest)
            if time.monotonic() - last > 0.2:
                last = time.monotonic()
                yield pb.VerifyResponse(
                    progress=pb.Progress(
                        phase=pb.Progress.VERIFYING,
                        bytes_done=done_bytes,
                        bytes_total=total,
                        files_done=result.blobs_checked,
                        files_total=len(targets),
                    )
                )
        result.bytes_checked = done_bytes
        bad = [*result.corrupt, *result.missing]
        if bad:
            users = await _in(self.core.admin_io, self.core.verifier.users, bad)
            result.damaged.extend(pb.BlobUse(sha256=d, models=users[d][0], paths=users[d][1]) for d in bad)
        if request.repair and (result.corrupt or result.missing):
            result.repaired.extend(await self.core.repair([*result.corrupt, *result.missing]))
        yield pb.VerifyResponse(result=result)

    @unary
    async def Doctor(self, request: pb.DoctorRequest, context: Any) -> pb.DoctorResponse:
        from weightcache_daemon.cache.doctor import run_checks

        results = await _in(self.core.admin_io, run_checks, self.core, request.timeout_seconds or 5.0)
        return pb.DoctorResponse(
            checks=[pb.Check(name=n, status=pb.Check.Status.Value(s), detail=d, hint=h) for n, s, d, h in results]  # type: ignore[arg-type]
        )

    @unary
    async def GC(self, request: pb.GCRequest, context: Any) -> pb.GCResponse:
        plan = self.core.plan_gc()
        if not request.dry_run:
            self.core.gc(plan)
        return convert.gc_plan(plan, request.dry_run)
