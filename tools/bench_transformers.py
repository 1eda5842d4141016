"""Benchmark: a transformers model from the cache in one call vs transformers' own from_pretrained.

A random-init Llama (bf16, ~0.75 GiB by default, saved by save_pretrained) is fetched into a
real weightcached; then, in one run, rounds interleaved, each variant in a fresh process
(torch and transformers imported, transformers' lazy modules resolved and a GC pass done
before the clock), page cache warm:

  transformers_original   AutoModelForCausalLM.from_pretrained(<original directory>)
  transformers_via_path   connect + open + AutoModelForCausalLM.from_pretrained(model.path):
                          an unmodified path loader reading through the granted descriptors
  weightcache_one_call    weightcache.transformers.from_pretrained(name): config, model built
                          on meta, zero-copy parameters, tokenizer — one call

The clock stops when the model is ready for a forward pass; each child then runs one forward
pass and reports a checksum of the logits, which must agree across variants. Each child also
reports its CPU time (all its threads) and, for the path variant, where the time went (connect,
open, building the path directory, transformers' load): on a busy machine wall times swing by
several times, CPU times much less.

    python tools/bench_transformers.py --rounds 3 [--layers 6] [--out bench-out/transformers.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
VARIANTS = ["transformers_original", "transformers_via_path", "weightcache_one_call"]


def child(variant: str, original: str, socket_dir: str) -> dict[str, Any]:
    import accelerate  # noqa: F401
    import torch
    import transformers

    import weightcache
    from weightcache.transformers import from_pretrained

    # transformers resolves its modules lazily on first attribute access (~3 s here for Llama):
    # a server pays that once at start, not per load, so it is paid here for every variant.
    _ = (transformers.AutoConfig, transformers.AutoModelForCausalLM, transformers.LlamaForCausalLM,
         transformers.GenerationConfig, transformers.AutoTokenizer)  # fmt: skip
    gc.collect()  # the pass importing torch leaves pending, charged to nobody's load
    keep: list[Any] = []
    phases: dict[str, list[float]] = {}  # phase -> [wall s, CPU s of this process, all threads]
    t0, c0 = time.perf_counter(), time.process_time()
    last = [t0, c0]

    def phase(name: str) -> None:
        now = [time.perf_counter(), time.process_time()]
        phases[name] = [now[0] - last[0], now[1] - last[1]]
        last[:] = now

    if variant == "transformers_original":
        model = transformers.AutoModelForCausalLM.from_pretrained(original)
    elif variant == "transformers_via_path":
        c = weightcache.connect(socket_dir)
        phase("connect")
        m = c.open("bench")
        phase("open")
        path = m.path
        phase("path")
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
        phase("from_pretrained")
        keep += [m, c]
    elif variant == "weightcache_one_call":
        lm = from_pretrained("bench", socket_dir=socket_dir)
        model = lm.model
        keep.append(lm)
    else:
        raise SystemExit(f"unknown variant {variant}")
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])).logits
    for k in keep:
        k.close()
    return {"seconds": seconds, "cpu_seconds": cpu, "phases": phases, "checksum": float(logits.double().sum()),
            "dtype": str(logits.dtype)}  # fmt: skip


def build(directory: Path, layers: int) -> int:
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(directory, safe_serialization=True)
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def run(variant: str, original: Path, socket_dir: Path) -> dict[str, Any]:
    r = subprocess.run(
        [sys.executable, str(HERE), "--child", variant, "--original", str(original), "--socket-dir", str(socket_dir)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        return {"error": (r.stderr or r.stdout).strip().splitlines()[-1][:300]}
    return dict(json.loads(r.stdout.strip().splitlines()[-1]))


def warm(directory: Path) -> None:
    for p in sorted(directory.iterdir()):
        if p.is_file():
            subprocess.run(["cat", str(p)], stdout=subprocess.DEVNULL, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", type=int, default=6, help="decoder layers (6: ~0.75 GiB in bf16)")
    ap.add_argument("--work", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child")
    ap.add_argument("--original", default="")
    ap.add_argument("--socket-dir", default="")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.original, a.socket_dir)))
        return
    from harness import start_daemon  # tools/ is on sys.path when this runs as `python tools/...`

    work = a.work or Path(tempfile.mkdtemp(prefix="wc-bench-transformers-"))
    work.mkdir(parents=True, exist_ok=True)
    original = work / "llama"
    size = build(original, a.layers)
    daemon = start_daemon(work / "d", None, client_sources=["*"])
    try:
        daemon.ctl("prefetch", f"file://{original}/", "--name", "bench")
        results: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
        for rnd in range(a.rounds):
            for v in VARIANTS:
                warm(original)  # the store's blobs were read (hashed) by the prefetch, and stay warm
                results[v].append(run(v, original, daemon.socket_dir))
            print(f"round {rnd + 1} done", flush=True)
        checks = {r["checksum"] for runs in results.values() for r in runs if "error" not in r}
        report: dict[str, Any] = {"bytes": size, "same_logits": len(checks) == 1, "variants": {}}
        for v, runs in results.items():
            ok = [r for r in runs if "error" not in r]
            report["variants"][v] = {
                "median_s": statistics.median(r["seconds"] for r in ok) if ok else None,
                "median_cpu_s": statistics.median(r["cpu_seconds"] for r in ok) if ok else None,
                "phases": {
                    p: [statistics.median(r["phases"][p][i] for r in ok) for i in (0, 1)]
                    for p in (ok[0]["phases"] if ok else {})
                },
                "runs": runs,
            }
        table = _table(report)
        print(table)
        if a.out:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(report, indent=1))
            a.out.with_suffix(".md").write_text(table)
    finally:
        daemon.stop()
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)


def _table(report: dict[str, Any]) -> str:
    base = report["variants"]["transformers_original"]
    out = [
        f"model: {report['bytes'] / 2**30:.2f} GiB bf16 Llama; logits identical across variants: "
        f"{report['same_logits']}\n",
        "| variant | median wall | original ÷ variant (wall) | median CPU | original ÷ variant (CPU) |",
        "|---|---|---|---|---|",
    ]
    for v, r in report["variants"].items():
        m, c = r["median_s"], r["median_cpu_s"]
        if m is None:
            err = next((x.get("error") for x in r["runs"] if "error" in x), "n/a")
            out.append(f"| {v} | failed: {err} | | | |")
            continue
        wall = f"{base['median_s'] / m:.2f}x" if base["median_s"] else ""
        cpu = f"{base['median_cpu_s'] / c:.2f}x" if base["median_cpu_s"] and c else ""
        out.append(f"| {v} | {m * 1000:.0f} ms | {wall} | {c * 1000:.0f} ms | {cpu} |")
        for p, (pw, pc) in r["phases"].items():
            out.append(f"| ↳ {p} | {pw * 1000:.1f} ms | | {pc * 1000:.1f} ms | |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
