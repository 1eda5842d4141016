"""fd.sock: read-only descriptors over SCM_RIGHTS; the open connection is the lease.

Each connection is served by one asyncio task. SO_PEERCRED says who is calling (pid,
uid, gid); every grant is logged with it. When the connection closes, for any reason
(including the kernel closing it for a process that died), its leases are released.

Bounds (docs/security.md, "fd.sock bounds"); every breach is an error frame to the abuser,
then its connection is closed, and nobody else notices:

* connections: at most ``max_clients`` in all and ``max_clients_per_uid`` per peer uid, and
  never more than the open-file limit leaves room for;
* a request frame is at most ``MAX_REQUEST_FRAME`` bytes, is read into a buffer of that
  size, and must arrive whole within ``frame_timeout`` of its first byte;
* a connection that holds no lease is closed after ``idle_timeout`` without a request (one
  that holds leases is the lease, and may sit as long as its process lives);
* descriptors in flight: descriptors sent to a socket but not yet read count against the
  daemon's RLIMIT_NOFILE in the kernel (ETOOMANYREFS past it, for every sender of this
  uid). So a request is refused while an earlier response's descriptors are unread (one
  response in flight per connection), a response is sent in batches that wait for the
  client to read, and one peer uid may have at most a quarter of the limit in flight.
* open descriptors: a grant opens at most one batch of blobs at a time, and only a few
  grants open at once, so a model with more files than the open-file limit is served and
  concurrent Acquires keep working.

The accept loop survives EMFILE/ENFILE: it backs off, logs, counts, and reports fd.sock as
not serving (gRPC health) until an accept succeeds again.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import resource
import socket
import struct
import termios
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import structlog

from weightcache.contract.errors import (
    BusyError,
    DeadlineError,
    ExhaustedError,
    InternalError,
    InvalidInputError,
    WeightcacheError,
    code_for,
)
from weightcache.contract.fdproto import MAX_FDS_PER_MSG, MAX_REQUEST_FRAME, pack
from weightcache.v1 import weightcache_pb2 as pb
from weightcache_daemon.cache.core import Core, Grant
from weightcache_daemon.cache.tenants import Scope
from weightcache_daemon.records import FileRow, Lease

log = structlog.get_logger("weightcached.fd")

ACCEPT_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
POLL = 0.01  # seconds between looks at a client's unread descriptors while a grant waits
LINGER_POLL = 0.5  # the same, for a refused connection that still has descriptors unread


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def raise_nofile_limit() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard one (start-up): every connection and every grant
    needs descriptors, and the same limit bounds descriptors in flight (ETOOMANYREFS)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft, hard


@dataclass(frozen=True)
class FdBudget:
    """How the open-file limit is shared, recomputed from the current limit (an operator may
    change it with prlimit while the daemon runs)."""

    limit: int
    batch: int  # descriptors per message and per open batch of a grant
    grant_slots: int  # grants that may hold an open batch at once
    connections: int  # fd.sock connections the limit leaves room for
    inflight_per_uid: int  # descriptors one peer uid may have sent-but-unread
    # Descriptors one declared tenant's connections may have sent-but-unread, all its uids
    # together (a container picks its uids): half the limit shared by the tenants. 0: no
    # tenants declared, the per-uid share alone.
    inflight_per_tenant: int = 0

    @staticmethod
    def now(max_clients: int, tenants: int = 0) -> FdBudget:
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if limit == resource.RLIM_INFINITY or limit > 1 << 24:
            limit = 1 << 24
        batch = max(1, min(MAX_FDS_PER_MSG, limit // 8))
        slots = max(1, min(4, (limit // 4) // batch))
        reserve = min(256, limit // 4)  # the index, gRPC, downloads, logs
        connections = max(1, min(max_clients, limit - batch * slots - reserve))
        per_tenant = max(batch, limit // (2 * tenants)) if tenants else 0
        return FdBudget(limit, batch, slots, connections, max(batch, limit // 4), per_tenant)


class _Refuse(Exception):
    """Abuse: send this error to the peer, then close its connection."""

    def __init__(self, exc: WeightcacheError, reason: str) -> None:
        super().__init__(str(exc))
        self.exc = exc
        self.reason = reason


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    pid: int
    uid: int
    gid: int
    tenant: str = ""  # the tenant whose fd.sock it came in on ("" = the default tenant)
    held: dict[str, Lease] = field(default_factory=dict)
    # Descriptors sent since the client was last seen to have read everything (its send
    # queue empty): an upper bound on what is in flight in its receive queue.
    unread_fds: int = 0

    @property
    def peer(self) -> dict[str, int | str]:
        peer: dict[str, int | str] = {"peer_pid": self.pid, "peer_uid": self.uid, "peer_gid": self.gid}
        if self.tenant:
            peer["tenant"] = self.tenant
        return peer

    def in_flight(self) -> int:
        """Descriptors possibly unread by the client. The kernel frees a message's buffer
        when the client has read all of it, so an empty send queue means all were read."""
        if self.unread_fds:
            if self.sock.fileno() < 0:  # closed: nothing of it is in flight any more
                return 0
            try:
                queued = struct.unpack("i", fcntl.ioctl(self.sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
            except OSError:
                return self.unread_fds
            if queued == 0:
                self.unread_fds = 0
        return self.unread_fds


class FdServer:
    def __init__(
        self,
        core: Core,
        path: str,
        max_clients: int = 4096,
        *,
        max_per_uid: int = 64,
        frame_timeout: float = 10.0,
        idle_timeout: float = 60.0,
        on_health: Callable[[bool], Awaitable[None]] | None = None,
        scope: Scope | None = None,
    ) -> None:
        self.core = core
        # The tenant of every connection accepted here: the socket is the identity (the peer
        # uid is only logged). None: the admin's view (tests of the server alone).
        self.scope = scope
        self.path = path
        self.max_clients = max_clients
        self.max_per_uid = max_per_uid
        self.frame_timeout = frame_timeout
        self.idle_timeout = idle_timeout
        self.on_health = on_health
        self.accepting = True  # False while accept() fails for lack of descriptors
        self._sock: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._conns: dict[asyncio.Task[None], _Conn] = {}
        self._per_uid: dict[int, int] = {}
        self._grants: asyncio.Semaphore | None = None
        self._grant_slots = 0
        # Declared tenants share the in-flight budget; the default tenant keeps the per-uid share.
        self._tenants = len(core.scopes) if scope is not None and not scope.tenant.default else 0

    async def start(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.path)  # mode and group: set by the caller (see server.py)
        sock.listen(512)
        sock.setblocking(False)
        self._sock = sock
        b = FdBudget.now(self.max_clients, self._tenants)
        log.info("fd_limits", nofile=b.limit, connections=b.connections, per_uid=self.max_per_uid,
                 batch=b.batch, grant_slots=b.grant_slots, inflight_per_uid=b.inflight_per_uid,
                 inflight_per_tenant=b.inflight_per_tenant)  # fmt: skip
        self._accept_task = asyncio.get_running_loop().create_task(self._accept())

    async def stop(self) -> None:
        if self._accept_task:
            self._accept_task.cancel()
        for t in list(self._conns):
            t.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        if self._sock:
            self._sock.close()

    # ---------------------------------------------------------------- accepting

    async def _set_accepting(self, ok: bool) -> None:
        if ok == self.accepting:
            return
        self.accepting = ok
        if ok:
            log.info("fd_accept_recovered")
        if self.on_health is not None:
            await self.on_health(ok)

    async def _accept(self) -> None:
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        backoff = 0.05
        while True:
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as exc:
                if exc.errno not in ACCEPT_ERRORS:
                    raise
                # Out of descriptors (ours or the system's): the pending client waits in the
                # backlog; try again later rather than spin or die.
                self.core.metrics.fd_accept_errors.labels(errno.errorcode.get(exc.errno or 0, "?")).inc()
                if self.accepting:
                    log.error("fd_accept_failed", error=os.strerror(exc.errno or 0), retry_in=backoff)
                await self._set_accepting(False)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = 0.05
            await self._set_accepting(True)
            try:
                pid, uid, gid = peer_credentials(conn)
            except OSError:
                conn.close()
                continue
            refusal = self._admit(uid)
            if refusal is not None:
                self._refuse(conn, refusal[0], refusal[1], {"peer_pid": pid, "peer_uid": uid, "peer_gid": gid})
                continue
            c = _Conn(conn, pid, uid, gid, self.scope.ns if self.scope is not None else "")
            self._per_uid[uid] = self._per_uid.get(uid, 0) + 1
            task = loop.create_task(self._serve(c))
            self._conns[task] = c
            task.add_done_callback(self._gone)

    def _gone(self, task: asyncio.Task[None]) -> None:
        c = self._conns.pop(task)
        n = self._per_uid.get(c.uid, 1) - 1
        if n:
            self._per_uid[c.uid] = n
        else:
            self._per_uid.pop(c.uid, None)

    def _admit(self, uid: int) -> tuple[WeightcacheError, str] | None:
        budget = FdBudget.now(self.max_clients, self._tenants)
        if len(self._conns) >= budget.connections:
            return ExhaustedError(
                f"fd.sock: too many clients (limit {budget.connections}); retry later"
            ), "too many connections"
        if self._per_uid.get(uid, 0) >= self.max_per_uid:
            return ExhaustedError(
                f"fd.sock: uid {uid} already has {self.max_per_uid} connections open (the per-uid limit); "
                "close some, or share one connection between models"
            ), "too many connections for uid"
        return None

    def _refuse(
        self, sock: socket.socket, exc: WeightcacheError, reason: str, peer: Mapping[str, int | str], close: bool = True
    ) -> None:
        """Send the reason without waiting (an abuser may not read), then close."""
        try:
            sock.setblocking(False)
            sock.send(pack(_error(code_for(exc).name, str(exc)).SerializeToString()))
        except OSError:
            pass
        if close:
            sock.close()
        self.core.metrics.fd_refused.labels(reason).inc()
        log.warning("fd_client_refused", reason=reason, error=str(exc), **peer)

    # ---------------------------------------------------------------- serving

    async def _serve(self, c: _Conn) -> None:
        loop = asyncio.get_running_loop()
        conn = c.sock
        conn.setblocking(False)
        try:
            while True:
                payload = await self._read_frame(loop, c)
                if payload is None:
                    return
                if c.in_flight():
                    raise _Refuse(
                        InvalidInputError(
                            f"fd.sock: a request came while {c.unread_fds} descriptor(s) of an earlier response are "
                            "unread; read each response before sending the next request"
                        ),
                        "request while descriptors unread",
                    )
                req = pb.FdRequest()
                try:
                    req.ParseFromString(payload)
                except Exception:  # noqa: BLE001 - protobuf raises DecodeError; any failure is a bad frame
                    raise _Refuse(InvalidInputError("fd.sock: frame is not an FdRequest"), "bad frame") from None
                kind = req.WhichOneof("request")
                try:
                    if kind == "acquire":
                        await self._acquire(loop, c, req.acquire.snapshot_id)
                    elif kind == "release":
                        sid = req.release.snapshot_id
                        lease = c.held.pop(sid, None)
                        if lease is None:
                            raise BusyError(f"snapshot {sid[:80]!r} is not held by this connection")
                        self.core.leases.release(lease.token)
                        log.info("lease_released", snapshot=sid, **c.peer)
                        await self._send(loop, c, pb.FdResponse(release=pb.ReleaseResponse(snapshot_id=sid)), [])
                    else:
                        await self._send(loop, c, _error("INVALID_ARGUMENT", "fd.sock: empty request"), [])
                except WeightcacheError as exc:
                    await self._send(loop, c, _error(code_for(exc).name, str(exc)), [])
        except _Refuse as r:
            self._refuse(conn, r.exc, r.reason, c.peer, close=False)
            await self._linger(c)
        except ConnectionError:
            return  # the client went away
        except OSError as exc:
            # not the client's doing (the daemon's descriptors, its disk): say so, close only this one
            log.error("fd_connection_failed", error=f"{type(exc).__name__}: {exc}", **c.peer)
            self._refuse(conn, ExhaustedError(f"fd.sock: {exc.strerror or exc}; retry"), "daemon error", c.peer)
        except Exception:
            # a bug: logged with its stack; this connection ends, the server goes on
            log.exception("fd_connection_crashed", **c.peer)
            self._refuse(conn, InternalError("fd.sock: internal error (see the daemon's log)"), "crash", c.peer)
        finally:
            for sid, lease in c.held.items():
                self.core.leases.release(lease.token)
                log.info("lease_released", snapshot=sid, reason="connection closed", **c.peer)
            c.held.clear()
            conn.close()

    async def _linger(self, c: _Conn) -> None:
        """Before a refused connection closes: descriptors it left unread stay in flight in
        the kernel, counted against the daemon, after our end closes and until the client reads
        them or exits. So the connection stays (no longer read from, its leases released) and
        keeps counting against its uid's connection and in-flight bounds until then; closing
        at once would let a client strand descriptors without limit by reconnecting."""
        for sid, lease in c.held.items():
            self.core.leases.release(lease.token)
            log.info("lease_released", snapshot=sid, reason="connection refused", **c.peer)
        c.held.clear()
        while c.in_flight():
            await asyncio.sleep(LINGER_POLL)

    async def _acquire(self, loop: asyncio.AbstractEventLoop, c: _Conn, sid: str) -> None:
        new = sid not in c.held
        grant = self.core.open_snapshot_for(c.pid, c.uid, c.gid, sid, c.held.get(sid), self.scope)
        c.held[sid] = grant.lease
        try:
            await self._send_grant(loop, c, sid, grant)
        except WeightcacheError:
            if new:  # nothing was granted: an Acquire that failed holds no lease
                self.core.leases.release(c.held.pop(sid).token)
            raise

    async def _send_grant(self, loop: asyncio.AbstractEventLoop, c: _Conn, sid: str, grant: Grant) -> None:
        files = grant.files
        entries = [pb.FileEntry(path=f.path, sha256=f.sha256, size=f.size) for f in files]
        first: pb.FdResponse | None = pb.FdResponse(acquire=pb.AcquireResponse(snapshot_id=sid, files=entries))
        budget = FdBudget.now(self.max_clients, self._tenants)
        if self._grants is None or self._grant_slots != budget.grant_slots:
            self._grants, self._grant_slots = asyncio.Semaphore(budget.grant_slots), budget.grant_slots
        grants = self._grants
        for i in range(0, max(len(files), 1), budget.batch):
            batch = files[i : i + budget.batch]
            await self._wait_for_reader(c, len(batch), budget)
            msg = first if first is not None else pb.FdResponse(more_fds=len(batch))
            first = None
            async with grants:  # a few open batches at a time, whatever the number of clients
                fds: list[int] = []
                try:
                    for f in batch:
                        fds.append(self._open(grant, f, sid))
                    await self._send(loop, c, msg, fds)
                finally:
                    for fd in fds:
                        os.close(fd)
        log.info("descriptors_granted", snapshot=sid, files=len(files), **c.peer)

    def _open(self, grant: Grant, f: FileRow, sid: str) -> int:
        path = f.path
        try:
            return grant.open(self.core.store, f)
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                self.core.metrics.fd_send_errors.labels("EMFILE").inc()
                log.error("fd_grant_failed", snapshot=sid, file=path, error=os.strerror(exc.errno or 0))
                raise _Refuse(
                    ExhaustedError(
                        f"fd.sock: the daemon is out of descriptors opening {path} of snapshot {sid}; retry"
                    ),
                    "daemon out of descriptors",
                ) from None
            raise

    async def _wait_for_reader(self, c: _Conn, n: int, budget: FdBudget) -> None:
        """Send `n` more descriptors only when this connection's unread ones leave room (two
        batches) and its uid's and its tenant's (every connection of this socket's) stay under
        their shares; a client that does not read within the frame timeout is refused (only
        this connection waits meanwhile)."""
        deadline = time.monotonic() + self.frame_timeout
        while True:
            mine = c.in_flight()
            uid_total = sum(o.in_flight() for o in self._conns.values() if o.uid == c.uid)
            tenant_total = sum(o.in_flight() for o in self._conns.values()) if budget.inflight_per_tenant else 0
            if (
                (mine == 0 or mine + n <= 2 * budget.batch)
                and (uid_total == 0 or uid_total + n <= budget.inflight_per_uid)
                and (tenant_total == 0 or tenant_total + n <= budget.inflight_per_tenant)
            ):
                return
            if time.monotonic() > deadline:
                raise _Refuse(
                    DeadlineError(
                        f"fd.sock: {mine} descriptor(s) sent to this connection (uid {c.uid}: {uid_total}; its tenant: "
                        f"{tenant_total}) were not read "
                        f"within {self.frame_timeout:g} s; read responses as they come"
                    ),
                    "descriptors unread",
                )
            await asyncio.sleep(POLL)

    async def _read_frame(self, loop: asyncio.AbstractEventLoop, c: _Conn) -> bytes | None:
        """One request. Waiting for its first byte: the idle timeout (none while leases are
        held); from then on the whole frame within the frame timeout, into a bounded buffer."""
        idle = None if c.held else self.idle_timeout
        try:
            first = await asyncio.wait_for(loop.sock_recv(c.sock, 4), idle)
        except TimeoutError:
            raise _Refuse(
                DeadlineError(f"fd.sock: no request for {self.idle_timeout:g} s and no lease held; connection closed"),
                "idle",
            ) from None
        if not first:
            return None
        try:
            return await asyncio.wait_for(self._rest_of_frame(loop, c.sock, first), self.frame_timeout)
        except TimeoutError:
            raise _Refuse(
                DeadlineError(f"fd.sock: a request frame was not completed within {self.frame_timeout:g} s"),
                "partial frame",
            ) from None

    async def _rest_of_frame(self, loop: asyncio.AbstractEventLoop, conn: socket.socket, head: bytes) -> bytes:
        header = head + await _recv_exactly(loop, conn, 4 - len(head))
        (n,) = struct.unpack(">I", header)
        if n > MAX_REQUEST_FRAME:
            raise _Refuse(
                InvalidInputError(f"fd.sock: request frame of {n} bytes exceeds the limit of {MAX_REQUEST_FRAME}"),
                "frame too large",
            )
        return await _recv_exactly(loop, conn, n)

    async def _send(self, loop: asyncio.AbstractEventLoop, c: _Conn, msg: pb.FdResponse, fds: list[int]) -> None:
        conn = c.sock
        data = pack(msg.SerializeToString())
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
        sent = 0
        while sent < len(data):
            try:
                # Descriptors ride on the first byte sent; later sendmsg calls carry none.
                n = conn.sendmsg([data[sent:]], anc if sent == 0 else [])
            except BlockingIOError:
                fut = loop.create_future()
                loop.add_writer(conn.fileno(), fut.set_result, None)
                try:
                    await asyncio.wait_for(fut, self.frame_timeout)
                except TimeoutError:
                    raise _Refuse(
                        DeadlineError(f"fd.sock: the client read nothing for {self.frame_timeout:g} s"), "not reading"
                    ) from None
                finally:
                    loop.remove_writer(conn.fileno())
                continue
            except OSError as exc:
                if sent == 0 and exc.errno == errno.ETOOMANYREFS:
                    # Too many descriptors in flight for the daemon's uid: this grant fails,
                    # loudly, and only for this connection; the others are bounded above.
                    self.core.metrics.fd_send_errors.labels("ETOOMANYREFS").inc()
                    log.error("fd_send_failed", error="ETOOMANYREFS", descriptors=len(fds), **c.peer)
                    raise _Refuse(
                        ExhaustedError(
                            f"fd.sock: the kernel refused to pass {len(fds)} descriptor(s) (ETOOMANYREFS: too many "
                            "in flight); retry"
                        ),
                        "ETOOMANYREFS",
                    ) from None
                raise
            if sent == 0 and fds:
                c.unread_fds += len(fds)
            sent += n


def _error(code: str, message: str) -> pb.FdResponse:
    return pb.FdResponse(error=pb.FdError(code=code, message=message))


async def _recv_exactly(loop: asyncio.AbstractEventLoop, conn: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await loop.sock_recv(conn, n - len(buf))
        if not chunk:
            raise ConnectionError("closed inside a frame")
        buf += chunk
    return bytes(buf)
