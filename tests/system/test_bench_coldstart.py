"""The cold-start benchmark's own parts that can be checked without running it: the model it
builds, the byte-counter interpolation, the analysis and the timeline picture."""

from __future__ import annotations

import math
import os
import time
import xml.etree.ElementTree as ET

import bench_coldstart as bc
import pytest
import timeline


def test_dims_reach_the_size_and_match_the_real_module() -> None:
    torch = pytest.importorskip("torch")
    from llama import TinyLlama

    d = bc.dims_for(256 << 20)
    with torch.device("meta"):
        m = TinyLlama(d["hidden"], d["layers"], d["vocab"], d["inter"], d["kv"])
    params = sum(p.numel() for p in m.parameters())
    assert params == bc.param_count(d)
    assert params * 2 >= 256 << 20
    smaller = {
        **d,
        "hidden": d["hidden"] - 128,
        "inter": int((d["hidden"] - 128) * 3.5),
        "kv": (d["hidden"] - 128) // 4,
    }
    assert bc.param_count(smaller) * 2 < 256 << 20  # the smallest hidden size that reaches it


def test_time_at_interpolates_between_samples() -> None:
    samples = [(10.0, 0.0), (11.0, 100.0), (13.0, 300.0)]
    assert bc.time_at(samples, 0) == 10.0
    assert bc.time_at(samples, 50) == pytest.approx(10.5)
    assert bc.time_at(samples, 200) == pytest.approx(12.0)
    assert bc.time_at(samples, 301) is None


def _run(t0: float, opened: float, logits: float, total: int, streamed: bool) -> dict[str, object]:
    groups = [
        {"group": g, "bytes": 1, "ready": t0 + 0.5 + i * 0.1 if streamed else t0 + opened,
         "read": [t0 + opened + i * 0.1, t0 + opened + i * 0.1 + 0.05], "want": t0 + opened + i * 0.1,
         "start": t0 + opened + i * 0.1 + 0.05, "end": t0 + opened + i * 0.1 + 0.1}
        for i, g in enumerate(["embed", "layers.0", "layers.1", "rest"])
    ]  # fmt: skip
    t = {"open": t0, "opened": t0 + opened, "logits": t0 + logits}
    cpu = {"open": 10.0, "logits": 10.0 + logits}  # the client: one core busy throughout
    if not streamed:
        t.update(prefetched=t0 + opened - 0.1, loaded=t0 + opened)
        cpu["prefetched"] = 10.0 + opened - 0.1
    return {
        "t": t,
        "cpu": cpu,
        "groups": groups,
        "equal": True,
        "streamed": streamed,
        "samples": [(t0 + 0.2, 0.0), (t0 + 2.2, float(total))],
        "server_cpu": [(t0, 50.0), (t0 + 10.0, 60.0)],  # daemon + S3 server: 1 core-s a second
    }


def test_analysis_table_and_picture() -> None:
    total = 1000
    runs = {
        "pure": {
            "t": {"open": 100.0, "committed": 102.5},
            "samples": [(100.2, 0.0), (102.2, float(total))],
            "server_cpu": [(99.0, 5.0), (101.0, 8.0), (103.0, 11.0)],
        },  # 1.5 core-s a second
        "sequential": _run(200.0, 2.6, 3.4, total, False),
        "reference": _run(300.0, 2.5, 3.1, total, False),
        "streaming": _run(400.0, 0.3, 2.6, total, True),
    }
    a = bc.analyse(300_000_000, runs, total, 250, 0.01)
    assert a["pure_download_s"] == pytest.approx(2.2)
    assert a["pure_download_layer0_bytes_s"] == pytest.approx(0.2 + 2.0 * 250 / total)
    seq, st = a["strategies"]["sequential"], a["strategies"]["streaming"]
    assert seq["read_s"] == pytest.approx(0.1) and seq["compute_s"] == pytest.approx(0.8)
    assert a["bound"] == pytest.approx((2.2 + 0.1 + 0.8) / 2.2)
    assert st["speedup"] == pytest.approx(3.4 / 2.6)
    assert a["targets"]["layer0_ratio"] == pytest.approx(st["layer0_s"] / (0.7 + 0.01))
    assert a["targets"]["logits_ok"] is False  # 2.6 s > 1.10 x 2.2 s
    # CPU floor: the download's 1.5 x 2.2 core-s, plus the sequential client's from its prefetch
    # to its logits (0.9 s of one core), over the machine's cores
    cores = len(os.sched_getaffinity(0))
    cf = a["cpu_floor"]
    assert cf["download_core_s"] == pytest.approx(3.3) and cf["client_core_s"] == pytest.approx(0.9)
    assert cf["cores"] == cores and cf["ratio"] == pytest.approx((3.3 + 0.9) / cores / 2.2)
    assert st["server_core_s"] == pytest.approx(2.6) and st["client_core_s"] == pytest.approx(2.6)
    assert st["busy"] == pytest.approx(2 * 2.6 / cores / 2.6)
    report = {"model": {"bytes": total, "dims": bc.dims_for(1), "layer0_bytes": 250, "prompt_tokens": 16},
              "device": "cpu", "command": "--size 1", "rates": [a], "raw": [runs]}  # fmt: skip
    text = bc.table(report)
    assert "| 300 MB/s | execute while downloading |" in text and "not met" in text
    assert f"CPU floor on {cores} cores: (download 3.30 core-s" in text
    old = {**runs, "pure": {k: v for k, v in runs["pure"].items() if k != "server_cpu"}}
    assert "cpu_floor" not in bc.analyse(300_000_000, old, total, 250, 0.01)  # raw data from before CPU was kept
    svg = ET.fromstring(bc.picture(report))
    titles = [t.text or "" for t in svg.iter("{http://www.w3.org/2000/svg}title")]
    # streaming draws per-layer download bars; every run draws each layer's compute
    assert sum(" download:" in t for t in titles) == 3 + 4
    assert sum(" compute:" in t for t in titles) == 3 * 4


def test_cpu_seconds_of_a_process_tree() -> None:
    """Real processes: a busy child's CPU counts under its parent's tree, a gone pid as 0."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\ninput()"],
                             stdin=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert child.pid in bc.process_tree(os.getpid())
        deadline = time.monotonic() + 120
        while bc.cpu_seconds([child.pid]) < 0.3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert bc.cpu_seconds([child.pid]) >= 0.3
        assert bc.cpu_seconds([2**22 + 1]) == 0  # above any pid_max: no such process
    finally:
        child.communicate("")
    assert bc.value_at([(1.0, 10.0), (3.0, 20.0)], 2.0) == pytest.approx(15.0)
    assert bc.value_at([(1.0, 10.0)], 2.0) is None


def test_render_scales_columns_independently() -> None:
    col = [timeline.Panel("a", [timeline.Row("x", [timeline.Segment("compute", 0.0, 1.0)])])]
    col2 = [timeline.Panel("b", [timeline.Row("x", [timeline.Segment("compute", 0.0, 4.0)])])]
    svg = ET.fromstring(timeline.render([col, col2], title="t"))
    bars = [r for r in svg.iter("{http://www.w3.org/2000/svg}rect") if r.get("fill") == timeline.KINDS["compute"][0]]
    widths = [float(r.get("width", "0")) for r in bars[-2:]]
    assert math.isclose(widths[0], widths[1])  # each fills its own column's scale
    assert timeline._ticks(2.5)[:3] == [0.0, 0.5, 1.0]
