"""Network faults between the daemon and S3 (a fault-injecting proxy on loopback), and disk
faults behind the daemon's back. Every case ends with a complete, byte-identical model or a
clear error with nothing published."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from faultproxy import FaultProxy
from harness import Daemon, daemon_argv, no_partial_files, s3_source, sha256_file, start_daemon, write_config


@pytest.fixture
def proxy(s3):  # type: ignore[no-untyped-def]
    p = FaultProxy(int(s3.endpoint.rsplit(":", 1)[1])).start()
    yield p
    p.stop()


@pytest.fixture
def model_in_s3(s3, bucket: str) -> tuple[str, dict[str, str]]:  # type: ignore[no-untyped-def]
    """Three objects, uploaded with SHA256 checksums (as `aws s3 cp --checksum-algorithm SHA256` does)."""
    from tests_helpers import write_u8_safetensors

    c = s3.client()
    expected = {}
    tmp = Path(f"/tmp/wc-faults-{os.getpid()}")
    tmp.mkdir(exist_ok=True)
    for name, size in (("model-00001-of-00002.safetensors", 3 << 20), ("model-00002-of-00002.safetensors", 2 << 20)):
        write_u8_safetensors(tmp / name, size, len(name) + size)
        data = (tmp / name).read_bytes()
        c.put_object(Bucket=bucket, Key=f"m/{name}", Body=data, ChecksumAlgorithm="SHA256")
        expected[name] = hashlib.sha256(data).hexdigest()
    c.put_object(Bucket=bucket, Key="m/config.json", Body=b"{}", ChecksumAlgorithm="SHA256")
    expected["config.json"] = hashlib.sha256(b"{}").hexdigest()
    return f"s3://{bucket}/m/", expected


def _daemon(tmp_path: Path, s3: Any, proxy: FaultProxy, name: str = "d", **source: Any) -> Daemon:
    root = tmp_path / name
    root.mkdir()
    # every request goes through the proxy; 6 attempts (the daemon's default is 5)
    via_proxy = s3_source(s3, endpoint_url=f"http://127.0.0.1:{proxy.port}", max_attempts=6, **source)
    cfg = write_config(root / "w.toml", None, client_sources=["*"], download={"concurrency": 2, "part_size": "1MiB"},
                       sources=[via_proxy])  # fmt: skip
    return start_daemon(root, s3, config=cfg)


def _check_complete(d: Daemon, expected: dict[str, str]) -> None:
    view = Path(d.ctl_json("show", "m")["manifest"]["path"])
    assert {p.name: sha256_file(p) for p in view.iterdir()} == expected
    no_partial_files(d)


@pytest.mark.parametrize(
    "fault",
    [
        {"truncate_after": 300_000, "times": 3},
        {"reset_after": 200_000, "times": 3},
        {"slowdown": True, "times": 4, "only_ranged": False},
        {"throttle": 4 << 20, "times": 2},
        {"stall_after": 100_000, "stall_seconds": 4, "times": 1},
    ],
    ids=["truncated", "reset", "503-slowdown", "throttled", "stalled-then-ok"],
)
def test_prefetch_survives_network_faults(tmp_path: Path, s3, proxy: FaultProxy, model_in_s3, fault, report) -> None:  # type: ignore[no-untyped-def]
    uri, expected = model_in_s3
    d = _daemon(tmp_path, s3, proxy, read_timeout=2)
    try:
        proxy.set(**fault)
        started = time.monotonic()
        d.ctl("prefetch", uri, "--name", "m")
        assert proxy.injected >= 1, "the fault was never injected"
        _check_complete(d, expected)
        what = ", ".join(f"{k}={v}" for k, v in fault.items())
        report(
            "network",
            f"S3 proxy: {what}",
            "prefetch retried/resumed; complete, byte-identical",
            f"injected {proxy.injected}x; {time.monotonic() - started:.1f} s",
        )
    finally:
        d.stop()


def test_endless_stall_is_a_deadline_error(tmp_path: Path, s3, proxy: FaultProxy, model_in_s3, report) -> None:  # type: ignore[no-untyped-def]
    uri, _ = model_in_s3
    d = _daemon(tmp_path, s3, proxy, read_timeout=1)
    try:
        proxy.set(stall_after=0, stall_seconds=60, times=1000)
        r = d.ctl("prefetch", uri, "--name", "m", check=False)
        assert r.returncode == 1 and "DeadlineError" in r.stderr and "timed out" in r.stderr, r.stderr
        assert d.ctl_json("ls") == []
        no_partial_files(d)
        report(
            "network",
            "S3 proxy stalls every response (read_timeout 1 s)",
            "DeadlineError (DEADLINE_EXCEEDED); nothing published",
            "",
        )
    finally:
        proxy.clear()
        d.stop()


def test_same_length_wrong_bytes_are_data_loss(tmp_path: Path, s3, proxy: FaultProxy, model_in_s3, report) -> None:  # type: ignore[no-untyped-def]
    uri, expected = model_in_s3
    d = _daemon(tmp_path, s3, proxy)
    try:
        proxy.set(corrupt=True, times=1000)
        r = d.ctl("prefetch", uri, "--name", "m", check=False)
        assert r.returncode == 1 and "CorruptedError" in r.stderr and "corrupted in transit" in r.stderr, r.stderr
        assert d.ctl_json("ls") == [] and d.ctl_json("stats")["blobs"] == 0  # nothing published
        no_partial_files(d)
        proxy.clear()
        d.ctl("prefetch", uri, "--name", "m")  # and a clean network fetches it fine
        _check_complete(d, expected)
        report(
            "corruption",
            "S3 proxy flips one byte per response (same length)",
            "CorruptedError (DATA_LOSS) from the source's SHA256 checksum; nothing published",
            "",
        )
    finally:
        d.stop()


def test_a_header_flipped_in_transit_is_read_again(tmp_path: Path, s3, proxy: FaultProxy, bucket: str, report) -> None:  # type: ignore[no-untyped-def]
    """The first ranged read is a header read, and its 101st byte lies inside the JSON of a
    Llama header: flipped, the header is invalid UTF-8. The daemon reads it again instead of
    failing a good model as malformed, and the model arrives byte-identical."""
    from harness import make_model

    src = make_model(tmp_path / "llama")
    c = s3.client()
    expected = {}
    for p in sorted(src.iterdir()):
        c.put_object(Bucket=bucket, Key=f"llama/{p.name}", Body=p.read_bytes())
        expected[p.name] = sha256_file(p)
    assert all(8 + int.from_bytes(p.read_bytes()[:8], "little") > 100 for p in src.glob("*.safetensors"))
    d = _daemon(tmp_path, s3, proxy)
    try:
        proxy.set(corrupt=True, times=1)
        d.ctl("prefetch", f"s3://{bucket}/llama/", "--name", "llama")
        assert proxy.injected == 1
        assert "header_read_twice" in d.log_text() and "not valid UTF-8" in d.log_text()
        view = Path(d.ctl_json("show", "llama")["manifest"]["path"])
        assert {p.name: sha256_file(p) for p in view.iterdir()} == expected
        no_partial_files(d)
        report("corruption", "S3 proxy flips one byte inside a safetensors header's JSON (the first ranged read)",
               "the header is read again, not called malformed; the model arrives byte-identical", "")  # fmt: skip
    finally:
        d.stop()


def test_known_checksum_skips_the_download(tmp_path: Path, s3, proxy: FaultProxy, model_in_s3, bucket: str) -> None:  # type: ignore[no-untyped-def]
    """The source vouches for a sha256 the store already has: no bytes move (dedup before download)."""
    uri, _ = model_in_s3
    c = s3.client()
    for key in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "config.json"):
        c.copy_object(Bucket=bucket, Key=f"copy/{key}", CopySource={"Bucket": bucket, "Key": f"m/{key}"},
                      ChecksumAlgorithm="SHA256")  # fmt: skip
    d = _daemon(tmp_path, s3, proxy)
    try:
        d.ctl("prefetch", uri, "--name", "m")
        first = int(d.ctl_json("stats")["bytes_downloaded"])
        d.ctl("prefetch", f"s3://{bucket}/copy/", "--name", "copy")
        assert int(d.ctl_json("stats")["bytes_downloaded"]) == first
    finally:
        d.stop()


def test_index_deleted_or_corrupted_while_stopped(daemon: Daemon, tiny_model: Path, report) -> None:  # type: ignore[no-untyped-def]
    daemon.ctl("prefetch", f"file://{tiny_model}/", "--name", "tiny")
    daemon.stop()
    index = daemon.cache_dir / "index.db"
    for suffix in ("-wal", "-shm"):
        Path(str(index) + suffix).unlink(missing_ok=True)
    index.write_bytes(b"this is not a database" * 100)
    r = subprocess.run(daemon_argv(daemon.cache_dir, daemon.socket_dir, daemon.admin_socket, log_format=None),
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 1 and "index" in r.stderr and "--rebuild-index" in r.stderr, r.stderr
    d2 = start_daemon(daemon.root, None, config=daemon.root / "weightcached.toml", extra_args=["--rebuild-index"])
    try:
        # rebuilt from the blobs: every blob adopted; names are gone (they lived only in the index)
        assert d2.ctl_json("stats")["blobs"] == 5 and d2.ctl_json("ls") == []
        d2.ctl("prefetch", f"file://{tiny_model}/", "--name", "tiny")
        st = d2.ctl_json("stats")
        assert st["blobs"] == 5 and st["models"] == 1  # the same bytes: stored once, not twice
    finally:
        d2.stop()
    # deleted while stopped: refused the same way, never silently replaced by an empty index
    for suffix in ("", "-wal", "-shm"):
        Path(str(index) + suffix).unlink(missing_ok=True)
    r = subprocess.run(daemon_argv(daemon.cache_dir, daemon.socket_dir, daemon.admin_socket, log_format=None),
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 1 and "is missing but the store holds 5 blob(s)" in r.stderr, r.stderr
    d3 = start_daemon(daemon.root, None, config=daemon.root / "weightcached.toml", extra_args=["--rebuild-index"])
    try:
        assert d3.ctl_json("stats")["blobs"] == 5
        report(
            "disk",
            "index.db overwritten with garbage, then deleted, while stopped",
            "clear start-up error naming --rebuild-index; with it, rebuilt from the blobs",
            "5 of 5 blobs re-adopted",
        )
        assert d3.ctl("verify").returncode == 0
    finally:
        d3.stop()


def test_blob_replaced_by_a_symlink_is_refused_and_healed(
    daemon: Daemon, tiny_model: Path, tmp_path: Path, report
) -> None:  # type: ignore[no-untyped-def]
    import weightcache
    from weightcache import CorruptedError

    daemon.ctl("prefetch", f"file://{tiny_model}/", "--name", "tiny")
    view = Path(daemon.ctl_json("show", "tiny")["manifest"]["path"])
    blob = (view / "config.json").resolve()
    secret = tmp_path / "secret"
    secret.write_text("do not hand me out")
    blob.unlink()
    blob.symlink_to(secret)
    from weightcache._fd import FdConnection

    snap = daemon.ctl_json("show", "tiny")["manifest"]["snapshot_id"]
    with FdConnection(daemon.socket_dir / "fd.sock") as conn, pytest.raises(CorruptedError, match="symlink"):
        conn.acquire(snap)  # never followed, never handed out
    r = daemon.ctl("verify", "--json", check=False)
    assert r.returncode == 1 and blob.name in r.stdout  # detected
    with weightcache.connect(daemon.socket_dir) as c, c.open("tiny") as m:  # the next use heals it
        assert len(m.keys()) == 21
    assert not blob.is_symlink() and sha256_file(blob) == blob.name
    report(
        "disk",
        "a blob replaced by a symlink to a secret file",
        "never followed (O_NOFOLLOW); verify reports it; next open re-fetches",
        "",
    )
    assert secret.read_text() == "do not hand me out"


def test_store_permission_errors_are_clear(daemon: Daemon, tiny_model: Path) -> None:
    if os.geteuid() == 0:
        # root ignores modes: make the ingest directory unusable another way
        ingest = daemon.cache_dir / "ingest"
        ingest.rename(daemon.cache_dir / "ingest.moved")
        ingest.write_text("a file where a directory should be")
        try:
            r = daemon.ctl("prefetch", f"file://{tiny_model}/", "--name", "tiny", check=False)
        finally:
            ingest.unlink()
            (daemon.cache_dir / "ingest.moved").rename(ingest)
        assert r.returncode == 1 and "store, while fetching model tiny" in r.stderr, r.stderr
        assert daemon.ctl_json("ls") == []
        daemon.ctl("prefetch", f"file://{tiny_model}/", "--name", "tiny")
