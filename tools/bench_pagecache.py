"""Benchmark: a cold file range touched through a private mapping, by three readahead paths of
the kernel, in settled and in recycled memory. It shows what each path costs a cold
zero-copy first layer on a given machine and kernel, apart from any loader.

Paths (each touches one byte per 4 KiB page of the range, in order, on one thread):
  read-around  no advice: each fault reads a window around itself, in large folios where the
               filesystem has them (what a plain mmap + touch, e.g. safetensors, gets)
  sequential   MADV_SEQUENTIAL on the mapping: sequential readahead ahead of the faults
  hinted       sequential, plus POSIX_FADV_WILLNEED of the range, one readahead window per call,
               from a second thread (what weightcache's open() does for the first layer group)

Memory before each touch: the range evicted, 2 GiB first-touched and freed (what a previous
load leaves behind), then
  settled   3 s of sleep (on a VM whose host takes idle memory back, long enough for it to)
  recycled  no sleep

A page-cache page on memory the host took back costs the guest a trip to the host the first
time it is touched: that shows as user CPU time of the touching process with no more page
faults. Which memory the kernel's large folios come from decides whether read-around pays it;
this tool reports it so that a slow round can be told from a slow path.

Every touch runs in a fresh process; rounds are interleaved. Reported: wall ms, CPU ms of the
touching process (user / system), page faults per 4 KiB page: medians, the spread in brackets.

    python tools/bench_pagecache.py [--size 164MiB] [--offset 8472] [--rounds 5] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

SETTLE = 3.0
PATHS = ("read-around", "sequential", "hinted")
MEMORY = ("settled", "recycled")


def child(path: str, offset: int, size: int, how: str, memory: str) -> dict[str, float]:
    import numpy as np
    from bench_load import drop  # tools/ is on sys.path when this runs as `python tools/bench_pagecache.py`

    from weightcache.contract.readahead import willneed

    left = drop([path])
    if left:
        raise SystemExit(f"{path}: {left} bytes still resident after eviction (fincore); the touch would not be cold")
    scratch = np.ones(2 << 30, dtype=np.uint8)  # 2 GiB first-touched, then freed, as a previous load would
    del scratch
    if memory == "settled":
        time.sleep(SETTLE)
    fd = os.open(path, os.O_RDONLY)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    mm = mmap.mmap(fd, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    if how != "read-around":
        mm.madvise(mmap.MADV_SEQUENTIAL)
    if how == "hinted":
        threading.Thread(target=willneed, args=(fd, offset, size)).start()
    touched = int(np.frombuffer(mm, dtype=np.uint8, count=size, offset=offset)[::4096].sum())
    elapsed = time.perf_counter() - t0
    r = resource.getrusage(resource.RUSAGE_SELF)
    del touched
    return {
        "ms": elapsed * 1000,
        "user_ms": (r.ru_utime - r0.ru_utime) * 1000,
        "sys_ms": (r.ru_stime - r0.ru_stime) * 1000,
        "faults_per_page": (r.ru_minflt - r0.ru_minflt + r.ru_majflt - r0.ru_majflt) / (size / 4096),
    }


def _cell(xs: list[float], fmt: str) -> str:
    xs = sorted(xs)
    return f"{statistics.median(xs):{fmt}} [{xs[0]:{fmt}}-{xs[-1]:{fmt}}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="164MiB", help="bytes touched (e.g. 164MiB, 1GB)")
    ap.add_argument("--offset", type=int, default=8472, help="where the range starts (a safetensors header's end)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default="/var/tmp", help="where the test file goes: a disk, not tmpfs")
    ap.add_argument("--child", nargs=5, metavar=("PATH", "OFFSET", "SIZE", "HOW", "MEMORY"))
    a = ap.parse_args()
    if a.child:
        p, off, size, how, memory = a.child
        print(json.dumps(child(p, int(off), int(size), how, memory)))
        return
    from weightcache_daemon.config import parse_size

    size = parse_size(a.size, "--size")
    if size <= 0 or a.offset < 0:
        raise SystemExit(f"--size {a.size} / --offset {a.offset}: a positive size and a non-negative offset")
    with tempfile.TemporaryDirectory(dir=a.dir) as work:
        path = str(Path(work) / "range.bin")
        with open(path, "wb") as f:  # random bytes, written once, then evicted before every touch
            f.write(os.urandom(a.offset))
            for left in range(size, 0, -(64 << 20)):
                f.write(os.urandom(min(64 << 20, left)))
        runs: dict[tuple[str, str], list[dict[str, float]]] = {}
        cases = [(how, mem) for mem in MEMORY for how in PATHS]
        for rnd in range(a.rounds):
            k = rnd % len(cases)
            for how, mem in cases[k:] + cases[:k]:
                out = subprocess.run(
                    [sys.executable, str(Path(__file__).resolve()), "--child", path, str(a.offset), str(size), how, mem],
                    check=True, capture_output=True, text=True,
                ).stdout  # fmt: skip
                runs.setdefault((how, mem), []).append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {rnd + 1} done", file=sys.stderr, flush=True)
    print(f"{size / 2**20:.0f} MiB at offset {a.offset}, {a.rounds} rounds, kernel {os.uname().release}\n")
    print("| memory | path | ms | user CPU ms | system CPU ms | faults/page |")
    print("|---|---|---|---|---|---|")
    for how, mem in sorted(runs, key=lambda c: (MEMORY.index(c[1]), PATHS.index(c[0]))):
        rs: list[Any] = runs[(how, mem)]
        print(
            f"| {mem} | {how} | {_cell([r['ms'] for r in rs], '.0f')} | {_cell([r['user_ms'] for r in rs], '.0f')} "
            f"| {_cell([r['sys_ms'] for r in rs], '.0f')} | {_cell([r['faults_per_page'] for r in rs], '.3f')} |"
        )


if __name__ == "__main__":
    main()
