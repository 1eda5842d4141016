"""Connecting to the daemon and opening models."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grpc

from . import paths
from ._fd import FdConnection
from ._model import Model, gc_paused
from .errors import NotFoundError, SourceError, WeightcacheError, from_rpc_error
from .v1 import weightcache_pb2 as pb
from .v1 import weightcache_pb2_grpc as pb_grpc

__all__ = ["Client", "Progress", "connect"]

Progress = pb.Progress
ProgressFn = Callable[[pb.Progress], None]


def find_socket_dir(socket_dir: str | os.PathLike[str] | None, env: Mapping[str, str]) -> Path:
    """socket_dir, else $WEIGHTCACHE_SOCKET_DIR, else the user default, else the system default."""
    if socket_dir is not None:
        return Path(socket_dir)
    if env.get("WEIGHTCACHE_SOCKET_DIR"):
        return Path(env["WEIGHTCACHE_SOCKET_DIR"])
    for candidate in (paths.user_socket_dir(env), paths.SYSTEM_SOCKET_DIR):
        if (candidate / paths.CLIENT_SOCKET_NAME).exists():
            return candidate
    raise NotFoundError(
        f"no weightcache daemon socket found (tried $WEIGHTCACHE_SOCKET_DIR, {paths.user_socket_dir(env)}, "
        f"{paths.SYSTEM_SOCKET_DIR}); is weightcached running and its socket directory mounted?"
    )


class _TextBar:
    """progress=True: a one-line bar on stderr."""

    def __init__(self) -> None:
        self.drawn = False

    def __call__(self, p: pb.Progress) -> None:
        if not p.bytes_total:
            return
        frac = p.bytes_done / p.bytes_total
        sys.stderr.write(
            f"\rweightcache: [{'#' * int(frac * 30):<30}] {frac * 100:5.1f}% "
            f"{p.bytes_done / 2**30:.2f}/{p.bytes_total / 2**30:.2f} GiB "
            f"{p.bytes_per_second / 2**20:.0f} MiB/s "
        )
        sys.stderr.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            sys.stderr.write("\n")


class Client:
    """A connection to weightcached's client socket directory."""

    def __init__(self, socket_dir: Path, timeout: float | None = None) -> None:
        self.socket_dir = socket_dir
        self.timeout = timeout
        sock = socket_dir / paths.CLIENT_SOCKET_NAME
        if not sock.exists():
            raise SourceError(f"daemon socket {sock} does not exist: is weightcached running?")
        self._channel = grpc.insecure_channel(f"unix://{sock}", options=[("grpc.max_receive_message_length", 64 << 20)])
        self._stub = pb_grpc.CacheStub(self._channel)

    def ensure(
        self,
        model: str,
        *,
        name: str = "",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        progress: ProgressFn | bool | None = None,
    ) -> pb.Manifest:
        """Make a model present (downloading it if the daemon allows) and return its manifest."""
        bar = _TextBar() if progress is True else None
        callback = bar if bar is not None else (progress if callable(progress) else None)
        req = pb.EnsureRequest(model=model, name=name, include=include or [], exclude=exclude or [])
        manifest: pb.Manifest | None = None
        try:
            for ev in self._stub.Ensure(req, timeout=self.timeout):
                if ev.HasField("progress"):
                    if callback is not None:
                        callback(ev.progress)
                else:
                    manifest = ev.manifest
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            if bar is not None:
                bar.close()
        if manifest is None:
            raise WeightcacheError(f"the daemon ended Ensure({model!r}) without a manifest")
        return manifest

    def open(
        self,
        model: str,
        *,
        progress: ProgressFn | bool | None = None,
        name: str = "",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        fallback: bool | None = None,
    ) -> Model:
        """Open a model by name, snapshot id or source URI.

        fallback=None: map descriptors from fd.sock when it exists, else read over gRPC.
        fallback=True: always read over gRPC (private memory). False: descriptors or fail.
        """
        with gc_paused():
            return self._open(model, progress, name, include, exclude, fallback)

    def _open(
        self,
        model: str,
        progress: ProgressFn | bool | None,
        name: str,
        include: list[str] | None,
        exclude: list[str] | None,
        fallback: bool | None,
    ) -> Model:
        manifest = self.ensure(model, name=name, include=include, exclude=exclude, progress=progress)
        fd_path = self.socket_dir / paths.FD_SOCKET_NAME
        conn: FdConnection | None = None
        if not fallback:
            if fallback is None and not fd_path.exists():
                conn = None
            else:
                conn = FdConnection(fd_path)
        try:
            return Model(self, manifest, conn)
        except BaseException:
            if conn is not None:
                conn.close()
            raise

    def list(self) -> list[pb.ModelInfo]:
        try:
            return list(self._stub.List(pb.ListRequest(), timeout=self.timeout).models)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def read_range(self, snapshot_id: str, path: str, offset: int = 0, length: int = 0) -> bytes:
        """Bytes of one file of a snapshot, over the stream (no descriptors)."""
        out = bytearray()
        for chunk in self._chunks(
            pb.ReadRangeRequest(snapshot_id=snapshot_id, file=pb.FileRange(path=path, offset=offset, length=length))
        ):
            out += chunk.data
        return bytes(out)

    def _chunks(self, req: pb.ReadRangeRequest) -> Any:
        try:
            yield from self._stub.ReadRange(req, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def _read_file_into(self, snapshot_id: str, path: str, buf: bytearray) -> None:
        view = memoryview(buf)
        req = pb.ReadRangeRequest(snapshot_id=snapshot_id, file=pb.FileRange(path=path), chunk_size=4 << 20)
        got = 0
        for chunk in self._chunks(req):
            n = len(chunk.data)
            view[chunk.file_offset : chunk.file_offset + n] = chunk.data
            got += n
        if got != len(buf):
            raise WeightcacheError(f"ReadRange of {path} in snapshot {snapshot_id}: got {got} of {len(buf)} bytes")

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(socket_dir: str | os.PathLike[str] | None = None, *, timeout: float | None = None) -> Client:
    """Connect to the daemon: socket_dir, $WEIGHTCACHE_SOCKET_DIR, then the user and system defaults."""
    return Client(find_socket_dir(socket_dir, os.environ), timeout=timeout)
