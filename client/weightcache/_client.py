"""Connecting to the daemon and opening models."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc

from ._backing import Backing, FetchedFiles, MappedFiles
from ._early import EarlyDownload, EarlyFiles, FetchedRanges
from ._fd import FdConnection
from ._model import Model, gc_paused
from ._records import Manifest, ModelInfo, Progress
from .contract import paths
from .contract.errors import DaemonUnavailableError, InvalidInputError, WeightcacheError, from_rpc_error
from .progress import Bar
from .v1 import weightcache_pb2 as pb
from .v1 import weightcache_pb2_grpc as pb_grpc

__all__ = ["Client", "ProgressFn", "connect"]

ProgressFn = Callable[[Progress], None]


def _reference(model: object) -> str:
    """A model reference is a str; a path object is the usual slip, answered with its URI."""
    if isinstance(model, str):
        return model
    if isinstance(model, os.PathLike):
        uri = Path(os.fspath(model)).absolute().as_uri().rstrip("/") + "/"
        raise InvalidInputError(
            f"model {model!r}: a path object is not a model reference; a directory is opened by its URI "
            f"(open({uri!r})), a cached model by its name or snapshot id (str)"
        )
    raise InvalidInputError(
        f"model {model!r:.200}: a model reference is a str (a name, a snapshot id or a source URI such as "
        f"s3://bucket/prefix/ or file:///dir/), not {type(model).__name__}"
    )


def _globs(value: object, what: str) -> list[str]:
    """include=/exclude=: a list of globs; a bare str would be read one character at a time."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return [str(v) for v in value]
    raise InvalidInputError(f"{what}={value!r:.200}: give a list of glob strings, e.g. {what}=['*.safetensors']")


def _check_socket_dir(socket_dir: object) -> None:
    if socket_dir is not None and not isinstance(socket_dir, (str, os.PathLike)):
        raise InvalidInputError(
            f"socket_dir={socket_dir!r:.200}: give the daemon's client socket directory as a str or path "
            "(the directory holding weightcache.sock), or None for $WEIGHTCACHE_SOCKET_DIR / the default"
        )


class Client:
    """A connection to weightcached's client socket directory."""

    def __init__(self, socket_dir: str | os.PathLike[str], timeout: float | None = None) -> None:
        _check_socket_dir(socket_dir)
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

    def _request(
        self, model: str, name: str, include: list[str] | None, exclude: list[str] | None, early: bool
    ) -> pb.EnsureRequest:
        if not isinstance(name, str):
            raise InvalidInputError(f"name={name!r:.200}: a model name is a str")
        return pb.EnsureRequest(model=_reference(model), name=name, include=_globs(include, "include"),
                                exclude=_globs(exclude, "exclude"), early=early)  # fmt: skip

    def _first_manifest(self, req: pb.EnsureRequest, callback: ProgressFn | None) -> tuple[pb.Manifest, Any]:
        """Start Ensure and read it up to its first manifest: (that manifest, the call). The
        call is still open: an early answer's download events follow on it."""
        call = self._stub.Ensure(req, timeout=self.timeout)
        try:
            for ev in call:
                if ev.HasField("progress"):
                    if callback is not None:
                        callback(Progress.from_pb(ev.progress))
                elif ev.HasField("manifest"):
                    return ev.manifest, call
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        except BaseException:
            call.cancel()  # e.g. an exception in the progress callback: nobody reads the rest
            raise
        raise WeightcacheError(f"the daemon ended Ensure({req.model!r}) without a manifest")

    @staticmethod
    def _drain(call: Any) -> None:
        """Read a finished call to its end (a committed manifest is its last event)."""
        try:
            for _ in call:
                pass
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def ensure(
        self,
        model: str,
        *,
        name: str = "",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        progress: ProgressFn | bool | None = None,
        verified: bool = True,
    ) -> Manifest:
        """Make a model present (downloading it if the daemon allows) and return its manifest.

        verified=True (the default): wait until the snapshot is downloaded, verified and in the
        store. verified=False: answer as soon as the daemon knows every file's header; for a
        model still downloading that is a early manifest (``Manifest.early``: an
        provisional snapshot id, valid only while the download runs), and the download goes on
        in the daemon after this returns. ``open()`` is what uses such an answer; ensure keeps
        waiting by default because a Manifest outlives its call, and a provisional id does not.

        ``progress``: True draws a bar on stderr; a callable receives ``Progress`` records."""
        bar, callback = _progress_sink(progress)
        try:
            first, call = self._first_manifest(self._request(model, name, include, exclude, not verified), callback)
            if first.early:
                call.cancel()  # stop listening; a client leaving never cancels the download itself
            else:
                self._drain(call)
        finally:
            if bar is not None:
                bar.close()
        return Manifest.from_pb(first)

    def open(
        self,
        model: str,
        *,
        progress: ProgressFn | bool | None = None,
        name: str = "",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        fallback: bool | None = None,
        verified: bool = False,
    ) -> Model:
        """Open a model by name, snapshot id or source URI.

        verified=False (the default): a model the daemon is still downloading (for this call or
        for anyone else) opens as soon as the daemon knows every file's header. Each read then
        waits for exactly its bytes; ``state_dict()``, ``path`` and the final group of
        ``stream()`` wait for the verified, committed snapshot; if verification fails, every
        call on the handle raises CorruptedError (see ``Model``). The client must stay open
        until the model is complete or closed: the rest of the download's events come over it.
        verified=True: open only once the snapshot is downloaded, verified and in the store.

        fallback=None: map descriptors from fd.sock when it exists, else read over gRPC.
        fallback=True: always read over gRPC (private memory). False: descriptors or fail.
        ``progress``: True draws a bar on stderr; a callable receives ``Progress`` records (for
        an early open, until the download ends, from a background thread).
        """
        with gc_paused():
            return self._open(model, progress, name, include, exclude, fallback, verified)

    def _open(
        self,
        model: str,
        progress: ProgressFn | bool | None,
        name: str,
        include: list[str] | None,
        exclude: list[str] | None,
        fallback: bool | None,
        verified: bool,
    ) -> Model:
        bar, callback = _progress_sink(progress)
        try:
            first, call = self._first_manifest(self._request(model, name, include, exclude, not verified), callback)
            if not first.early:
                self._drain(call)
        except BaseException:
            if bar is not None:
                bar.close()
            raise
        manifest = Manifest.from_pb(first)
        fd_path = self.socket_dir / paths.FD_SOCKET_NAME
        use_grpc = fallback or (fallback is None and not fd_path.exists())
        backing: Backing
        if manifest.early:
            download = EarlyDownload(
                manifest,
                manifest.name or model,
                call,
                call.cancel,
                on_progress=callback,
                on_end=bar.close if bar is not None else None,
            )
            download.start()  # before the backing: an Acquire racing the commit waits for it
            try:
                if use_grpc:
                    backing = FetchedRanges(download, self.read_range_into)
                else:
                    backing = EarlyFiles(lambda: FdConnection(fd_path), download)
            except BaseException:
                download.close()
                raise
            return Model(manifest, backing)
        if bar is not None:
            bar.close()
        if use_grpc:
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

    def read_range_into(self, snapshot_id: str, path: str, offset: int, dest: memoryview) -> None:
        """Fill ``dest`` with the bytes of one file of a snapshot from ``offset``, over gRPC
        (of a snapshot still downloading: once they are on disk)."""
        if not len(dest):
            return
        req = pb.ReadRangeRequest(
            snapshot_id=snapshot_id, file=pb.FileRange(path=path, offset=offset, length=len(dest)), chunk_size=4 << 20
        )
        got = 0
        for chunk in self._chunks(req):
            n = len(chunk.data)
            at = chunk.file_offset - offset
            if at < 0 or at + n > len(dest):
                raise WeightcacheError(
                    f"ReadRange of {path} in snapshot {snapshot_id}: bytes {chunk.file_offset}..{chunk.file_offset + n} "
                    f"outside the {len(dest)} asked from {offset}"
                )
            dest[at : at + n] = chunk.data
            got += n
        if got != len(dest):
            raise WeightcacheError(
                f"ReadRange of {path} in snapshot {snapshot_id}: got {got} of {len(dest)} bytes from {offset}"
            )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _progress_sink(progress: ProgressFn | bool | None) -> tuple[Bar | None, ProgressFn | None]:
    """``progress=``: True draws a bar, a callable receives the records, anything else nothing."""
    bar = Bar() if progress is True else None
    return bar, bar if bar is not None else (progress if callable(progress) else None)


def connect(socket_dir: str | os.PathLike[str] | None = None, *, timeout: float | None = None) -> Client:
    """Connect to the daemon: socket_dir, $WEIGHTCACHE_SOCKET_DIR, then the user and system
    defaults (``weightcache.paths.client_socket_dir``)."""
    _check_socket_dir(socket_dir)
    return Client(paths.client_socket_dir(socket_dir, os.environ, os.geteuid()), timeout=timeout)
