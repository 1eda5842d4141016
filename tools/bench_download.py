"""Benchmark: download a generated Llama-shaped model from a local S3 server (SeaweedFS).

In one run, interleaved, each variant N times (min/median/max reported):
  * weightcache  — `cachectl prefetch` into a fresh store (fsync + sha256 + validation included)
  * weightcache, file order — the same with download.order = "file" (what layer order costs)
  * boto3        — boto3 `download_file` per file, default TransferConfig (no fsync, no hashing)
  * ideal        — N parallel ranged GETs (same part size as the daemon) that discard the data
  * ideal+write  — the same GETs, each part written into its file (no hashing, no fsync)
  * ideal+all    — the same, plus what the engine must do: each file sha256-hashed in order as
                   its parts land (read back from the page cache), then fsynced

Where the time goes: for every run, the CPU seconds of the S3 server, of the downloading side
(daemon + cachectl, or this process's threads) and the wall time; a separate measurement of
sha256 on one core. On a machine with C cores a download cannot beat
(server CPU + client CPU) / C, so the two columns show whether the cores or the engine set the
pace. --pin reruns weightcache and ideal with the S3 server pinned to CPU 0 and the client to
the others (taskset), the shape of a node whose storage server is elsewhere.

    python tools/bench_download.py --size 2GiB --repeat 3 [--pin] [--out bench-out/download.json]

The machine is shared and noisy: read the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import make_model  # tools/ is on sys.path when this runs as `python tools/bench_download.py`
import s3server
from harness import start_daemon, write_config

CONCURRENCY = 16
PART = 8 << 20


def settle() -> None:
    time.sleep(3)  # freed memory goes back to the host; let every variant start alike


def cpu_of(pid: int) -> float:
    """CPU seconds (user + system, every thread) a live process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def session_pids(sid: int) -> list[int]:
    """Every process of a session (the S3 server runs in its own)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:
                out.append(int(d.name))
    return out


def server_cpu(srv: s3server.S3Server) -> float:
    total = 0.0
    for pid in session_pids(srv.process.pid):
        try:
            total += cpu_of(pid)
        except OSError:
            pass
    return total


def pin(pids: list[int], cpus: str) -> None:
    for pid in pids:
        subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(pid)], check=True, capture_output=True)


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_weightcache(
    srv: s3server.S3Server, bucket: str, prefix: str, work: Path, client_cpus: str | None, order: str = "layer"
) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(dir=work, prefix="wc-"))
    cfg = write_config(root / "w.toml", srv, client_sources=["*"],
                       download={"concurrency": CONCURRENCY, "part_size": PART, "order": order})  # fmt: skip
    d = start_daemon(root, srv, config=cfg)
    admin = d.admin_socket
    try:
        if client_cpus:
            pin([d.proc.pid], client_cpus)
        settle()
        s0, d0, c0 = server_cpu(srv), cpu_of(d.proc.pid), children_cpu()
        t = time.perf_counter()
        subprocess.run(
            [*(["taskset", "-c", client_cpus] if client_cpus else []),
             "cachectl", "--admin-socket", str(admin), "prefetch", f"s3://{bucket}/{prefix}", "--name", "bench"],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        elapsed = time.perf_counter() - t
        server = server_cpu(srv) - s0
        client = cpu_of(d.proc.pid) - d0 + children_cpu() - c0
        hwm = 0
        for line in Path(f"/proc/{d.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
        return {"seconds": elapsed, "server_cpu": server, "client_cpu": client, "rss": hwm}
    finally:
        d.stop()
        shutil.rmtree(root, ignore_errors=True)


def run_boto3(srv: s3server.S3Server, bucket: str, keys: list[str], work: Path) -> dict[str, float]:
    out = Path(tempfile.mkdtemp(dir=work, prefix="boto-"))
    c = srv.client()
    settle()
    s0, p0 = server_cpu(srv), time.process_time()
    t = time.perf_counter()
    for k in keys:
        c.download_file(bucket, k, str(out / Path(k).name))
    elapsed = time.perf_counter() - t
    r = {"seconds": elapsed, "server_cpu": server_cpu(srv) - s0, "client_cpu": time.process_time() - p0}
    shutil.rmtree(out, ignore_errors=True)
    return r


def run_parts(srv: s3server.S3Server, bucket: str, sizes: dict[str, int], work: Path, *, write: bool,
              finish: bool, client_cpus: str | None = None) -> dict[str, float]:  # fmt: skip
    """CONCURRENCY threads of ranged GETs of PART bytes. write: each part pwritten into its file;
    finish: each file also sha256-hashed in order as its parts land (read back from the page
    cache, one thread per file, as sha256 is sequential) and fsynced: the engine's work, without
    the engine."""
    from botocore.config import Config

    c = __import__("boto3").client(
        "s3", endpoint_url=srv.endpoint, aws_access_key_id=srv.admin_key[0],
        aws_secret_access_key=srv.admin_key[1], region_name=srv.region,
        config=Config(max_pool_connections=CONCURRENCY + 4),
    )  # fmt: skip
    parts = [(k, o, min(PART, n - o)) for k, n in sizes.items() for o in range(0, n, PART)]
    out = Path(tempfile.mkdtemp(dir=work, prefix="parts-"))
    fds = {}
    if write:
        for k, n in sizes.items():
            fds[k] = os.open(out / Path(k).name, os.O_RDWR | os.O_CREAT, 0o600)
            os.ftruncate(fds[k], n)
    lock = threading.Lock()
    landed: dict[str, set[int]] = {k: set() for k in sizes}
    cond = threading.Condition()
    phase: dict[str, float] = {"hash_s": 0.0, "fsync_s": 0.0}

    def worker() -> None:
        buf = bytearray(PART)
        while True:
            with lock:
                if not parts:
                    return
                k, o, n = parts.pop(0)
            body = c.get_object(Bucket=bucket, Key=k, Range=f"bytes={o}-{o + n - 1}")["Body"]
            got = 0
            while chunk := body.read(1 << 20):
                if write:
                    buf[got : got + len(chunk)] = chunk
                got += len(chunk)
            if write:
                os.pwrite(fds[k], memoryview(buf)[:got], o)
                with cond:
                    landed[k].add(o)
                    cond.notify_all()

    def hasher(k: str) -> None:
        h, pos, n = hashlib.sha256(), 0, sizes[k]
        while pos < n:
            with cond:
                cond.wait_for(lambda p=pos: p in landed[k])
            t = time.perf_counter()
            h.update(os.pread(fds[k], min(PART, n - pos), pos))
            phase["hash_s"] += time.perf_counter() - t
            pos += PART
        t = time.perf_counter()
        os.fsync(fds[k])
        phase["fsync_s"] += time.perf_counter() - t

    if client_cpus:
        os.sched_setaffinity(0, {int(x) for x in client_cpus.split(",")})  # threads started below inherit it
    try:
        settle()
        s0, p0 = server_cpu(srv), time.process_time()
        t = time.perf_counter()
        ts = [threading.Thread(target=worker) for _ in range(CONCURRENCY)]
        hs = [threading.Thread(target=hasher, args=(k,)) for k in sizes] if finish else []
        for th in ts + hs:
            th.start()
        for th in ts:
            th.join()
        gets = time.perf_counter() - t
        for th in hs:
            th.join()
        elapsed = time.perf_counter() - t
        return {"seconds": elapsed, "gets_s": gets, **phase, "server_cpu": server_cpu(srv) - s0,
                "client_cpu": time.process_time() - p0}  # fmt: skip
    finally:
        if client_cpus:
            os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
        for fd in fds.values():
            os.close(fd)
        shutil.rmtree(out, ignore_errors=True)


def sha256_rate(nbytes: int = 512 << 20) -> float:
    """Bytes per second sha256 hashes from memory on one core."""
    buf = os.urandom(1 << 20) * (nbytes >> 20)
    t = time.perf_counter()
    hashlib.sha256(buf).digest()
    return nbytes / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="2GiB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--pin", action="store_true", help="also run weightcache and ideal with the server on CPU 0 only")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    from weightcache_daemon.config import parse_size

    work = a.work or Path(tempfile.mkdtemp(prefix="wc-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model = make_model.make_model(work / "model", parse_size(a.size, "--size"), shards=2)
    srv = s3server.start(work / "s3")
    ncpu = os.cpu_count() or 1
    rest = ",".join(str(i) for i in range(1, ncpu)) or "0"
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
        variants: dict[str, Any] = {
            "weightcache": lambda: run_weightcache(srv, bucket, prefix, work, None),
            # the same engine fetching file by file: what layer order (download.order) costs
            "weightcache, file order": lambda: run_weightcache(srv, bucket, prefix, work, None, "file"),
            "boto3": lambda: run_boto3(srv, bucket, keys, work),
            "ideal": lambda: run_parts(srv, bucket, sizes, work, write=False, finish=False),
            "ideal+write": lambda: run_parts(srv, bucket, sizes, work, write=True, finish=False),
            "ideal+all": lambda: run_parts(srv, bucket, sizes, work, write=True, finish=True),
        }
        if a.pin:
            variants["weightcache, server pinned"] = lambda: run_weightcache(srv, bucket, prefix, work, rest)
            variants["ideal, server pinned"] = lambda: run_parts(srv, bucket, sizes, work, write=False, finish=False,
                                                                 client_cpus=rest)  # fmt: skip
        results: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
        for i in range(a.repeat):
            names = list(variants)
            names = names[i % len(names) :] + names[: i % len(names)]  # rotated: no variant always first
            for name in names:
                pinned = "pinned" in name
                if pinned:
                    pin(session_pids(srv.process.pid), "0")
                try:
                    results[name].append(variants[name]())
                finally:
                    if pinned:
                        pin(session_pids(srv.process.pid), f"0-{ncpu - 1}")
            print(
                f"round {i + 1}: " + ", ".join(f"{k} {v[-1]['seconds']:.2f}s" for k, v in results.items()), flush=True
            )
        hash_rate = sha256_rate()
        report = {
            "bytes": total,
            "cpus": ncpu,
            "sha256_MBps_one_core": hash_rate / 1e6,
            "variants": {k: _summary(v) for k, v in results.items()},
            "runs": results,
            "concurrency": CONCURRENCY,
            "part_size": PART,
        }
        ideal = report["variants"]["ideal"]["seconds"]["median"]
        wc = report["variants"]["weightcache"]["seconds"]["median"]
        report["ratio_vs_ideal"] = ideal / wc
        report["ratio_vs_boto3"] = report["variants"]["boto3"]["seconds"]["median"] / wc
        print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=1))
        print(_table(report))
        if a.out:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(report, indent=2))
            a.out.with_suffix(".md").write_text(_table(report))
    finally:
        srv.stop()
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)


def _summary(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {k: {"min": min(r[k] for r in runs), "median": statistics.median(r[k] for r in runs),
                "max": max(r[k] for r in runs)} for k in runs[0]}  # fmt: skip


def _table(report: dict[str, Any]) -> str:
    total, ncpu = report["bytes"], report["cpus"]
    v = report["variants"]
    wc = v["weightcache"]["seconds"]["median"]
    out = [
        f"model: {total / 2**30:.2f} GiB, 2 shards; {ncpu} CPUs; sha256 on one core "
        f"{report['sha256_MBps_one_core']:.0f} MB/s\n",
        "| variant | min s | median s | max s | MB/s (median) | weightcache speed-up | server CPU s | client CPU s "
        f"| CPU floor on {ncpu} cores |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in v.items():
        sec, sc, cc = r["seconds"], r["server_cpu"]["median"], r["client_cpu"]["median"]
        out.append(
            f"| {name} | {sec['min']:.2f} | {sec['median']:.2f} | {sec['max']:.2f} | {total / sec['median'] / 1e6:.0f} "
            f"| {sec['median'] / wc:.2f}x | {sc:.2f} | {cc:.2f} | {(sc + cc) / ncpu:.2f} s |"
        )
    extra = []
    for name in ("ideal+write", "ideal+all"):
        r = v.get(name, {})
        if "gets_s" in r:
            extra.append(f"{name}: GETs done at {r['gets_s']['median']:.2f} s"
                         + (f", sha256 {r['hash_s']['median']:.2f} s of one thread, fsync {r['fsync_s']['median']:.2f} s"
                            if name == "ideal+all" else ""))  # fmt: skip
    rss = v["weightcache"].get("rss")
    if rss:
        extra.append(f"daemon peak RSS {rss['max'] / 1e6:.0f} MB")
    return "\n".join(out) + "\n\n" + "; ".join(extra) + "\n"


if __name__ == "__main__":
    main()
