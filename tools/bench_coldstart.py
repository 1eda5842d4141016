"""Benchmark: the cold-start timeline. A node that has never seen the model gets a request: how
soon does the first layer compute, and how soon are the logits ready?

A Llama-shaped torch model that really computes (tests/llama.py, bf16, 16 layers, hidden size
chosen to reach --size) is saved as --shards safetensors files, two by default (safetensors.torch.save_file: tensors
in lexicographic order, so layers.10 sits before layers.2 in a file) and stored in a local
SeaweedFS server. The daemon's source is limited to a network-like rate (download.rate_limit);
each rate in --rates runs, in the same run, each from a fresh daemon on an empty store (nothing
of it in the page cache):

  pure          a plain download of the model (Client.ensure, waiting for the committed
                snapshot): the download time of the same bytes, against which the rest is read
  sequential    `cachectl prefetch` -> open() -> weightcache.nn.load_into -> forward
  reference     open(verified=True), which waits for the committed snapshot (what open() did
                before streaming) -> materialize_just_in_time forward
  streaming     open() (returns once the headers are known) -> materialize_just_in_time
                forward, executing while the download runs

Each strategy runs in a fresh process (torch imported and its kernels warmed up on one layer
of the same shapes before the clock starts), ends with one forward pass of a short prompt, and
compares its logits bit for bit (torch.equal) with an eager reference computed once from the
original files. Recorded per strategy, on one clock (time.monotonic, system-wide): open()
called; bytes downloaded over time (the daemon's weightcache_downloaded_bytes counter, polled
every 20 ms); per layer group the time its bytes were ready (the backing's readiness), read
(backing reads), the forward waiting for it, and its compute (forward pre/post hooks; on CUDA
each hook synchronises so the times are real); the logits; the CPU seconds the client, the daemon
and the S3 server used. From those, a CPU floor: the download's CPU work plus the sequential
client's (read and forward, alone on the machine), over the machine's cores, is the least wall
time any schedule of that work can take here.

    python tools/bench_coldstart.py --size 2GiB --rates 300MB,0 --svg docs/coldstart.svg --doc docs/benchmarks.md
    python tools/bench_coldstart.py --size 2GiB --out bench-out/coldstart.json    # raw data kept
    python tools/bench_coldstart.py --size 2GiB --logs bench-out/logs   # each daemon's log kept
    python tools/bench_coldstart.py --replot bench-out/coldstart.json --svg docs/coldstart.svg --doc docs/benchmarks.md
    python tools/bench_coldstart.py --size 2GiB --device cuda        # on a GPU machine

Targets (streaming): layer 0 has computed within 1.05x (download time of the bytes layer 0
needs + one header round trip) after open() is called; logits within 1.10x the pure download
time; the end-to-end speed-up over sequential is reported next to its bound
(download + read + compute) / download, all measured in the same run.
"""

from __future__ import annotations

import argparse
import bisect
import gc
import json
import math
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
DOC_START, DOC_END = "<!-- coldstart:start -->", "<!-- coldstart:end -->"
STRATEGIES = ("sequential", "reference", "streaming")
LABELS = {
    "sequential": "sequential: prefetch → open → load_into → forward",
    "reference": "reference: open(verified=True) → just-in-time forward",
    "streaming": "execute while downloading: open() → just-in-time forward",
}
POLL = 0.02  # seconds between reads of the daemon's download counter
SETTLE = 2.0  # seconds the child idles before the clock starts (freed memory handed back alike)
LAYERS = 16
VOCAB = 32000


def now() -> float:
    return time.monotonic()


# ---------------------------------------------------------------- the model


def dims_for(size: int, layers: int = LAYERS) -> dict[str, int]:
    """TinyLlama dimensions (Llama-3 proportions: inter 3.5x hidden, kv hidden/4) whose bf16
    weights reach ``size`` bytes; hidden grows in steps of 128."""
    hidden = 256
    while True:
        d = {"hidden": hidden, "layers": layers, "vocab": VOCAB, "inter": int(hidden * 3.5), "kv": hidden // 4}
        if param_count(d) * 2 >= size:
            return d
        hidden += 128


def param_count(d: dict[str, int]) -> int:
    h, i, kv = d["hidden"], d["inter"], d["kv"]
    per_layer = 2 * h + 2 * h * h + 2 * kv * h + 3 * h * i
    return 2 * d["vocab"] * h + h + d["layers"] * per_layer


def write_model(out: Path, dims: dict[str, int], shards: int = 2, seed: int = 0) -> int:
    """Random bf16 weights (std 0.02, norms near 1) for TinyLlama(**dims), split in layer order
    into ``shards`` safetensors files written by safetensors.torch.save_file, plus the index and
    config.json. Returns the total bytes of the tensors."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(REPO / "tests"))
    from llama import TinyLlama

    from weightcache.layers import default_layer_of, order_layers

    with torch.device("meta"):
        shapes = {
            n: tuple(p.shape)
            for n, p in TinyLlama(
                dims["hidden"], dims["layers"], dims["vocab"], dims["inter"], dims["kv"]
            ).named_parameters()
        }
    rank = {g: i for i, g in enumerate(order_layers(default_layer_of(n) for n in shapes))}
    names = sorted(shapes, key=lambda n: (rank[default_layer_of(n)], n))
    total = sum(math.prod(s) * 2 for s in shapes.values())
    gen = torch.Generator().manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    per, acc = total / shards, 0
    groups: list[list[str]] = [[] for _ in range(shards)]
    for n in names:
        groups[min(int(acc / per), shards - 1)].append(n)
        acc += math.prod(shapes[n]) * 2
    weight_map = {}
    for k, group in enumerate(groups):
        fn = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {}
        for n in group:
            t = torch.randn(shapes[n], generator=gen).mul_(0.02)
            if n.endswith("norm.weight"):
                t.add_(1.0)
            tensors[n] = t.to(torch.bfloat16)
        save_file(tensors, str(out / fn), metadata={"format": "pt"})
        del tensors
        weight_map.update(dict.fromkeys(group, fn))
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    (out / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], **dims}, indent=2))
    return int(total)


# ---------------------------------------------------------------- child side: one strategy


class Recorder:
    """Per layer group: bytes ready, reads, the forward waiting for it, compute start/end."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.groups: list[tuple[str, list[tuple[str, int, int]]]] = []
        self.ready: dict[str, float] = {}
        self.reads: list[tuple[float, float, str, int, int]] = []
        self.want: dict[str, float] = {}
        self.start: dict[str, float] = {}
        self.end: dict[str, float] = {}
        self.complete: float | None = None  # an early open: when the committed snapshot arrived

    def sync(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)

    def attach(self, model: Any) -> None:
        """Learn the groups' byte ranges; time the backing's reads (instance attributes that
        shadow its read_into, and its prefault: the stream reads through model.backing, copies
        with read_into, zero-copy views with prefault)."""
        self.groups = [(g, [(t.file, t.offset, t.length) for t in metas]) for g, metas in model.groups()]
        backing = model.backing
        inner_read, inner_prefault = backing.read_into, getattr(backing, "prefault", None)

        def read_into(file: str, offset: int, dest: memoryview) -> None:
            t0 = now()
            inner_read(file, offset, dest)
            self.reads.append((t0, now(), file, offset, len(dest)))

        def prefault(file: str, offset: int, length: int) -> None:
            t0 = now()
            assert inner_prefault is not None
            inner_prefault(file, offset, length)
            self.reads.append((t0, now(), file, offset, length))

        try:
            backing.read_into = read_into
            if inner_prefault is not None:
                backing.prefault = prefault
        except AttributeError:  # a backing with __slots__: no read times, the rest still holds
            pass

    def watch(self, model: Any) -> None:
        """A thread recording when each group's bytes became ready: it waits (10 ms at a time)
        for the first group not ready yet and, after each wait, marks every group that is, so a
        group the daemon fetches out of layer order is seen within 10 ms too."""
        backing = model.backing

        def ready(ranges: list[tuple[str, int, int]]) -> bool:
            return all(backing.ready(f, o, n) for f, o, n in ranges)

        def run() -> None:
            try:
                pending = list(self.groups)
                while pending:
                    f, o, n = next(((f, o, n) for f, o, n in pending[0][1] if not backing.ready(f, o, n)),
                                   pending[0][1][0])  # fmt: skip
                    backing.wait_ready(f, o, n, 0.01)
                    t = now()
                    for g, ranges in pending:
                        if ready(ranges):
                            self.ready[g] = t
                    pending = [(g, r) for g, r in pending if g not in self.ready]
                if model.manifest.early:
                    backing.wait_complete()
                    self.complete = now()
            except Exception:  # noqa: BLE001 - the forward pass reports the failure itself
                return

        threading.Thread(target=run, name="ready-watch", daemon=True).start()

    def units(self, module: Any) -> list[tuple[str, Any, Any]]:
        """(group, module whose pre-hook starts it, module whose post-hook ends it)."""
        inner = module.model
        out = [("embed", inner.embed_tokens, inner.embed_tokens)]
        out += [(f"layers.{i}", layer, layer) for i, layer in enumerate(inner.layers)]
        return [*out, ("rest", inner.norm, module.lm_head)]

    def hook_want(self, module: Any) -> None:
        """Before the just-in-time hooks are armed: fires first, when the forward reaches the layer."""
        for g, first, _ in self.units(module):
            first.register_forward_pre_hook(self._stamp(self.want, g, sync=False))

    def hook_compute(self, module: Any) -> None:
        """After arming: the pre-hook fires once the layer's weights are in place."""
        for g, first, last in self.units(module):
            first.register_forward_pre_hook(self._stamp(self.start, g, sync=True))
            last.register_forward_hook(self._stamp(self.end, g, sync=True))

    def _stamp(self, into: dict[str, float], g: str, sync: bool) -> Any:
        def hook(*_: Any) -> None:
            if sync:
                self.sync()
            into.setdefault(g, now())

        return hook

    def report(self) -> list[dict[str, Any]]:
        index: dict[str, list[tuple[int, int, str]]] = {}
        for g, ranges in self.groups:
            for f, o, n in ranges:
                index.setdefault(f, []).append((o, o + n, g))
        for v in index.values():
            v.sort()
        reads: dict[str, list[float]] = {}
        for t0, t1, f, off, _n in self.reads:
            spans = index.get(f, [])
            i = bisect.bisect_right(spans, (off, math.inf, "")) - 1
            if i >= 0 and spans[i][0] <= off < spans[i][1]:
                r = reads.setdefault(spans[i][2], [math.inf, -math.inf, 0.0])
                r[0], r[1], r[2] = min(r[0], t0), max(r[1], t1), r[2] + (t1 - t0)
        out = []
        for g, ranges in self.groups:
            span = reads.get(g)
            out.append({
                "group": g, "bytes": sum(n for _, _, n in ranges), "ready": self.ready.get(g),
                "read": [span[0], span[1]] if span else None, "want": self.want.get(g),
                "start": self.start.get(g), "end": self.end.get(g),
            })  # fmt: skip
        return out


def warm_up(dims: dict[str, int], device: Any) -> None:
    """One decoder layer and an lm_head of the real shapes, run once: the kernels' first-call
    costs (oneDNN primitives, cuBLAS handles) are paid before the clock, as a server would."""
    import torch
    from llama import Block

    block = Block(dims["hidden"], dims["inter"], dims["kv"]).to(device=device, dtype=torch.bfloat16)
    head = torch.nn.Linear(dims["hidden"], dims["vocab"], bias=False).to(device=device, dtype=torch.bfloat16)
    emb = torch.nn.Embedding(dims["vocab"], dims["hidden"]).to(device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        x = emb(torch.zeros(1, 8, dtype=torch.long, device=device))
        head(block(x))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    del block, head, emb


def child(strategy: str, ctx: dict[str, Any]) -> dict[str, Any]:
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from llama import TinyLlama

    import weightcache
    from weightcache.nn import load_into, materialize_just_in_time

    device = torch.device(ctx["device"])
    dims = ctx["dims"]
    tokens = torch.tensor([ctx["prompt"]], dtype=torch.long, device=device)
    if strategy == "eager":
        from safetensors.torch import load_file

        sd: dict[str, Any] = {}
        for f in ctx["files"]:
            sd.update(load_file(f, device=str(device)))
        with torch.device("meta"):
            module = TinyLlama(dims["hidden"], dims["layers"], dims["vocab"], dims["inter"], dims["kv"])
        module.load_state_dict(sd, assign=True)
        with torch.no_grad():
            torch.save(module(tokens).cpu(), ctx["ref"])
        return {}
    ref = torch.load(ctx["ref"])
    warm_up(dims, device)
    with torch.device("meta"):
        module = TinyLlama(dims["hidden"], dims["layers"], dims["vocab"], dims["inter"], dims["kv"])
    module.eval()
    rec = Recorder(device)
    client = weightcache.connect(ctx["socket_dir"])
    gc.collect()
    time.sleep(SETTLE)
    t: dict[str, float] = {"open": now()}
    cpu: dict[str, float] = {"open": process_cpu()}
    if strategy == "sequential":
        subprocess.run(
            ["cachectl", "--admin-socket", ctx["admin_socket"], "prefetch", ctx["uri"], "--name", "bench"],
            check=True, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        t["prefetched"] = now()
        cpu["prefetched"] = process_cpu()
        m = client.open(ctx["uri"])
        streamed = False
        t["opened"] = now()
        rec.attach(m)
        load_into(module, m, device=None if device.type == "cpu" else device)
        rec.sync()
        t["loaded"] = now()
        rec.hook_compute(module)
    else:
        m = client.open(ctx["uri"], verified=strategy == "reference")
        t["opened"] = now()
        streamed = m.manifest.early  # False: the daemon answered with the committed snapshot
        rec.attach(m)
        rec.watch(m)
        rec.hook_want(module)
        materialize_just_in_time(module, m, device, prefetch=2)
        rec.hook_compute(module)
    with torch.no_grad():
        logits = module(tokens)
    rec.sync()
    t["logits"] = now()
    cpu["logits"] = process_cpu()
    equal = bool(torch.equal(logits.cpu(), ref))
    if rec.complete is not None:
        t["complete"] = rec.complete
    m.close()
    client.close()
    return {"t": t, "cpu": cpu, "groups": rec.report(), "equal": equal, "streamed": streamed}


def process_cpu() -> float:
    """User + system CPU seconds of this process, every thread (torch's included)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ---------------------------------------------------------------- orchestrator


class Poller(threading.Thread):
    """Samples the daemon's downloaded-bytes counter: [(time, bytes)], one per change; and the
    CPU seconds the daemon and the S3 server have used: [(time, seconds)], every poll."""

    def __init__(self, port: int, pids: list[int]) -> None:
        super().__init__(name="metrics-poll", daemon=True)
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.pids = pids
        self.samples: list[tuple[float, float]] = []
        self.cpu: list[tuple[float, float]] = []
        self._stop_event = threading.Event()

    def read(self) -> float | None:
        try:
            with urllib.request.urlopen(self.url, timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return None
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("weightcache_downloaded_bytes_total")
        )

    def run(self) -> None:
        last = -1.0
        while not self._stop_event.is_set():
            t = now()
            self.cpu.append((t, cpu_seconds(self.pids)))
            v = self.read()
            if v is not None and v != last:
                self.samples.append((t, v))
                last = v
            self._stop_event.wait(POLL)

    def stop(self) -> list[tuple[float, float]]:
        self._stop_event.set()
        self.join(timeout=10)
        v = self.read()
        if v is not None and (not self.samples or v != self.samples[-1][1]):
            self.samples.append((now(), v))
        return self.samples


def proc_stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (which may hold spaces and
    parentheses): [0] is the state, [1] the parent pid, [11] and [12] utime and stime in clock
    ticks. None if the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def process_tree(root: int) -> list[int]:
    """``root`` and every process below it (the S3 server may run as a wrapper and its binary)."""
    parents: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (fields := proc_stat(d.name)) is not None:
            parents[int(d.name)] = int(fields[1])
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(c for c, pp in parents.items() if pp == pid)
    return out


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes have used (all their threads); gone ones count 0."""
    total = 0
    for pid in pids:
        if (fields := proc_stat(pid)) is not None:
            total += int(fields[11]) + int(fields[12])
    return total / TICK


def crossing(points: list[tuple[float, float]], x: float) -> float | None:
    """Along points (a, b) with a never decreasing: b where a reaches x, interpolated between
    the points around it; None if a never does."""
    prev: tuple[float, float] | None = None
    for a, b in points:
        if a >= x:
            if prev is None or a == prev[0]:
                return b
            return prev[1] + (x - prev[0]) / (a - prev[0]) * (b - prev[1])
        prev = (a, b)
    return None


def value_at(samples: list[tuple[float, float]], t: float) -> float | None:
    """A sampled counter's value at time ``t``."""
    return crossing(samples, t)


def time_at(samples: list[tuple[float, float]], nbytes: float) -> float | None:
    """When the counter reached ``nbytes``."""
    return crossing([(v, t) for t, v in samples], nbytes)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def drop_cache(root: Path) -> None:
    """Evict a directory's files from the page cache (written pages are clean after fsync)."""
    for f in root.rglob("*"):
        if f.is_file() and not f.is_symlink():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def run_child(strategy: str, ctx_path: Path) -> dict[str, Any]:
    r = subprocess.run(
        [sys.executable, str(HERE), "--child", strategy, "--ctx", str(ctx_path)],
        capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-15:]
        raise SystemExit(f"strategy {strategy} failed ({r.returncode}):\n" + "\n".join(tail))
    return dict(json.loads(r.stdout.strip().splitlines()[-1]))


def run_strategy(
    strategy: str, rate: int, ctx: dict[str, Any], srv: Any, work: Path, logs: Path | None = None
) -> dict[str, Any]:
    from harness import start_daemon, write_config

    from weightcache_daemon.config import DownloadConfig

    root = work / f"rate{rate}-{strategy}"
    root.mkdir(parents=True)
    port = free_port()
    download = {"concurrency": DownloadConfig.concurrency, "part_size": DownloadConfig.part_size, "rate_limit": rate}
    cfg = write_config(root / "weightcached.toml", srv, client_sources=["*"], metrics_address=f"127.0.0.1:{port}",
                       download=download)  # fmt: skip
    d = start_daemon(root, srv, config=cfg)
    poller = Poller(port, [d.proc.pid, *process_tree(srv.process.pid)])
    poller.start()
    try:
        ctx = {**ctx, "socket_dir": str(d.socket_dir), "admin_socket": str(d.admin_socket)}
        ctx_path = root / "ctx.json"
        ctx_path.write_text(json.dumps(ctx))
        if strategy == "pure":
            import weightcache

            with weightcache.connect(d.socket_dir) as c:
                time.sleep(SETTLE)
                t0 = now()
                c.ensure(ctx["uri"], verified=True)
                res: dict[str, Any] = {"t": {"open": t0, "committed": now()}}
        else:
            res = run_child(strategy, ctx_path)
    finally:
        res_samples = poller.stop()
        d.stop()
        if logs is not None:
            logs.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(d.log, logs / f"{rate_label(rate).replace(' ', '').replace('/', '')}-{strategy}.log")
        drop_cache(root)
        shutil.rmtree(root, ignore_errors=True)
    res["samples"] = res_samples
    res["server_cpu"] = poller.cpu
    return res


def header_round_trip(srv: Any, bucket: str, key: str, repeat: int = 7) -> float:
    """Median time of the daemon's header read: 8 bytes (the header length), then the header."""
    c = srv.client()
    times = []
    for _ in range(repeat):
        t0 = now()
        n = int.from_bytes(c.get_object(Bucket=bucket, Key=key, Range="bytes=0-7")["Body"].read(), "little")
        c.get_object(Bucket=bucket, Key=key, Range=f"bytes=8-{8 + n - 1}")["Body"].read()
        times.append(now() - t0)
    return sorted(times)[len(times) // 2]


def bytes_for_layer0(model_dir: Path) -> int:
    """The bytes layer 0 needs when the download goes in execution order: the small files, every
    safetensors header, the embeddings and layers.0."""
    from safetensors import safe_open

    from weightcache.layers import default_layer_of

    n = 0
    for p in model_dir.iterdir():
        if not p.name.endswith(".safetensors"):
            n += p.stat().st_size
            continue
        with open(p, "rb") as f:
            n += 8 + int.from_bytes(f.read(8), "little")
        with safe_open(str(p), "pt") as h:
            for k in h.keys():
                if default_layer_of(k) in ("embed", "layers.0"):
                    sl = h.get_slice(k)
                    n += math.prod(sl.get_shape()) * 2
    return n


# ---------------------------------------------------------------- analysis and output


def analyse(rate: int, runs: dict[str, dict[str, Any]], total: int, b0: int, header_rt: float) -> dict[str, Any]:
    pure = runs["pure"]
    p0 = pure["t"]["open"]
    dl_all = time_at(pure["samples"], total)
    dl_b0 = time_at(pure["samples"], b0)
    out: dict[str, Any] = {
        "rate": rate,
        "pure_download_s": dl_all - p0 if dl_all else None,
        "pure_download_layer0_bytes_s": dl_b0 - p0 if dl_b0 else None,
        "pure_committed_s": pure["t"]["committed"] - p0,
        "header_round_trip_s": header_rt,
        "strategies": {},
    }
    cores = len(os.sched_getaffinity(0))
    for s in STRATEGIES:
        r = runs.get(s)
        if r is None or "skipped" in r:
            out["strategies"][s] = {"skipped": (r or {}).get("skipped", "not run")}
            continue
        t0 = r["t"]["open"]
        g = {x["group"]: x for x in r["groups"]}
        dl = time_at(r["samples"], total)
        dl_b0_own = time_at(r["samples"], b0)
        row = {
            "layer0_s": g["layers.0"]["end"] - t0,
            "logits_s": r["t"]["logits"] - t0,
            "download_done_s": dl - t0 if dl else None,
            # This run's own download of the bytes layer 0 needs: the pure run's varies from
            # run to run by tens of ms, so this says what the pipeline adds on top of its link.
            "download_layer0_bytes_s": dl_b0_own - t0 if dl_b0_own else None,
            "opened_s": r["t"]["opened"] - t0,
            "verified_s": verified_at(s, r["t"]) - t0,
            "equal": r["equal"],
            "streamed": r.get("streamed", False),
        }
        server = [value_at(r.get("server_cpu", []), x) for x in (t0, r["t"]["logits"])]
        if None not in server and "cpu" in r:
            # The share of the machine the run kept busy, daemon, S3 server and client together.
            row["server_core_s"] = server[1] - server[0]  # type: ignore[operator]
            row["client_core_s"] = r["cpu"]["logits"] - r["cpu"]["open"]
            row["busy"] = (row["server_core_s"] + row["client_core_s"]) / cores / row["logits_s"]
        if s == "sequential":
            row["prefetch_s"] = r["t"]["prefetched"] - t0
            row["read_s"] = r["t"]["loaded"] - r["t"]["prefetched"]  # open() + load_into
            row["compute_s"] = r["t"]["logits"] - r["t"]["loaded"]
        out["strategies"][s] = row
    seq = out["strategies"]["sequential"]
    seq_run = runs.get("sequential", {})
    if "skipped" not in seq and out["pure_download_s"]:
        d = out["pure_download_s"]
        out["bound"] = (d + seq["read_s"] + seq["compute_s"]) / d
        for s in STRATEGIES:
            row = out["strategies"][s]
            if "skipped" not in row:
                row["speedup"] = seq["logits_s"] / row["logits_s"]
                row["logits_over_download"] = row["logits_s"] / d
    download_cpu = [value_at(pure.get("server_cpu", []), x) for x in (p0, dl_all or p0)]
    if "skipped" not in seq and out["pure_download_s"] and None not in download_cpu and "cpu" in seq_run:
        # No schedule finishes before the machine's cores have done the download's work and the
        # client's (reading and computing, as the sequential run did it alone). Where this floor
        # is above 1.10x, the logits target cannot be met on this machine whatever the order.
        work = download_cpu[1] - download_cpu[0]  # type: ignore[operator]
        client = seq_run["cpu"]["logits"] - seq_run["cpu"]["prefetched"]
        floor = (work + client) / cores
        out["cpu_floor"] = {"download_core_s": work, "client_core_s": client, "cores": cores, "floor_s": floor,
                            "ratio": floor / out["pure_download_s"]}  # fmt: skip
    st = out["strategies"]["streaming"]
    if "skipped" not in st and out["pure_download_layer0_bytes_s"]:
        budget = out["pure_download_layer0_bytes_s"] + header_rt
        out["targets"] = {
            "layer0_ratio": st["layer0_s"] / budget,
            "layer0_ok": st["layer0_s"] <= 1.05 * budget,
            "logits_ratio": st["logits_over_download"],
            "logits_ok": st["logits_over_download"] <= 1.10,
        }
    return out


def verified_at(strategy: str, t: dict[str, float]) -> float:
    """When the committed (verified) snapshot was there: prefetch returned, open(verified=True)
    returned, or an early handle saw its download complete."""
    if strategy == "sequential":
        return t["prefetched"]
    return t.get("complete", t["opened"])


def rate_label(rate: int) -> str:
    return f"{rate / 1e6:g} MB/s" if rate else "unthrottled"


def table(report: dict[str, Any]) -> str:
    m = report["model"]
    lines = [
        f"Model: {m['bytes'] / 2**30:.2f} GiB bf16, {m['dims']['layers']} layers, hidden {m['dims']['hidden']}, "
        f"{m.get('shards', 2)} shards; prompt {m['prompt_tokens']} tokens; device {report['device']}.",
        "",
        "| source rate | strategy | last byte on disk | verified | layer 0 computed | logits ready "
        "| logits ÷ pure download | speed-up vs sequential | logits equal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for a in report["rates"]:
        rl = rate_label(a["rate"])
        d = a["pure_download_s"]
        lines.append(f"| {rl} | pure download (`ensure`) | {d:.2f} s | {a['pure_committed_s']:.2f} s | | | 1.00 | | |")
        for s in STRATEGIES:
            r = a["strategies"][s]
            if "skipped" in r:
                lines.append(f"| {rl} | {s} | not run: {r['skipped']} | | | | | | |")
                continue
            if s == "streaming" and not r["streamed"]:
                notes.append(f"- {rl}: open() answered with the committed snapshot: nothing was executed early.")
            sp = f"{r['speedup']:.2f}x" if "speedup" in r else ""
            if s != "sequential" and "bound" in a:
                sp += f" (bound {a['bound']:.2f}x)"
            last = f"{r['download_done_s']:.2f} s" if r["download_done_s"] is not None else "?"
            lines.append(
                f"| {rl} | {LABELS[s].split(':')[0]} | {last} | {r['verified_s']:.2f} s | {r['layer0_s']:.2f} s "
                f"| {r['logits_s']:.2f} s | {r.get('logits_over_download', 0):.2f} | {sp} "
                f"| {'yes' if r['equal'] else '**NO**'} |"
            )
        seq = a["strategies"]["sequential"]
        if "skipped" not in seq:
            notes.append(
                f"- {rl}, sequential: prefetch {seq['prefetch_s']:.2f} s (last byte at {seq['download_done_s']:.2f} s), "
                f"open + load_into {seq['read_s'] * 1000:.0f} ms, forward {seq['compute_s']:.2f} s; bound "
                f"(download + read + compute) / download = ({d:.2f} + {seq['read_s']:.2f} + {seq['compute_s']:.2f}) "
                f"/ {d:.2f} = **{a.get('bound', 0):.2f}x**."
            )
        tg = a.get("targets")
        if tg:
            notes.append(
                f"- {rl}: layer 0 computed {a['strategies']['streaming']['layer0_s']:.2f} s after open() vs "
                f"{a['pure_download_layer0_bytes_s']:.2f} s to download the bytes it needs + "
                f"{a['header_round_trip_s'] * 1000:.0f} ms header round trip: **{tg['layer0_ratio']:.2f}x** "
                f"(target ≤ 1.05x, {'met' if tg['layer0_ok'] else 'not met'}); logits "
                f"**{tg['logits_ratio']:.2f}x** the pure download (target ≤ 1.10x, "
                f"{'met' if tg['logits_ok'] else 'not met'})."
            )
            cf = a.get("cpu_floor")
            if cf:
                notes.append(
                    f"- {rl}: CPU floor on {cf['cores']} cores: (download {cf['download_core_s']:.2f} core-s, daemon "
                    f"and S3 server, + open, read and forward {cf['client_core_s']:.2f} core-s, the sequential "
                    f"client) / {cf['cores']} = {cf['floor_s']:.2f} s, **{cf['ratio']:.2f}x** the pure download: "
                    "the least wall time any schedule of this work takes on this machine. The execute-while-downloading run kept "
                    f"{a['strategies']['streaming'].get('busy', 0) * 100:.0f}% of it busy."
                )
            own = a["strategies"]["streaming"].get("download_layer0_bytes_s")
            if own is not None:
                notes.append(
                    f"- {rl}: in the same run those bytes were downloaded {own:.2f} s after open(); layer 0 "
                    f"computed {(a['strategies']['streaming']['layer0_s'] - own) * 1000:.0f} ms later "
                    "(written, reported, read, computed)."
                )
    return "\n".join(lines + (["", *notes] if notes else [])) + "\n"


def picture(report: dict[str, Any]) -> str:
    from timeline import Mark, Panel, Row, Segment, render

    columns = []
    for a, raw in zip(report["rates"], report["raw"], strict=True):
        panels = []
        for s in STRATEGIES:
            r = raw.get(s)
            if r is None or "skipped" in r:
                continue
            t0 = r["t"]["open"]
            rows = []
            samples = [(t - t0, v) for t, v in r["samples"]]
            first = next((t for t, v in samples if v > 0), None)
            done = time_at(r["samples"], report["model"]["bytes"])
            dl_row = Row("download")
            if first is not None and done is not None:
                # the counter moves per part: the first byte came up to one poll before it did
                first = max(0.0, first - POLL)
                dl_row.segments += [Segment("setup", 0.0, first), Segment("download", first, done - t0)]
            rows.append(dl_row)
            # A group's bytes arrived after the last group that was ready strictly before it
            # (groups seen ready at the same moment share the interval).
            readies = sorted({g["ready"] - t0 for g in r["groups"] if g["ready"] is not None})
            for g in r["groups"]:
                row = Row(g["group"].replace("layers.", "L"))
                if s == "streaming" and g["ready"] is not None:
                    ready = g["ready"] - t0
                    i = readies.index(ready)
                    row.segments.append(Segment("download", readies[i - 1] if i else r["t"]["opened"] - t0, ready))
                if g["read"] is not None:
                    rs, re_ = g["read"][0] - t0, g["read"][1] - t0
                    if s == "streaming" and g["ready"] is not None:
                        rs = max(rs, g["ready"] - t0)  # before that the read was waiting for bytes
                    row.segments.append(Segment("read", rs, max(rs, re_)))
                if g["want"] is not None and g["start"] is not None:
                    row.segments.append(Segment("wait", g["want"] - t0, g["start"] - t0))
                if g["start"] is not None and g["end"] is not None:
                    row.segments.append(Segment("compute", g["start"] - t0, g["end"] - t0))
                rows.append(row)
            if s == "sequential":
                # load_into maps the files (zero-copy on CPU): its read is one span for all layers
                rows[0].segments.append(Segment("read", r["t"]["prefetched"] - t0, r["t"]["loaded"] - t0))
            st = a["strategies"][s]
            marks = [Mark(st["verified_s"], f"verified {st['verified_s']:.2f} s", "#7b4ea7"),
                     Mark(st["logits_s"], f"logits {st['logits_s']:.2f} s")]  # fmt: skip
            if done is not None:
                marks.insert(0, Mark(done - t0, f"last byte {done - t0:.2f} s", "#4e79a7"))
            panels.append(Panel(f"{rate_label(a['rate'])} · {LABELS[s]}", rows, marks))
        columns.append(panels)
    m = report["model"]
    title = (f"Cold start: {m['bytes'] / 2**30:.2f} GiB Llama-shaped model from S3 to logits "
             f"({report['device']}), time since open()/prefetch was called")  # fmt: skip
    note = f"python tools/{HERE.name} {report['command']}"
    return str(render(columns, title=title, note=note))


def update_doc(doc: Path, text: str) -> None:
    body = doc.read_text()
    if DOC_START not in body or DOC_END not in body:
        raise SystemExit(f"{doc} has no {DOC_START} … {DOC_END} markers to write the table between")
    pre, rest = body.split(DOC_START, 1)
    _, post = rest.split(DOC_END, 1)
    doc.write_text(pre + DOC_START + "\n" + text + DOC_END + post)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="2GiB", help="bytes of bf16 weights (the hidden size grows to reach it)")
    ap.add_argument("--rates", default="300MB,0", help="source rates, comma-separated (0 = unthrottled)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]: where the forward pass runs")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--shards", type=int, default=2, help="safetensors files the model is split into")
    ap.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    ap.add_argument("--out", type=Path, help="write the raw measurements and analysis as JSON")
    ap.add_argument("--logs", type=Path, help="keep each strategy's daemon log in this directory")
    ap.add_argument("--svg", type=Path, help="write the timeline picture here (e.g. docs/coldstart.svg)")
    ap.add_argument(
        "--doc", type=Path, help="rewrite the table between the coldstart markers in this file (docs/benchmarks.md)"
    )
    ap.add_argument("--replot", type=Path, help="redraw --svg/--doc from a --out JSON without measuring")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--ctx", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, json.loads(a.ctx.read_text()))))
        return
    if a.replot:
        report = json.loads(a.replot.read_text())
        m = report["model"]  # the analysis is redone from the raw measurements
        report["rates"] = [analyse(x["rate"], raw, m["bytes"], m["layer0_bytes"], x["header_round_trip_s"])
                           for x, raw in zip(report["rates"], report["raw"], strict=True)]  # fmt: skip
    else:
        report = measure(a)
    print(table(report))
    if a.out and not a.replot:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=1))
    if a.svg:
        a.svg.parent.mkdir(parents=True, exist_ok=True)
        a.svg.write_text(picture(report))
    if a.doc:
        update_doc(a.doc, table(report))


def measure(a: argparse.Namespace) -> dict[str, Any]:
    import s3server

    from weightcache_daemon.config import parse_size

    if a.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(f"--device {a.device}: CUDA is not available on this machine")
    rates = [parse_size(r, "--rates") for r in a.rates.split(",")]
    work = a.work or Path(tempfile.mkdtemp(prefix="wc-bench-cold-"))
    work.mkdir(parents=True, exist_ok=True)
    dims = dims_for(parse_size(a.size, "--size"))
    src = work / "model"
    if a.shards < 1:
        raise SystemExit(f"--shards {a.shards}: must be at least 1")
    total = write_model(src, dims, a.shards)
    b0 = bytes_for_layer0(src)
    files = sorted(str(p) for p in src.glob("*.safetensors"))
    prompt = [(7919 * i + 13) % dims["vocab"] for i in range(a.prompt_tokens)]
    ctx = {"dims": dims, "device": a.device, "prompt": prompt, "ref": str(work / "ref.pt"), "files": files}
    (work / "ctx.json").write_text(json.dumps(ctx))
    run_child("eager", work / "ctx.json")
    srv = s3server.start(work / "s3")
    try:
        c = srv.client()
        bucket, prefix = "bench", "models/llama/"
        c.create_bucket(Bucket=bucket)
        for p in sorted(src.iterdir()):
            c.upload_file(str(p), bucket, prefix + p.name)
        header_rt = header_round_trip(srv, bucket, prefix + Path(files[0]).name)
        shutil.rmtree(src)  # the source lives in S3 only now
        ctx["uri"] = f"s3://{bucket}/{prefix}"
        analyses, raws = [], []
        for rate in rates:
            runs: dict[str, dict[str, Any]] = {}
            for s in ("pure", *STRATEGIES):
                runs[s] = run_strategy(s, rate, ctx, srv, work, a.logs)
                r = runs[s]
                msg = (
                    r.get("skipped")
                    or f"done in {r['t'].get('logits', r['t'].get('committed', 0)) - r['t']['open']:.2f} s"
                )
                print(f"{rate_label(rate)} {s}: {msg}", flush=True)
            analyses.append(analyse(rate, runs, total, b0, header_rt))
            raws.append(runs)
    finally:
        srv.stop()
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    # what defines the measurement (not where its outputs went)
    command = f"--size {a.size} --rates {a.rates}" + (f" --device {a.device}" if a.device != "cpu" else "")
    command += f" --prompt-tokens {a.prompt_tokens}" if a.prompt_tokens != 16 else ""
    command += f" --shards {a.shards}" if a.shards != 2 else ""
    return {
        "model": {"bytes": total, "dims": dims, "layer0_bytes": b0, "prompt_tokens": a.prompt_tokens,
                  "shards": a.shards},
        "device": a.device, "command": command,
        "rates": analyses, "raw": raws,
    }  # fmt: skip


if __name__ == "__main__":
    main()
