"""Client library: zero-copy tensors, copy-on-write isolation, shared pages, streaming, fallback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from harness import Daemon, make_model, sha256_file, wait_for

torch = pytest.importorskip("torch")
from safetensors.torch import load_file, save_file  # noqa: E402

import weightcache  # noqa: E402
from weightcache import InvalidInputError, NotFoundError  # noqa: E402

ALL_DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.uint16,
    torch.int32,
    torch.uint32,
    torch.int64,
    torch.uint64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]


def _dtype_model(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    for i, dt in enumerate(ALL_DTYPES):
        base = torch.randn(3, 5, generator=g) * 10
        tensors[f"model.layers.{i}.w"] = base.to(dt)
        tensors[f"model.layers.{i}.scalar"] = torch.tensor(7, dtype=torch.int64).to(dt)
        tensors[f"model.layers.{i}.empty"] = torch.zeros(0, 4).to(dt)
    tensors["model.embed_tokens.weight"] = torch.randn(8, 4, generator=g).to(torch.bfloat16)
    tensors["lm_head.weight"] = torch.randn(8, 4, generator=g)
    half = len(tensors) // 2
    items = list(tensors.items())
    save_file(dict(items[:half]), str(directory / "model-00001-of-00002.safetensors"))
    save_file(dict(items[half:]), str(directory / "model-00002-of-00002.safetensors"))
    (directory / "config.json").write_text("{}")
    return directory


def _reference(directory: Path) -> dict[str, torch.Tensor]:
    ref: dict[str, torch.Tensor] = {}
    for p in sorted(directory.glob("*.safetensors")):
        ref.update(load_file(str(p)))
    return ref


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return bool(torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


@pytest.fixture
def dtype_model(tmp_path: Path) -> Path:
    return _dtype_model(tmp_path / "dtypes")


@pytest.fixture
def opened(daemon: Daemon, dtype_model: Path):  # type: ignore[no-untyped-def]
    client = weightcache.connect(daemon.socket_dir)
    model = client.open(f"file://{dtype_model}/", name="dtypes")
    yield model
    model.close()
    client.close()


def test_every_dtype_equals_safetensors(opened, dtype_model: Path) -> None:  # type: ignore[no-untyped-def]
    ref = _reference(dtype_model)
    sd = opened.state_dict()
    assert set(sd) == set(ref) and opened.zero_copy
    for name, t in ref.items():
        assert _same(sd[name], t), name
        assert _same(opened.get_tensor(name), t), name
    assert sd["model.layers.0.scalar"].dim() == 0
    for reuse in (False, True):  # mixed dtypes and odd byte lengths packed into one ring slot
        for _, tensors in opened.stream("cpu", prefetch=1, reuse=reuse):
            for name, t in tensors.items():
                assert _same(t, ref[name]), (reuse, name)
    names = list(sd)
    assert names[0] == "model.embed_tokens.weight" and names[-1] == "lm_head.weight"


def test_get_slice_and_meta(opened) -> None:  # type: ignore[no-untyped-def]
    s = opened.get_slice("model.layers.11.w")
    assert s.get_shape() == [3, 5] and s.get_dtype() == "F32"
    assert torch.equal(s[1:2], opened.get_tensor("model.layers.11.w")[1:2])
    with pytest.raises(NotFoundError, match="tensor 'nope' is not in model dtypes"):
        opened.get_tensor("nope")


def test_fallback_equals_descriptor_path(daemon: Daemon, dtype_model: Path, tmp_path: Path) -> None:
    with weightcache.connect(daemon.socket_dir) as c:
        with c.open(f"file://{dtype_model}/", name="dtypes") as fast, c.open("dtypes", fallback=True) as slow:
            assert not slow.zero_copy
            for name in fast.keys():
                assert _same(fast.get_tensor(name), slow.get_tensor(name)), name
            for (g1, t1), (g2, t2) in zip(fast.stream("cpu"), slow.stream("cpu"), strict=True):
                assert g1 == g2 and all(_same(t1[k], t2[k]) for k in t1)
    # a socket directory without fd.sock (a container that cannot receive descriptors)
    only_grpc = tmp_path / "only-grpc"
    only_grpc.mkdir()
    os.symlink(daemon.socket_dir / "weightcache.sock", only_grpc / "weightcache.sock")
    with weightcache.connect(only_grpc) as c, c.open("dtypes") as m:
        assert not m.zero_copy and _same(m.get_tensor("lm_head.weight"), _reference(dtype_model)["lm_head.weight"])


def test_write_to_tensor_stays_in_process(daemon: Daemon, tiny_model: Path) -> None:
    with weightcache.connect(daemon.socket_dir) as c, c.open(f"file://{tiny_model}/", name="tiny") as m:
        blob = Path(m.path) / m.meta("lm_head.weight").file
        before = sha256_file(blob)
        t = m.get_tensor("lm_head.weight")
        original = t.clone()
        t.fill_(1.0)
        assert torch.all(t == 1.0)
        assert sha256_file(blob) == before
        code = textwrap.dedent(f"""
            import sys, weightcache, torch
            with weightcache.connect({str(daemon.socket_dir)!r}) as c, c.open("tiny") as m:
                t = m.get_tensor("lm_head.weight")
                torch.save(t.clone(), sys.argv[1])
        """)
        out = daemon.root / "other.pt"
        subprocess.run([sys.executable, "-c", code, str(out)], check=True)
        assert torch.equal(torch.load(out), original)


def _blob_rss_pss(pid: int) -> tuple[int, int]:
    """Resident and proportional bytes of the blobs a process maps. A mapping is named by the
    path its descriptor was opened through: the daemon's read-only view of the store, whose
    root is its own (/blobs/sha256/...), or the store's path when it has no view."""
    rss = pss = 0
    current = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        parts = line.split()
        if "-" in parts[0] and len(parts) >= 5:
            current = len(parts) >= 6 and "/blobs/sha256/" in parts[5]
        elif current and parts[0] == "Rss:":
            rss += int(parts[1])
        elif current and parts[0] == "Pss:":
            pss += int(parts[1])
    return rss * 1024, pss * 1024


def test_two_processes_share_pages(daemon: Daemon, tmp_path: Path) -> None:
    model = make_model(tmp_path / "m", tiny=False, size=48 << 20)
    snap = daemon.ctl_json("prefetch", f"file://{model}/", "--name", "shared")["snapshot_id"]
    code = textwrap.dedent(f"""
        import sys, time, weightcache, torch
        with weightcache.connect({str(daemon.socket_dir)!r}) as c, c.open("shared") as m:
            total = sum(float(t.float().sum()) for t in m.state_dict().values())  # touch every page
            print("ready", flush=True)
            sys.stdin.readline()
    """)
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        size = sum(int(f["size"]) for f in daemon.ctl_json("show", snap)["manifest"]["files"])
        for p in procs:
            rss, pss = _blob_rss_pss(p.pid)
            assert rss > 0.9 * size * 0.99, (rss, size)  # each maps (nearly) the whole model
            assert pss < 0.6 * rss, (rss, pss)  # ...but owns only half of it: the pages are shared
    finally:
        for p in procs:
            p.communicate("\n", timeout=30)


def _resident(path: Path) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", str(path)],
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    return int(out.strip() or 0)


def _evict_after_open(blobs: list[Path], at_most: int) -> None:
    """Drop the blobs from the page cache until at most ``at_most`` bytes of them stay, once the
    background hint of the open() that found them is done (pages under read are not dropped);
    skip the test where the filesystem keeps its pages (tmpfs)."""
    wait_for(lambda: not any(t.name == "wc-hint" for t in threading.enumerate()), 60, "the first hint")

    def evicted() -> bool:
        for blob in blobs:
            fd = os.open(blob, os.O_RDONLY)
            try:
                os.fdatasync(fd)  # dirty pages are not dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return sum(_resident(b) for b in blobs) <= at_most

    deadline = time.monotonic() + 30
    while not evicted():
        if time.monotonic() > deadline:
            pytest.skip(f"{blobs[0].parent}'s filesystem keeps its pages (tmpfs?): nothing to observe")
        time.sleep(0.05)


@pytest.mark.skipif(shutil.which("fincore") is None, reason="needs fincore (util-linux) to see the page cache")
def test_open_starts_reading_the_first_layer_group(daemon: Daemon, tmp_path: Path) -> None:
    model = make_model(tmp_path / "m", tiny=False, size=48 << 20)
    daemon.ctl("prefetch", f"file://{model}/", "--name", "cold")
    with weightcache.connect(daemon.socket_dir) as c:
        with c.open("cold") as m:
            first = [m.meta(n) for n in m.layers()[0].tensors]
            blob = (Path(m.store_path) / first[0].file).resolve()
        want = sum(t.length for t in first if t.file == first[0].file)
        # That open() hinted the group too, from a background thread: it must be done, and the
        # reads it queued evicted, before the real check.
        _evict_after_open([blob], want // 4)
        with c.open("cold"):
            # Nothing touches a tensor: the first group's pages arrive because open() asked for them.
            try:
                wait_for(lambda: _resident(blob) >= want, 60, f"the first layer group's {want} bytes in the page cache")
            except AssertionError as exc:
                hints = [t.name for t in threading.enumerate() if t.name == "wc-hint"]
                raise AssertionError(f"{exc}: {_resident(blob)} resident; hint threads alive: {hints}") from None


@pytest.mark.skipif(shutil.which("fincore") is None, reason="needs fincore (util-linux) to see the page cache")
def test_stream_views_are_faulted_in_before_they_are_handed_over(daemon: Daemon, tmp_path: Path) -> None:
    """stream(copy=False) brings each group's pages in before handing the group over, so the
    consumer computes on resident pages rather than faulting them in one small read at a time."""
    from weightcache._backing import _resident as mapped_resident

    model = make_model(tmp_path / "m", tiny=False, size=48 << 20)
    daemon.ctl("prefetch", f"file://{model}/", "--name", "cold")
    with weightcache.connect(daemon.socket_dir) as c:
        with c.open("cold") as m:
            blobs = sorted({(Path(m.store_path) / f.path).resolve() for f in m.manifest.files})
        _evict_after_open(blobs, (48 << 20) // 8)
        with c.open("cold") as m:
            stream = m.stream("cpu", prefetch=1, copy=False)
            groups = [next(stream), next(stream)]  # open() itself hints the first group only
            for _, tensors in groups:
                for name, t in tensors.items():
                    n = t.numel() * t.element_size()
                    assert n == 0 or mapped_resident(t.data_ptr(), n), f"{name} handed over before its pages were in"
            stream.close()


def test_stream_order_and_prefetch_bound(daemon: Daemon, tiny_model: Path) -> None:
    ref = _reference(tiny_model)
    with weightcache.connect(daemon.socket_dir) as c, c.open(f"file://{tiny_model}/", name="tiny") as m:
        s = m.stream("cpu", prefetch=1)
        names = []
        for group, tensors in s:
            time.sleep(0.05)  # a slow consumer: the reader must not run ahead
            assert s.groups_read - s.groups_yielded <= 1
            names.append(group)
            for k, v in tensors.items():
                assert _same(v, ref[k])
                assert v.data_ptr() != m.get_tensor(k).data_ptr()  # fresh memory
        assert names == ["embed", "layers.0", "layers.1", "rest"]
        assert s.max_ahead <= 1
        s2 = m.stream("cpu", prefetch=3, copy=False)
        assert [g for g, _ in s2] == names
        # reuse=True: views into a ring of prefetch+1 buffers, each group valid until the next step
        for group, tensors in m.stream("cpu", prefetch=1, reuse=True):
            for k, v in tensors.items():
                assert _same(v, ref[k]), (group, k)
        # a custom grouping: one group per tensor kind
        custom = [g for g, _ in m.stream("cpu", layer_of=lambda n: "norms" if "norm" in n else "weights")]
        assert custom == ["norms", "weights"]
        with pytest.raises(InvalidInputError):
            m.stream("cpu", prefetch=0)


def test_stream_stops_early_without_leaking(daemon: Daemon, tiny_model: Path) -> None:
    import threading

    with weightcache.connect(daemon.socket_dir) as c, c.open(f"file://{tiny_model}/", name="tiny") as m:
        before = threading.active_count()
        s = m.stream("cpu", prefetch=2)
        next(s)
        s.close()
        assert threading.active_count() <= before


def test_load_into_module_strict_and_not(daemon: Daemon, tiny_model: Path) -> None:
    from llama import TinyLlama

    from weightcache.nn import load_into

    ref = _reference(tiny_model)
    with weightcache.connect(daemon.socket_dir) as c, c.open(f"file://{tiny_model}/", name="tiny") as m:
        module = TinyLlama()
        assert load_into(module, m) == ([], [])
        for k, v in module.state_dict().items():
            assert _same(v, ref[k])
        extra = TinyLlama()
        extra.register_parameter("bonus", torch.nn.Parameter(torch.zeros(1)))
        with pytest.raises(InvalidInputError, match="missing from model tiny: bonus"):
            load_into(extra, m)
        assert load_into(extra, m, strict=False) == (["bonus"], [])
        small = TinyLlama(layers=1)
        with pytest.raises(InvalidInputError, match=r"not in the module: model\.layers\.1\."):
            load_into(small, m)
        wrong = TinyLlama(vocab=31)
        with pytest.raises(
            InvalidInputError,
            match=r"tensor model.embed_tokens.weight: the model has shape \[32, 16\] but the module expects \[31, 16\]",
        ):
            load_into(wrong, m, strict=False)


def test_load_into_meta_module_assigns(daemon: Daemon, tiny_model: Path) -> None:
    from llama import TinyLlama

    from weightcache.nn import load_into

    ref = _reference(tiny_model)
    with weightcache.connect(daemon.socket_dir) as c, c.open(f"file://{tiny_model}/", name="tiny") as m:
        with torch.device("meta"):
            module = TinyLlama()
        assert load_into(module, m) == ([], [])  # assigned, like load_state_dict(assign=True)
        for k, v in module.state_dict().items():
            assert _same(v, ref[k]), k
        assert isinstance(module.lm_head.weight, torch.nn.Parameter) and module.lm_head.weight.requires_grad
        assert module.lm_head.weight.data_ptr() == m.get_tensor("lm_head.weight").data_ptr()  # zero-copy
        with torch.device("meta"):
            wider = TinyLlama(dtype=torch.float32)
        load_into(wider, m)  # the module's dtype wins (a cast, so a copy)
        assert wider.lm_head.weight.dtype == torch.float32
        assert torch.equal(wider.lm_head.weight, ref["lm_head.weight"].float())
        with torch.device("meta"):
            streamed = TinyLlama()
        load_into(streamed, m, device="cpu")  # streamed: fresh tensors, assigned
        assert _same(streamed.lm_head.weight.detach(), ref["lm_head.weight"])
        assert streamed.lm_head.weight.data_ptr() != m.get_tensor("lm_head.weight").data_ptr()
        with torch.device("meta"):
            extra = TinyLlama()
            extra.register_parameter("bonus", torch.nn.Parameter(torch.zeros(1)))
        assert load_into(extra, m, strict=False) == (["bonus"], [])
        assert extra.bonus.is_meta and not extra.lm_head.weight.is_meta


def test_path_with_and_without_descriptors(daemon: Daemon, tiny_model: Path) -> None:
    with weightcache.connect(daemon.socket_dir) as c:
        with c.open(f"file://{tiny_model}/", name="tiny") as fast, c.open("tiny", fallback=True) as slow:
            assert Path(fast.store_path).is_dir() and fast.path != fast.store_path
            assert fast.path == fast.path  # built once
            for f in fast.files:
                assert sha256_file(Path(fast.path) / f.path) == f.sha256, f.path
            assert slow.path == slow.store_path  # no descriptors: the store's view, where it is visible
            pid = os.fork()
            if pid == 0:  # a forked worker closing its copy of the handle leaves the parent's path alone
                try:
                    fast.close()
                finally:
                    os._exit(0)
            os.waitpid(pid, 0)
            assert (Path(fast.path) / "config.json").is_file()


def test_just_in_time_equals_eager(daemon: Daemon, tiny_model: Path) -> None:
    from llama import TinyLlama

    from weightcache.nn import load_into, materialize_just_in_time

    tokens = torch.tensor([[1, 5, 7, 2, 9, 30]])
    with weightcache.connect(daemon.socket_dir) as c, c.open(f"file://{tiny_model}/", name="tiny") as m:
        eager = TinyLlama()
        load_into(eager, m)
        expected = eager(tokens)
        with torch.device("meta"):
            lazy = TinyLlama()
        assert lazy.lm_head.weight.is_meta
        jit = materialize_just_in_time(lazy, m, "cpu", prefetch=1)
        got = lazy(tokens)
        assert not any(p.is_meta for p in lazy.parameters())
        assert torch.equal(got, expected)
        assert jit._handles == []  # hooks removed once every layer arrived
        assert torch.equal(lazy(tokens), expected)  # and the second pass is plain
        # On CPU the weights are the shared pages themselves; copy=True makes private copies.
        name = "model.layers.0.mlp.up_proj.weight"
        assert lazy.get_parameter(name).data_ptr() == m.get_tensor(name).data_ptr()
        with torch.device("meta"):
            private = TinyLlama()
        materialize_just_in_time(private, m, "cpu", copy=True).finish()
        assert private.get_parameter(name).data_ptr() != m.get_tensor(name).data_ptr()
        assert torch.equal(private(tokens), expected)


def test_open_errors_come_back_as_categories(daemon: Daemon) -> None:
    with weightcache.connect(daemon.socket_dir) as c:
        with pytest.raises(NotFoundError, match="model 'missing' is not in the cache"):
            c.open("missing")
        with pytest.raises(InvalidInputError, match="unsupported scheme"):
            c.open("gopher://x/y")
    # "no daemon" is one category everywhere, whichever step finds it
    from weightcache import DaemonUnavailableError

    with pytest.raises(DaemonUnavailableError, match="does not exist: is weightcached running"):
        weightcache.connect(daemon.root / "nowhere")
    daemon.stop(9)  # sockets left behind, nobody listening
    with pytest.raises(DaemonUnavailableError):
        with weightcache.connect(daemon.socket_dir) as c:
            c.open("missing")


def test_read_range_of_a_layer(daemon: Daemon, tiny_model: Path) -> None:
    """The wire's layer ranges, through a plain gRPC stub (the client's API is whole files)."""
    import grpc

    from weightcache.errors import from_rpc_error
    from weightcache.v1 import weightcache_pb2 as pb
    from weightcache.v1 import weightcache_pb2_grpc as pb_grpc

    ref = _reference(tiny_model)
    with weightcache.connect(daemon.socket_dir) as c:
        man = c.ensure(f"file://{tiny_model}/", name="tiny")
    assert len(man.tensors) == 21 and list(man.layers) == ["embed", "layers.0", "layers.1", "rest"]
    with grpc.insecure_channel(f"unix://{daemon.socket_dir / 'weightcache.sock'}") as channel:
        stub = pb_grpc.CacheStub(channel)
        req = pb.ReadRangeRequest(snapshot_id=man.snapshot_id, layers=pb.LayerRange(first=1, last=1), chunk_size=64)
        got: dict[str, bytearray] = {}
        for ch in stub.ReadRange(req):
            got.setdefault(ch.tensor, bytearray()).extend(ch.data)
            assert len(ch.data) <= 64
        assert set(got) == {t.name for t in man.tensors if t.layer == "layers.0"}
        for name, data in got.items():
            assert bytes(data) == ref[name].reshape(-1).view(torch.uint8).numpy().tobytes()
        with pytest.raises(grpc.RpcError) as caught:
            list(
                stub.ReadRange(pb.ReadRangeRequest(snapshot_id=man.snapshot_id, layers=pb.LayerRange(first=2, last=9)))
            )
        err = from_rpc_error(caught.value)
        assert isinstance(err, InvalidInputError) and "layer range 2..9 is outside" in str(err)


def test_progress_reaches_the_client(daemon_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model = make_model(tmp_path / "m", tiny=False, size=6 << 20)
    d = daemon_factory(download={"rate_limit": 64 << 20})
    events = []
    with weightcache.connect(d.socket_dir) as c:
        man = c.ensure(f"file://{model}/", name="m", progress=events.append)
    total = sum(f.size for f in man.files)
    assert events and all(isinstance(e, weightcache.Progress) for e in events)
    assert {e.phase for e in events} <= set(weightcache.Progress.PHASES)
    sized = [e for e in events if e.phase != "listing"]
    assert sized and all(e.bytes_total == total for e in sized)
    assert max(e.bytes_done for e in events) > 0


@pytest.mark.cuda
def test_stream_to_cuda_equals_cpu(daemon: Daemon, tiny_model: Path) -> None:
    ref = _reference(tiny_model)
    with weightcache.connect(daemon.socket_dir) as c, c.open(f"file://{tiny_model}/", name="tiny") as m:
        for _, tensors in m.stream("cuda", prefetch=2):
            for k, v in tensors.items():
                assert v.is_cuda and _same(v.cpu(), ref[k])


@pytest.mark.cuda
def test_just_in_time_on_cuda_equals_eager(daemon: Daemon, tiny_model: Path) -> None:
    from llama import TinyLlama

    from weightcache.nn import load_into, materialize_just_in_time

    tokens = torch.tensor([[1, 5, 7, 2]], device="cuda")
    with weightcache.connect(daemon.socket_dir) as c, c.open(f"file://{tiny_model}/", name="tiny") as m:
        eager = TinyLlama().cuda()
        load_into(eager, m)
        with torch.device("meta"):
            lazy = TinyLlama()
        materialize_just_in_time(lazy, m, "cuda", prefetch=1)
        assert torch.equal(lazy(tokens), eager(tokens))


# ---------------------------------------------------------------- records, backings, resolver, bar


def test_ensure_list_and_open_return_the_packages_records(daemon: Daemon, tiny_model: Path) -> None:
    import dataclasses

    from google.protobuf.message import Message

    ref = _reference(tiny_model)
    with weightcache.connect(daemon.socket_dir) as c:
        man = c.ensure(f"file://{tiny_model}/", name="tiny")
        assert isinstance(man, weightcache.Manifest) and not isinstance(man, Message)
        assert man.name == "tiny" and man.source == f"file://{tiny_model}/" and len(man.snapshot_id) >= 16
        with pytest.raises(dataclasses.FrozenInstanceError):
            man.name = "other"  # type: ignore[misc]
        assert all(isinstance(f, weightcache.FileInfo) for f in man.files)
        assert sorted(f.path for f in man.files) == sorted(p.name for p in tiny_model.iterdir())
        assert {t.name for t in man.tensors} == set(ref)
        for t in man.tensors:
            assert isinstance(t, weightcache.TensorMeta) and isinstance(t.shape, tuple)
            assert t.shape == tuple(ref[t.name].shape) and t.length == ref[t.name].nbytes
        assert man.layers == ("embed", "layers.0", "layers.1", "rest")
        assert c.ensure("tiny") == man and hash(c.ensure(man.snapshot_id).files) == hash(man.files)
        with c.open("tiny") as m:
            assert m.manifest == man and m.files == list(man.files)
            [info] = [i for i in c.list() if i.name == "tiny"]
            assert isinstance(info, weightcache.ModelInfo) and not isinstance(info, Message)
            assert info.snapshot_id == man.snapshot_id and info.source == man.source
            assert info.size == sum(f.size for f in man.files) and info.file_count == len(man.files)
            # (the client API does not show other processes' leases; cachectl ls does)
            assert isinstance(info.leases, tuple) and all(isinstance(le, weightcache.Lease) for le in info.leases)


def _gated_backing(inner: weightcache.Backing):  # type: ignore[no-untyped-def]
    """A third backing, defined outside the package, whose bytes are not ready until the test
    opens a gate: the shape of a file still being written."""
    import threading

    class Gated:
        zero_copy = False

        def __init__(self) -> None:
            self.gate = threading.Event()
            self.waiting = threading.Event()

        def ready(self, file: str, offset: int, length: int) -> bool:
            return self.gate.is_set()

        def wait_ready(self, file: str, offset: int, length: int, timeout: float | None = None) -> bool:
            self.waiting.set()
            return self.gate.wait(timeout)

        def complete(self) -> bool:
            return self.gate.is_set()

        def wait_complete(self, timeout: float | None = None) -> bool:
            return self.gate.wait(timeout)

        def read_into(self, file: str, offset: int, dest: memoryview) -> None:
            self.wait_ready(file, offset, len(dest))
            inner.read_into(file, offset, dest)

        def view(self, file: str, offset: int, length: int) -> memoryview:
            self.wait_ready(file, offset, length)
            return inner.view(file, offset, length)

        def advise(self, file: str, offset: int, length: int) -> None:
            inner.advise(file, offset, length)

        def descriptors(self) -> None:
            return None

        def close(self) -> None:
            inner.close()

    return Gated()


def test_every_backing_gives_the_same_tensors(daemon: Daemon, dtype_model: Path) -> None:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from weightcache import Backing, CorruptedError, Model
    from weightcache._backing import FetchedFiles, MappedFiles
    from weightcache._fd import FdConnection

    ref = _reference(dtype_model)
    with weightcache.connect(daemon.socket_dir) as c:
        man = c.ensure(f"file://{dtype_model}/", name="dtypes")
        fetches: list[str] = []
        lock = threading.Lock()

        def fetch(path: str, buf: bytearray) -> None:
            with lock:
                fetches.append(path)
            c.read_file_into(man.snapshot_id, path, buf)

        mapped = MappedFiles(FdConnection(daemon.socket_dir / "fd.sock"), man.snapshot_id)
        fetched = FetchedFiles(man.snapshot_id, man.files, fetch)
        assert isinstance(mapped, Backing) and isinstance(fetched, Backing)
        assert mapped.zero_copy and not fetched.zero_copy
        assert set(mapped.descriptors() or {}) == {f.path for f in man.files} and fetched.descriptors() is None
        # Many readers of one file at once: fetched once, not once per reader.
        big = max(man.tensors, key=lambda t: t.length)
        with ThreadPoolExecutor(8) as pool:
            outs = list(pool.map(lambda _: bytes(fetched.view(big.file, big.offset, big.length)), range(16)))
        assert fetches == [big.file] and len(set(outs)) == 1
        for t in man.tensors:
            want = ref[t.name].reshape(-1).view(torch.uint8).numpy().tobytes() if t.length else b""
            for b in (mapped, fetched):
                assert b.ready(t.file, t.offset, t.length) and b.wait_ready(t.file, t.offset, t.length, timeout=0)
                assert bytes(b.view(t.file, t.offset, t.length)) == want, (type(b).__name__, t.name)
                dest = bytearray(t.length)
                b.read_into(t.file, t.offset, memoryview(dest))
                assert bytes(dest) == want, (type(b).__name__, t.name)
        for b in (mapped, fetched):
            with pytest.raises(CorruptedError, match=f"outside the file.*|{big.file}"):
                b.view(big.file, big.offset, 1 << 40)
            with pytest.raises(NotFoundError, match="'nope' is not in snapshot"):
                b.view("nope", 0, 1)
        # The same handle API over each backing, a backing from outside the package included.
        gated = _gated_backing(FetchedFiles(man.snapshot_id, man.files, fetch))
        assert isinstance(gated, Backing)
        handles = [Model(man, mapped), Model(man, fetched), Model(man, gated)]
        stream = handles[2].stream("cpu", prefetch=1)
        assert gated.waiting.wait(60)  # the reader waits for bytes that are not ready yet
        assert stream.groups_read == 0
        gated.gate.set()
        streamed = {k: v for _, group in stream for k, v in group.items()}
        assert set(streamed) == set(ref) and all(_same(streamed[k], ref[k]) for k in ref)
        kept = handles[0].get_tensor("lm_head.weight")
        for m in handles:
            sd = m.state_dict()
            assert list(sd) == [t.name for t in man.tensors]
            assert all(_same(sd[k], ref[k]) for k in ref), m.backing
            m.close()
        assert _same(kept, ref["lm_head.weight"])  # a tensor outlives its handle's close()
        with pytest.raises(NotFoundError, match="closed"):
            mapped.view(big.file, big.offset, big.length)


def test_one_socket_resolver_for_client_and_cachectl(
    daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from weightcache import paths
    from weightcache_daemon.cli import cachectl

    monkeypatch.chdir(daemon.socket_dir.parent)
    rel = Path(daemon.socket_dir.name)
    assert paths.client_socket_dir(rel, {}, 1000) == daemon.socket_dir  # relative: absolute, here
    with weightcache.connect(rel) as c:  # and gRPC can use it
        assert isinstance(c.list(), list)
    env = {"WEIGHTCACHE_SOCKET_DIR": "sockets", "WEIGHTCACHE_ADMIN_SOCKET": "a.sock", "XDG_RUNTIME_DIR": "/x"}
    assert paths.client_socket_dir(None, env, 1000) == daemon.socket_dir.parent / "sockets"
    assert paths.admin_socket(None, env, 1000) == daemon.socket_dir.parent / "a.sock"
    assert paths.admin_socket("b.sock", env, 0) == daemon.socket_dir.parent / "b.sock"
    runtime = tmp_path / "run"
    xdg = {"XDG_RUNTIME_DIR": str(runtime)}
    assert paths.client_socket_dir(None, xdg, 0) == paths.SYSTEM_SOCKET_DIR  # nothing running: the default
    assert paths.client_socket_dir(None, xdg, 1000) == runtime / "weightcache" / "client"
    assert paths.admin_socket(None, xdg, 1000) == runtime / "weightcache" / "admin.sock"
    (runtime / "weightcache" / "client").mkdir(parents=True)
    (runtime / "weightcache" / "client" / "weightcache.sock").touch()
    assert paths.client_socket_dir(None, xdg, 0) == runtime / "weightcache" / "client"  # a user daemon is found
    # cachectl resolves with the very same functions, from its own process environment
    for k in ("WEIGHTCACHE_SOCKET_DIR", "WEIGHTCACHE_ADMIN_SOCKET"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert cachectl.client_socket_dir(None) == runtime / "weightcache" / "client"
    assert cachectl.client_socket_dir(rel) == daemon.socket_dir
    assert cachectl.admin_socket(None) == paths.admin_socket(None, os.environ, os.geteuid())


def test_one_progress_bar() -> None:
    import io

    from weightcache.progress import Bar, human

    out = io.StringIO()
    bar = Bar(stream=out, interval=3600)  # only the first frame, then the last one at close()
    for done in range(0, 101, 10):
        bar(weightcache.Progress("downloading", done << 20, 100 << 20, done // 10, 10, 50 << 20, "f"))
    bar.close()
    frames = [f.strip() for f in out.getvalue().split("\r") if f.strip()]
    assert len(frames) == 2, frames
    assert frames[0].startswith("[" + "." * 30 + "]   0.0% 0 B/100.0 MiB 50.0 MiB/s eta 2s 0/10 files downloading")
    assert frames[1].startswith("[" + "#" * 30 + "] 100.0% 100.0 MiB/100.0 MiB 50.0 MiB/s 10/10 files downloading")
    assert out.getvalue().endswith("\n")
    quiet = io.StringIO()
    off = Bar(enabled=False, stream=quiet)
    off.update(1, 2)
    off.close()
    assert quiet.getvalue() == ""
    assert [human(n) for n in (0, 1023, 1024, 3 << 30, 5 << 40, 9 << 50)] == [
        "0 B", "1023 B", "1.0 KiB", "3.0 GiB", "5.0 TiB", "9216.0 TiB"]  # fmt: skip
    assert weightcache.Progress("", 5, 0, 0, 0, 0.0, "").fraction == 0.0


def test_every_exported_name_exists() -> None:
    import dataclasses

    assert weightcache.__all__ == sorted(weightcache.__all__)
    missing = [n for n in weightcache.__all__ if not hasattr(weightcache, n)]
    assert missing == []
    for record in ("FileInfo", "Layer", "Lease", "Manifest", "ModelInfo", "Progress", "TensorMeta"):
        cls = getattr(weightcache, record)
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, record  # type: ignore[attr-defined]
    assert weightcache.nn.load_into and weightcache.transformers.from_pretrained  # lazy submodules


def test_mapped_files_read_ahead_sequentially(daemon: Daemon, tmp_path: Path) -> None:
    """Each mapped file is marked for sequential readahead (the kernel's VmFlags ``sr``), so a
    cold model touched in order streams ahead of its page faults."""
    model = make_model(tmp_path / "m", tiny=False, size=8 << 20)
    daemon.ctl("prefetch", f"file://{model}/", "--name", "seq")
    with weightcache.connect(daemon.socket_dir) as c, c.open("seq") as m:
        addr = m.get_tensor(m.keys()[0]).data_ptr()
        flags, inside = None, False
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split()
                if "-" in head[0] and not head[0].endswith(":"):
                    lo, hi = (int(x, 16) for x in head[0].split("-"))
                    inside = lo <= addr < hi
                elif head[0] == "VmFlags:" and inside:
                    flags = head[1:]
                    break
        assert flags is not None, f"no mapping holds {addr:#x}"
        assert "sr" in flags, f"mapping flags {flags}: not marked sequential"


def _cached_model(daemon: Daemon, tmp_path: Path, size: int, name: str) -> dict[str, Any]:
    """A generated model of about ``size`` bytes, prefetched as ``name``; its tensors."""
    model = make_model(tmp_path / "m", tiny=False, size=size)
    daemon.ctl("prefetch", f"file://{model}/", "--name", name)
    want: dict[str, Any] = {}
    for f in sorted(model.glob("*.safetensors")):
        want.update(load_file(f))
    return want


@pytest.mark.skipif(shutil.which("fincore") is None, reason="needs fincore (util-linux) to see the page cache")
def test_stream_copies_cached_and_evicted_groups_alike(daemon: Daemon, tmp_path: Path) -> None:
    """stream("cpu") gives the source's bytes whether the blobs are in the page cache or not."""
    from weightcache._backing import _resident as mapped_resident

    want = _cached_model(daemon, tmp_path, 48 << 20, "copies")
    with weightcache.connect(daemon.socket_dir) as c, c.open("copies") as m:
        sd = m.state_dict()  # not read: the tensors only map the files
        first = m.keys()[0]
        blobs = sorted({(Path(m.store_path) / t.file).resolve() for t in (m.meta(n) for n in m.keys())})
        for b in blobs:
            subprocess.run(["cat", str(b)], stdout=subprocess.DEVNULL, check=True)
        assert mapped_resident(sd[first].data_ptr(), sd[first].nbytes)
        got = {k: v for _, g in m.stream("cpu") for k, v in g.items()}
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)

        _evict_after_open(blobs, 0)
        assert not mapped_resident(sd[first].data_ptr(), sd[first].nbytes)
        got = {k: v for _, g in m.stream("cpu") for k, v in g.items()}
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_stream_reads_the_next_group_while_a_group_finishes(daemon: Daemon, tmp_path: Path) -> None:
    """A copy's reads do not stop at a group's end: while one read of group 0 is still
    running, the reads of group 1 go on (within the prefetch bound), and the groups are still
    handed over in order with the source's bytes."""
    want = _cached_model(daemon, tmp_path, 24 << 20, "overlap")
    with weightcache.connect(daemon.socket_dir) as c, c.open("overlap") as m:
        groups = m.groups()
        first = {(t.file, t.offset) for t in groups[0][1]}
        second = {(t.file, t.offset) for t in groups[1][1]}
        real = m.backing
        second_read = threading.Event()
        held: list[bool] = []

        class Slow:
            """The real backing, but the first read of group 0 waits until group 1 is read."""

            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

            def read_into(self, file: str, offset: int, dest: memoryview) -> None:
                if (file, offset) in second:
                    second_read.set()
                if (file, offset) in first and not held:
                    held.append(second_read.wait(timeout=120))
                real.read_into(file, offset, dest)

        m._backing = Slow()  # type: ignore[assignment]
        try:
            order = []
            got: dict[str, Any] = {}
            for name, g in m.stream("cpu", prefetch=2):
                order.append(name)
                got.update(g)
        finally:
            m._backing = real
        assert held == [True], "group 1's reads waited for group 0's to finish"
        assert order == [name for name, _ in groups]
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
