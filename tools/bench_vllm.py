"""Benchmark: vLLM on a cold node (CPU build). Time from "serve this model" to the first token.

A Llama-shaped model of about --size (random weights, bf16, a tokenizer trained here) sits in a
local SeaweedFS server behind a network-like rate (--rate, in bytes/s: the daemon's
download.rate_limit; boto3's GETs go through a throttling proxy at the same total rate). Each
cold case starts from an empty daemon store and an empty download directory (the page cache is
not dropped: the source's bytes may be cached by the kernel, as an object store's would not be):

  a  download   boto3 download_file of every object, then vLLM's default loader on the directory
  b  runai      vLLM's runai_streamer load format straight from S3 (if runai-model-streamer is
                installed in vLLM's Python; else reported as not run)
  c  prefetch   `cachectl prefetch`, then LLM(model=Model.path)
  d  launcher   weightcache.vllm.prepare (what weightcache-vllm does) + LLM with the
                weightcache load format, started while the model downloads

and warm (the model cached): c and d again. vLLM runs in --vllm-python (tools/vllm_ttft.py),
engine and worker in their own processes as vLLM starts them by default. The bound for d is
max(download time, vLLM's start-up on a cached model (warm c)).

    python tools/bench_vllm.py --size 1GiB --rate 300MB --vllm-python .venv-vllm/bin/python --out bench-out/vllm.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import s3server
from faultproxy import FaultProxy
from harness import start_daemon, upload_dir

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_HOST_IP": "127.0.0.1"}
WORDS = ["hello", "world", "the", "cache", "shares", "pages", "between", "containers"]


def _size(text: str) -> int:
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    t = text.strip().upper()
    for u, m in units.items():
        if t.endswith(u):
            return int(float(t[: -len(u)]) * m)
    return int(t)


def build_model(directory: Path, size: int) -> Path:
    """Llama-shaped: hidden 1024, head_dim 64, intermediate 4096, vocab 32000; layers to reach size."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    hidden, inter, vocab = 1024, 4096, 32000
    per_layer = 2 * (hidden * hidden * 2 + 2 * hidden * 256 + 3 * hidden * inter)  # q,o + k,v (4 kv heads) + mlp
    fixed = 2 * 2 * vocab * hidden
    layers = max(1, round((size - fixed) / per_layer))
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4,
                                   max_position_embeddings=512, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(directory, safe_serialization=True, max_shard_size="400MB")
    vocab_map = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab_map, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(directory)
    return directory


def ttft(python: str, out: Path, t0: float, *args: str, env: dict[str, str] | None = None) -> dict[str, float]:
    """Run tools/vllm_ttft.py; its marks as seconds since t0."""
    log = out.with_suffix(".log")
    with open(log, "w") as f:  # a file, not a pipe: vLLM's children may outlive the runner briefly
        r = subprocess.run([python, str(HERE / "vllm_ttft.py"), "--out", str(out), *args],
                           env={**os.environ, **VLLM_ENV, **(env or {})}, stdout=f, stderr=subprocess.STDOUT, timeout=3600)  # fmt: skip
    if r.returncode != 0:
        raise RuntimeError(f"vllm_ttft {' '.join(args)} failed:\n{log.read_text()[-4000:]}")
    marks = json.loads(out.read_text())
    return {k: (v - t0 if k != "token" else v) for k, v in marks.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--rate", default="300MB", help="bytes/s from the object store")
    ap.add_argument(
        "--vllm-python", default=os.environ.get("WEIGHTCACHE_VLLM_PYTHON", str(ROOT / ".venv-vllm/bin/python"))
    )
    ap.add_argument("--out", type=Path)
    ap.add_argument("--svg", type=Path, help="write the timeline picture here (e.g. docs/vllm.svg)")
    ap.add_argument("--from-json", type=Path, help="only draw --svg from a saved --out report (no new run)")
    ap.add_argument("--work", type=Path, help="keep the model and logs here (default: a temp dir)")
    a = ap.parse_args()
    if a.from_json:
        if not a.svg:
            ap.error("--from-json needs --svg")
        a.svg.write_text(picture(json.loads(a.from_json.read_text())))
        return
    size, rate = _size(a.size), _size(a.rate)
    work = (a.work or Path(tempfile.mkdtemp(prefix="bench-vllm-"))).resolve()  # sockets need absolute paths
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model"
    if not (model / "config.json").exists():
        build_model(model, size)
    nbytes = sum(p.stat().st_size for p in model.iterdir())
    s3 = s3server.start()
    results: dict[str, Any] = {"size": nbytes, "rate": rate, "cases": {}}
    cases = results["cases"]
    try:
        c3 = s3.client()
        c3.create_bucket(Bucket="bench")
        upload_dir(s3, "bench", "llama/", model)
        uri = "s3://bench/llama/"
        download = {"rate_limit": str(rate), "concurrency": 4, "part_size": "8MiB"}

        # (a) download with boto3 (4 streams through the throttling proxy), then vLLM's default loader
        proxy = FaultProxy(int(s3.endpoint.rsplit(":", 1)[1])).start()
        try:
            import boto3
            from boto3.s3.transfer import TransferConfig

            proxy.set(throttle=rate // 4, times=1_000_000)
            key = s3.admin_key
            bc = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{proxy.port}", aws_access_key_id=key[0],
                              aws_secret_access_key=key[1], region_name=s3.region)  # fmt: skip
            dest = work / "downloaded"
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir()
            t0 = time.time()
            cfg = TransferConfig(max_concurrency=4, multipart_chunksize=8 << 20)
            for obj in bc.list_objects_v2(Bucket="bench", Prefix="llama/")["Contents"]:
                bc.download_file("bench", obj["Key"], str(dest / obj["Key"].split("/", 1)[1]), Config=cfg)
            downloaded = time.time() - t0
            cases["a download"] = {
                "downloaded": downloaded,
                **ttft(a.vllm_python, work / "a.json", t0, "--model", str(dest)),
            }
            print("a", cases["a download"], flush=True)

            # (b) runai_streamer straight from S3 (through the same proxy)
            probe = subprocess.run([a.vllm_python, "-c", "import runai_model_streamer"], capture_output=True)
            if probe.returncode == 0:
                env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}", "AWS_ACCESS_KEY_ID": key[0],
                       "AWS_SECRET_ACCESS_KEY": key[1], "AWS_DEFAULT_REGION": s3.region,
                       "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0", "AWS_EC2_METADATA_DISABLED": "true"}  # fmt: skip
                t0 = time.time()
                try:
                    cases["b runai"] = ttft(a.vllm_python, work / "b.json", t0, "--model", uri,
                                            "--load-format", "runai_streamer", env=env)  # fmt: skip
                except RuntimeError as exc:
                    cases["b runai"] = {"error": str(exc)[-1500:]}
            else:
                cases["b runai"] = {"error": "runai-model-streamer is not installed in vLLM's Python"}
            print("b", cases["b runai"], flush=True)
        finally:
            proxy.stop()

        # (c) cachectl prefetch, then model.path; then warm
        d = start_daemon(work / "dc", s3, client_sources=["*"], download=download)
        try:
            t0 = time.time()
            d.ctl("prefetch", uri, "--name", "bench", timeout=3600)
            prefetched = time.time() - t0
            cases["c prefetch"] = {"downloaded": prefetched, **ttft(a.vllm_python, work / "c.json", t0, "--open", "bench",
                                                                       "--socket-dir", str(d.socket_dir))}  # fmt: skip
            print("c", cases["c prefetch"], flush=True)
            t0 = time.time()
            cases["c warm"] = ttft(
                a.vllm_python, work / "cw.json", t0, "--open", "bench", "--socket-dir", str(d.socket_dir)
            )
            print("c warm", cases["c warm"], flush=True)
            t0 = time.time()
            cases["d warm"] = ttft(
                a.vllm_python, work / "dw.json", t0, "--prepare", "bench", "--socket-dir", str(d.socket_dir)
            )
            print("d warm", cases["d warm"], flush=True)
        finally:
            d.stop()
            shutil.rmtree(work / "dc", ignore_errors=True)

        # (d) the launcher's steps on a cold node
        d = start_daemon(work / "dd", s3, client_sources=["*"], download=download)
        try:
            t0 = time.time()
            cases["d launcher"] = ttft(
                a.vllm_python, work / "d.json", t0, "--prepare", uri, "--socket-dir", str(d.socket_dir)
            )
            print("d", cases["d launcher"], flush=True)
        finally:
            d.stop()
            shutil.rmtree(work / "dd", ignore_errors=True)
    finally:
        s3.stop()

    dl = cases["a download"]["downloaded"]
    start = cases["c warm"]["first_token"]
    bound = max(dl, start)
    results["download_s"], results["vllm_start_warm_s"], results["bound_s"] = dl, start, bound
    lines = [f"model {nbytes / 1e9:.2f} GB, source {rate / 1e6:.0f} MB/s; first token, seconds from the request:", ""]
    lines += ["| case | first token (s) | vs (d) |", "|---|---|---|"]
    dt = cases["d launcher"]["first_token"]
    for name, c in cases.items():
        if "first_token" in c:
            lines.append(f"| {name} | {c['first_token']:.1f} | {c['first_token'] / dt:.2f}x |")
        else:
            lines.append(f"| {name} | not run: {c['error'].splitlines()[-1][:120]} | |")
    lines += [
        "",
        f"bound max(download {dl:.1f}, vLLM start-up {start:.1f}) = {bound:.1f} s; (d) is {dt / bound:.2f}x the bound",
    ]
    print("\n".join(lines))
    results["table"] = lines
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(results, indent=1))
    if a.svg:
        a.svg.write_text(picture(results))


# Phases of one case, from its own timestamps (seconds since the request).
PHASES = {
    "download": ("#4e79a7", "download (boto3, or cachectl prefetch)"),
    "setup": ("#c6d7ea", "vLLM process start and imports"),
    "read": ("#f28e2b", "engine start and weight load"),
    "compute": ("#59a14f", "first token"),
}


def picture(results: dict[str, Any]) -> str:
    """The report as a timeline: one row per case, its phases on one time axis, the bound marked."""
    from timeline import Mark, Panel, Row, Segment, render

    rows = []
    for name, c in results["cases"].items():
        if "first_token" not in c:
            continue
        segs = []
        if "downloaded" in c:
            segs.append(Segment("download", 0.0, c["downloaded"]))
        segs += [
            Segment("setup", c["spawned"], c["imported"]),
            Segment("read", c["imported"], c["ready"]),
            Segment("compute", c["ready"], c["first_token"]),
        ]
        rows.append(Row(name, segs))
    marks = [Mark(results["bound_s"], "bound: max(download, vLLM start-up)")]
    d = results["cases"].get("d launcher", {})
    if "first_token" in d:
        marks.append(Mark(d["first_token"], "(d) launcher: first token", "#2c3e50"))
    title = (
        f"vLLM on a cold node: {results['size'] / 1e9:.2f} GB from S3 at {results['rate'] / 1e6:.0f} MB/s, "
        "seconds from the request to the first token"
    )
    return render([[Panel("time to first token", rows, marks)]], title=title, kinds=PHASES)


if __name__ == "__main__":
    main()
