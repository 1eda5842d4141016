"""Foundation: prefetch from S3 and directories, byte-identical blobs, dedup, one download per model."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path

import pytest
from harness import Daemon, daemon_argv, make_model, no_partial_files, sha256_file, upload_dir


def _view(d: Daemon, name: str) -> Path:
    info = d.ctl_json("show", name)
    return Path(info["manifest"]["path"])


def test_prefetch_from_s3_is_byte_identical(daemon: Daemon, s3_model: str, tiny_model: Path) -> None:
    r = daemon.ctl("prefetch", s3_model, "--name", "tiny")
    assert "tiny: snapshot" in r.stdout
    view = _view(daemon, "tiny")
    src = sorted(p.name for p in tiny_model.iterdir())
    assert sorted(p.name for p in view.iterdir()) == src
    for name in src:
        cached = view / name
        assert cached.is_symlink()
        blob = cached.resolve()
        assert blob.parent.parent.name == "sha256" and blob.name == sha256_file(tiny_model / name)
        assert sha256_file(cached) == sha256_file(tiny_model / name)
        assert blob.stat().st_mode & 0o777 == 0o444
    no_partial_files(daemon)


def test_prefetch_from_directory(daemon: Daemon, tiny_model: Path) -> None:
    out = daemon.ctl_json("prefetch", f"file://{tiny_model}/")
    assert out["name"] == "tiny-llama" and out["file_count"] == 5
    for p in tiny_model.iterdir():
        assert sha256_file(Path(out["path"]) / p.name) == sha256_file(p)


def test_listing_json_and_show_tensors(daemon: Daemon, s3_model: str) -> None:
    daemon.ctl("prefetch", s3_model, "--name", "tiny")
    models = daemon.ctl_json("ls")
    assert [m["name"] for m in models] == ["tiny"]
    assert models[0]["source"] == s3_model and models[0]["pinned"] is False
    shown = daemon.ctl_json("show", "tiny", "--tensors")
    tensors = shown["manifest"]["tensors"]
    assert tensors[0]["layer"] == "embed" and tensors[-1]["layer"] == "rest"
    assert shown["manifest"]["layers"][:3] == ["embed", "layers.0", "layers.1"]
    # snapshot id and source URI resolve to the same model
    assert daemon.ctl_json("show", shown["manifest"]["snapshot_id"])["model"]["name"] == "tiny"
    assert daemon.ctl_json("show", s3_model)["model"]["name"] == "tiny"
    text = daemon.ctl("show", "tiny", "--tensors").stdout
    assert "model.layers.1.mlp.down_proj.weight" in text


def test_include_exclude(daemon: Daemon, s3_model: str) -> None:
    out = daemon.ctl_json("prefetch", s3_model, "--name", "only-weights", "--include", "*.safetensors")
    assert out["file_count"] == 2
    out = daemon.ctl_json("prefetch", s3_model, "--name", "no-index", "--exclude", "*.index.json")
    assert out["file_count"] == 4


def test_dedup_two_prefixes_sharing_two_of_three_files(daemon: Daemon, s3, bucket: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    c = s3.client()
    shared_a, shared_b = os.urandom(300_000), os.urandom(200_000)
    own1, own2 = os.urandom(100_000), os.urandom(150_000)
    for prefix, own in (("m1/", own1), ("m2/", own2)):
        c.put_object(Bucket=bucket, Key=prefix + "a.txt", Body=shared_a)
        c.put_object(Bucket=bucket, Key=prefix + "b.txt", Body=shared_b)
        c.put_object(Bucket=bucket, Key=prefix + "own.txt", Body=own)
    # No weights: the files are named (--include) to be taken as they are (ingest/layout.py).
    daemon.ctl("prefetch", f"s3://{bucket}/m1/", "--name", "m1", "--include", "*")
    daemon.ctl("prefetch", f"s3://{bucket}/m2/", "--name", "m2", "--include", "*")
    st = daemon.ctl_json("stats")
    unique = len(shared_a) + len(shared_b) + len(own1) + len(own2)
    assert int(st["stored_bytes"]) == unique
    assert int(st["logical_bytes"]) == unique + len(shared_a) + len(shared_b)
    assert st["blobs"] == 4
    assert "dedup saves" in daemon.ctl("stats").stdout
    on_disk = sum(p.stat().st_size for p in (daemon.cache_dir / "blobs").rglob("*") if p.is_file())
    assert on_disk == unique


def test_unchanged_objects_are_not_downloaded_again(daemon: Daemon, s3_model: str, tiny_model: Path) -> None:
    daemon.ctl("prefetch", s3_model, "--name", "tiny")
    first = int(daemon.ctl_json("stats")["bytes_downloaded"])
    assert first == sum(p.stat().st_size for p in tiny_model.iterdir())
    daemon.ctl("prefetch", s3_model, "--name", "tiny")
    assert int(daemon.ctl_json("stats")["bytes_downloaded"]) == first


def test_concurrent_prefetch_of_one_model_downloads_once(daemon_factory, s3, bucket: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model = make_model(tmp_path / "m", tiny=False, size=24 << 20)
    upload_dir(s3, bucket, "big/", model)
    total = sum(p.stat().st_size for p in model.iterdir())
    # Throttled so the two callers certainly overlap.
    d = daemon_factory(download={"rate_limit": 40 << 20})
    procs = [
        subprocess.Popen(
            ["cachectl", "prefetch", f"s3://{bucket}/big/", "--name", "big", "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=d.env,
            text=True,
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    snaps = {json.loads(o)["snapshot_id"] for o, _ in outs}
    assert len(snaps) == 1
    assert int(d.ctl_json("stats")["bytes_downloaded"]) == total


def test_object_replaced_mid_download_restarts_that_file(daemon_factory, s3, bucket: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from tests_helpers import write_u8_safetensors

    c = s3.client()
    write_u8_safetensors(tmp_path / "old", 12 << 20, 1)
    write_u8_safetensors(tmp_path / "new", 12 << 20, 2)
    old, new = (tmp_path / "old").read_bytes(), (tmp_path / "new").read_bytes()
    c.put_object(Bucket=bucket, Key="m/model.safetensors", Body=old)
    c.put_object(Bucket=bucket, Key="m/config.json", Body=b"{}")
    # Throttled so the replacement certainly lands mid-download: 12 MiB take 4 s at least.
    d = daemon_factory(download={"rate_limit": 3 << 20, "concurrency": 2})
    import grpc

    from weightcache.v1 import weightcache_pb2 as pb
    from weightcache.v1 import weightcache_pb2_grpc as pb_grpc

    replaced_at, model = -1, None
    req = pb.PrefetchRequest(uri=f"s3://{bucket}/m/", name="m", include=["*"])
    with grpc.insecure_channel(f"unix://{d.admin_socket}") as ch:
        for ev in pb_grpc.AdminStub(ch).Prefetch(req, timeout=240):
            if ev.HasField("model"):
                model = ev.model
            elif replaced_at < 0 and ev.progress.bytes_done >= 1 << 20:
                # the daemon's own progress says the old bytes are arriving: replace the object now
                c.put_object(Bucket=bucket, Key="m/model.safetensors", Body=new)
                replaced_at = ev.progress.bytes_done
    assert model is not None and 1 << 20 <= replaced_at < len(old), replaced_at
    path = Path(model.path) / "model.safetensors"
    import hashlib

    assert sha256_file(path) == hashlib.sha256(new).hexdigest()  # never a splice of old and new
    assert int(d.ctl_json("stats")["bytes_downloaded"]) > len(new)  # the first bytes were fetched again
    no_partial_files(d)


def test_second_daemon_on_same_store_refuses(daemon: Daemon, tmp_path: Path) -> None:
    r = subprocess.run(daemon_argv(daemon.cache_dir, tmp_path / "s2", tmp_path / "a2" / "admin.sock", log_format=None),
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 1
    assert "already used by another weightcached" in r.stderr and str(daemon.proc.pid) in r.stderr


def test_missing_source_and_bad_uri_are_clear_errors(daemon: Daemon, bucket: str) -> None:
    r = daemon.ctl("prefetch", f"s3://{bucket}/nothing-here/", check=False)
    assert r.returncode == 1 and "NotFoundError" in r.stderr and "no files match" in r.stderr
    r = daemon.ctl("prefetch", "ftp://host/x", check=False)
    assert r.returncode == 2 and "unsupported scheme 'ftp'" in r.stderr
    r = daemon.ctl("prefetch", f"s3://{bucket}/x/", "--name", "../etc", check=False)
    assert r.returncode == 2 and "model name '../etc'" in r.stderr
    r = daemon.ctl("show", "nope", check=False)
    assert r.returncode == 1 and "NotFoundError: model 'nope' is not in the cache" in r.stderr


def test_progress_bar_on_a_terminal(daemon: Daemon, s3_model: str) -> None:
    import pty

    pid, fd = pty.fork()
    if pid == 0:  # child: cachectl with a terminal on stderr
        os.environ.update(daemon.env)
        os.execvp("cachectl", ["cachectl", "prefetch", s3_model, "--name", "tty"])
    out = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert b"tty: snapshot" in out


def test_concurrent_prefetch_waiters_all_get_progress(daemon_factory, s3, bucket: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import grpc

    from weightcache.v1 import weightcache_pb2 as pb
    from weightcache.v1 import weightcache_pb2_grpc as pb_grpc

    model = make_model(tmp_path / "m", tiny=False, size=8 << 20)
    upload_dir(s3, bucket, "p/", model)
    d = daemon_factory(download={"rate_limit": 8 << 20})
    results: list[list[str]] = [[], []]

    def run(i: int) -> None:
        stub = pb_grpc.AdminStub(grpc.insecure_channel(f"unix://{d.admin_socket}"))
        for ev in stub.Prefetch(pb.PrefetchRequest(uri=f"s3://{bucket}/p/", name="p"), timeout=240):
            results[i].append(ev.WhichOneof("event"))

    ts = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(300)
        assert not t.is_alive()
    for r in results:
        assert r[-1] == "model" and r.count("progress") >= 2


@pytest.mark.parametrize("bad", ["s3://", "s3:///x", "file://remote/dir", "file://relative"])
def test_malformed_uris(daemon: Daemon, bad: str) -> None:
    r = daemon.ctl("prefetch", bad, check=False)
    assert r.returncode == 2, r.stderr
    assert repr(bad) in r.stderr or bad in r.stderr
