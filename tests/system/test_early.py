"""Using a model while it is still being downloaded (an early Ensure answer).

The first part exercises the client's half on its own: a real file written by a thread in
layer order, mapped for real, while a test-fed sequence of real protobuf messages stands in for
the daemon's side of the Ensure stream (and a small object hands out a descriptor of that file,
standing in for fd.sock). The second part runs the same promises against the real daemon.
"""

from __future__ import annotations

import json
import os
import queue
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from harness import wait_for

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402

from weightcache import CorruptedError, DaemonUnavailableError, Model, NotFoundError  # noqa: E402
from weightcache._early import EarlyDownload, EarlyFiles, FetchedRanges  # noqa: E402
from weightcache._fd import GrantedFile  # noqa: E402
from weightcache._records import FileInfo, Manifest, TensorMeta  # noqa: E402
from weightcache.layers import default_layer_of, order_layers  # noqa: E402
from weightcache.v1 import weightcache_pb2 as pb  # noqa: E402

PROVISIONAL = "f" * 32
COMMITTED = "c" * 64
FILE = "model.safetensors"


# ---------------------------------------------------------------- a checkpoint and its manifest


def _llama(seed: int = 0) -> Any:
    from llama import TinyLlama

    torch.manual_seed(seed)
    return TinyLlama(hidden=64, layers=4, vocab=128, inter=128, kv=16)


def _checkpoint(directory: Path, seed: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / FILE
    save_file({k: v.contiguous() for k, v in _llama(seed).state_dict().items()}, str(path))
    return path


def _manifest(source: Path, *, early: bool = True) -> Manifest:
    """The tensor map of a one-file checkpoint, as the daemon would send it."""
    raw = source.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = {k: v for k, v in json.loads(raw[8 : 8 + n]).items() if k != "__metadata__"}
    layers = order_layers(default_layer_of(k) for k in header)
    index = {la: i for i, la in enumerate(layers)}
    tensors = sorted(
        (
            TensorMeta(k, FILE, v["dtype"], tuple(v["shape"]), 8 + n + v["data_offsets"][0],
                       v["data_offsets"][1] - v["data_offsets"][0], default_layer_of(k), index[default_layer_of(k)])
            for k, v in header.items()
        ),
        key=lambda t: (t.layer_index, t.offset),
    )  # fmt: skip
    sid, sha = (PROVISIONAL, "") if early else (COMMITTED, "a" * 64)
    return Manifest(sid, "tiny", "file:///src/", "", (FileInfo(FILE, sha, len(raw)),), tuple(tensors),
                    tuple(layers), early)  # fmt: skip


def _committed_pb(m: Manifest) -> pb.EnsureResponse:
    c = _manifest_pb(m)
    c.manifest.snapshot_id, c.manifest.early = COMMITTED, False
    for f in c.manifest.files:
        f.sha256 = "a" * 64
    return c


def _manifest_pb(m: Manifest) -> pb.EnsureResponse:
    return pb.EnsureResponse(
        manifest=pb.Manifest(
            snapshot_id=m.snapshot_id, model=m.name, source=m.source, early=m.early, layers=list(m.layers),
            files=[pb.FileEntry(path=f.path, sha256=f.sha256, size=f.size) for f in m.files],
            tensors=[pb.Tensor(name=t.name, file=t.file, dtype=t.dtype, shape=list(t.shape), offset=t.offset,
                               length=t.length, layer=t.layer, layer_index=t.layer_index) for t in m.tensors],
        )
    )  # fmt: skip


def _ready_pb(ranges: list[tuple[int, int]], total: int) -> pb.EnsureResponse:
    flat = [x for r in ranges for x in r]
    done = sum(e - s for s, e in ranges)
    ready = pb.Readiness(snapshot_id=PROVISIONAL, files=[pb.FileReady(path=FILE, ranges=flat)],
                         bytes_ready=done, bytes_total=total)  # fmt: skip
    return pb.EnsureResponse(ready=ready)


# ---------------------------------------------------------------- what stands in for the daemon


class _Status(grpc.RpcError):
    """How a failed gRPC call ends an iteration over its responses: an RpcError with a code."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class _Feed:
    """The rest of an early Ensure call, fed by the test: real pb messages, a status to fail
    with, or None for a stream that just ends. ``cancel`` behaves like the call's."""

    def __init__(self) -> None:
        self.q: queue.Queue[Any] = queue.Queue()
        self.cancelled = threading.Event()

    def __iter__(self) -> Iterator[pb.EnsureResponse]:
        while True:
            item = self.q.get()
            if self.cancelled.is_set():
                raise _Status(grpc.StatusCode.CANCELLED, "Locally cancelled by application!")
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def put(self, item: Any) -> None:
        self.q.put(item)

    def cancel(self) -> None:
        self.cancelled.set()
        self.q.put(None)


class _Grants:
    """Hands out a read-only descriptor of the file being written, like fd.sock's Acquire."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.acquired: list[str] = []

    def __call__(self) -> _Grants:
        return self

    def acquire(self, snapshot_id: str) -> list[GrantedFile]:
        self.acquired.append(snapshot_id)
        return [GrantedFile(FILE, "", self.path.stat().st_size, os.open(self.path, os.O_RDONLY | os.O_CLOEXEC))]

    def close(self) -> None:
        pass


class _Writer(threading.Thread):
    """Writes ``source`` into ``dest`` (preallocated to full size) in layer order, ``chunk``
    bytes per write, and reports each range only after its pwrite returned, as the daemon does."""

    def __init__(self, source: Path, dest: Path, manifest: Manifest, feed: _Feed, chunk: int = 512,
                 pace: float = 0.0005, end: Any = "commit") -> None:  # fmt: skip
        super().__init__(daemon=True)
        self.data = source.read_bytes()
        self.dest, self.manifest, self.feed, self.chunk, self.pace, self.end = dest, manifest, feed, chunk, pace, end
        self.written: list[tuple[int, int]] = []
        self.lock = threading.Lock()
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.posix_fallocate(fd, 0, len(self.data))
        os.close(fd)

    def order(self) -> list[tuple[int, int]]:
        header_end = min(t.offset for t in self.manifest.tensors)
        return [(0, header_end)] + [(t.offset, t.offset + t.length) for t in self.manifest.tensors]

    def on_disk(self, start: int, end: int) -> bool:
        with self.lock:
            return any(s <= start and end <= e for s, e in self.written)

    def run(self) -> None:
        import time

        fd = os.open(self.dest, os.O_WRONLY)
        try:
            for start, end in self.order():
                for s in range(start, end, self.chunk):
                    e = min(end, s + self.chunk)
                    os.pwrite(fd, self.data[s:e], s)
                    with self.lock:
                        self.written = _merged(self.written, s, e)
                        ranges = list(self.written)
                    self.feed.put(_ready_pb(ranges, len(self.data)))
                    time.sleep(self.pace)  # a slow source, not a wait for anything
        finally:
            os.close(fd)
        if self.end == "commit":
            self.feed.put(_committed_pb(self.manifest))
        elif self.end is not None:
            self.feed.put(self.end)


def _merged(ranges: list[tuple[int, int]], s: int, e: int) -> list[tuple[int, int]]:
    out = []
    for a, b in sorted([*ranges, (s, e)]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _open(tmp_path: Path, *, fetched: bool = False, **writer: Any) -> tuple[Model, _Writer, _Feed, Path]:
    """An early Model over a file being written: the client's half exactly as ``open()``
    builds it, with the daemon's half stood in for."""
    source = _checkpoint(tmp_path / "src")
    man = _manifest(source)
    feed = _Feed()
    dest = tmp_path / "ingest.safetensors"
    w = _Writer(source, dest, man, feed, **writer)
    dl = EarlyDownload(man, "tiny", feed, feed.cancel)
    dl.start()
    if fetched:
        backing: Any = FetchedRanges(dl, _fetch_from(dest, dl))
    else:
        backing = EarlyFiles(_Grants(dest), dl)
    return Model(man, backing), w, feed, source


def _fetch_from(dest: Path, dl: EarlyDownload) -> Any:
    """The daemon's ReadRange: waits until the range is on disk, then reads it."""

    def fetch(sid: str, path: str, offset: int, buf: memoryview) -> None:
        dl.wait_ready(path, offset, len(buf))
        with open(dest, "rb") as f:
            f.seek(offset)
            buf[:] = f.read(len(buf))

    return fetch


def _expected(source: Path, t: TensorMeta) -> bytes:
    with open(source, "rb") as f:
        f.seek(t.offset)
        return f.read(t.length)


def _raw(tensor: Any) -> bytes:
    return bytes(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


# ---------------------------------------------------------------- the client's half, on its own


@pytest.mark.parametrize("fetched", [False, True], ids=["mapped", "fetched"])
def test_readiness_is_never_ahead_of_the_writer(tmp_path: Path, fetched: bool) -> None:
    m, w, _feed, source = _open(tmp_path, fetched=fetched)
    assert m.manifest.early and not m.complete()
    w.start()
    seen = 0
    checked: list[str] = []
    for gname, group in m.stream("cpu", prefetch=1):
        for name, t in group.items():
            meta = m.meta(name)
            # the bytes were on disk before the stream handed them out, and they are the source's
            assert w.on_disk(meta.offset, meta.offset + meta.length), name
            assert _raw(t) == _expected(source, meta), name
            seen += 1
        # a tensor of the next layer, read on its own while the writer is still slow
        later = [t for t in m.manifest.tensors if t.layer_index > m.meta(next(iter(group))).layer_index]
        if later:
            got = m.get_tensor(later[0].name)
            assert w.on_disk(later[0].offset, later[0].offset + later[0].length)
            assert _raw(got) == _expected(source, later[0])
        checked.append(gname)
    assert seen == len(m) and checked == list(m.manifest.layers)
    assert m.complete() and m.snapshot_id == COMMITTED and m.files[0].sha256 == "a" * 64
    sd = m.state_dict()
    assert all(_raw(sd[t.name]) == _expected(source, t) for t in m.manifest.tensors)
    m.close()


def test_a_read_waits_for_exactly_its_bytes(tmp_path: Path) -> None:
    m, w, feed, source = _open(tmp_path, end=None)
    data = source.read_bytes()
    target = m.meta("model.layers.2.mlp.down_proj.weight")
    other = m.meta("model.layers.0.self_attn.q_proj.weight")
    fd = os.open(w.dest, os.O_WRONLY)
    try:
        s, e = target.offset, target.offset + target.length
        os.pwrite(fd, data[s : e - 1], s)
        feed.put(_ready_pb([(s, e - 1)], len(data)))  # all of it but its last byte
        box: dict[str, Any] = {}
        reader = threading.Thread(target=lambda: box.setdefault("t", m.get_tensor(target.name)), daemon=True)
        reader.start()
        wait_for(lambda: m.backing.ready(FILE, s, target.length - 1), 30, "the first report to arrive")
        assert not m.backing.ready(FILE, s, target.length)
        assert not m.backing.wait_ready(FILE, s, target.length, timeout=0)
        reader.join(timeout=0.2)
        assert reader.is_alive(), "get_tensor returned before its last byte was on disk"
        os.pwrite(fd, data[e - 1 : e], e - 1)
        feed.put(_ready_pb([(s, e)], len(data)))
        reader.join(timeout=60)
        assert not reader.is_alive() and _raw(box["t"]) == _expected(source, target)
        # that was all that was needed: nothing else of the file is on disk
        assert not m.backing.ready(FILE, other.offset, other.length) and not m.complete()
        assert m.backing.ready(FILE, s, target.length) and not m.backing.ready(FILE, s - 1, target.length + 1)
    finally:
        os.close(fd)
    m.close()
    assert feed.cancelled.is_set()  # close() ends the call (the daemon keeps downloading)
    with pytest.raises(NotFoundError, match="model tiny is closed"):
        m.get_tensor(other.name)


def test_fallback_fetches_exactly_the_asked_ranges(tmp_path: Path) -> None:
    source = _checkpoint(tmp_path / "src")
    man = _manifest(source)
    feed = _Feed()
    w = _Writer(source, tmp_path / "ingest.safetensors", man, feed)
    dl = EarlyDownload(man, "tiny", feed, feed.cancel)
    dl.start()
    log: list[tuple[str, int, int]] = []
    inner = _fetch_from(w.dest, dl)
    t, u = man.tensors[5], man.tensors[-1]

    def fetch(sid: str, path: str, offset: int, buf: memoryview) -> None:
        log.append((sid, offset, offset + len(buf)))
        if sid == PROVISIONAL and offset == u.offset:
            dl.wait_complete()  # the download committed while this read waited: its id is gone
            raise NotFoundError(f"snapshot {sid} is not in the cache")
        inner(sid, path, offset, buf)

    m = Model(man, FetchedRanges(dl, fetch))
    box: dict[str, Any] = {}
    late = threading.Thread(target=lambda: box.setdefault("u", m.get_tensor(u.name)), daemon=True)
    late.start()
    wait_for(lambda: (PROVISIONAL, u.offset, u.offset + u.length) in log, 60, "the read of the last tensor")
    w.start()
    assert _raw(m.get_tensor(t.name)) == _expected(source, t)
    m.get_tensor(t.name)
    late.join(timeout=120)
    assert _raw(box["u"]) == _expected(source, u) and m.snapshot_id == COMMITTED
    # exactly the asked ranges, each once; the late one again by the content id
    assert sorted(log) == sorted([(PROVISIONAL, t.offset, t.offset + t.length),
                                  (PROVISIONAL, u.offset, u.offset + u.length),
                                  (COMMITTED, u.offset, u.offset + u.length)])  # fmt: skip
    m.close()


def test_failed_verification_raises_everywhere_and_the_final_group_never_comes(tmp_path: Path) -> None:
    from llama import TinyLlama

    from weightcache.nn import materialize_just_in_time

    m, w, feed, source = _open(tmp_path, end=None)
    w.start()
    w.join(timeout=120)
    assert m.backing.wait_ready(FILE, 0, source.stat().st_size, timeout=60)  # every byte is on disk...
    stream = m.stream("cpu", prefetch=1)
    groups = len(m.layers())
    for _ in range(groups - 1):
        next(stream)
    wait_for(lambda: stream.groups_read == groups, 60, "the final group to be read")
    box: dict[str, BaseException] = {}

    def last() -> None:
        try:
            next(stream)
        except BaseException as exc:  # noqa: BLE001 - inspected below
            box["e"] = exc

    waiter = threading.Thread(target=last, daemon=True)
    waiter.start()
    waiter.join(timeout=0.2)
    assert waiter.is_alive(), "the final group came before the snapshot was verified"
    with torch.device("meta"):
        lazy = TinyLlama(hidden=64, layers=4, vocab=128, inter=128, kv=16)
    jit = materialize_just_in_time(lazy, m, "cpu", prefetch=1)
    # ...but verification fails
    feed.put(_Status(grpc.StatusCode.DATA_LOSS, "file model.safetensors: sha256 0badc0de, expected 1234"))
    waiter.join(timeout=60)
    assert isinstance(box.get("e"), CorruptedError), box
    assert stream.groups_yielded == groups - 1
    message = "verification of model tiny failed: file model.safetensors: sha256 0badc0de.*nothing was published"
    t = m.meta("model.layers.0.mlp.up_proj.weight")
    calls = {
        "next(stream)": lambda: next(stream),
        "a new stream": lambda: next(iter(m.stream("cpu"))),
        "get_tensor": lambda: m.get_tensor(t.name),
        "state_dict": m.state_dict,
        "path": lambda: m.path,
        "view": lambda: m.backing.view(FILE, t.offset, t.length),
        "read_into": lambda: m.backing.read_into(FILE, t.offset, memoryview(bytearray(t.length))),
        "ready": lambda: m.backing.ready(FILE, t.offset, t.length),
        "wait_ready": lambda: m.backing.wait_ready(FILE, t.offset, t.length),
        "complete": m.complete,
        "wait_complete": m.wait_complete,
        "forward pass": lambda: lazy(torch.tensor([[1, 2, 3]])),
    }
    for what, call in calls.items():
        with pytest.raises(CorruptedError, match=message):
            call()
            pytest.fail(f"{what} did not raise")
    assert jit._handles  # the last group never materialised
    m.close()


@pytest.mark.parametrize(
    "end",
    [_Status(grpc.StatusCode.UNAVAILABLE, "Socket closed"), None],
    ids=["connection broke", "stream ended without the committed manifest"],
)
def test_a_broken_stream_is_daemon_unavailable_naming_the_model(tmp_path: Path, end: Any) -> None:
    m, _w, feed, _source = _open(tmp_path, end=None)
    last = m.manifest.tensors[-1]
    box: dict[str, BaseException] = {}

    def read() -> None:
        try:
            m.get_tensor(last.name)
        except BaseException as exc:  # noqa: BLE001 - inspected below
            box["e"] = exc

    waiter = threading.Thread(target=read, daemon=True)
    waiter.start()
    feed.put(end)  # nothing was written: the reader is waiting when the stream breaks
    waiter.join(timeout=60)
    assert isinstance(box.get("e"), DaemonUnavailableError), box
    assert "model tiny" in str(box["e"])
    with pytest.raises(DaemonUnavailableError, match="model tiny"):
        m.state_dict()
    m.close()


def test_withdrawn_bytes_are_corrupted(tmp_path: Path) -> None:
    m, _w, feed, source = _open(tmp_path, end=None)
    size = source.stat().st_size
    feed.put(_ready_pb([(0, 100)], size))
    assert m.backing.wait_ready(FILE, 0, 100, timeout=60)
    feed.put(_ready_pb([(0, 50)], size))  # the file restarted at a new source version
    with pytest.raises(CorruptedError, match=r"file model\.safetensors of model tiny: bytes reported on disk were"):
        m.backing.wait_ready(FILE, 0, size)
    m.close()


def _land(fd: int, data: bytes, feed: _Feed, written: list[tuple[int, int]], start: int, end: int) -> None:
    """Write [start, end) of the file and report it, as the daemon does (after the write)."""
    os.pwrite(fd, data[start:end], start)
    written[:] = _merged(written, start, end)
    feed.put(_ready_pb(list(written), len(data)))


@pytest.mark.parametrize("mode", ["fresh", "ring", "views"])
def test_a_stream_reads_what_has_landed_while_it_waits_for_the_rest(tmp_path: Path, mode: str) -> None:
    """Pieces of a group are read (views: faulted in) as their bytes land, and a later group that
    is wholly on disk (the final norm and head come right after the first layer in a layer-order
    download) is read while an earlier one is still arriving; groups are still handed over in
    order, and the final one only on the committed snapshot."""
    m, w, feed, source = _open(tmp_path, end=None)
    data = source.read_bytes()
    groups = m.groups()
    reads: list[tuple[int, int]] = []
    reuse = mode == "ring"
    if mode == "views":
        real_prefault = m.backing.prefault  # type: ignore[attr-defined]

        def spy_prefault(file: str, offset: int, length: int) -> None:
            reads.append((offset, offset + length))
            real_prefault(file, offset, length)

        m.backing.prefault = spy_prefault  # type: ignore[attr-defined]
    else:
        real_read = m.backing.read_into

        def spy(file: str, offset: int, dest: memoryview) -> None:
            reads.append((offset, offset + len(dest)))
            real_read(file, offset, dest)

        m.backing.read_into = spy  # type: ignore[method-assign]
    written: list[tuple[int, int]] = []
    fd = os.open(w.dest, os.O_WRONLY)
    try:
        _land(fd, data, feed, written, 0, min(t.offset for t in m.manifest.tensors))
        for t in groups[0][1] + groups[-1][1]:
            _land(fd, data, feed, written, t.offset, t.offset + t.length)
        # A ring (reuse=True) reads early only within its window; fresh tensors from anywhere,
        # the prefetch bound still holding.
        prefetch = len(groups) if reuse else 2
        assert len(groups) > prefetch + 1 or reuse
        stream = m.stream("cpu", prefetch=prefetch, reuse=reuse, copy=mode != "views")
        name, first = next(stream)
        assert name == groups[0][0]
        for t in groups[0][1]:
            assert _raw(first[t.name]) == _expected(source, t)
        final = groups[-1][1]
        wait_for(lambda: all((t.offset, t.offset + t.length) in reads for t in final), 60,
                 "the final group to be read while group 1 downloads")  # fmt: skip
        # group 1: its first tensor lands alone, and is read before the rest of its group
        one = groups[1][1]
        assert len(one) > 1
        _land(fd, data, feed, written, one[0].offset, one[0].offset + one[0].length)
        wait_for(lambda: (one[0].offset, one[0].offset + one[0].length) in reads, 60, "its first tensor's read")
        assert not any(s >= one[1].offset and s < one[-1].offset + one[-1].length for s, _ in reads)
        assert stream.groups_read == 1  # handed over in order: group 1 is not complete
        for t in [t for _, ts in groups[1:-1] for t in ts]:
            _land(fd, data, feed, written, t.offset, t.offset + t.length)
        got = [name]
        for name, tensors in stream:
            got.append(name)
            for t in m.manifest.tensors:
                if t.name in tensors:
                    assert _raw(tensors[t.name]) == _expected(source, t)
            if len(got) == len(groups) - 1:
                break
        assert got == [g for g, _ in groups[:-1]] and not m.complete()
        box: dict[str, Any] = {}
        last = threading.Thread(target=lambda: box.setdefault("g", next(stream)), daemon=True)
        last.start()
        last.join(timeout=0.2)
        assert last.is_alive(), "the final group came before the snapshot was committed"
        feed.put(_committed_pb(m.manifest))
        last.join(timeout=60)
        assert box["g"][0] == groups[-1][0]
        for t in final:
            assert _raw(box["g"][1][t.name]) == _expected(source, t)
        assert stream.max_ahead <= prefetch
    finally:
        os.close(fd)
    m.close()


def test_just_in_time_on_a_downloading_model_equals_eager(tmp_path: Path) -> None:
    from llama import TinyLlama

    from weightcache.nn import load_into, materialize_just_in_time

    tokens = torch.tensor([[1, 5, 7, 2, 9, 30, 100]])
    m, w, _feed, _source = _open(tmp_path, chunk=256)
    eager = _llama()
    expected = eager(tokens)
    with torch.device("meta"):
        lazy = TinyLlama(hidden=64, layers=4, vocab=128, inter=128, kv=16)
    jit = materialize_just_in_time(lazy, m, "cpu", prefetch=1)
    w.start()
    got = lazy(tokens)
    assert m.complete()  # the last group waited for the committed snapshot
    assert torch.equal(got, expected) and jit._handles == []
    again = TinyLlama(hidden=64, layers=4, vocab=128, inter=128, kv=16)
    load_into(again, m)
    assert torch.equal(again(tokens), expected)
    m.close()


@pytest.mark.cuda
def test_stream_to_cuda_while_downloading_equals_the_source(tmp_path: Path) -> None:
    m, w, _feed, source = _open(tmp_path)
    w.start()
    for _, group in m.stream("cuda", prefetch=2):
        for name, t in group.items():
            meta = m.meta(name)
            assert t.is_cuda and w.on_disk(meta.offset, meta.offset + meta.length), name
            assert _raw(t.cpu()) == _expected(source, meta), name
    assert m.complete()
    m.close()


# ---------------------------------------------------------------- against the real daemon

RATE = "1MiB"  # the daemon's whole download rate: a model of ~8.6 MiB takes ~8 s to arrive
BIG = {"hidden": 256, "layers": 6, "vocab": 2048, "inter": 512, "kv": 64}


def _big_llama(seed: int) -> Any:
    from llama import TinyLlama

    torch.manual_seed(seed)
    return TinyLlama(**BIG)


def _source(directory: Path, seed: int) -> Path:
    """A Llama-shaped checkpoint in two shards, as a source directory."""
    directory.mkdir(parents=True, exist_ok=True)
    items = [(k, v.contiguous()) for k, v in _big_llama(seed).state_dict().items()]
    half = len(items) // 2
    save_file(dict(items[:half]), str(directory / "model-00001-of-00002.safetensors"))
    save_file(dict(items[half:]), str(directory / "model-00002-of-00002.safetensors"))
    (directory / "config.json").write_text("{}")
    return directory


def _reference(directory: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for p in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(p)))
    return out


@pytest.fixture
def slow(daemon_factory: Any) -> Any:
    return daemon_factory(download={"rate_limit": RATE})


def test_open_returns_while_downloading_and_streams_the_source(slow: Any, tmp_path: Path, report: Any) -> None:
    import time

    import weightcache

    src = _source(tmp_path / "llama", seed=1)
    ref = _reference(src)
    total = sum(p.stat().st_size for p in src.iterdir())
    events: list[Any] = []
    with weightcache.connect(slow.socket_dir) as c:
        t0 = time.monotonic()
        m = c.open(f"file://{src}/", name="llama", progress=events.append)
        opened = time.monotonic() - t0
        early = m.manifest
        assert early.early and not m.complete(), "open() waited for the whole download"
        assert len(early.snapshot_id) == 32 and {t.name for t in early.tensors} == set(ref)
        assert m.zero_copy and m.backing.download.bytes_ready < total
        first_group_at = None
        gname = ""
        for gname, group in m.stream("cpu", prefetch=1):  # noqa: B007 - the last one is checked below
            if first_group_at is None:
                first_group_at = time.monotonic() - t0
            for name, t in group.items():
                assert torch.equal(_raw_view(t), _raw_view(ref[name])), name
        done = time.monotonic() - t0
        assert gname == "rest" and m.complete()
        assert m.snapshot_id != early.snapshot_id and not m.manifest.early
        assert all(len(f.sha256) == 64 for f in m.files)
        committed = c.ensure(f"file://{src}/", name="llama")
        assert committed.snapshot_id == m.snapshot_id and committed.files == m.manifest.files
        sd = m.state_dict()
        assert all(torch.equal(_raw_view(sd[k]), _raw_view(ref[k])) for k in ref)
        for f in src.iterdir():  # path-based loaders see the verified files
            assert (Path(m.path) / f.name).read_bytes() == f.read_bytes()
        m.close()
    assert any(e.phase == "downloading" for e in events)
    report("early open", f"{total / 2**20:.1f} MiB at {RATE}/s: open, stream every group",
           "tensors equal the source", f"open {opened:.2f} s, first group {first_group_at:.2f} s, "
           f"last group {done:.2f} s")  # fmt: skip


def _raw_view(t: Any) -> Any:
    return t.contiguous().reshape(-1).view(torch.uint8)


def test_state_dict_and_verified_open_wait_for_the_commit(slow: Any, tmp_path: Path) -> None:
    import weightcache

    src = _source(tmp_path / "llama", seed=2)
    ref = _reference(src)
    uri = f"file://{src}/"
    with weightcache.connect(slow.socket_dir) as c:
        early = c.ensure(uri, name="two", verified=False)  # returns; the download goes on
        assert early.early and all(f.sha256 == "" for f in early.files if f.path.endswith(".safetensors"))
        with c.open(uri, name="two") as m:
            assert m.manifest.early and m.snapshot_id == early.snapshot_id  # the same download
            first = m.get_tensor("model.embed_tokens.weight")  # its bytes only
            assert torch.equal(_raw_view(first), _raw_view(ref["model.embed_tokens.weight"]))
            sd = m.state_dict()
            assert m.complete(), "state_dict() returned before the snapshot was committed"
            assert all(torch.equal(_raw_view(sd[k]), _raw_view(ref[k])) for k in ref)
            real = m.snapshot_id
        verified = c.ensure(uri, name="two")
        assert not verified.early and verified.snapshot_id == real
        with c.open(uri, name="two", verified=True) as m2:
            assert not m2.manifest.early and m2.complete() and m2.snapshot_id == real


def test_just_in_time_while_downloading_equals_eager(slow: Any, tmp_path: Path, report: Any) -> None:
    from llama import TinyLlama

    import weightcache
    from weightcache.nn import materialize_just_in_time

    src = _source(tmp_path / "llama", seed=3)
    tokens = torch.tensor([[1, 5, 7, 2, 9, 30, 100, 2000]])
    expected = _big_llama(3)(tokens)
    with torch.device("meta"):
        lazy = TinyLlama(**BIG)
    seen: dict[str, float] = {}
    with weightcache.connect(slow.socket_dir) as c, c.open(f"file://{src}/", name="jit") as m:
        assert m.manifest.early
        dl = m.backing.download

        def computed(*_: Any) -> None:
            seen.setdefault("layer0", dl.bytes_ready / dl.bytes_total)

        lazy.model.layers[0].register_forward_hook(computed)
        jit = materialize_just_in_time(lazy, m, "cpu", prefetch=1)
        got = lazy(tokens)
        assert m.complete() and jit._handles == []
    assert torch.equal(got, expected)
    report("early just in time", "Llama-shaped module on a model still downloading", "logits equal eager",
           f"layer 0 computed with {seen['layer0'] * 100:.0f}% of the bytes on disk")  # fmt: skip


def test_fallback_over_grpc_while_downloading(slow: Any, tmp_path: Path) -> None:
    import weightcache

    src = _source(tmp_path / "llama", seed=4)
    ref = _reference(src)
    only_grpc = tmp_path / "only-grpc"
    only_grpc.mkdir()
    os.symlink(slow.socket_dir / "weightcache.sock", only_grpc / "weightcache.sock")
    with weightcache.connect(only_grpc) as c, c.open(f"file://{src}/", name="fb") as m:
        early = m.manifest
        assert early.early and not m.zero_copy
        for _, group in m.stream("cpu", prefetch=1):
            for name, t in group.items():
                assert torch.equal(_raw_view(t), _raw_view(ref[name])), name
        assert m.complete() and m.snapshot_id != early.snapshot_id and not m.manifest.early
        assert torch.equal(_raw_view(m.get_tensor("lm_head.weight")), _raw_view(ref["lm_head.weight"]))


def test_daemon_killed_mid_download_is_an_error_naming_the_model(slow: Any, tmp_path: Path) -> None:
    import weightcache

    src = _source(tmp_path / "llama", seed=5)
    with weightcache.connect(slow.socket_dir) as c:
        m = c.open(f"file://{src}/", name="killed")
        assert m.manifest.early
        m.get_tensor("model.embed_tokens.weight")
        slow.stop(9)
        with pytest.raises(DaemonUnavailableError, match="daemon went away while model killed was downloading"):
            m.state_dict()
        with pytest.raises(DaemonUnavailableError, match="model killed"):
            m.get_tensor("lm_head.weight")
        m.close()
