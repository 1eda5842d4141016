"""Load: many processes opening one cold model at once, a thousand short-lived clients, and
the client limit. Figures (latencies, fd counts, RSS) are printed for docs/test-report.md."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from harness import make_model, upload_dir, wait_for

import weightcache
from weightcache import ExhaustedError
from weightcache._fd import FdConnection

OPENER = textwrap.dedent("""
    import sys, time, zlib, weightcache
    sock, model = sys.argv[1], sys.argv[2]
    print("ready", flush=True)       # imports done
    while not sys.stdin.readline():  # wait for the start signal, so all open at once
        pass
    with weightcache.connect(sock) as c, c.open(model) as m:
        crc = 0
        for name in m.keys():           # read every byte (no torch: raw bytes)
            crc = zlib.crc32(m.get_bytes(name), crc)
        m.wait_complete()               # a cold open answers early: the id is provisional until the commit
        print(m.snapshot_id, crc, flush=True)
""")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def test_64_processes_open_one_cold_model_at_once(daemon_factory, s3, bucket: str, tmp_path: Path, report) -> None:  # type: ignore[no-untyped-def]
    model = make_model(tmp_path / "m", tiny=False, size=24 << 20)
    upload_dir(s3, bucket, "cold/", model)
    total = sum(p.stat().st_size for p in model.iterdir())
    d = daemon_factory(download={"rate_limit": 64 << 20})
    uri = f"s3://{bucket}/cold/"
    procs = [subprocess.Popen([sys.executable, "-c", OPENER, str(d.socket_dir), uri], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(64)]  # fmt: skip
    for p in procs:  # every interpreter has imported everything: the clock measures the opens only
        assert p.stdout is not None
        assert p.stdout.readline() == "ready\n", p.communicate(timeout=60)
    started = time.monotonic()
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = [p.communicate(timeout=600) for p in procs]
    elapsed = time.monotonic() - started
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs if e][:2]
    assert len({o for o, _ in outs}) == 1  # same snapshot, same bytes everywhere
    downloaded = int(d.ctl_json("stats")["bytes_downloaded"])
    assert downloaded == total, (downloaded, total)  # one download for 64 callers
    blobs = d.cache_dir / "blobs"
    assert sum(f.stat().st_size for f in blobs.rglob("*") if f.is_file()) == total  # one copy on disk
    report(
        "load",
        "64 processes open the same cold 57 MiB model from S3 at once",
        "all 64 succeed, one download, one copy on disk",
        f"{elapsed:.1f} s; downloaded {downloaded / total:.2f}x the model",
    )


def test_1000_short_lived_clients(daemon, tiny_model: Path, report) -> None:  # type: ignore[no-untyped-def]
    daemon.ctl("prefetch", f"file://{tiny_model}/", "--name", "tiny")
    pid = daemon.proc.pid
    with weightcache.connect(daemon.socket_dir) as c, c.open("tiny"):
        pass  # warm up
    base_fds, base_rss = _fds(pid), _rss(pid)
    lat: list[float] = []
    for i in range(1000):
        t = time.perf_counter()
        with weightcache.connect(daemon.socket_dir) as c, c.open("tiny") as m:
            m.get_bytes("lm_head.weight")
        lat.append(time.perf_counter() - t)
        if i == 499:
            mid_rss = _rss(pid)
    # the daemon closes a connection's descriptors once it sees the close: give it a generous
    # deadline, then compare (a leak fails below, with both counts)
    deadline = time.monotonic() + 60
    while _fds(pid) > base_fds and time.monotonic() < deadline:
        time.sleep(0.05)
    end_fds, end_rss = _fds(pid), _rss(pid)
    q = statistics.quantiles(lat, n=100)
    assert end_fds <= base_fds, (base_fds, end_fds)  # no descriptor leaks
    assert end_rss - mid_rss < 20 << 20, (mid_rss, end_rss)  # memory stable over the second half
    assert daemon.ctl_json("stats")["leases"] == 0
    report(
        "load",
        "1,000 short-lived clients open a cached model (connect, Ensure, Acquire, read, close)",
        "all succeed; no descriptor leak; memory stable",
        f"open p50 {q[49] * 1e3:.1f} ms, p99 {q[98] * 1e3:.1f} ms; daemon fds {base_fds}->{end_fds}; "
        f"RSS {base_rss >> 20}->{end_rss >> 20} MiB",
    )


def test_client_limit_is_refused_with_the_reason(daemon_factory, tiny_model: Path, report) -> None:  # type: ignore[no-untyped-def]
    d = daemon_factory(max_clients=8)
    snap = d.ctl_json("prefetch", f"file://{tiny_model}/", "--name", "tiny")["snapshot_id"]
    held: list[Any] = []
    try:
        for _ in range(8):
            conn = FdConnection(d.socket_dir / "fd.sock")
            for g in conn.acquire(snap):
                os.close(g.fd)
            held.append(conn)
        extra = FdConnection(d.socket_dir / "fd.sock")
        with pytest.raises(ExhaustedError, match="too many clients"):
            extra.acquire(snap)
        extra.close()
        assert d.proc.poll() is None and d.ctl_json("stats")["leases"] == 8
    finally:
        for conn in held:
            conn.close()
    # the daemon frees a client slot when it sees the connection close
    wait_for(lambda: d.ctl_json("stats")["leases"] == 0, 60, "the held connections to be released")
    with weightcache.connect(d.socket_dir) as c, c.open("tiny") as m:  # room again
        assert len(m.keys()) == 21
    report("load", "a 9th client against max_clients = 8", "RESOURCE_EXHAUSTED with the reason; daemon unaffected", "")
