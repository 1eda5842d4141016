"""Starting real weightcached processes for tests and benchmarks: the one place that writes the
daemon's command line and configuration files.

    from harness import start_daemon, write_config
    d = start_daemon(tmp / "d", s3)            # waits until fd.sock accepts
    d.ctl("prefetch", "file:///models/x/", "--name", "x")
    d.stop()

The daemon runs as a subprocess on a temporary store and sockets under ``root``; nothing here
reads or touches the machine's default paths.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import make_model as _make_model
import s3server


def daemon_argv(
    cache_dir: Path,
    socket_dir: Path,
    admin_socket: Path,
    *,
    config: Path | None = None,
    log_format: str | None = "json",
    extra: list[str] | None = None,
) -> list[str]:
    """The weightcached command line for a daemon on these paths."""
    argv = ["weightcached"]
    if config is not None:
        argv += ["--config", str(config)]
    argv += ["--cache-dir", str(cache_dir), "--socket-dir", str(socket_dir), "--admin-socket", str(admin_socket)]
    if log_format:
        argv += ["--log-format", log_format]
    return argv + list(extra or [])


def toml_value(v: Any) -> str:
    """A TOML literal for the values configs use (strings, numbers, booleans, lists of them)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML form for {v!r}")


def toml_text(top: Mapping[str, Any], tables: Mapping[str, Mapping[str, Any]] | None = None,
              arrays: Mapping[str, list[Mapping[str, Any]]] | None = None) -> str:  # fmt: skip
    """TOML for a flat top level, ``[table]`` sections and ``[[array]]`` entries."""
    lines = [f"{k} = {toml_value(v)}" for k, v in top.items()]
    for name, body in (tables or {}).items():
        lines += [f"[{name}]", *(f"{k} = {toml_value(v)}" for k, v in body.items())]
    for name, entries in (arrays or {}).items():
        for body in entries:
            lines += [f"[[{name}]]", *(f"{k} = {toml_value(v)}" for k, v in body.items())]
    return "\n".join(lines) + "\n"


def s3_source(s3: s3server.S3Server, prefix: str = "s3://", **extra: Any) -> dict[str, Any]:
    """A ``[[sources]]`` entry that reaches the test S3 server with its admin key."""
    return {"prefix": prefix, "endpoint_url": s3.endpoint, "region": s3.region,
            "access_key_id": s3.admin_key[0], "secret_access_key": s3.admin_key[1], "max_attempts": 3, **extra}  # fmt: skip


def write_config(path: Path, s3: s3server.S3Server | None, **extra: Any) -> Path:
    """A daemon config: top-level keys from ``extra``, ``download={...}`` as its table, and the
    test S3 server as a source when one is given."""
    # system-mode daemons (root + config) serve metrics on 9464 by default: tests opt in per port
    extra.setdefault("metrics_address", "")
    download = {"concurrency": 4, "part_size": "1MiB", **extra.pop("download", {})}
    tables = {"download": download, **({"limits": extra.pop("limits")} if "limits" in extra else {})}
    sources = list(extra.pop("sources", []))
    if s3 is not None:
        sources.append(s3_source(s3))
    path.write_text(toml_text(extra, tables, {"sources": sources} if sources else None))
    return path


def make_model(path: Path, *, tiny: bool = True, size: int = 0, seed: int = 0, shards: int = 2) -> Path:
    """A Llama-shaped safetensors model: tiny (a few KB, 21 tensors) unless ``size`` is asked for."""
    return _make_model.make_model(path, size=size, shards=shards, seed=seed, tiny=tiny)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def accepting(path: Path) -> bool:
    """A live daemon accepts on its socket; a stale socket file of a killed one refuses."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def serving(socket_dir: Path) -> bool:
    """The daemon's gRPC health on weightcache.sock says SERVING: set last in its start-up."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(f"unix://{socket_dir / 'weightcache.sock'}") as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    except grpc.RpcError:
        return False
    return bool(status == health_pb2.HealthCheckResponse.SERVING)


def wait_for(pred: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll an observable state until it holds; a deadline, never a fixed sleep."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Daemon:
    root: Path
    cache_dir: Path
    socket_dir: Path
    admin_socket: Path
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def env(self) -> dict[str, str]:
        return dict(
            os.environ, WEIGHTCACHE_ADMIN_SOCKET=str(self.admin_socket), WEIGHTCACHE_SOCKET_DIR=str(self.socket_dir)
        )

    def ctl(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            ["cachectl", *args], capture_output=True, text=True, env=self.env, timeout=timeout, stdin=subprocess.DEVNULL
        )
        if check and r.returncode != 0:
            raise AssertionError(f"cachectl {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return r

    def ctl_json(self, *args: str) -> Any:
        return json.loads(self.ctl(*args, "--json").stdout)

    def wait_ready(self, timeout: float = 60) -> None:
        """Until the daemon reports SERVING: fd.sock accepting is not enough, the metrics
        endpoint, resumed downloads and models.d start after it."""
        deadline = time.monotonic() + timeout
        while not (accepting(self.socket_dir / "fd.sock") and serving(self.socket_dir)):
            if self.proc.poll() is not None:
                raise AssertionError(f"weightcached exited with {self.proc.returncode}:\n{self.log_text()}")
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"weightcached not ready in {timeout:.0f} s:\n{self.log_text()}")
            time.sleep(0.05)

    def stop(self, sig: int = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_daemon(
    root: Path,
    s3: s3server.S3Server | None,
    *,
    config: Path | None = None,
    cache_dir: Path | None = None,
    wait: bool = True,
    extra_args: list[str] | None = None,
    env: Mapping[str, str] | None = None,
    **cfg: Any,
) -> Daemon:
    """A weightcached on ``root``/{store,sock,admin}; its log goes to ``root/daemon.log``."""
    root.mkdir(parents=True, exist_ok=True)
    if config is None:
        cfg.setdefault("client_sources", ["*"])
        config = write_config(root / "weightcached.toml", s3, **cfg)
    cache_dir = cache_dir or root / "store"
    socket_dir, admin = root / "sock", root / "admin" / "admin.sock"
    log = root / "daemon.log"
    with open(log, "ab") as lf:
        proc = subprocess.Popen(
            daemon_argv(cache_dir, socket_dir, admin, config=config, extra=extra_args),
            stdout=lf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
        )
    d = Daemon(root, cache_dir, socket_dir, admin, proc, log)
    if wait:
        d.wait_ready()
    return d


def upload_dir(s3: s3server.S3Server, bucket: str, prefix: str, directory: Path) -> None:
    c = s3.client()
    for p in sorted(directory.rglob("*")):
        if p.is_file():
            c.upload_file(str(p), bucket, prefix + p.relative_to(directory).as_posix())


def no_partial_files(d: Daemon) -> None:
    """Nothing half-written: ingest is empty and every blob's name is its content."""
    assert not any((d.cache_dir / "ingest").iterdir()), list((d.cache_dir / "ingest").iterdir())
    for blob in (d.cache_dir / "blobs" / "sha256").rglob("*"):
        if blob.is_file():
            assert sha256_file(blob) == blob.name
