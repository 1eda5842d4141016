"""GPU check: H2D throughput of stream() vs peers, and time to the first layer, in one run.

    python tools/gpu_check.py                 # on a CUDA machine; installs what it needs
    python tools/gpu_check.py --device cpu    # dry run of the same code paths without a GPU

Steps: install the project (and the peers where they install, never replacing torch),
generate a Llama-shaped model (default 4 GiB), start weightcached on temp dirs, prefetch the
model from a directory, warm the page cache, then time, each in a fresh process:
  * weightcache stream(device, prefetch=2): pinned ring + side-stream copies (H2D GB/s,
    time to first layer)
  * safetensors.torch.load_file(device=...)
  * Run:ai Model Streamer (device=...) and fastsafetensors (nogds) where they install
Prints one JSON report and a table; budget well under 8 minutes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent


def _pip(*args: str) -> bool:
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", *args], capture_output=True, text=True)
    if r.returncode != 0:
        print(f"pip install {' '.join(args)} failed: {r.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
    return r.returncode == 0


def install() -> dict[str, bool]:
    have_torch = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True).returncode == 0
    if not have_torch:
        _pip("torch")
    ok = {"project": _pip("-e", f"{ROOT}[daemon]", "safetensors", "numpy")}
    # Peers without their dependencies, so none of them swaps the machine's torch.
    ok["runai"] = _pip("--no-deps", "runai-model-streamer") and _pip("humanize")
    ok["fastsafetensors"] = _pip("--no-deps", "fastsafetensors")
    return ok


def child(variant: str, device: str, files: list[str], socket_dir: str) -> dict[str, Any]:
    import torch

    import weightcache

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if device.startswith("cuda"):
        torch.empty(1, device=device)  # CUDA context outside the clock
    gc.collect()  # the full GC pass that importing torch leaves pending, outside the clock too
    time.sleep(2)
    nbytes = 0
    first = None
    t0 = time.perf_counter()
    if variant == "weightcache":
        with weightcache.connect(socket_dir) as c, c.open("gpucheck") as m:
            for _, group in m.stream(device, prefetch=2):
                if first is None:
                    sync()
                    first = time.perf_counter() - t0
                nbytes += sum(t.numel() * t.element_size() for t in group.values())
            sync()
    elif variant == "safetensors":
        from safetensors.torch import load_file

        for f in files:
            sd = load_file(f, device=device)
            if first is None:
                sync()
                first = time.perf_counter() - t0
            nbytes += sum(t.numel() * t.element_size() for t in sd.values())
        sync()
    elif variant == "runai":
        from runai_model_streamer import SafetensorsStreamer

        with SafetensorsStreamer() as s:
            s.stream_files(files, device=device)
            for _, t in s.get_tensors():
                t = t.to(device, non_blocking=True)
                if first is None:
                    sync()
                    first = time.perf_counter() - t0
                nbytes += t.numel() * t.element_size()
        sync()
    elif variant == "fastsafetensors":
        from fastsafetensors import fastsafe_open

        with fastsafe_open(filenames=files, nogds=True, device=device) as f:
            for k in f.keys():
                t = f.get_tensor(k)
                if first is None:
                    sync()
                    first = time.perf_counter() - t0
                nbytes += t.numel() * t.element_size()
        sync()
    elapsed = time.perf_counter() - t0
    return {"seconds": elapsed, "first_layer_s": first, "bytes": nbytes, "GBps": nbytes / elapsed / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--size", default="4GiB")
    ap.add_argument("--no-install", action="store_true")
    ap.add_argument("--child")
    ap.add_argument("--socket-dir", default="")
    ap.add_argument("files", nargs="*")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.device, a.files, a.socket_dir)))
        return
    started = time.monotonic()
    installed = {} if a.no_install else install()
    # install() may have just put the project in with `pip install -e`: its path hook is read at
    # interpreter start-up, so this process finds the fresh install only through these paths.
    sys.path[:0] = [str(HERE.parent), str(ROOT / "daemon"), str(ROOT / "client")]
    import make_model

    from weightcache_daemon.config import parse_size

    work = Path(tempfile.mkdtemp(prefix="wc-gpu-"))
    src = make_model.make_model(work / "src", parse_size(a.size, "--size"), shards=2)
    admin = work / "a" / "admin.sock"
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'client'}:{ROOT / 'daemon'}")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "weightcache_daemon.main", "--cache-dir", str(work / "store"), "--socket-dir",
         str(work / "s"), "--admin-socket", str(admin)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    report: dict[str, Any] = {"device": a.device, "installed": installed}
    try:
        while not (work / "s" / "fd.sock").exists():
            if daemon.poll() is not None:
                raise SystemExit("weightcached did not start")
            time.sleep(0.05)
        info = json.loads(subprocess.run(
            [sys.executable, "-m", "weightcache_daemon.cli.cachectl", "--admin-socket", str(admin), "prefetch",
             f"file://{src}/", "--name", "gpucheck", "--json"], env=env, check=True, capture_output=True,
            text=True).stdout)  # fmt: skip
        shutil.rmtree(src)
        view = Path(info["path"])
        files = [str((view / n).resolve()) for n in sorted(os.listdir(view)) if n.endswith(".safetensors")]
        for f in files:  # warm page cache
            subprocess.run(["cat", f], stdout=subprocess.DEVNULL, check=True)
        report["bytes"] = sum(os.path.getsize(f) for f in files)
        try:
            import torch

            report["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
        except ImportError:
            report["gpu"] = "torch missing"
        for variant in ("weightcache", "safetensors", "runai", "fastsafetensors"):
            r = subprocess.run([sys.executable, str(HERE), "--child", variant, "--device", a.device, "--socket-dir",
                                str(work / "s"), *files], env=env, capture_output=True, text=True, timeout=180)  # fmt: skip
            report[variant] = (json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0
                               else {"error": (r.stderr.strip().splitlines() or ["?"])[-1][:300]})  # fmt: skip
            print(variant, report[variant], flush=True)
    finally:
        daemon.terminate()
        daemon.wait()
        shutil.rmtree(work, ignore_errors=True)
    report["wall_s"] = time.monotonic() - started
    print(json.dumps(report, indent=2))
    print("\n| variant | GB/s | first layer |\n|---|---|---|")
    for v in ("weightcache", "safetensors", "runai", "fastsafetensors"):
        r = report[v]
        if "error" in r:
            print(f"| {v} | failed: {r['error']} | |")
        else:
            fl = f"{r['first_layer_s'] * 1000:.0f} ms" if r["first_layer_s"] is not None else "-"
            print(f"| {v} | {r['GBps']:.2f} | {fl} |")
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_check.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
