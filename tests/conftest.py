"""Shared fixtures: a real SeaweedFS S3 server on loopback (one per session) and real
weightcached daemons as subprocesses on temp directories and sockets."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import make_model as _make_model  # noqa: E402
import s3server  # noqa: E402


@pytest.fixture(scope="session")
def s3() -> Iterator[s3server.S3Server]:
    server = s3server.start()
    yield server
    server.stop()


@pytest.fixture
def bucket(s3: s3server.S3Server) -> str:
    name = f"wc-{uuid.uuid4().hex[:12]}"
    s3.client().create_bucket(Bucket=name)
    return name


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def make_model(path: Path, *, tiny: bool = True, size: int = 0, seed: int = 0, shards: int = 2) -> Path:
    return _make_model.make_model(path, size=size, shards=shards, seed=seed, tiny=tiny)


def upload_dir(s3: s3server.S3Server, bucket: str, prefix: str, directory: Path) -> None:
    c = s3.client()
    for p in sorted(directory.rglob("*")):
        if p.is_file():
            c.upload_file(str(p), bucket, prefix + p.relative_to(directory).as_posix())


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


def write_config(path: Path, s3: s3server.S3Server | None, **extra: Any) -> Path:
    # system-mode daemons (root + config) serve metrics on 9464 by default: tests opt in per port
    extra.setdefault("metrics_address", "")
    lines = []
    for k, v in extra.items():
        if k != "download":
            lines.append(f"{k} = {json.dumps(v)}")
    dl = {"concurrency": 4, "part_size": "1MiB", **extra.get("download", {})}
    lines.append("[download]")
    lines += [f"{k} = {json.dumps(v)}" for k, v in dl.items()]
    if s3 is not None:
        lines += [
            "[[sources]]",
            'prefix = "s3://"',
            f'endpoint_url = "{s3.endpoint}"',
            f'region = "{s3.region}"',
            f'access_key_id = "{s3.admin_key[0]}"',
            f'secret_access_key = "{s3.admin_key[1]}"',
            "max_attempts = 3",
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _accepting(path: Path) -> bool:
    """A live daemon accepts on its socket; a stale socket file of a killed one refuses."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def start_daemon(
    root: Path,
    s3: s3server.S3Server | None,
    *,
    config: Path | None = None,
    wait: bool = True,
    extra_args: list[str] | None = None,
    **cfg: Any,
) -> Daemon:
    root.mkdir(parents=True, exist_ok=True)
    if config is None:
        cfg.setdefault("client_sources", ["*"])
        config = write_config(root / "weightcached.toml", s3, **cfg)
    cache_dir, socket_dir, admin = root / "store", root / "sock", root / "admin" / "admin.sock"
    log = root / "daemon.log"
    with open(log, "ab") as lf:
        proc = subprocess.Popen(
            [
                "weightcached",
                "--config",
                str(config),
                "--cache-dir",
                str(cache_dir),
                "--socket-dir",
                str(socket_dir),
                "--admin-socket",
                str(admin),
                "--log-format",
                "json",
                *(extra_args or []),
            ],
            stdout=lf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    d = Daemon(root, cache_dir, socket_dir, admin, proc, log)
    if wait:
        deadline = time.monotonic() + 30
        while not _accepting(socket_dir / "fd.sock"):
            if proc.poll() is not None:
                raise AssertionError(f"weightcached exited with {proc.returncode}:\n{d.log_text()}")
            if time.monotonic() > deadline:
                d.stop()
                raise AssertionError(f"weightcached not ready in 30 s:\n{d.log_text()}")
            time.sleep(0.05)
    return d


@pytest.fixture
def daemon_factory(tmp_path: Path, s3: s3server.S3Server) -> Iterator[Any]:
    started: list[Daemon] = []

    def factory(name: str = "d", **cfg: Any) -> Daemon:
        d = start_daemon(tmp_path / name, s3, **cfg)
        started.append(d)
        return d

    yield factory
    for d in started:
        d.stop()


@pytest.fixture
def daemon(daemon_factory: Any) -> Daemon:
    return daemon_factory()  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture
def s3_model(s3: s3server.S3Server, bucket: str, tiny_model: Path) -> str:
    upload_dir(s3, bucket, "models/tiny-llama/", tiny_model)
    return f"s3://{bucket}/models/tiny-llama/"


def no_partial_files(d: Daemon) -> None:
    """Nothing half-written: ingest is empty and every blob's name is its content."""
    assert not any((d.cache_dir / "ingest").iterdir()), list((d.cache_dir / "ingest").iterdir())
    for blob in (d.cache_dir / "blobs" / "sha256").rglob("*"):
        if blob.is_file():
            assert sha256_file(blob) == blob.name


__all__ = ["Daemon", "make_model", "no_partial_files", "sha256_file", "shutil", "start_daemon", "upload_dir"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` skip cleanly on machines without a CUDA device (CI, development machines)."""
    try:
        import torch

        has_cuda = bool(torch.cuda.is_available())
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# ---------------------------------------------------------------- the suite's own report
# Tests that put the daemon through something call report(case, what, result, figures); at the
# end of the session the rows are written to $WC_SUITE_REPORT (tools/suite_report.py turns them
# into the README's table), so the table is the suite's output, not a hand-written claim.
_REPORT: list[dict[str, str]] = []


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Any:
    def add(case: str, what: str, result: str, figures: str = "") -> None:
        _REPORT.append({"case": case, "what": what, "result": result, "figures": figures,
                        "test": request.node.nodeid})  # fmt: skip

    return add


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    out = os.environ.get("WC_SUITE_REPORT")
    if out and _REPORT:
        Path(out).write_text(json.dumps(_REPORT, indent=1))
