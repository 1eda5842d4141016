"""A cold node: clients open a model while the daemon is still downloading it.

Everything here runs the real daemon on a throttled source (download.rate_limit), so the
download is still going while the clients read; nothing waits on a clock: every wait is for an
observable state, with a generous deadline.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from faultproxy import FaultProxy
from harness import Daemon, make_model, no_partial_files, s3_source, sha256_file, start_daemon, wait_for, write_config

from weightcache._fd import FdConnection
from weightcache.contract.ranges import covered
from weightcache.v1 import weightcache_pb2 as pb
from weightcache.v1 import weightcache_pb2_grpc as pb_grpc

MiB = 1 << 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~24 MiB Llama-shaped model in two shards, tensors in safetensors' own (name) order."""
    return make_model(tmp_path_factory.mktemp("cold") / "llama", tiny=False, size=24 * MiB, shards=2)


def _slow_daemon(root: Path, rate: str = "6MiB", concurrency: int = 2, **cfg: Any) -> Daemon:
    return start_daemon(root, None, download={"rate_limit": rate, "concurrency": concurrency, "part_size": "1MiB"},
                        **cfg)  # fmt: skip


def _ensure_early(d: Daemon, uri: str) -> Any:
    stub = pb_grpc.CacheStub(grpc.insecure_channel(f"unix://{d.socket_dir}/weightcache.sock"))
    return stub.Ensure(pb.EnsureRequest(model=uri, early=True), timeout=300)


def _tensor_parts(manifest: pb.Manifest, part: int) -> tuple[dict[tuple[str, int], int], dict[str, int]]:
    """(file, part index) -> the download rank of the first layer group needing a byte of it,
    and each safetensors file's data offset (its header's end). The header is written before
    the download, so a part holding it goes with the file's first tensor."""
    from weightcache_daemon.ingest.schedule import group_ranks

    group = group_ranks(list(manifest.layers))
    ranks: dict[tuple[str, int], int] = {}
    first: dict[str, tuple[int, int]] = {}  # file -> (data offset, rank of the tensor there)
    for t in manifest.tensors:
        r = group[t.layer_index]
        first[t.file] = min(first.get(t.file, (t.offset, r)), (t.offset, r))
        for i in range(t.offset // part, -(-(t.offset + t.length) // part)):
            ranks[(t.file, i)] = min(ranks.get((t.file, i), r), r)
    for file, (start, r) in first.items():
        for i in range(-(-start // part)):
            ranks[(file, i)] = min(ranks.get((file, i), r), r)
    return ranks, {f: start for f, (start, _) in first.items()}


def test_readiness_is_never_ahead_of_the_disk(tmp_path: Path, model_dir: Path, report) -> None:  # type: ignore[no-untyped-def]
    """Every range the daemon reports ready is, at that moment, byte-identical to the source
    when read through the granted descriptor; ranges only grow; the stream ends committed."""
    d = _slow_daemon(tmp_path / "d")
    try:
        call = _ensure_early(d, f"file://{model_dir}/")
        first = next(call)
        while first.WhichOneof("event") == "progress":
            first = next(call)
        assert first.manifest.early and len(first.manifest.snapshot_id) == 32
        sizes = {f.path: f.size for f in first.manifest.files}
        conn = FdConnection(d.socket_dir / "fd.sock")
        fds = {g.path: g.fd for g in conn.acquire(first.manifest.snapshot_id)}
        source = {p: (model_dir / p).read_bytes() for p in sizes}
        seen: dict[str, list[int]] = {p: [] for p in sizes}
        checked = events = 0
        ready_at_first_event = None
        final = None
        for ev in call:
            kind = ev.WhichOneof("event")
            if kind == "manifest":
                final = ev.manifest
                break
            if kind != "ready":
                continue
            events += 1
            if ready_at_first_event is None:
                ready_at_first_event = ev.ready.bytes_ready
            for f in ev.ready.files:
                ranges = list(f.ranges)
                old = seen[f.path]
                # ranges only grow: every old range lies inside a new one
                for s, e in zip(old[::2], old[1::2], strict=True):
                    assert any(ns <= s and e <= ne for ns, ne in zip(ranges[::2], ranges[1::2], strict=True))
                for s, e in zip(ranges[::2], ranges[1::2], strict=True):
                    assert 0 <= s < e <= sizes[f.path]
                    assert os.pread(fds[f.path], e - s, s) == source[f.path][s:e], f"{f.path} [{s},{e}) ahead of disk"
                    checked += e - s
                seen[f.path] = ranges
        assert final is not None and not final.early and final.snapshot_id != first.manifest.snapshot_id
        assert ready_at_first_event is not None and ready_at_first_event < sum(sizes.values())  # opened mid-download
        for p, fd in fds.items():  # the same descriptors now read the committed blobs
            assert hashlib.sha256(os.pread(fd, sizes[p], 0)).hexdigest() == sha256_file(model_dir / p)
            os.close(fd)
        conn.close()
        report("early", "a reader checks every range reported ready against the source, during a throttled "
               "download", "never ahead of the disk; ranges only grow; the same descriptors read the committed blobs",
               f"{events} readiness events, {checked / MiB:.0f} MiB re-read")  # fmt: skip
    finally:
        d.stop()


def test_download_runs_in_layer_order(tmp_path: Path, model_dir: Path) -> None:
    """One part in flight at a time: the parts arrive in layer-group order across both shards
    (small files first, then embed, layers.0, the rest (final norm, lm_head: see
    schedule.group_ranks), layers.1, layers.2, ... numerically), although the shards store
    layers in name order (layers.10 before layers.2). Every header is on disk before any of
    them: the daemon writes the headers it read for the manifest, so the part holding a header
    comes with its first tensor (lm_head's, in the second shard), not ahead of every layer."""
    d = _slow_daemon(tmp_path / "d", rate="12MiB", concurrency=1)
    try:
        call = _ensure_early(d, f"file://{model_dir}/")
        manifest = None
        arrival: list[list[int]] = []  # per readiness event: the ranks of the parts newly on disk
        have: set[tuple[str, int]] = set()
        sizes: dict[str, int] = {}
        headers_ready_before: int | None = None  # parts of tensors on disk when every header was
        for ev in call:
            kind = ev.WhichOneof("event")
            if kind == "manifest":
                if not ev.manifest.early:
                    break
                manifest = ev.manifest
                ranks, data_offset = _tensor_parts(manifest, MiB)
                sizes = {f.path: f.size for f in manifest.files}
                ready: dict[str, list[tuple[int, int]]] = {}
            elif kind == "ready":
                assert manifest is not None
                new = []
                for f in ev.ready.files:
                    ready[f.path] = r = list(zip(f.ranges[::2], f.ranges[1::2], strict=True))
                    for i in range(-(-sizes[f.path] // MiB)):
                        if (f.path, i) not in have and covered(r, i * MiB, min((i + 1) * MiB, sizes[f.path])):
                            have.add((f.path, i))
                            new.append(ranks.get((f.path, i), -1))  # -1: not safetensors (config)
                if headers_ready_before is None and all(
                    covered(ready.get(p, []), 0, n) for p, n in data_offset.items()
                ):
                    headers_ready_before = sum(1 for k in have if k in ranks)
                if new:
                    arrival.append(new)
        assert manifest is not None
        names = [t.name for t in manifest.tensors]
        assert names[0] == "model.embed_tokens.weight" and manifest.layers[:3] == ["embed", "layers.0", "layers.1"]
        assert headers_ready_before == 0, f"{headers_ready_before} weight parts on disk before every header was"
        shard1, shard2 = sorted(data_offset)
        assert ranks[(shard1, 0)] == 0 < ranks[(shard2, 0)]  # embed's part; lm_head's part, after layers.0
        flat = [r for group in arrival for r in group]
        assert len(flat) > 10
        # each event's parts come no earlier in layer order than the previous event's
        for a, b in itertools.pairwise(arrival):
            assert max(a) <= min(b), f"out of layer order: {a} then {b}"
    finally:
        d.stop()


CHILD = textwrap.dedent(
    """
    import faulthandler, hashlib, json, sys, time
    import weightcache
    from weightcache.errors import WeightcacheError
    sock, uri, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    if mode != "stop-after-first":  # a reader that hangs shows where, and ends before the test's timeout
        faulthandler.dump_traceback_later(200, exit=True)
    c = weightcache.connect(sock)
    m = c.open(uri)
    out = {"streaming": bool(m.manifest.early), "provisional": m.snapshot_id, "tensors": {}}
    print(json.dumps({"opened": True, "streaming": out["streaming"]}), flush=True)
    try:
        for la in m.layers():
            for n in la.tensors:
                out["tensors"][n] = hashlib.sha256(m.get_bytes(n)).hexdigest()
            if mode == "stop-after-first":
                print(json.dumps({"first_group": la.name}), flush=True)
                sys.stdin.read()  # the test kills us here
        m.backing.wait_complete()
        out["snapshot"] = m.snapshot_id
    except WeightcacheError as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(out), flush=True)
    """
)


def _daemon_state(d: Daemon) -> str:
    """For a failure message: the daemon's thread stacks (SIGUSR1), its asyncio tasks' await
    chains (SIGUSR2) and the end of its log, to show which side a reader that never finished
    was waiting on."""
    for sig, mark in ((signal.SIGUSR1, "most recent call first"), (signal.SIGUSR2, "asyncio tasks (")):
        if d.proc.poll() is not None:
            break
        d.proc.send_signal(sig)
        try:
            wait_for(lambda mark=mark: mark in d.log_text(), 30, "the daemon's dump")
        except AssertionError:
            pass  # the log as it is says something still
    return "daemon log (end):\n" + d.log_text()[-30000:]


def _spawn(d: Daemon, uri: str, mode: str = "all") -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(d.socket_dir), uri, mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.PIPE, text=True)  # fmt: skip


def _assert_cached_as(model_dir: Path, d: Daemon) -> None:
    """Model "llama" is in the store, every file byte-identical to the source."""
    view = Path(d.ctl_json("show", "llama")["manifest"]["path"])
    assert {p.name: sha256_file(p) for p in view.iterdir()} == {p.name: sha256_file(p) for p in model_dir.iterdir()}


def _expected_tensors(model_dir: Path) -> dict[str, str]:
    out = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        raw = shard.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + n])
        for name, t in header.items():
            if name != "__metadata__":
                s, e = t["data_offsets"]
                out[name] = hashlib.sha256(raw[8 + n + s : 8 + n + e]).hexdigest()
    return out


def test_sixteen_processes_read_one_early_download(tmp_path: Path, model_dir: Path, report) -> None:  # type: ignore[no-untyped-def]
    d = _slow_daemon(tmp_path / "d", rate="16MiB")
    uri = f"file://{model_dir}/"
    try:
        kids = [_spawn(d, uri) for _ in range(16)]
        results = []
        for k in kids:
            out, err = k.communicate(timeout=300)
            assert k.returncode == 0, f"{err}\n{_daemon_state(d)}"
            results.append(json.loads(out.strip().splitlines()[-1]))
        expected = _expected_tensors(model_dir)
        assert all("error" not in r for r in results), [r.get("error") for r in results]
        assert all(r["tensors"] == expected for r in results)
        streaming = sum(r["streaming"] for r in results)
        assert streaming >= 1  # the first opener at least found the model downloading
        snapshots = {r["snapshot"] for r in results}
        assert len(snapshots) == 1
        size = sum(p.stat().st_size for p in model_dir.iterdir())
        stats = d.ctl_json("stats")
        assert int(stats["bytes_downloaded"]) == size  # one download, shared
        assert [m["name"] for m in d.ctl_json("ls")] == ["llama"]
        no_partial_files(d)
        report("early", "16 processes open one cold model at once and read every tensor while it downloads",
               "one download shared; every tensor byte-identical; one committed snapshot",
               f"{streaming}/16 opened it streaming; {size / MiB:.0f} MiB downloaded once")  # fmt: skip
    finally:
        d.stop()


def test_usr2_shows_where_each_stream_waits(tmp_path: Path, model_dir: Path) -> None:
    """`kill -USR2` logs every asyncio task's await chain. A streaming Ensure is a handler
    inside async generators (fetch, then _stream_job): the dump must reach _stream_job, which a
    thread dump (USR1) cannot show."""
    import weightcache

    d = _slow_daemon(tmp_path / "d", rate="1MiB")
    try:
        with weightcache.connect(d.socket_dir) as c, c.open(f"file://{model_dir}/") as m:
            assert m.manifest.early

            def dump_shows_the_stream() -> bool:
                # A dump taken while the handler sends a message ends in gRPC's write instead:
                # ask again until one catches the stream at rest, where it spends its time.
                n = d.log_text().count("asyncio tasks (")
                d.proc.send_signal(signal.SIGUSR2)
                wait_for(lambda: d.log_text().count("asyncio tasks (") > n, 30, "a task dump")
                return "in Core._stream_job" in d.log_text()

            wait_for(dump_shows_the_stream, 120, "a task dump that shows the stream waiting in _stream_job")
            assert "in Core.fetch" in d.log_text() and not m.backing.complete()  # the download still runs
            assert d.proc.poll() is None  # and the daemon goes on
    finally:
        d.stop()


def test_an_early_client_killed_mid_download_leaves_the_download_going(tmp_path: Path, model_dir: Path) -> None:
    d = _slow_daemon(tmp_path / "d", rate="8MiB")
    uri = f"file://{model_dir}/"
    try:
        k = _spawn(d, uri, "stop-after-first")
        assert k.stdout is not None
        assert json.loads(k.stdout.readline())["streaming"]
        assert "first_group" in json.loads(k.stdout.readline())
        k.kill()
        k.wait(timeout=60)
        wait_for(lambda: [m["name"] for m in d.ctl_json("ls")] == ["llama"], 300, "the download to commit")
        _assert_cached_as(model_dir, d)
        no_partial_files(d)
    finally:
        d.stop()


def test_daemon_killed_mid_download_fails_early_clients_resumes(tmp_path: Path, model_dir: Path, report) -> None:  # type: ignore[no-untyped-def]
    d = _slow_daemon(tmp_path / "d", rate="4MiB")
    uri = f"file://{model_dir}/"
    kids = [_spawn(d, uri) for _ in range(3)]
    for k in kids:
        assert k.stdout is not None
        assert json.loads(k.stdout.readline())["opened"]
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(timeout=60)
    killed = time.monotonic()
    errors = []
    for k in kids:
        out, err = k.communicate(timeout=120)  # a hang would fail here, not pass
        assert k.returncode == 0, err
        errors.append(json.loads(out.strip().splitlines()[-1]).get("error", ""))
    took = time.monotonic() - killed
    assert all(e.startswith("DaemonUnavailableError") and "llama" in e for e in errors), errors
    d2 = start_daemon(d.root, None, config=d.root / "weightcached.toml")  # resumes the download by itself
    try:
        wait_for(lambda: [m["name"] for m in d2.ctl_json("ls")] == ["llama"], 300, "the resumed download")
        _assert_cached_as(model_dir, d2)
        no_partial_files(d2)
        report("early", "daemon SIGKILLed while 3 clients stream a cold model",
               "each client: DaemonUnavailableError naming the model, no hang; restart completes it byte-identical",
               f"all 3 errors within {took:.1f} s of the kill")  # fmt: skip
    finally:
        d2.stop()


def test_from_pretrained_on_a_cold_node_starts_before_the_download_ends(tmp_path: Path) -> None:
    """weightcache.transformers.from_pretrained (just in time) of a model the node has never
    seen: it returns once the config and the embeddings are on disk, not after the download;
    its logits equal transformers' own, and its private copy of the small files goes with it."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from weightcache.transformers import _EarlyFiles, from_pretrained

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=2048, hidden_size=128, intermediate_size=512, num_hidden_layers=6,
                                   num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    directory = tmp_path / "hf"
    transformers.LlamaForCausalLM(cfg).save_pretrained(directory, safe_serialization=True)
    ids = torch.tensor([[1, 5, 7, 2, 9, 30, 4]])
    with torch.no_grad():
        expected = transformers.AutoModelForCausalLM.from_pretrained(str(directory))(input_ids=ids).logits
    size = sum(p.stat().st_size for p in directory.iterdir())
    # About 16 s of download: the first layers are there within a few seconds, the rest is not.
    d = _slow_daemon(tmp_path / "d", rate=str(max(size // 16, 1 << 20)))
    try:
        lm = from_pretrained(f"file://{directory}/", socket_dir=d.socket_dir, just_in_time=True)
        try:
            assert lm.handle.manifest.early and not lm.handle.complete(), (
                "from_pretrained waited for the whole download"
            )
            early = next(p for p in lm._owned if isinstance(p, _EarlyFiles)).path
            assert os.path.isfile(os.path.join(early, "config.json"))
            with torch.no_grad():
                got = lm.model(input_ids=ids).logits
            assert lm.handle.complete()  # the last layer group waited for the verified snapshot
            assert torch.equal(got, expected)
        finally:
            lm.close()
        assert not os.path.exists(early)
    finally:
        d.stop()


def test_capacity_is_admitted_before_the_first_byte(tmp_path: Path, model_dir: Path) -> None:
    d = _slow_daemon(tmp_path / "d", max_size="8MiB")
    try:
        import weightcache
        from weightcache.errors import ExhaustedError

        with weightcache.connect(d.socket_dir) as c, pytest.raises(ExhaustedError):
            c.open(f"file://{model_dir}/")
        assert int(d.ctl_json("stats")["bytes_downloaded"]) == 0
        no_partial_files(d)
    finally:
        d.stop()


@pytest.fixture
def proxy(s3: Any) -> Any:
    p = FaultProxy(int(s3.endpoint.rsplit(":", 1)[1])).start()
    yield p
    p.stop()


@pytest.mark.parametrize("checksums", [True, False], ids=["source-sha256", "no-checksum"])
def test_a_byte_flipped_in_transit_fails_every_reader_and_publishes_nothing(  # type: ignore[no-untyped-def]
    tmp_path: Path, s3, bucket: str, model_dir: Path, proxy: FaultProxy, report, checksums: bool
) -> None:
    """With SHA256 checksums (as `aws s3 cp --checksum-algorithm SHA256` uploads), the hash
    catches the flips. Without, a flipped byte inside a file's header (the 101st byte of the
    response for its first part) does: the header read before the download was valid, so the
    file is corrupted, not malformed."""
    import weightcache
    from weightcache.errors import CorruptedError

    c3 = s3.client()
    extra = {"ChecksumAlgorithm": "SHA256"} if checksums else {}
    for p in sorted(model_dir.iterdir()):
        c3.put_object(Bucket=bucket, Key=f"llama/{p.name}", Body=p.read_bytes(), **extra)
    root = tmp_path / "d"
    root.mkdir()
    cfg = write_config(root / "w.toml", None, client_sources=["*"],
                       download={"concurrency": 2, "part_size": "1MiB", "rate_limit": "6MiB"},
                       sources=[s3_source(s3, endpoint_url=f"http://127.0.0.1:{proxy.port}")])  # fmt: skip
    d = start_daemon(root, s3, config=cfg)
    try:
        with weightcache.connect(d.socket_dir) as c:
            m = c.open(f"s3://{bucket}/llama/")
            assert m.manifest.early
            proxy.set(corrupt=True, times=10_000)  # every object read from now on has one byte flipped
            groups = [la.name for la in m.layers()]
            delivered = []
            with pytest.raises(CorruptedError) as info:
                for name, _tensors in m.stream(copy=False):
                    delivered.append(name)
            assert len(delivered) < len(groups)  # the final group never came
            assert "llama" in str(info.value)
            with pytest.raises(CorruptedError):  # and every later call on the handle says so
                m.get_tensor(m.keys()[0])
            m.close()
        proxy.clear()
        wait_for(lambda: not d.ctl_json("ls", "--downloads"), 120, "the failed download to end")
        assert d.ctl_json("ls") == [] and int(d.ctl_json("stats")["blobs"]) == 0  # nothing published
        no_partial_files(d)
        assert "early_readers_failed" in d.log_text()
        report("early", f"a byte flipped in transit while a client streams the model ({'' if checksums else 'no '}"
               "source checksum)",
               "CorruptedError at the client's next call; the final group never delivered; nothing published",
               f"{len(delivered)} of {len(groups)} groups delivered")  # fmt: skip
    finally:
        d.stop()


def test_a_file_changed_at_the_source_mid_download_fails_its_early_readers(tmp_path: Path, model_dir: Path) -> None:
    """The engine restarts a file whose source changed: what the readers were told of the old
    version is void, so they get CorruptedError (never a final group), while the download goes on
    and commits the new version."""
    import shutil

    import weightcache
    from weightcache.errors import CorruptedError

    src = tmp_path / "llama"
    shutil.copytree(model_dir, src)
    newer = make_model(tmp_path / "newer", tiny=False, size=24 * MiB, shards=2, seed=1)  # same shapes, other bytes
    shard = "model-00001-of-00002.safetensors"
    d = _slow_daemon(tmp_path / "d", rate="6MiB")
    try:
        with weightcache.connect(d.socket_dir) as c:
            m = c.open(f"file://{src}/")
            assert m.manifest.early
            shutil.copy(newer / shard, src / (shard + ".new"))
            os.replace(src / (shard + ".new"), src / shard)  # published as a new version
            delivered = []
            with pytest.raises(CorruptedError) as info:
                for name, _ in m.stream(copy=False):
                    delivered.append(name)
            assert "changed at the source" in str(info.value) and "llama" in str(info.value)
            assert len(delivered) < len(m.layers())
            m.close()
        wait_for(lambda: [x["name"] for x in d.ctl_json("ls")] == ["llama"], 300, "the new version to commit")
        view = Path(d.ctl_json("show", "llama")["manifest"]["path"])
        assert sha256_file(view / shard) == sha256_file(newer / shard)
        no_partial_files(d)
    finally:
        d.stop()
