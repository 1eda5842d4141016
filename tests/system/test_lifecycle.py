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

import pytest
from harness import Daemon, make_model, no_partial_files, sha256_file, start_daemon, upload_dir, wait_for, write_config
from tests_helpers import write_u8_model


def _names(d: Daemon) -> list[str]:
    return sorted(m["name"] for m in d.ctl_json("ls"))


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
    models = {n: write_u8_model(tmp_path / "models" / n, size, i) for i, n in enumerate("abcdef")}
    model_bytes = sum(p.stat().st_size for p in models["a"].iterdir())
    # room for three models under the high watermark; a fourth evicts exactly one
    d = daemon_factory(max_size=int(model_bytes * 3.5), high_watermark=0.95, low_watermark=0.9)
    for n in "abc":
        d.ctl("prefetch", f"file://{models[n]}/", "--name", n)  # one after the other: distinct use times
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
    big = write_u8_model(tmp_path / "big", 8 << 20, 1)
    d = daemon_factory(max_size=4 << 20)
    r = d.ctl("prefetch", f"file://{big}/", "--name", "big", check=False)
    assert r.returncode == 1 and "ExhaustedError" in r.stderr and "more than the cache capacity" in r.stderr
    assert int(d.ctl_json("stats")["bytes_downloaded"]) == 0
    no_partial_files(d)


def test_pinned_and_leased_models_are_not_evicted_to_make_room(daemon_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    a, b = write_u8_model(tmp_path / "a", 4 << 20, 1), write_u8_model(tmp_path / "b", 4 << 20, 2)
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
    m = write_u8_model(tmp_path / "m", 2 << 20, 3)
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
    wait_for(lambda: int(daemon.ctl_json("stats")["held_bytes"]) == 0, 60, "held bytes released")


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

    a = write_u8_model(tmp_path / "a", 8 << 20, 1)
    b = write_u8_model(tmp_path / "b", 8 << 20, 2)
    root = tmp_path / "d"
    root.mkdir()
    cfg = write_config(root / "w.toml", None, client_sources=["*"])
    d = start_daemon(root, None, config=cfg)
    d2: Daemon | None = None
    try:
        d.stop()
        # the store on the tmpfs: same daemon, cache dir moved there
        d2 = start_daemon(root, None, config=cfg, cache_dir=tmpfs / "store")
        d2.ctl("prefetch", f"file://{a}/", "--name", "a", "--pin")
        # leave free bytes but no free inodes beyond the job's record (its directory and state
        # file): the next ingest is accepted and admitted, then hits a real ENOSPC on its data
        st = os.statvfs(tmpfs)
        used_inodes = st.f_files - st.f_ffree
        subprocess.run(["mount", "-o", f"remount,nr_inodes={used_inodes + 2}", str(tmpfs)], check=True)
        r = d2.ctl("prefetch", f"file://{b}/", "--name", "b", check=False)
        assert r.returncode == 1 and "ExhaustedError" in r.stderr and "no space left" in r.stderr.lower()
        events = [json.loads(line) for line in d2.log_text().splitlines() if line.startswith("{")]
        assert any(e["event"] == "fetch_start" and e["model"] == "b" for e in events)  # admitted, then ENOSPC
        assert _names(d2) == ["a"]
        assert not any((tmpfs / "store" / "ingest").iterdir())  # nothing partial left behind
        with weightcache.connect(d2.socket_dir) as c, c.open("a") as m:  # still served
            assert m.get_tensor("w").numel() == 8 << 20
        # and a model larger than the free space is refused at admission, before a byte
        subprocess.run(["mount", "-o", "remount,nr_inodes=10000", str(tmpfs)], check=True)
        huge = write_u8_model(tmp_path / "huge", 60 << 20, 3)
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
        wait_for(lambda: _names(d) == ["tiny"], 60, "models.d start-up prefetch")
        assert d.ctl_json("ls")[0]["pinned"] is True
        assert "models_d_invalid" in d.log_text() and "unknown key(s) size" in d.log_text()
        (models_d / "weights.toml").write_text(f'uri = "{s3_model}"\nname = "weights"\ninclude = ["*.safetensors"]\n'
                                               "pin = false\n")  # fmt: skip
        wait_for(lambda: "weights" in _names(d), 60, "models.d new file")
        assert d.ctl_json("show", "weights")["model"]["file_count"] == 2
        (models_d / "weights.toml").write_text(f'uri = "{s3_model}"\nname = "weights"\ninclude = ["*.json"]\n')
        wait_for(lambda: d.ctl_json("show", "weights")["model"]["file_count"] == 3, 60, "models.d changed file")
        (models_d / "tiny.toml").unlink()
        wait_for(lambda: d.ctl_json("show", "tiny")["model"]["pinned"] is False, 30, "models.d removed file unpins")
        assert "tiny" in _names(d)  # unpinned, not deleted
    finally:
        d.stop()


ACCEPTED = '"event": "fetch_accepted"'  # logged once the job's record is in ingest/ (jobs.JobRegistry.start)


def _prefetch_accepted(d: Daemon, uri: str, name: str) -> subprocess.Popen[str]:
    """Start `cachectl prefetch` and return once the daemon has accepted the job. Waiting on the
    daemon's own word, not on a delay from the spawn: a fresh interpreter importing grpc can
    take longer than any fixed delay on a busy machine."""
    p = subprocess.Popen(["cachectl", "prefetch", uri, "--name", name], env=d.env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)  # fmt: skip
    wait_for(lambda: ACCEPTED in d.log_text() or p.poll() is not None, 120, "the daemon to accept the prefetch")
    assert ACCEPTED in d.log_text(), (p.returncode, p.stderr.read() if p.stderr else "", d.log_text()[-3000:])
    return p


def _kill(d: Daemon) -> None:
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()


def _recorded_bytes(d: Daemon) -> int:
    """Bytes the (dead) daemon's ingest records say are on disk: what a resume must not fetch again."""
    total = 0
    for state_file in (d.cache_dir / "ingest").glob("*/state.json"):
        state = json.loads(state_file.read_text())
        ps = int(state["part_size"])
        total += sum(min(ps, int(f["size"]) - i * ps) for f in state["files"] for i in f["written"])
    return total


def _admin_bytes_downloaded(d: Daemon) -> int:
    """Stats over the admin socket from this process: no cachectl start-up between this and a kill."""
    import grpc

    from weightcache.v1 import weightcache_pb2 as pb
    from weightcache.v1 import weightcache_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"unix://{d.admin_socket}") as ch:
        return int(pb_grpc.AdminStub(ch).Stats(pb.StatsRequest(), timeout=60).bytes_downloaded)


def _kill_and_resume(d_root: Path, s3, uri: str, expected: dict[str, str], when: float, cfg: Path) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    d = start_daemon(d_root, s3, config=cfg)
    p = _prefetch_accepted(d, uri, "big")
    time.sleep(when)  # the random point of the kill after acceptance: the subject of the test, not a wait
    before = _admin_bytes_downloaded(d)  # a figure for the report only: the kill follows it, not at once
    _kill(d)
    _, err = p.communicate(timeout=120)
    if p.returncode != 0:  # killed under it (else it had finished): a clear error, not a hang or a traceback
        assert p.returncode == 1 and err.startswith("cachectl prefetch: ") and "weightcached" in err, err
    recorded = _recorded_bytes(d)
    d2 = start_daemon(d_root, s3, config=cfg)  # resumes by itself
    try:
        wait_for(lambda: "big" in _names(d2), 120, "the resumed prefetch")
        after = int(d2.ctl_json("stats")["bytes_downloaded"])
        view = Path(d2.ctl_json("show", "big")["manifest"]["path"])
        assert {p.name: sha256_file(p) for p in view.iterdir()} == expected  # complete and byte-identical
        assert d2.ctl("verify").returncode == 0
        no_partial_files(d2)
        # what the first run recorded as written is read back, not fetched again
        total = sum(p.stat().st_size for p in view.iterdir())
        assert after <= total - recorded, (after, recorded, total)
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
        # anywhere from acceptance (listing) to commit, and a little past it
        when = rng.uniform(0, total / rate + 0.3)
        expected = {p.name: sha256_file(p) for p in model.iterdir()}
        before, after = _kill_and_resume(root, s3, f"s3://{bucket}/big/", expected, when, cfg)
        assert after <= total, (i, when, before, after, total)
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
@pytest.mark.timeout(1800)  # 40 daemon starts: a few minutes idle, several times that on a busy machine
def test_kill_9_at_random_points_20_times(tmp_path: Path, s3, bucket: str, report) -> None:  # type: ignore[no-untyped-def]
    _resume_case(tmp_path, s3, bucket, iterations=20, seed=int(os.environ.get("WC_SEED", "7")), report=report)


@pytest.mark.parametrize("checksums", [False, True], ids=["no-checksums", "sha256-checksums"])
def test_kill_between_the_commits_moves_and_its_index_transaction(tmp_path: Path, s3, bucket: str,  # type: ignore[no-untyped-def]
                                                                  checksums: bool) -> None:  # fmt: skip
    """A crash after the commit moved the verified files into the store but before the index
    transaction: the restarted job finds its blobs (adopted at start-up) and fetches nothing
    again, and the model it names has every tensor. The test holds SQLite's write lock on
    index.db from another connection, so the daemon's commit waits right there (a real lock, no
    hook in the daemon), and kills it then. With SHA256 checksums at the source the restarted
    job could also take the adopted blobs for known bytes; they carry no tensor records."""
    import sqlite3

    from safetensors import safe_open

    model = make_model(tmp_path / "m", tiny=False, size=4 << 20, shards=2)
    if checksums:
        c = s3.client()
        for f in sorted(model.iterdir()):
            c.put_object(Bucket=bucket, Key=f"cut/{f.name}", Body=f.read_bytes(), ChecksumAlgorithm="SHA256")
    else:
        upload_dir(s3, bucket, "cut/", model)
    tensors = {}
    for f in model.glob("*.safetensors"):
        with safe_open(str(f), "np") as h:
            tensors.update({k: f.name for k in h.keys()})
    expected = {p.name: sha256_file(p) for p in model.iterdir()}
    total = sum(p.stat().st_size for p in model.iterdir())
    root = tmp_path / "d"
    root.mkdir()
    cfg = write_config(root / "w.toml", s3, client_sources=["*"])
    d = start_daemon(root, s3, config=cfg)
    lock = sqlite3.connect(d.cache_dir / "index.db", isolation_level=None, timeout=60)
    try:
        p = _prefetch_accepted(d, f"s3://{bucket}/cut/", "cut")
        lock.execute("BEGIN IMMEDIATE")  # from here every write of the daemon to its index waits
        blobs = d.cache_dir / "blobs" / "sha256"
        wait_for(lambda: sum(1 for _ in blobs.glob("*/*")) == len(expected), 120, "the commit to move every file")
        assert '"event": "fetch_done"' not in d.log_text()  # the index transaction is still waiting
        _kill(d)
        p.communicate(timeout=120)
    finally:
        lock.rollback() if lock.in_transaction else None
        lock.close()
    d2 = start_daemon(root, s3, config=cfg)
    try:
        wait_for(lambda: "cut" in _names(d2), 120, "the resumed prefetch")
        view = Path(d2.ctl_json("show", "cut")["manifest"]["path"])
        assert {f.name: sha256_file(f) for f in view.iterdir()} == expected
        assert d2.ctl("verify").returncode == 0
        no_partial_files(d2)
        # Every file was in the store before the kill: not one byte of it is fetched again.
        assert int(d2.ctl_json("stats")["bytes_downloaded"]) == 0, total
        import weightcache

        with weightcache.connect(d2.socket_dir) as client, client.open("cut") as m:
            assert {t: m.meta(t).file for t in m.keys()} == tensors
    finally:
        d2.stop()


def test_kill_before_the_daemon_accepts_a_prefetch(tmp_path: Path, s3, bucket: str) -> None:  # type: ignore[no-untyped-def]
    """The kill lands before the request reaches the daemon: the client says which daemon it could
    not reach, nothing is half-written, and the next start has nothing to resume."""
    upload_dir(s3, bucket, "m/", write_u8_model(tmp_path / "m", 2 << 20, 5))
    d = start_daemon(tmp_path / "d", s3)
    _kill(d)  # its socket files stay behind and refuse connections
    r = subprocess.run(["cachectl", "prefetch", f"s3://{bucket}/m/", "--name", "m"], env=d.env, capture_output=True,
                       text=True, timeout=120, stdin=subprocess.DEVNULL)  # fmt: skip
    assert r.returncode == 1 and r.stderr.startswith("cachectl prefetch: "), r.stderr
    assert str(d.admin_socket) in r.stderr and "refused" in r.stderr, r.stderr
    assert ACCEPTED not in d.log_text() and not any((d.cache_dir / "ingest").iterdir())
    d2 = start_daemon(d.root, s3, config=d.root / "weightcached.toml")
    try:
        assert d2.log_text().count('"resumable_ingests": 0') == 2, d2.log_text()  # both starts: nothing to resume
        assert _names(d2) == [] and int(d2.ctl_json("stats")["bytes_downloaded"]) == 0
        no_partial_files(d2)
    finally:
        d2.stop()


def test_accepted_prefetch_is_resumed_even_before_its_first_byte(tmp_path: Path, s3, bucket: str) -> None:  # type: ignore[no-untyped-def]
    """An accepted prefetch is durable intent: its record is written before the daemon accepts
    it, so a daemon killed before a single byte arrived still completes the model after a restart."""
    import socket

    model = write_u8_model(tmp_path / "m", 2 << 20, 6)
    upload_dir(s3, bucket, "m/", model)
    total = sum(p.stat().st_size for p in model.iterdir())
    root = tmp_path / "d"
    cfg = write_config(tmp_path / "w.toml", s3, client_sources=["*"])
    # The first daemon's S3 endpoint accepts connections and never answers: the job is accepted,
    # then waits on its listing, so the kill certainly lands before any byte of the model.
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(64)
        silent = tmp_path / "silent.toml"
        silent.write_text(cfg.read_text().replace(s3.endpoint, f"http://127.0.0.1:{hole.getsockname()[1]}"))
        d = start_daemon(root, s3, config=silent)
        p = _prefetch_accepted(d, f"s3://{bucket}/m/", "m")
        assert int(d.ctl_json("stats")["bytes_downloaded"]) == 0
        _kill(d)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1 and err.startswith("cachectl prefetch: ") and "weightcached" in err, err  # it went
    records = list((d.cache_dir / "ingest").iterdir())
    assert len(records) == 1 and [f.name for f in records[0].iterdir()] == ["state.json"]  # the intent, no byte
    state = json.loads((records[0] / "state.json").read_text())
    assert (state["uri"], state["name"], state["files"]) == (f"s3://{bucket}/m/", "m", [])
    d2 = start_daemon(root, s3, config=cfg)  # the real endpoint now
    try:
        assert '"resumable_ingests": 1' in d2.log_text()
        wait_for(lambda: "m" in _names(d2), 120, "the resumed prefetch")
        view = Path(d2.ctl_json("show", "m")["manifest"]["path"])
        assert {p.name: sha256_file(p) for p in view.iterdir()} == {p.name: sha256_file(p) for p in model.iterdir()}
        assert int(d2.ctl_json("stats")["bytes_downloaded"]) == total
        no_partial_files(d2)
    finally:
        d2.stop()


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
    a = write_u8_model(tmp_path / "a", 1 << 20, 1)
    daemon.ctl("prefetch", f"file://{a}/", "--name", "a")
    write_u8_model(tmp_path / "a", 1 << 20, 2)  # new content under the same name and path
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
    a = write_u8_model(tmp_path / "models" / "a", 1 << 20, 1)
    b = write_u8_model(tmp_path / "models" / "b", 1 << 20, 2)
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
