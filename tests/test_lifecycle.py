"""Cache lifecycle: capacity and LRU eviction, pins and leases, evicted-but-open files, ENOSPC,
models.d, crash recovery with resume, verify and repair."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, make_model, no_partial_files, sha256_file, start_daemon, upload_dir, write_config


def _blob_model(directory: Path, size: int, seed: int) -> Path:
    """A small model of distinct content: one safetensors file of `size` bytes plus a config."""
    from tests_helpers import write_u8_safetensors

    directory.mkdir(parents=True, exist_ok=True)
    write_u8_safetensors(directory / "model.safetensors", size, seed)
    (directory / "config.json").write_text(json.dumps({"seed": seed}))
    return directory


def _names(d: Daemon) -> list[str]:
    return sorted(m["name"] for m in d.ctl_json("ls"))


def _wait(pred: Any, timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


HOLD = textwrap.dedent("""
    import sys, weightcache
    c = weightcache.connect(sys.argv[1])
    m = c.open(sys.argv[2])
    t = m.get_tensor("w")
    print(int(t.sum()), flush=True)
    sys.stdin.readline()           # the daemon evicts the model now
    print(int(t.sum()), flush=True)  # the mapping still reads the same bytes
    sys.stdin.readline()
""")


def _hold(d: Daemon, name: str) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(d.socket_dir), name], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)  # fmt: skip
    return p


def test_lru_eviction_with_pins_and_leases(daemon_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import weightcache

    size = 4 << 20
    models = {n: _blob_model(tmp_path / "models" / n, size, i) for i, n in enumerate("abcdef")}
    model_bytes = sum(p.stat().st_size for p in models["a"].iterdir())
    # room for three models under the high watermark; a fourth evicts exactly one
    d = daemon_factory(max_size=int(model_bytes * 3.5), high_watermark=0.95, low_watermark=0.9)
    for n in "abc":
        d.ctl("prefetch", f"file://{models[n]}/", "--name", n)
        time.sleep(0.05)
    with weightcache.connect(d.socket_dir) as c, c.open("a"):
        pass  # a is now the most recently used: LRU order b, c, a
    d.ctl("prefetch", f"file://{models['d']}/", "--name", "d")
    assert _names(d) == ["a", "c", "d"]
    # pin a; a client holds c: the only candidate left is d, though it is the newest
    d.ctl("pin", "a")
    holder = _hold(d, "c")
    try:
        assert holder.stdout is not None and holder.stdout.readline()
        d.ctl("prefetch", f"file://{models['e']}/", "--name", "e")
        assert _names(d) == ["a", "c", "e"]
        st = d.ctl_json("stats")
        assert int(st["stored_bytes"]) <= int(model_bytes * 3.5 * 0.95)
    finally:
        holder.communicate("\n\n", timeout=30)


def test_oversized_model_is_refused_before_a_byte(daemon_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    big = _blob_model(tmp_path / "big", 8 << 20, 1)
    d = daemon_factory(max_size=4 << 20)
    r = d.ctl("prefetch", f"file://{big}/", "--name", "big", check=False)
    assert r.returncode == 1 and "ExhaustedError" in r.stderr and "more than the cache capacity" in r.stderr
    assert int(d.ctl_json("stats")["bytes_downloaded"]) == 0
    no_partial_files(d)


def test_pinned_and_leased_models_are_not_evicted_to_make_room(daemon_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    a, b = _blob_model(tmp_path / "a", 4 << 20, 1), _blob_model(tmp_path / "b", 4 << 20, 2)
    d = daemon_factory(max_size=6 << 20)
    d.ctl("prefetch", f"file://{a}/", "--name", "a", "--pin")
    r = d.ctl("prefetch", f"file://{b}/", "--name", "b", check=False)
    assert r.returncode == 1 and "pinned, in use, or being downloaded" in r.stderr
    assert (
        _names(d) == ["a"]
        and int(d.ctl_json("stats")["bytes_downloaded"])
        == a.joinpath("model.safetensors").stat().st_size + a.joinpath("config.json").stat().st_size
    )


def test_evicted_model_stays_readable_by_a_process_that_has_it_open(daemon: Daemon, tmp_path: Path) -> None:
    m = _blob_model(tmp_path / "m", 2 << 20, 3)
    daemon.ctl("prefetch", f"file://{m}/", "--name", "m")
    blob = next(Path(p).resolve() for p in Path(daemon.ctl_json("show", "m")["manifest"]["path"]).iterdir()
                if p.name == "model.safetensors")  # fmt: skip
    holder = _hold(daemon, "m")
    assert holder.stdout is not None
    before = holder.stdout.readline().strip()
    r = daemon.ctl("evict", "m", check=False)
    assert r.returncode == 1 and "in use by 1 process" in r.stderr and "--force" in r.stderr
    plan = daemon.ctl_json("evict", "m", "--force", "--dry-run")
    assert plan["dry_run"] and plan["models"] == ["m"] and int(plan["bytes_freed"]) > 2 << 20
    assert blob.exists()  # a dry run touches nothing
    daemon.ctl("evict", "m", "--force")
    assert not blob.exists() and _names(daemon) == []
    assert int(daemon.ctl_json("stats")["held_bytes"]) > 2 << 20  # still counted: the process holds it
    holder.stdin.write("\n")  # type: ignore[union-attr]
    holder.stdin.flush()  # type: ignore[union-attr]
    assert holder.stdout.readline().strip() == before  # the unlinked file reads the same bytes
    holder.communicate("\n", timeout=30)
    _wait(lambda: int(daemon.ctl_json("stats")["held_bytes"]) == 0, 10, "held bytes released")


@pytest.fixture
def tmpfs(tmp_path: Path):  # type: ignore[no-untyped-def]
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_enospc_on_a_small_tmpfs(tmpfs: Path, tmp_path: Path, s3, report) -> None:  # type: ignore[no-untyped-def]
    import weightcache

    a = _blob_model(tmp_path / "a", 8 << 20, 1)
    b = _blob_model(tmp_path / "b", 8 << 20, 2)
    root = tmp_path / "d"
    root.mkdir()
    cfg = write_config(root / "w.toml", None, client_sources=["*"])
    d = start_daemon(root, None, config=cfg)
    d2: Daemon | None = None
    try:
        d.stop()
        # the store on the tmpfs: same daemon, cache dir moved there
        d2 = _start_with_cache(root, cfg, tmpfs / "store")
        d2.ctl("prefetch", f"file://{a}/", "--name", "a", "--pin")
        # leave free bytes but no free inodes: the next ingest hits a real ENOSPC after admission
        st = os.statvfs(tmpfs)
        used_inodes = st.f_files - st.f_ffree
        subprocess.run(["mount", "-o", f"remount,nr_inodes={used_inodes + 1}", str(tmpfs)], check=True)
        r = d2.ctl("prefetch", f"file://{b}/", "--name", "b", check=False)
        assert r.returncode == 1 and "ExhaustedError" in r.stderr and "no space left" in r.stderr.lower()
        assert _names(d2) == ["a"]
        assert not any((tmpfs / "store" / "ingest").iterdir())  # nothing partial left behind
        with weightcache.connect(d2.socket_dir) as c, c.open("a") as m:  # still served
            assert m.get_tensor("w").numel() == 8 << 20
        # and a model larger than the free space is refused at admission, before a byte
        subprocess.run(["mount", "-o", "remount,nr_inodes=10000", str(tmpfs)], check=True)
        huge = _blob_model(tmp_path / "huge", 60 << 20, 3)
        r = d2.ctl("prefetch", f"file://{huge}/", "--name", "huge", check=False)
        assert r.returncode == 1 and "ExhaustedError" in r.stderr
        assert d2.ctl("verify").returncode == 0
        report(
            "full disk",
            "48 MiB tmpfs store: inodes exhausted mid-ingest (real ENOSPC), then a 60 MiB model",
            "ExhaustedError (RESOURCE_EXHAUSTED), partial files removed, existing model still served; "
            "the oversized one refused before a byte",
            "",
        )
    finally:
        if d2 is not None:
            d2.stop()


def _start_with_cache(root: Path, cfg: Path, cache_dir: Path) -> Daemon:
    import conftest

    log = root / "daemon2.log"
    admin = root / "admin" / "admin.sock"
    with open(log, "ab") as lf:
        proc = subprocess.Popen(["weightcached", "--config", str(cfg), "--cache-dir", str(cache_dir), "--socket-dir",
                                 str(root / "sock"), "--admin-socket", str(admin)], stdout=lf, stderr=subprocess.STDOUT)  # fmt: skip
    d = conftest.Daemon(root, cache_dir, root / "sock", admin, proc, log)
    _wait(lambda: conftest._accepting(root / "sock" / "fd.sock") or proc.poll() is not None, 30, "daemon start")
    assert proc.poll() is None, d.log_text()
    return d


def test_models_d_add_change_remove_and_invalid(tmp_path: Path, s3, s3_model: str) -> None:  # type: ignore[no-untyped-def]
    models_d = tmp_path / "models.d"
    models_d.mkdir()
    (models_d / "tiny.toml").write_text(f'uri = "{s3_model}"\nname = "tiny"\n')  # present at start-up
    (models_d / "broken.toml").write_text('uri = "s3://x/"\nsize = 3\n')
    root = tmp_path / "d"
    root.mkdir()
    cfg = write_config(root / "w.toml", s3, models_dir=str(models_d))
    d = start_daemon(root, s3, config=cfg)
    try:
        _wait(lambda: _names(d) == ["tiny"], 60, "models.d start-up prefetch")
        assert d.ctl_json("ls")[0]["pinned"] is True
        assert "models_d_invalid" in d.log_text() and "unknown key(s) size" in d.log_text()
        (models_d / "weights.toml").write_text(f'uri = "{s3_model}"\nname = "weights"\ninclude = ["*.safetensors"]\n'
                                               "pin = false\n")  # fmt: skip
        _wait(lambda: "weights" in _names(d), 60, "models.d new file")
        assert d.ctl_json("show", "weights")["model"]["file_count"] == 2
        (models_d / "weights.toml").write_text(f'uri = "{s3_model}"\nname = "weights"\ninclude = ["*.json"]\n')
        _wait(lambda: d.ctl_json("show", "weights")["model"]["file_count"] == 3, 60, "models.d changed file")
        (models_d / "tiny.toml").unlink()
        _wait(lambda: d.ctl_json("show", "tiny")["model"]["pinned"] is False, 30, "models.d removed file unpins")
        assert "tiny" in _names(d)  # unpinned, not deleted
    finally:
        d.stop()


def _kill_and_resume(d_root: Path, s3, uri: str, expected: dict[str, str], when: float, cfg: Path) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    d = start_daemon(d_root, s3, config=cfg)
    p = subprocess.Popen(["cachectl", "prefetch", uri, "--name", "big"], env=d.env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)  # fmt: skip
    time.sleep(when)
    before = int(d.ctl_json("stats")["bytes_downloaded"]) if d.proc.poll() is None else 0
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    p.wait(timeout=30)
    d2 = start_daemon(d_root, s3, config=cfg)  # resumes by itself
    try:
        _wait(lambda: "big" in _names(d2), 120, "the resumed prefetch")
        after = int(d2.ctl_json("stats")["bytes_downloaded"])
        view = Path(d2.ctl_json("show", "big")["manifest"]["path"])
        assert {p.name: sha256_file(p) for p in view.iterdir()} == expected  # complete and byte-identical
        assert d2.ctl("verify").returncode == 0
        no_partial_files(d2)
        return before, after
    finally:
        d2.stop()


def _resume_case(tmp_path: Path, s3, bucket: str, iterations: int, seed: int, report) -> None:  # type: ignore[no-untyped-def]
    model = make_model(tmp_path / "m", tiny=False, size=20 << 20, shards=3)
    upload_dir(s3, bucket, "big/", model)
    total = sum(p.stat().st_size for p in model.iterdir())
    rate = 16 << 20
    rng = random.Random(seed)
    ratios = []
    for i in range(iterations):
        root = tmp_path / f"run{i}"
        root.mkdir()
        cfg = write_config(root / "w.toml", s3, client_sources=["*"],
                           download={"rate_limit": rate, "concurrency": 2, "part_size": "1MiB"})  # fmt: skip
        when = rng.uniform(0.2, total / rate + 0.3)  # anywhere from listing to commit
        expected = {p.name: sha256_file(p) for p in model.iterdir()}
        before, after = _kill_and_resume(root, s3, f"s3://{bucket}/big/", expected, when, cfg)
        # bytes across both runs ~1x the model: what run 1 wrote is not fetched again
        # (slack: parts in flight at the kill, and what arrived between the stats call and the kill)
        slack = 4 * (1 << 20) + rate // 2
        assert before + after <= total + slack, (i, when, before, after, total)
        assert after <= total
        ratios.append((before + after) / total)
    report(
        "crash",
        f"kill -9 of the daemon at random points of a 3-file prefetch, restart ({iterations}x)",
        "every run resumes by itself; complete, byte-identical, verify clean",
        f"bytes fetched across both runs: max {max(ratios):.2f}x, mean {sum(ratios) / len(ratios):.2f}x the model",
    )


def test_kill_9_during_prefetch_then_restart_resumes(tmp_path: Path, s3, bucket: str, report) -> None:  # type: ignore[no-untyped-def]
    _resume_case(tmp_path, s3, bucket, iterations=2, seed=1, report=report)


@pytest.mark.slow
def test_kill_9_at_random_points_20_times(tmp_path: Path, s3, bucket: str, report) -> None:  # type: ignore[no-untyped-def]
    _resume_case(tmp_path, s3, bucket, iterations=20, seed=int(os.environ.get("WC_SEED", "7")), report=report)


def test_verify_finds_flipped_and_truncated_blobs_and_repairs(daemon: Daemon, s3_model: str, report) -> None:  # type: ignore[no-untyped-def]
    import weightcache
    from weightcache import CorruptedError

    daemon.ctl("prefetch", s3_model, "--name", "tiny")
    view = Path(daemon.ctl_json("show", "tiny")["manifest"]["path"])
    shard1 = (view / "model-00001-of-00002.safetensors").resolve()
    shard2 = (view / "model-00002-of-00002.safetensors").resolve()
    good1, good2 = shard1.name, shard2.name
    os.chmod(shard1, 0o644)
    with open(shard1, "r+b") as f:  # flip one byte in the data section
        f.seek(-5, os.SEEK_END)
        b = f.read(1)
        f.seek(-5, os.SEEK_END)
        f.write(bytes([b[0] ^ 0xFF]))
    os.chmod(shard2, 0o644)
    os.truncate(shard2, shard2.stat().st_size - 100)
    r = daemon.ctl("verify", "--json", check=False)
    assert r.returncode == 1
    res = json.loads(r.stdout)
    assert sorted(res["corrupt"]) == sorted([good1, good2]) and sorted(res["quarantined"]) == sorted([good1, good2])
    # quarantined blobs are never handed to a client again
    from weightcache._fd import FdConnection

    snap = daemon.ctl_json("show", "tiny")["manifest"]["snapshot_id"]
    with FdConnection(daemon.socket_dir / "fd.sock") as conn, pytest.raises(CorruptedError, match="quarantined"):
        conn.acquire(snap)
    before = int(daemon.ctl_json("stats")["bytes_downloaded"])
    r = daemon.ctl("verify", "--repair", "--json")
    assert json.loads(r.stdout)["repaired"] == ["tiny"]
    assert int(daemon.ctl_json("stats")["bytes_downloaded"]) > before
    assert daemon.ctl("verify").returncode == 0
    assert sha256_file(view / "model-00001-of-00002.safetensors") == good1
    with weightcache.connect(daemon.socket_dir) as c, c.open("tiny") as m:
        assert len(m.keys()) == 21
    report(
        "corruption",
        "a flipped byte and a truncated blob in the store",
        "verify finds both, quarantines them (never handed out), --repair re-downloads",
        "",
    )


def test_damaged_model_is_fetched_again_on_next_use(daemon: Daemon, s3_model: str) -> None:
    import weightcache

    daemon.ctl("prefetch", s3_model, "--name", "tiny")
    view = Path(daemon.ctl_json("show", "tiny")["manifest"]["path"])
    shard = (view / "model-00001-of-00002.safetensors").resolve()
    os.chmod(shard, 0o644)
    with open(shard, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\x00" if f.read(0) == b"" else b"\x01")
    daemon.ctl("verify", check=False)  # finds and quarantines it
    with weightcache.connect(daemon.socket_dir) as c, c.open("tiny") as m:  # next use re-fetches
        assert len(m.keys()) == 21
    assert daemon.ctl("verify").returncode == 0


def test_gc_removes_orphans_and_unnamed_snapshots(daemon: Daemon, tmp_path: Path) -> None:
    a = _blob_model(tmp_path / "a", 1 << 20, 1)
    daemon.ctl("prefetch", f"file://{a}/", "--name", "a")
    _blob_model(tmp_path / "a", 1 << 20, 2)  # new content under the same name and path
    daemon.ctl("prefetch", f"file://{a}/", "--name", "a")  # the old snapshot has no name now
    stray = daemon.cache_dir / "ingest" / "leftover"
    stray.mkdir()
    plan = daemon.ctl_json("gc", "--dry-run")
    assert (
        plan["dry_run"] and len(plan["snapshots"]) == 1 and len(plan["blobs"]) == 2 and plan["ingests"] == ["leftover"]
    )
    assert stray.exists()
    done = daemon.ctl_json("gc")
    assert done["blobs"] == plan["blobs"] and not stray.exists()
    assert daemon.ctl_json("gc")["blobs"] == []
    assert daemon.ctl("verify").returncode == 0


def test_start_up_reconciles_index_and_blobs(daemon_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    a = _blob_model(tmp_path / "models" / "a", 1 << 20, 1)
    b = _blob_model(tmp_path / "models" / "b", 1 << 20, 2)
    d = daemon_factory()
    d.ctl("prefetch", f"file://{a}/", "--name", "a")
    d.ctl("prefetch", f"file://{b}/", "--name", "b")
    blob_b = (Path(d.ctl_json("show", "b")["manifest"]["path"]) / "model.safetensors").resolve()
    d.stop()
    blob_b.unlink()  # a row without its blob
    import hashlib

    orphan = os.urandom(4096)
    digest = hashlib.sha256(orphan).hexdigest()
    (d.cache_dir / "blobs" / "sha256" / digest[:2]).mkdir(exist_ok=True)
    (d.cache_dir / "blobs" / "sha256" / digest[:2] / digest).write_bytes(orphan)  # a blob without its row
    bogus = "f" * 64
    (d.cache_dir / "blobs" / "sha256" / "ff").mkdir(exist_ok=True)
    (d.cache_dir / "blobs" / "sha256" / "ff" / bogus).write_bytes(b"not what the name says")
    (d.cache_dir / "ingest" / "junk").mkdir()
    d2 = start_daemon(d.root, None, config=d.root / "weightcached.toml")
    try:
        log = d2.log_text()
        assert '"adopted_blobs": 1' in log and '"removed_files": 1' in log and '"stale_ingests": 1' in log
        assert _names(d2) == ["a"]  # b lost a blob: dropped, not served broken
        assert not (d.cache_dir / "blobs" / "sha256" / "ff" / bogus).exists()
        assert digest in d2.ctl_json("gc", "--dry-run")["blobs"]  # adopted, and unreferenced
        assert d2.ctl("verify").returncode == 0
        d2.ctl("prefetch", f"file://{b}/", "--name", "b")  # and it can simply be fetched again
        assert _names(d2) == ["a", "b"]
    finally:
        d2.stop()
