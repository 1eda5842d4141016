"""Client library: zero-copy tensors, copy-on-write isolation, shared pages, streaming, fallback."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import Daemon, make_model, sha256_file

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


def _blob_rss_pss(pid: int, blob_dir: str) -> tuple[int, int]:
    rss = pss = 0
    current = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        parts = line.split()
        if "-" in parts[0] and len(parts) >= 5:
            current = len(parts) >= 6 and parts[5].startswith(blob_dir)
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
        blob_dir = str(daemon.cache_dir / "blobs")
        size = sum(int(f["size"]) for f in daemon.ctl_json("show", snap)["manifest"]["files"])
        for p in procs:
            rss, pss = _blob_rss_pss(p.pid, blob_dir)
            assert rss > 0.9 * size * 0.99, (rss, size)  # each maps (nearly) the whole model
            assert pss < 0.6 * rss, (rss, pss)  # ...but owns only half of it: the pages are shared
    finally:
        for p in procs:
            p.communicate("\n", timeout=30)


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


def test_open_errors_come_back_as_categories(daemon: Daemon) -> None:
    with weightcache.connect(daemon.socket_dir) as c:
        with pytest.raises(NotFoundError, match="model 'missing' is not in the cache"):
            c.open("missing")
        with pytest.raises(InvalidInputError, match="unsupported scheme"):
            c.open("gopher://x/y")
    with pytest.raises(NotFoundError, match="no weightcache daemon socket found"):
        from weightcache._client import find_socket_dir

        find_socket_dir(None, {"XDG_RUNTIME_DIR": str(daemon.root / "nowhere")})


def test_read_range_of_a_layer(daemon: Daemon, tiny_model: Path) -> None:
    from weightcache.v1 import weightcache_pb2 as pb

    ref = _reference(tiny_model)
    with weightcache.connect(daemon.socket_dir) as c:
        man = c.ensure(f"file://{tiny_model}/", name="tiny")
        assert len(man.tensors) == 21 and list(man.layers) == ["embed", "layers.0", "layers.1", "rest"]
        req = pb.ReadRangeRequest(snapshot_id=man.snapshot_id, layers=pb.LayerRange(first=1, last=1), chunk_size=64)
        got: dict[str, bytearray] = {}
        for ch in c._chunks(req):
            got.setdefault(ch.tensor, bytearray()).extend(ch.data)
            assert len(ch.data) <= 64
        assert set(got) == {t.name for t in man.tensors if t.layer == "layers.0"}
        for name, data in got.items():
            assert bytes(data) == ref[name].reshape(-1).view(torch.uint8).numpy().tobytes()
        with pytest.raises(InvalidInputError, match=r"layer range 2\.\.9 is outside"):
            list(c._chunks(pb.ReadRangeRequest(snapshot_id=man.snapshot_id, layers=pb.LayerRange(first=2, last=9))))


def test_progress_reaches_the_client(daemon_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model = make_model(tmp_path / "m", tiny=False, size=6 << 20)
    d = daemon_factory(download={"rate_limit": 64 << 20})
    events = []
    with weightcache.connect(d.socket_dir) as c:
        man = c.ensure(f"file://{model}/", name="m", progress=events.append)
    total = sum(f.size for f in man.files)
    sized = [e for e in events if e.phase != e.LISTING]
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
