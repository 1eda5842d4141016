"""fd.sock: read-only descriptors over SCM_RIGHTS; the open connection is the lease.

Each connection is served by one asyncio task. SO_PEERCRED says who is calling (pid,
uid, gid); every grant is logged with it. When the connection closes, for any reason
(including the kernel closing it for a process that died), its leases are released.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct

import structlog

from weightcache.errors import BusyError, CorruptedError, WeightcacheError, code_for
from weightcache.fdproto import MAX_FDS_PER_MSG, MAX_FRAME, pack
from weightcache.v1 import weightcache_pb2 as pb

from .core import Core
from .leases import Lease

log = structlog.get_logger("weightcached.fd")


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


class FdServer:
    def __init__(self, core: Core, path: str, max_connections: int = 4096) -> None:
        self.core = core
        self.path = path
        self.max_connections = max_connections
        self._sock: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.path)  # mode and group: set by the caller (see server.py)
        sock.listen(512)
        sock.setblocking(False)
        self._sock = sock
        self._accept_task = asyncio.get_running_loop().create_task(self._accept())

    async def stop(self) -> None:
        if self._accept_task:
            self._accept_task.cancel()
        for t in list(self._conns):
            t.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        if self._sock:
            self._sock.close()

    async def _accept(self) -> None:
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._sock)
            if len(self._conns) >= self.max_connections:
                # Refused with a reason the client reports as UNAVAILABLE; the daemon carries on.
                msg = f"fd.sock: too many clients (limit {self.max_connections}); retry later"
                try:
                    conn.setblocking(False)
                    conn.send(pack(_error("UNAVAILABLE", msg).SerializeToString()))
                except OSError:
                    pass
                conn.close()
                log.warning("fd_connection_refused", reason="too many connections", limit=self.max_connections)
                continue
            task = loop.create_task(self._serve(conn))
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        pid, uid, gid = peer_credentials(conn)
        peer = {"peer_pid": pid, "peer_uid": uid, "peer_gid": gid}
        held: dict[str, Lease] = {}
        conn.setblocking(False)
        try:
            while True:
                payload = await self._read_frame(loop, conn)
                if payload is None:
                    return
                req = pb.FdRequest()
                try:
                    req.ParseFromString(payload)
                except Exception:  # noqa: BLE001 - protobuf raises DecodeError; any failure is a bad frame
                    await self._send(loop, conn, _error("INVALID_ARGUMENT", "fd.sock: frame is not an FdRequest"), [])
                    return
                kind = req.WhichOneof("request")
                try:
                    if kind == "acquire":
                        await self._acquire(loop, conn, req.acquire.snapshot_id, held, pid, uid, gid, peer)
                    elif kind == "release":
                        sid = req.release.snapshot_id
                        lease = held.pop(sid, None)
                        if lease is None:
                            raise BusyError(f"snapshot {sid[:80]!r} is not held by this connection")
                        self.core.leases.release(lease.token)
                        self.core.lease_released(sid)
                        log.info("lease_released", snapshot=sid, **peer)
                        await self._send(loop, conn, pb.FdResponse(release=pb.ReleaseResponse(snapshot_id=sid)), [])
                    else:
                        await self._send(loop, conn, _error("INVALID_ARGUMENT", "fd.sock: empty request"), [])
                except WeightcacheError as exc:
                    await self._send(loop, conn, _error(code_for(exc).name, str(exc)), [])
        except (ConnectionError, OSError):
            return
        finally:
            for sid, lease in held.items():
                self.core.leases.release(lease.token)
                self.core.lease_released(sid)
                log.info("lease_released", snapshot=sid, reason="connection closed", **peer)
            conn.close()

    async def _acquire(
        self,
        loop: asyncio.AbstractEventLoop,
        conn: socket.socket,
        sid: str,
        held: dict[str, Lease],
        pid: int,
        uid: int,
        gid: int,
        peer: dict[str, int],
    ) -> None:
        self.core.check_snapshot(sid)
        files = self.core.index.files(sid)
        bad = self.core.index.quarantined()
        for f in files:
            if f.sha256 in bad:
                raise CorruptedError(
                    f"blob sha256:{f.sha256} ({f.path}) of snapshot {sid} failed verification ({bad[f.sha256]}) and "
                    "is quarantined; open the model again, or run cachectl verify --repair, to re-download it"
                )
        fds: list[int] = []
        try:
            for f in files:
                fds.append(self.core.store.open(f.sha256))
            if sid not in held:
                held[sid] = self.core.leases.acquire(sid, pid, uid, gid)
                for row in self.core.index.models_of_snapshot(sid):
                    self.core.index.touch(row.name)
            entries = [pb.FileEntry(path=f.path, sha256=f.sha256, size=f.size) for f in files]
            resp = pb.FdResponse(acquire=pb.AcquireResponse(snapshot_id=sid, files=entries))
            self.core.metrics.grants.inc()  # counted when granted, before the client can act on it
            await self._send(loop, conn, resp, fds[:MAX_FDS_PER_MSG])
            for i in range(MAX_FDS_PER_MSG, len(fds), MAX_FDS_PER_MSG):
                batch = fds[i : i + MAX_FDS_PER_MSG]
                await self._send(loop, conn, pb.FdResponse(more_fds=len(batch)), batch)
            log.info("descriptors_granted", snapshot=sid, files=len(files), **peer)
        finally:
            for fd in fds:
                os.close(fd)

    async def _read_frame(self, loop: asyncio.AbstractEventLoop, conn: socket.socket) -> bytes | None:
        header = await _recv_exactly(loop, conn, 4)
        if header is None:
            return None
        (n,) = struct.unpack(">I", header)
        if n > MAX_FRAME:
            raise ConnectionError(f"frame of {n} bytes")
        return await _recv_exactly(loop, conn, n)

    async def _send(
        self, loop: asyncio.AbstractEventLoop, conn: socket.socket, msg: pb.FdResponse, fds: list[int]
    ) -> None:
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
                    await fut
                finally:
                    loop.remove_writer(conn.fileno())
                continue
            sent += n


def _error(code: str, message: str) -> pb.FdResponse:
    return pb.FdResponse(error=pb.FdError(code=code, message=message))


async def _recv_exactly(loop: asyncio.AbstractEventLoop, conn: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = await loop.sock_recv(conn, n - len(buf))
        if not chunk:
            if buf:
                raise ConnectionError("closed inside a frame")
            return None
        buf += chunk
    return bytes(buf)
