"""Start vLLM on a cached model, while it may still be downloading, holding its lease.

::

    open(model, early) ──► committed already?  yes ─► directory = Model.path (every file)
                                              no  ─► directory = the non-weight files, copied
                                                     as soon as their bytes are on disk
    vLLM --model <directory> --load-format weightcache ──► engine/worker: load_weights opens
         (imports, processes, config, tokenizer:            the same model and streams the
          all while the weights download)                   weights as they land, the last
                                                            group only once verified
    lease: this process's handle, held until vLLM exits; a failed verification stops vLLM

The directory of a model still downloading holds copies of the small configuration files
(config.json, tokenizer files, ...), each taken only once its bytes are on disk; the weight
files are left out, since the load format reads weights from the daemon. Those copies are
checked against the verified snapshot by the loader (config and weights of one snapshot)
before the last weights are handed to vLLM.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from .._client import Client, connect
from .._model import Model
from ..contract.errors import InvalidInputError, WeightcacheError
from ._options import LOAD_FORMAT, LoaderOptions

__all__ = ["Prepared", "prepare", "serve"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
SERVER_MODULE = "vllm.entrypoints.openai.api_server"


@dataclass
class Prepared:
    """A model ready for vLLM: ``path`` for ``--model``, the load format and its options.
    Valid while the ``prepare()`` block runs (it holds the lease and the directory)."""

    handle: Model
    path: str
    options: LoaderOptions
    streaming: bool

    def loader_config(self) -> dict[str, Any]:
        return self.options.to_config()

    def server_args(self) -> list[str]:
        """Arguments for ``python -m vllm.entrypoints.openai.api_server`` (or ``vllm serve``)."""
        import json

        return [
            "--model",
            self.path,
            "--load-format",
            LOAD_FORMAT,
            "--model-loader-extra-config",
            json.dumps(self.loader_config()),
        ]

    def llm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``vllm.LLM(...)``."""
        return {"model": self.path, "load_format": LOAD_FORMAT, "model_loader_extra_config": self.loader_config()}


def _copy_config_files(handle: Model, base: str | None) -> str:
    """A private directory with the snapshot's non-weight files, each written once its bytes
    are on disk (a read of a model still downloading waits for exactly its range)."""
    directory = tempfile.mkdtemp(prefix=f"weightcache-vllm-{os.getpid()}-", dir=base)  # 0700
    try:
        for info in handle.files:
            if info.path.endswith(_WEIGHT_SUFFIXES):
                continue
            if os.path.isabs(info.path) or ".." in info.path.split("/"):
                raise InvalidInputError(f"file path {info.path!r} of model {handle.name} escapes its directory")
            buf = bytearray(info.size)
            if info.size:
                handle.backing.read_into(info.path, 0, memoryview(buf))
            target = os.path.join(directory, info.path)
            os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
            with open(target, "wb") as f:
                f.write(buf)
        if not os.path.exists(os.path.join(directory, "config.json")):
            raise InvalidInputError(
                f"model {handle.name or handle.snapshot_id} has no config.json: vLLM cannot start on it"
            )
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return directory


@contextmanager
def prepare(
    model: str,
    *,
    client: Client | None = None,
    socket_dir: str | None = None,
    progress: Any = None,
    tmp_dir: str | None = None,
) -> Iterator[Prepared]:
    """Open ``model`` (a name, source URI or snapshot id; early, while it downloads) and yield
    what vLLM needs to load it with the ``weightcache`` load format. The lease (and, for a
    model still downloading, the client connection that follows the download) is held until
    the block ends: keep vLLM inside it.

    A committed model gets ``Model.path`` and its snapshot id (config and weights of exactly
    that snapshot); a model still downloading gets a directory of its configuration files and
    is loaded by the same name or URI, which joins the one download the daemon runs."""
    with ExitStack() as stack:
        if client is None:
            client = stack.enter_context(connect(socket_dir))
        handle = stack.enter_context(client.open(model, progress=progress))
        sock = str(client.socket_dir)
        if handle.complete():
            yield Prepared(handle, handle.path, LoaderOptions(handle.snapshot_id, sock), False)
            return
        directory = _copy_config_files(handle, tmp_dir)
        stack.callback(shutil.rmtree, directory, True)
        yield Prepared(handle, directory, LoaderOptions(model, sock), True)


def server_command(prepared: Prepared, vllm_args: Sequence[str], python: str | None = None) -> list[str]:
    return [python or sys.executable, "-m", SERVER_MODULE, *prepared.server_args(), *vllm_args]


def serve(
    model: str,
    vllm_args: Sequence[str] = (),
    *,
    socket_dir: str | None = None,
    python: str | None = None,
    env: dict[str, str] | None = None,
    progress: Any = None,
    forward_signals: bool = False,
) -> int:
    """Run vLLM's OpenAI server on ``model`` until it exits; returns its exit status.

    ``python``: the interpreter that has vLLM (default: this one). ``vllm_args``: more server
    arguments (``--port``, ``--max-model-len``, ...). If the download fails verification, the
    server is stopped and the error raised (vLLM's own load fails on it as well).
    ``forward_signals``: pass SIGTERM/SIGINT on to the server (for a process's main thread)."""
    failure: list[WeightcacheError] = []
    with prepare(model, socket_dir=socket_dir, progress=progress) as prepared:
        state = "while it downloads" if prepared.streaming else "from the cache"
        print(f"weightcache-vllm: starting vLLM on {model} {state} ({prepared.path})", file=sys.stderr, flush=True)
        proc = subprocess.Popen(server_command(prepared, vllm_args, python), env=env)
        restore = _forward(proc) if forward_signals else {}
        try:
            if prepared.streaming:
                threading.Thread(
                    target=_watch, args=(prepared.handle, proc, failure), name="wc-vllm-watch", daemon=True
                ).start()
            rc = proc.wait()
        finally:
            for sig, handler in restore.items():
                signal.signal(sig, handler)
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
    if failure:
        raise failure[0]
    return rc


def _watch(handle: Model, proc: subprocess.Popen[bytes], failure: list[WeightcacheError]) -> None:
    """Stop the server when the download it loads from fails (verification, source, daemon)."""
    try:
        handle.wait_complete()
    except WeightcacheError as exc:
        failure.append(exc)
        if proc.poll() is None:
            proc.terminate()


def _forward(proc: subprocess.Popen[bytes]) -> dict[int, Any]:
    def handler(sig: int, _frame: object) -> None:
        if proc.poll() is None:
            proc.send_signal(sig)

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}


def main(argv: Sequence[str] | None = None) -> int:
    """``weightcache-vllm MODEL [--socket-dir DIR] [--python PY] [vLLM server arguments...]``"""
    import argparse

    parser = argparse.ArgumentParser(
        prog="weightcache-vllm",
        description="Start vLLM's OpenAI server on a cached model (name, source URI or snapshot id), "
        "while it still downloads, with the weightcache load format; every other argument goes to vLLM.",
    )
    parser.add_argument("model", help="name, source URI (s3://..., file://...) or snapshot id")
    parser.add_argument(
        "--socket-dir", help="the daemon's client socket directory (default: $WEIGHTCACHE_SOCKET_DIR, ...)"
    )
    parser.add_argument("--python", help="the Python that has vLLM installed (default: this one)")
    args, rest = parser.parse_known_args(argv)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    try:
        return serve(
            args.model, rest, socket_dir=args.socket_dir, python=args.python, progress=True, forward_signals=True
        )
    except WeightcacheError as exc:
        print(f"weightcache-vllm: {exc}", file=sys.stderr)
        return 1
