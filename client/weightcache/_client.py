"""Connecting to the daemon and opening models."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc

from . import paths
from ._backing import Backing, FetchedFiles, MappedFiles
from ._fd import FdConnection
from ._model import Model, gc_paused
from ._records import Manifest, ModelInfo, Progress
from .errors import DaemonUnavailableError, WeightcacheError, from_rpc_error
from .progress import Bar
from .v1 import weightcache_pb2 as pb
from .v1 import weightcache_pb2_grpc as pb_grpc

__all__ = ["Client", "ProgressFn", "connect"]

ProgressFn = Callable[[Progress], None]


class Client:
    """A connection to weightcached's client socket directory."""

    def __init__(self, socket_dir: str | os.PathLike[str], timeout: float | None = None) -> None:
        self.socket_dir = Path(socket_dir).absolute()  # gRPC would read a relative path as a host
        self.timeout = timeout
        sock = self.socket_dir / paths.CLIENT_SOCKET_NAME
        if not sock.exists():
            raise DaemonUnavailableError(
                f"daemon socket {sock} does not exist: is weightcached running, and its client socket "
                "directory mounted here? (socket_dir= or WEIGHTCACHE_SOCKET_DIR point elsewhere)"
            )
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
    ) -> Manifest:
        """Make a model present (downloading it if the daemon allows) and return its manifest.

        ``progress``: True draws a bar on stderr; a callable receives ``Progress`` records."""
        bar = Bar() if progress is True else None
        callback: ProgressFn | None = bar if bar is not None else (progress if callable(progress) else None)
        req = pb.EnsureRequest(model=model, name=name, include=include or [], exclude=exclude or [])
        manifest: pb.Manifest | None = None
        try:
            for ev in self._stub.Ensure(req, timeout=self.timeout):
                if ev.HasField("progress"):
                    if callback is not None:
                        callback(Progress.from_pb(ev.progress))
                else:
                    manifest = ev.manifest
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            if bar is not None:
                bar.close()
        if manifest is None:
            raise WeightcacheError(f"the daemon ended Ensure({model!r}) without a manifest")
        return Manifest.from_pb(manifest)

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
        backing: Backing
        if fallback or (fallback is None and not fd_path.exists()):
            snapshot_id = manifest.snapshot_id

            def fetch(path: str, buf: bytearray) -> None:
                self.read_file_into(snapshot_id, path, buf)

            backing = FetchedFiles(snapshot_id, manifest.files, fetch)
        else:
            conn = FdConnection(fd_path)
            try:
                backing = MappedFiles(conn, manifest.snapshot_id)
            except BaseException:
                conn.close()
                raise
        return Model(manifest, backing)

    def load_transformers(self, model: str | Model, **kwargs: Any) -> Any:
        """``weightcache.transformers.from_pretrained(model, client=self, **kwargs)``: a
        transformers model (and tokenizer) built from a cached snapshot."""
        from .transformers import from_pretrained

        return from_pretrained(model, client=self, **kwargs)

    def list(self) -> list[ModelInfo]:
        """The named models in the cache (those this caller may see)."""
        try:
            resp = self._stub.List(pb.ListRequest(), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return [ModelInfo.from_pb(m) for m in resp.models]

    def read_range(self, snapshot_id: str, path: str, offset: int = 0, length: int = 0) -> bytes:
        """Bytes of one file of a snapshot, over the stream (no descriptors)."""
        out = bytearray()
        for chunk in self._chunks(
            pb.ReadRangeRequest(snapshot_id=snapshot_id, file=pb.FileRange(path=path, offset=offset, length=length))
        ):
            out += chunk.data
        return bytes(out)

    def _chunks(self, req: pb.ReadRangeRequest) -> Iterator[pb.ReadRangeChunk]:
        try:
            yield from self._stub.ReadRange(req, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def read_file_into(self, snapshot_id: str, path: str, buf: bytearray | memoryview) -> None:
        """Fill ``buf`` (exactly the file's size) with one whole file of a snapshot, over gRPC."""
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
    """Connect to the daemon: socket_dir, $WEIGHTCACHE_SOCKET_DIR, then the user and system
    defaults (``weightcache.paths.client_socket_dir``)."""
    return Client(paths.client_socket_dir(socket_dir, os.environ, os.geteuid()), timeout=timeout)
