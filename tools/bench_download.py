"""Benchmark: download a generated Llama-shaped model from a local S3 server (SeaweedFS).

In one run, interleaved, each variant N times (median reported):
  * weightcache  — `cachectl prefetch` into a fresh store (fsync + sha256 + validation included)
  * boto3        — boto3 `download_file` per file, default TransferConfig (no fsync, no hashing)
  * ideal        — N parallel ranged GETs (same part size as the daemon) that discard the data

    python tools/bench_download.py --size 2GiB --repeat 3 [--out bench-out/download.json]

Reports throughput and the ratios weightcache/boto3 and weightcache/ideal, and the daemon's
peak RSS (VmHWM). The machine is shared and noisy: read the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import make_model  # tools/ is on sys.path when this runs as `python tools/bench_download.py`
import s3server
from harness import start_daemon, write_config

CONCURRENCY = 16
PART = 8 << 20


def drop_cache(paths: list[Path]) -> None:
    for p in paths:
        for f in [p] if p.is_file() else [x for x in p.rglob("*") if x.is_file()]:
            fd = os.open(f, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def settle() -> None:
    time.sleep(3)  # freed memory goes back to the host; let every variant start alike


def run_weightcache(srv: s3server.S3Server, bucket: str, prefix: str, work: Path) -> tuple[float, int]:
    root = Path(tempfile.mkdtemp(dir=work, prefix="wc-"))
    cfg = write_config(root / "w.toml", srv, client_sources=["*"],
                       download={"concurrency": CONCURRENCY, "part_size": PART})  # fmt: skip
    d = start_daemon(root, srv, config=cfg)
    admin = d.admin_socket
    try:
        settle()
        t = time.perf_counter()
        subprocess.run(
            ["cachectl", "--admin-socket", str(admin), "prefetch", f"s3://{bucket}/{prefix}", "--name", "bench"],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        elapsed = time.perf_counter() - t
        hwm = 0
        for line in Path(f"/proc/{d.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
        return elapsed, hwm
    finally:
        d.stop()
        shutil.rmtree(root, ignore_errors=True)


def run_boto3(srv: s3server.S3Server, bucket: str, prefix: str, keys: list[str], work: Path) -> float:
    out = Path(tempfile.mkdtemp(dir=work, prefix="boto-"))
    c = srv.client()
    settle()
    t = time.perf_counter()
    for k in keys:
        c.download_file(bucket, k, str(out / Path(k).name))
    elapsed = time.perf_counter() - t
    shutil.rmtree(out, ignore_errors=True)
    return elapsed


def run_ideal(srv: s3server.S3Server, bucket: str, sizes: dict[str, int]) -> float:
    from botocore.config import Config

    c = srv.client()
    c = __import__("boto3").client(
        "s3", endpoint_url=srv.endpoint, aws_access_key_id=srv.admin_key[0],
        aws_secret_access_key=srv.admin_key[1], region_name=srv.region,
        config=Config(max_pool_connections=CONCURRENCY + 4),
    )  # fmt: skip
    parts = [(k, o, min(PART, n - o)) for k, n in sizes.items() for o in range(0, n, PART)]
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not parts:
                    return
                k, o, n = parts.pop(0)
            body = c.get_object(Bucket=bucket, Key=k, Range=f"bytes={o}-{o + n - 1}")["Body"]
            while body.read(1 << 20):
                pass

    settle()
    t = time.perf_counter()
    ts = [threading.Thread(target=worker) for _ in range(CONCURRENCY)]
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="2GiB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    from weightcache_daemon.config import parse_size

    work = a.work or Path(tempfile.mkdtemp(prefix="wc-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model = make_model.make_model(work / "model", parse_size(a.size, "--size"), shards=2)
    srv = s3server.start(work / "s3")
    try:
        c = srv.client()
        bucket, prefix = "bench", "models/llama/"
        c.create_bucket(Bucket=bucket)
        keys, sizes = [], {}
        for p in sorted(model.iterdir()):
            key = prefix + p.name
            c.upload_file(str(p), bucket, key)
            keys.append(key)
            sizes[key] = p.stat().st_size
        total = sum(sizes.values())
        shutil.rmtree(model)  # the source lives in S3 only now
        results: dict[str, list[float]] = {"weightcache": [], "boto3": [], "ideal": []}
        rss: list[int] = []
        for i in range(a.repeat):
            t, hwm = run_weightcache(srv, bucket, prefix, work)
            results["weightcache"].append(t)
            rss.append(hwm)
            results["boto3"].append(run_boto3(srv, bucket, prefix, keys, work))
            results["ideal"].append(run_ideal(srv, bucket, sizes))
            print(f"round {i + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in results.items()), flush=True)
        med = {k: statistics.median(v) for k, v in results.items()}
        report = {
            "bytes": total,
            "median_seconds": med,
            "throughput_MBps": {k: total / v / 1e6 for k, v in med.items()},
            "ratio_vs_boto3": med["boto3"] / med["weightcache"],
            "ratio_vs_ideal": med["ideal"] / med["weightcache"],
            "daemon_peak_rss_MB": max(rss) / 1e6,
            "runs": results,
            "concurrency": CONCURRENCY,
            "part_size": PART,
        }
        print(json.dumps(report, indent=2))
        print("\n| variant | median s | MB/s | weightcache speed-up |\n|---|---|---|---|")
        for k in ("weightcache", "boto3", "ideal"):
            print(f"| {k} | {med[k]:.2f} | {total / med[k] / 1e6:.0f} | {med[k] / med['weightcache']:.2f}x |")
        print(f"\ndaemon peak RSS: {max(rss) / 1e6:.0f} MB for a {total / 2**30:.2f} GiB model")
        if a.out:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(report, indent=2))
    finally:
        srv.stop()
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
