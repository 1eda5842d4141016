"""Benchmark: loading a cached ~3 GiB two-shard Llama-shaped model on CPU, against the peers.

One run, every variant in its own fresh process (imports done before the clock starts; a
3 s settle before each timed load so freed memory is handed back alike), rounds
interleaved, medians reported:

  warm-zero-copy   open() to a full state_dict of zero-copy tensors (weightcache: daemon
                   round trip + descriptor passing + mmap) vs safetensors load_file / safe_open
                   (both mmap-backed in safetensors >= 0.4)
  warm-copy        every byte copied into fresh CPU memory: weightcache stream("cpu") vs the
                   peers that copy: Run:ai Model Streamer, tensorizer, fastsafetensors (nogds)
  cold             files evicted (posix_fadvise DONTNEED), every byte read: the same variants,
                   mmap-backed ones touching every page, plus dd bs=64M of the same files
  first-layer      cold, time until the first layer group's bytes are in memory

    python tools/bench_load.py --size 3GiB --rounds 2 [--out bench-out/load.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
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

ZERO = ["weightcache_open", "safetensors_load_file", "safetensors_safe_open"]
COPY = ["weightcache_stream", "weightcache_stream_reuse", "runai_streamer", "tensorizer", "fastsafetensors"]


# ---------------------------------------------------------------- child side


def _touch(t: Any) -> int:
    """Read one byte per 4 KiB page: forces lazily mapped tensors in, costs little compute."""
    import torch

    if t.numel() == 0:
        return 0
    flat = t.reshape(-1).view(torch.uint8)
    return int(flat[::4096].sum()) + int(flat[-1])


def child(variant: str, files: list[str], socket_dir: str, tzfile: str, first_only: bool) -> dict[str, Any]:
    import torch  # noqa: F401 - imported before the clock, for every variant

    import weightcache

    first_layer_names = json.loads(os.environ["WC_FIRST_LAYER"])
    # Importing torch leaves a full cyclic-GC pass pending (~80 ms here) that lands on whatever
    # allocates next; a server imports torch long before it loads weights, so run it now, for
    # every variant alike, instead of charging it to the first load.
    gc.collect()
    time.sleep(SETTLE)
    nbytes = 0
    first: float | None = None
    t0 = time.perf_counter()

    def got(name: str, t: Any) -> None:
        nonlocal nbytes, first
        nbytes += t.numel() * t.element_size()
        if first is None and name in first_layer_names:
            first_layer_names.remove(name)
            _touch(t)
            if not first_layer_names:
                first = time.perf_counter() - t0

    if variant == "weightcache_open":
        c = weightcache.connect(socket_dir)
        m = c.open("bench")
        sd = m.state_dict()
        elapsed_open = time.perf_counter() - t0
        for k, v in sd.items():
            got(k, v)
        if os.environ.get("WC_TOUCH") == "1":
            for v in sd.values():
                _touch(v)
        elapsed = time.perf_counter() - t0
        return {"seconds": elapsed if os.environ.get("WC_TOUCH") == "1" else elapsed_open, "bytes": nbytes,
                "first": first}  # fmt: skip
    if variant.startswith("weightcache_stream"):
        c = weightcache.connect(socket_dir)
        m = c.open("bench")
        views = variant.endswith("_views")
        for _, group in m.stream("cpu", prefetch=2, reuse=variant.endswith("_reuse"), copy=not views):
            for k, v in group.items():
                got(k, v)
                if views:
                    _touch(v)
            if first_only and first is not None:
                break
        m.close()
        c.close()
    elif variant == "safetensors_load_file":
        from safetensors.torch import load_file

        for f in files:
            for k, v in load_file(f).items():
                got(k, v)
                if os.environ.get("WC_TOUCH") == "1":
                    _touch(v)
    elif variant == "safetensors_safe_open":
        from safetensors import safe_open

        for f in files:
            with safe_open(f, "pt") as h:
                for k in h.keys():
                    v = h.get_tensor(k)
                    got(k, v)
                    if os.environ.get("WC_TOUCH") == "1":
                        _touch(v)
                    if first_only and first is not None:
                        break
            if first_only and first is not None:
                break
    elif variant == "runai_streamer":
        from runai_model_streamer import SafetensorsStreamer

        with SafetensorsStreamer() as s:
            s.stream_files(files)
            for k, v in s.get_tensors():
                got(k, v)
                if first_only and first is not None:
                    break
    elif variant == "tensorizer":
        from tensorizer import TensorDeserializer

        d = TensorDeserializer(tzfile, device="cpu", lazy_load=first_only)
        for k in d.keys():
            got(k, d[k])
            if first_only and first is not None:
                break
    elif variant == "fastsafetensors":
        from fastsafetensors import fastsafe_open

        with fastsafe_open(filenames=files, nogds=True, device="cpu") as f:
            for k in f.keys():
                got(k, f.get_tensor(k))
                if first_only and first is not None:
                    break
    elif variant == "dd":
        for f in files:
            subprocess.run(["dd", f"if={f}", "of=/dev/null", "bs=64M"], check=True, capture_output=True)
            nbytes += os.path.getsize(f)
    else:
        raise SystemExit(f"unknown variant {variant}")
    return {"seconds": time.perf_counter() - t0, "bytes": nbytes, "first": first}


# ---------------------------------------------------------------- orchestrator


def drop(paths: list[str]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def warm(paths: list[str]) -> None:
    for p in paths:
        subprocess.run(["cat", p], stdout=subprocess.DEVNULL, check=True)


def run(variant: str, ctx: dict[str, Any], *, touch: bool = False, first_only: bool = False) -> dict[str, Any]:
    env = dict(os.environ, WC_FIRST_LAYER=json.dumps(ctx["first_layer"]), WC_TOUCH="1" if touch else "0")
    r = subprocess.run(
        [sys.executable, str(HERE), "--child", variant, "--socket-dir", ctx["socket_dir"], "--tzfile", ctx["tzfile"],
         *(["--first-only"] if first_only else []), *ctx["files"]],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    if r.returncode != 0:
        return {"error": (r.stderr or r.stdout).strip().splitlines()[-1][:300]}
    return dict(json.loads(r.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="3GiB")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child")
    ap.add_argument("--socket-dir", default="")
    ap.add_argument("--tzfile", default="")
    ap.add_argument("--first-only", action="store_true")
    ap.add_argument("files", nargs="*")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.files, a.socket_dir, a.tzfile, a.first_only)))
        return
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
        subprocess.run(
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
            check=True,
        )
        import weightcache

        with weightcache.connect(daemon.socket_dir) as c, c.open("bench") as m:
            first_layer = list(m.layers()[0].tensors)
        total = sum(os.path.getsize(f) for f in files)
        ctx = {"socket_dir": str(daemon.socket_dir), "files": files, "tzfile": tzfile, "first_layer": first_layer}
        allfiles = [*files, tzfile]
        res: dict[str, dict[str, list[dict[str, Any]]]] = {
            s: {} for s in ("warm-zero-copy", "warm-zero-copy-touched", "warm-copy", "cold", "first-layer")
        }
        for rnd in range(a.rounds):
            warm(allfiles)
            for v in ZERO:
                res["warm-zero-copy"].setdefault(v, []).append(run(v, ctx))
                res["warm-zero-copy-touched"].setdefault(v, []).append(run(v, ctx, touch=True))
            for v in COPY:
                warm(allfiles)
                res["warm-copy"].setdefault(v, []).append(run(v, ctx))
            for v in [*COPY, "weightcache_stream_views", "safetensors_safe_open", "dd"]:
                drop(allfiles)
                res["cold"].setdefault(v, []).append(run(v, ctx, touch=True))
            for v in [
                "weightcache_stream",
                "weightcache_stream_reuse",
                "weightcache_stream_views",
                "runai_streamer",
                "tensorizer",
                "fastsafetensors",
                "safetensors_safe_open",
            ]:
                drop(allfiles)
                res["first-layer"].setdefault(v, []).append(run(v, ctx, first_only=True))
            print(f"round {rnd + 1} done", flush=True)
        report: dict[str, Any] = {"bytes": total, "scenarios": {}}
        for scen, by_variant in res.items():
            rows = {}
            for v, runs in by_variant.items():
                ok = [r for r in runs if "error" not in r]
                key = "first" if scen == "first-layer" else "seconds"
                vals = [r[key] for r in ok if r.get(key) is not None]
                rows[v] = {"median_s": statistics.median(vals) if vals else None, "runs": runs}
            report["scenarios"][scen] = rows
        print(json.dumps(report, indent=1)[:4000])
        print(_table(report, total))
        if a.out:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(report, indent=1))
            a.out.with_suffix(".md").write_text(_table(report, total))
    finally:
        daemon.stop()
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)


def _table(report: dict[str, Any], total: int) -> str:
    out = [f"model: {total / 2**30:.2f} GiB, 2 shards\n", "| scenario | variant | median | GB/s | variant time ÷ weightcache time |",
           "|---|---|---|---|---|"]  # fmt: skip
    ours = {"warm-zero-copy": "weightcache_open", "warm-zero-copy-touched": "weightcache_open",
            "warm-copy": "weightcache_stream", "cold": "weightcache_stream", "first-layer": "weightcache_stream"}  # fmt: skip
    for scen, rows in report["scenarios"].items():
        base = rows.get(ours[scen], {}).get("median_s")
        for v, r in rows.items():
            m = r["median_s"]
            if m is None:
                err = next((x.get("error") for x in r["runs"] if "error" in x), "n/a")
                out.append(f"| {scen} | {v} | failed: {err} | | |")
                continue
            gbs = f"{total / m / 1e9:.2f}" if scen not in ("first-layer", "warm-zero-copy") else ""
            ratio = f"{m / base:.2f}x" if base else ""
            out.append(f"| {scen} | {v} | {m * 1000:.0f} ms | {gbs} | {ratio} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
