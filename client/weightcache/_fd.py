"""Client side of fd.sock: Acquire a snapshot, receive read-only descriptors."""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from .contract.errors import DaemonUnavailableError, WeightcacheError, from_code
from .contract.fdproto import pack, recv_frame
from .v1 import weightcache_pb2 as pb


@dataclass(frozen=True, slots=True)
class GrantedFile:
    path: str
    sha256: str
    size: int
    fd: int


class FdConnection:
    """One connection to fd.sock. Leases live as long as it stays open."""

    def __init__(self, path: Path | str, timeout: float = 30.0) -> None:
        self.path = str(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._lock = threading.Lock()
        try:
            self._sock.connect(self.path)
        except OSError as exc:
            self._sock.close()
            raise DaemonUnavailableError(f"cannot connect to {self.path}: {exc.strerror or exc}") from None

    def _roundtrip(self, req: pb.FdRequest) -> tuple[pb.FdResponse, list[int]]:
        with self._lock:
            fds: list[int] = []
            try:
                try:
                    self._sock.sendall(pack(req.SerializeToString()))
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the daemon refused us; its reason, if it sent one, is still queued to read
                payload, fds = recv_frame(self._sock)
                resp = pb.FdResponse()
                resp.ParseFromString(payload)
                if resp.WhichOneof("response") == "acquire":
                    # Large snapshots come in batches that the daemon sends as we read them.
                    while len(fds) < len(resp.acquire.files):
                        more_payload, more = recv_frame(self._sock)
                        fds.extend(more)
                        extra = pb.FdResponse()
                        extra.ParseFromString(more_payload)
                        if extra.WhichOneof("response") == "error":
                            resp = extra  # refused half-way (e.g. out of descriptors): its reason
                            break
                        if extra.WhichOneof("response") != "more_fds":
                            raise ConnectionError("fd.sock: expected the rest of the descriptors")
            except (OSError, ConnectionError) as exc:
                for fd in fds:
                    os.close(fd)
                raise DaemonUnavailableError(f"fd.sock {self.path}: {exc}") from None
        if resp.WhichOneof("response") == "error":
            for fd in fds:
                os.close(fd)
            raise from_code(resp.error.code, resp.error.message)
        return resp, fds

    def acquire(self, snapshot_id: str) -> list[GrantedFile]:
        resp, fds = self._roundtrip(pb.FdRequest(acquire=pb.AcquireRequest(snapshot_id=snapshot_id)))
        files = resp.acquire.files
        if len(fds) != len(files):
            for fd in fds:
                os.close(fd)
            raise WeightcacheError(f"fd.sock sent {len(fds)} descriptors for {len(files)} files")
        return [GrantedFile(f.path, f.sha256, f.size, fd) for f, fd in zip(files, fds, strict=True)]

    def release(self, snapshot_id: str) -> None:
        self._roundtrip(pb.FdRequest(release=pb.ReleaseRequest(snapshot_id=snapshot_id)))

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> FdConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
