"""Benchmark: loading a cached two-shard Llama-shaped model on CPU, against the peers.

One run, every variant in its own fresh process, rounds interleaved (the order rotates each
round), min/median/max reported. Fair to every variant alike: torch, weightcache and the
variant's own library are imported before the clock; one cyclic-GC pass, then the same memory
preparation before every timed load:

  settled    sleep 3 s: memory freed by the previous process goes back to the host first, so
             every load first-touches really fresh memory (the case of a new serving process)
  recycled   the same load once (settled, untimed), everything it loaded freed, then the timed
             load at once: a second load in the same process, which gets memory the allocator
             and the guest still hold (what a benchmark running every variant in one process sees)

Scenarios:
  warm-open           open() to a full state_dict of zero-copy tensors, page cache warm
  warm-open-touched   the same, then one byte read per page of every tensor
  warm-copy           every byte copied into fresh CPU memory (settled): weightcache stream("cpu")
                      vs the peers that copy: Run:ai Model Streamer, tensorizer, fastsafetensors
  warm-copy-recycled  the same into recycled memory
  cold                blobs evicted (posix_fadvise DONTNEED, checked with fincore), every byte read
  first-layer-zero-copy / first-layer-copy
                      cold, until the first layer group's bytes are in memory (each tensor
                      touched once per page), zero-copy variants and copying variants apart
  limits              the machine, in the same run: cold `dd bs=64M`; warm copy (pread from the
                      page cache into touched memory: the copy alone); warm pread into fresh
                      memory (1 thread, and one per CPU); first touch of fresh memory (fill of
                      a model-sized tensor, 1 thread and one per CPU; settled and recycled)

Besides time, every load reports what it cost: CPU seconds (user + system, every thread of the
loading process and of the children it waited for) per GB, page faults per 4 KiB page loaded,
and the daemon's CPU seconds over the same span, so that a reader can tell *why* a number is
what it is (a copy bound by first-touching fresh memory, a loader spinning, a slow disk).
Ratios are taken round by round (variant ÷ weightcache in the same round) and shown as the
median with the spread of the rounds.

    python tools/bench_load.py --size 2GiB --rounds 3 [--busy 2] [--out bench-out/load.json] [--doc docs/benchmarks.md]
    python tools/bench_load.py --from-json bench-out/load.json --doc docs/benchmarks.md

--busy N keeps N CPU-bound processes spinning through every round (settle included), so that
every loader competes for the CPUs as it would beside other work; 0 (the default) is a quiet
run. They run in a session of their own (--busy-group node: the kernel schedules them as another
group, as it does other containers' work) or in the loader's (--busy-group process: each
runnable thread gets an equal share, so a loader with more threads gets more of the CPUs).

--doc rewrites the table between the bench-load markers in that file (a busy run's between the
bench-load-busy-node or bench-load-busy-process markers).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
SETTLE = 3.0

# The module each variant needs, imported before the clock (tensorizer's import alone takes
# ~0.2 s here; timing it would charge a once-per-process cost to the load).
IMPORTS = {
    "safetensors_load_file": "safetensors.torch",
    "safetensors_safe_open": "safetensors",
    "runai_streamer": "runai_model_streamer",
    "tensorizer": "tensorizer",
    "fastsafetensors": "fastsafetensors",
}

# scenario -> (variants, the weightcache variant the ratios are taken against)
SCENARIOS: dict[str, tuple[list[str], str]] = {
    "warm-open": (["weightcache_open", "safetensors_load_file", "safetensors_safe_open"], "weightcache_open"),
    "warm-open-touched": (["weightcache_open", "safetensors_load_file", "safetensors_safe_open"], "weightcache_open"),
    "warm-copy": (
        ["weightcache_stream", "weightcache_stream_reuse", "runai_streamer", "tensorizer", "fastsafetensors"],
        "weightcache_stream",
    ),
    "warm-copy-recycled": (
        ["weightcache_stream", "runai_streamer", "tensorizer", "fastsafetensors"],
        "weightcache_stream",
    ),
    "cold": (
        [
            "weightcache_stream",
            "weightcache_stream_reuse",
            "weightcache_open",
            "runai_streamer",
            "tensorizer",
            "fastsafetensors",
            "safetensors_safe_open",
        ],
        "weightcache_stream",
    ),
    "first-layer-zero-copy": (
        ["weightcache_open", "weightcache_stream_views", "safetensors_safe_open"],
        "weightcache_open",
    ),
    "first-layer-copy": (
        ["weightcache_stream", "weightcache_stream_reuse", "tensorizer", "runai_streamer", "fastsafetensors"],
        "weightcache_stream",
    ),
    "limits": (
        ["dd_cold", "copy_warm", "pread_fresh_1", "pread_fresh_n", "touch_fresh_1", "touch_fresh_n", "touch_recycled"],
        "",
    ),
}


# ---------------------------------------------------------------- child side


def _touch(t: Any) -> int:
    """Read one byte per 4 KiB page: forces lazily mapped tensors in, costs little compute.
    With numpy, on this thread: a torch reduction would wake torch's worker threads, which spin
    while this one waits for the disk, and charge that spinning to the loader's CPU seconds."""
    import torch

    if t.numel() == 0:
        return 0
    flat = t.reshape(-1).view(torch.uint8).numpy()
    return int(flat[::4096].sum()) + int(flat[-1])


def child(variant: str, files: list[str], socket_dir: str, tzfile: str, mode: str, recycled: bool) -> dict[str, Any]:
    """One timed load. mode: "full" (every tensor, untouched unless mapped and cold), "touch"
    (every tensor, every page touched), "first" (stop once the first layer group is in).
    recycled: the same load once untimed, its tensors freed, then the timed one at once."""
    if recycled:
        child(variant, files, socket_dir, tzfile, mode, False)  # returns having dropped what it loaded
    import importlib

    import torch

    import weightcache

    if variant in IMPORTS:
        importlib.import_module(IMPORTS[variant])
    first_layer_names = set(json.loads(os.environ["WC_FIRST_LAYER"]))
    total = sum(os.path.getsize(f) for f in files)
    first_only = mode == "first"
    touch_all = mode == "touch"
    # Importing torch leaves a full cyclic-GC pass pending (~80 ms here) that lands on whatever
    # allocates next; a server imports torch long before it loads weights, so run it now, for
    # every variant alike, instead of charging it to the first load.
    gc.collect()
    copy_buf = (
        torch.empty(max(os.path.getsize(f) for f in files), dtype=torch.uint8) if variant == "copy_warm" else None
    )
    if copy_buf is not None:
        copy_buf.fill_(1)  # touched before the clock: this limit is the copy alone
    if not recycled:
        time.sleep(SETTLE)  # memory freed before goes back to the host: the load touches fresh memory
    nbytes = 0
    first: float | None = None
    opened: float | None = None
    usage = _Usage(os.environ.get("WC_DAEMON_PID"))
    t0 = time.perf_counter()

    kept: list[Any] = []  # every tensor lives until the clock stops, as in a model: no variant frees in the window

    def got(name: str, t: Any) -> None:
        nonlocal nbytes, first
        kept.append(t)
        nbytes += t.numel() * t.element_size()
        if first is None and name in first_layer_names:
            first_layer_names.discard(name)
            _touch(t)
            if not first_layer_names:
                first = time.perf_counter() - t0

    def done() -> bool:
        return first_only and first is not None

    if variant == "weightcache_open":
        c = weightcache.connect(socket_dir)
        m = c.open("bench")
        sd = m.state_dict()
        opened = time.perf_counter() - t0
        for k, v in sd.items():
            got(k, v)
            if touch_all:
                _touch(v)
            if done():
                break
    elif variant.startswith("weightcache_stream"):
        c = weightcache.connect(socket_dir)
        m = c.open("bench")
        opened = time.perf_counter() - t0
        views = variant.endswith("_views")
        for _, group in m.stream("cpu", prefetch=2, reuse=variant.endswith("_reuse"), copy=not views):
            for k, v in group.items():
                got(k, v)
                if views or touch_all:
                    _touch(v)
            if done():
                break
        elapsed = time.perf_counter() - t0
        used = usage.delta()
        m.close()  # not timed: stopping the read-ahead of the groups not asked for
        c.close()
        return {"seconds": elapsed, "bytes": nbytes, "first": first, "open": opened, **used}
    elif variant == "safetensors_load_file":
        from safetensors.torch import load_file

        for f in files:
            for k, v in load_file(f).items():
                got(k, v)
                if touch_all:
                    _touch(v)
    elif variant == "safetensors_safe_open":
        from safetensors import safe_open

        for f in files:
            with safe_open(f, "pt") as h:
                for k in h.keys():
                    v = h.get_tensor(k)
                    got(k, v)
                    if touch_all:
                        _touch(v)
                    if done():
                        break
            if done():
                break
    elif variant == "runai_streamer":
        from runai_model_streamer import SafetensorsStreamer

        with SafetensorsStreamer() as s:
            s.stream_files(files)
            for k, v in s.get_tensors():
                got(k, v)
                if done():
                    break
    elif variant == "tensorizer":
        from tensorizer import TensorDeserializer

        d = TensorDeserializer(tzfile, device="cpu", lazy_load=first_only)
        for k in d.keys():
            got(k, d[k])
            if done():
                break
    elif variant == "fastsafetensors":
        from fastsafetensors import fastsafe_open

        with fastsafe_open(filenames=files, nogds=True, device="cpu") as f:
            for k in f.keys():
                got(k, f.get_tensor(k))
                if done():
                    break
    elif variant == "dd_cold":
        for f in files:
            subprocess.run(["dd", f"if={f}", "of=/dev/null", "bs=64M"], check=True, capture_output=True)
            nbytes += os.path.getsize(f)
    elif variant == "copy_warm":
        assert copy_buf is not None
        view = memoryview(copy_buf.numpy())
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            size = os.path.getsize(f)
            done_bytes = 0
            while done_bytes < size:
                done_bytes += os.preadv(fd, [view[done_bytes:size]], done_bytes)
            os.close(fd)
            nbytes += size
    elif variant.startswith("pread_fresh_"):
        # Warm bytes into fresh memory with plain preads: what any copying loader is bound by.
        from concurrent.futures import ThreadPoolExecutor

        threads = 1 if variant.endswith("_1") else len(os.sched_getaffinity(0))
        jobs = []
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            size = os.path.getsize(f)
            dest = torch.empty(size, dtype=torch.uint8)
            kept.append(dest)
            view = memoryview(dest.numpy())
            step = -(-size // threads)
            jobs += [(fd, view[o : o + step], o) for o in range(0, size, step)]
            nbytes += size
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda j: _pread_all(*j), jobs))
    elif variant.startswith("touch_"):
        b = torch.empty(total, dtype=torch.uint8)
        if variant == "touch_fresh_1":
            torch.set_num_threads(1)
        b.fill_(1)
        kept.append(b)
        nbytes = total
    else:
        raise SystemExit(f"unknown variant {variant}")
    elapsed = time.perf_counter() - t0
    return {"seconds": elapsed, "bytes": nbytes, "first": first, "open": opened, **usage.delta()}


def _pread_all(fd: int, dest: memoryview, offset: int) -> None:
    done = 0
    while done < len(dest):
        done += os.preadv(fd, [dest[done:]], offset + done)


def _proc_cpu(pid: str | None) -> float:
    """CPU seconds (user + system) another process has used so far; 0 if it cannot be read."""
    if not pid:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Usage:
    """What a timed load cost besides time: CPU seconds of this process (all its threads) and
    of the children it waited for (dd), page faults, and the daemon's CPU over the same span."""

    def __init__(self, daemon_pid: str | None) -> None:
        import resource

        self._daemon_pid = daemon_pid
        self._self0 = resource.getrusage(resource.RUSAGE_SELF)
        self._kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self._daemon0 = _proc_cpu(daemon_pid)

    def delta(self) -> dict[str, float]:
        import resource

        s, k = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        s0, k0 = self._self0, self._kids0
        return {
            "user_s": s.ru_utime - s0.ru_utime + k.ru_utime - k0.ru_utime,
            "sys_s": s.ru_stime - s0.ru_stime + k.ru_stime - k0.ru_stime,
            "minflt": s.ru_minflt - s0.ru_minflt + k.ru_minflt - k0.ru_minflt,
            "majflt": s.ru_majflt - s0.ru_majflt + k.ru_majflt - k0.ru_majflt,
            "daemon_cpu_s": _proc_cpu(self._daemon_pid) - self._daemon0,
        }


# ---------------------------------------------------------------- orchestrator


def drop(paths: list[str]) -> int:
    """Evict the files' pages; returns how many bytes fincore still finds resident."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    return resident(paths)


def resident(paths: list[str]) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", *paths],
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    return sum(int(x) for x in out.split())


def warm(paths: list[str]) -> None:
    if resident(paths) < sum(os.path.getsize(p) for p in paths):
        for p in paths:
            subprocess.run(["cat", p], stdout=subprocess.DEVNULL, check=True)


def run(variant: str, ctx: dict[str, Any], mode: str, recycled: bool = False) -> dict[str, Any]:
    env = dict(os.environ, WC_FIRST_LAYER=json.dumps(ctx["first_layer"]), WC_DAEMON_PID=str(ctx.get("daemon_pid", "")))
    load = os.getloadavg()[0]
    module = IMPORTS.get(variant)
    if module is not None and importlib.util.find_spec(module.split(".")[0]) is None:
        return {"error": f"{module} is not installed", "load": load}
    r = subprocess.run(
        [sys.executable, str(HERE), "--child", variant, "--socket-dir", ctx["socket_dir"], "--tzfile", ctx["tzfile"],
         "--mode", mode, *(["--recycled"] if recycled else []), *ctx["files"]],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    if r.returncode != 0:
        lines = (r.stderr or r.stdout).strip().splitlines() or ["(no output)"]
        return {"error": lines[-1][:300], "load": load}
    return {**json.loads(r.stdout.strip().splitlines()[-1]), "load": load}


def one(scen: str, variant: str, ctx: dict[str, Any]) -> dict[str, Any]:
    """One timed load of a variant in a scenario, the page cache prepared for it."""
    allfiles = [*ctx["files"], ctx["tzfile"]]
    cold = scen in ("cold", "first-layer-zero-copy", "first-layer-copy") or variant == "dd_cold"
    left = 0
    if cold:
        left = drop(allfiles)
    else:
        warm(allfiles)
    if scen == "limits":
        r = run(variant, ctx, "full", recycled=variant == "touch_recycled")
    elif scen.startswith("first-layer"):
        r = run(variant, ctx, "first")
    else:
        touch = scen in ("warm-open-touched", "cold")
        r = run(variant, ctx, "touch" if touch else "full", recycled=scen == "warm-copy-recycled")
    if cold:
        r["resident_before"] = left
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="2GiB")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset to run")
    ap.add_argument("--variants", default="", help="comma-separated: only these variants of each scenario")
    ap.add_argument("--busy", type=int, default=0, help="CPU-bound processes spinning through the rounds")
    ap.add_argument("--busy-group", choices=("node", "process"), default="node",
                    help="node: the spinning processes in a session of their own (other work on the node); "
                         "process: in the loader's session (other work in the same container)")  # fmt: skip
    ap.add_argument("--work", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--doc", "--readme", dest="doc", type=Path,
                    help="rewrite the table between the bench-load markers in this file (docs/benchmarks.md)")  # fmt: skip
    ap.add_argument("--from-json", type=Path, help="no run: print (and --doc) the table of a saved --out report")
    ap.add_argument("--child")
    ap.add_argument("--socket-dir", default="")
    ap.add_argument("--tzfile", default="")
    ap.add_argument("--mode", default="full")
    ap.add_argument("--recycled", action="store_true")
    ap.add_argument("files", nargs="*")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.files, a.socket_dir, a.tzfile, a.mode, a.recycled)))
        return
    if a.from_json:
        table = _table(json.loads(a.from_json.read_text()))
        print(table)
        if a.doc:
            saved = json.loads(a.from_json.read_text())
            _write_doc(a.doc, table, _doc_tag(saved.get("busy", 0), saved.get("busy_group", "node")))
        return
    scenarios = [x for x in a.scenarios.split(",") if x]
    unknown = [x for x in scenarios if x not in SCENARIOS]
    if unknown:
        raise SystemExit(f"--scenarios: unknown {unknown}; known: {', '.join(SCENARIOS)}")
    only = {x for x in a.variants.split(",") if x}
    known = {v for s in scenarios for v in SCENARIOS[s][0]}
    if only - known:
        raise SystemExit(f"--variants: {sorted(only - known)} not in {scenarios}; known: {', '.join(sorted(known))}")
    import make_model  # tools/ is on sys.path when this runs as `python tools/bench_load.py`
    from harness import start_daemon

    from weightcache_daemon.config import parse_size

    work = a.work or Path(tempfile.mkdtemp(prefix="wc-bench-load-"))
    work.mkdir(parents=True, exist_ok=True)
    src = make_model.make_model(work / "src", parse_size(a.size, "--size"), shards=2)
    daemon = start_daemon(work / "d", None, client_sources=["*"])
    admin = daemon.admin_socket
    try:
        info = json.loads(subprocess.run(
            ["cachectl", "--admin-socket", str(admin), "prefetch", f"file://{src}/", "--name", "bench", "--json"],
            check=True, capture_output=True, text=True).stdout)  # fmt: skip
        shutil.rmtree(src)
        view = Path(info["path"])
        files = [str((view / n).resolve()) for n in sorted(os.listdir(view)) if n.endswith(".safetensors")]
        tzfile = str(work / "model.tensors")
        subprocess.run(  # the tensorizer peer's own format (a missing tensorizer fails its rows only)
            [
                sys.executable,
                "-c",
                (
                    "import sys; from safetensors.torch import load_file; from tensorizer import TensorSerializer\n"
                    "sd = {}\n[sd.update(load_file(f)) for f in sys.argv[2:]]\n"
                    "s = TensorSerializer(sys.argv[1]); s.write_state_dict(sd); s.close()"
                ),
                tzfile,
                *files,
            ],
            check=importlib.util.find_spec("tensorizer") is not None,
        )
        import weightcache

        with weightcache.connect(daemon.socket_dir) as c, c.open("bench") as m:
            first = m.layers()[0]
            first_layer = list(first.tensors)
        total = sum(os.path.getsize(f) for f in files)
        ctx = {
            "socket_dir": str(daemon.socket_dir),
            "files": files,
            "tzfile": tzfile,
            "first_layer": first_layer,
            "daemon_pid": daemon.proc.pid,
        }
        res: dict[str, dict[str, list[dict[str, Any]]]] = {s: {} for s in scenarios}
        with _Busy(a.busy, a.busy_group):
            for rnd in range(a.rounds):
                for scen in scenarios:
                    variants = [v for v in SCENARIOS[scen][0] if not only or v in only]
                    if not variants:
                        continue
                    k = rnd % len(variants)
                    for v in variants[k:] + variants[:k]:  # rotated: no variant always runs first
                        res[scen].setdefault(v, []).append(one(scen, v, ctx))
                print(f"round {rnd + 1} done", flush=True)
        report: dict[str, Any] = {
            "bytes": total,
            "first_layer": {"name": first.name, "bytes": first.nbytes, "tensors": len(first_layer)},
            "rounds": a.rounds,
            "cpus": os.cpu_count(),
            "busy": a.busy,
            "busy_group": a.busy_group,
            "scenarios": {},
        }
        for scen, by_variant in res.items():
            rows = {}
            for v, runs in by_variant.items():
                key = "first" if scen.startswith("first-layer") else "seconds"
                vals = sorted(r[key] for r in runs if "error" not in r and r.get(key) is not None)
                rows[v] = {
                    "min_s": vals[0] if vals else None,
                    "median_s": statistics.median(vals) if vals else None,
                    "max_s": vals[-1] if vals else None,
                    "runs": runs,
                }
            report["scenarios"][scen] = rows
        table = _table(report)
        print(table)
        if a.out:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(report, indent=1))
            a.out.with_suffix(".md").write_text(table)
        if a.doc:
            _write_doc(a.doc, table, _doc_tag(a.busy, a.busy_group))
    finally:
        daemon.stop()
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)


class _Busy:
    """``n`` processes spinning on a CPU each while the rounds run. ``group="node"``: in a
    session of their own, like other containers' work on a node, which the kernel schedules as
    another group (autogroup, or a pod's cgroup), so the loader's share of the CPUs does not
    depend on how many threads it runs; ``group="process"``: in the loader's own session, where
    each runnable thread gets an equal share (like other work inside the serving container)."""

    def __init__(self, n: int, group: str = "node") -> None:
        self._n = n
        self._own_session = group == "node"
        self._procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> _Busy:
        for _ in range(self._n):
            self._procs.append(
                subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=self._own_session)
            )
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self._procs:
            p.kill()
            p.wait()


def _doc_tag(busy: int, group: str) -> str:
    return f"bench-load-busy-{group}" if busy else "bench-load"


def _write_doc(path: Path, table: str, tag: str) -> None:
    start, end = f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"
    text = path.read_text()
    pat = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pat.search(text):
        raise SystemExit(f"{path}: no {start} ... {end} markers to write the table between")
    path.write_text(pat.sub(lambda _: f"{start}\n{table}{end}", text, count=1))


def _ms(x: float | None) -> str:
    return f"{x * 1000:.0f}" if x is not None else "-"


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _ratio(runs: list[dict[str, Any]], base: list[dict[str, Any]], key: str) -> str:
    """The variant's time over weightcache's, round by round: median [min-max] of the rounds."""
    rs = sorted(
        r[key] / b[key]
        for r, b in zip(runs, base, strict=False)
        if "error" not in r and "error" not in b and r.get(key) and b.get(key)
    )
    if not rs:
        return ""
    return f"{statistics.median(rs):.2f}x [{rs[0]:.2f}-{rs[-1]:.2f}]"


def _costs(runs: list[dict[str, Any]], size: int) -> tuple[str, str, str]:
    """CPU seconds per GB, page faults per 4 KiB page, daemon CPU seconds: medians of the rounds."""
    ok = [r for r in runs if "error" not in r and "user_s" in r and r.get("bytes")]
    cpu = _median([(r["user_s"] + r["sys_s"]) / (r["bytes"] / 1e9) for r in ok])
    faults = _median([(r["minflt"] + r["majflt"]) / (r["bytes"] / 4096) for r in ok])
    daemon = _median([r["daemon_cpu_s"] for r in ok])
    return (
        f"{cpu:.2f}" if cpu is not None else "-",
        f"{faults:.2f}" if faults is not None else "-",
        f"{daemon:.2f}" if daemon is not None else "-",
    )


def _busy_text(n: int, group: str) -> str:
    if not n:
        return ", nothing else started"
    where = "in a session of their own" if group == "node" else "in the loader's session"
    return f" with {n} CPU-bound processes spinning beside every load ({where})"


def _table(report: dict[str, Any]) -> str:
    total = report["bytes"]
    fl = report["first_layer"]
    loads = [r["load"] for rows in report["scenarios"].values() for v in rows.values() for r in v["runs"]]
    out = [
        f"model: {total / 2**30:.2f} GiB, 2 shards; first layer group `{fl['name']}`: {fl['bytes'] / 2**20:.0f} MiB, "
        f"{fl['tensors']} tensors; {report['rounds']} rounds on {report['cpus']} CPUs"
        f"{_busy_text(report.get('busy', 0), report.get('busy_group', 'node'))}, 1-minute load average "
        f"{min(loads, default=0):.1f} to {max(loads, default=0):.1f} during the runs\n",
        "| scenario | variant | min ms | median ms | max ms | GB/s (median) | CPU s/GB | faults/page | daemon CPU s "
        "| variant ÷ weightcache, median [spread] of the rounds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for scen, rows in report["scenarios"].items():
        ours = SCENARIOS[scen][1]
        base_runs = rows.get(ours, {}).get("runs", [])
        key = "first" if scen.startswith("first-layer") else "seconds"
        for v, r in rows.items():
            m = r["median_s"]
            if m is None:
                err = next((x.get("error") for x in r["runs"] if "error" in x), "n/a")
                out.append(f"| {scen} | {v} | failed: {str(err).replace('|', '/')} | | | | | | | |")
                continue
            size = fl["bytes"] if scen.startswith("first-layer") else total
            gbs = f"{size / m / 1e9:.2f}" if scen != "warm-open" else ""
            ratio = _ratio(r["runs"], base_runs, key) if ours else ""
            cpu, faults, daemon = _costs(r["runs"], size)
            name = f"**{v}**" if v == ours else v
            out.append(
                f"| {scen} | {name} | {_ms(r['min_s'])} | {_ms(m)} | {_ms(r['max_s'])} | {gbs} | {cpu} | {faults} "
                f"| {daemon} | {ratio} |"
            )
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
