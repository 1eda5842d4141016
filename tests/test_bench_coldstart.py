"""The cold-start benchmark's own parts that can be checked without running it: the model it
builds, the byte-counter interpolation, the analysis and the timeline picture."""

from __future__ import annotations

import math
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
    if not streamed:
        t.update(prefetched=t0 + opened - 0.1, loaded=t0 + opened)
    return {"t": t, "groups": groups, "equal": True, "streamed": streamed,
            "samples": [(t0 + 0.2, 0.0), (t0 + 2.2, float(total))]}  # fmt: skip


def test_analysis_table_and_picture() -> None:
    total = 1000
    runs = {
        "pure": {"t": {"open": 100.0, "committed": 102.5}, "samples": [(100.2, 0.0), (102.2, float(total))]},
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
    report = {"model": {"bytes": total, "dims": bc.dims_for(1), "layer0_bytes": 250, "prompt_tokens": 16},
              "device": "cpu", "command": "--size 1", "rates": [a], "raw": [runs]}  # fmt: skip
    text = bc.table(report)
    assert "| 300 MB/s | execute while downloading |" in text and "not met" in text
    svg = ET.fromstring(bc.picture(report))
    titles = [t.text or "" for t in svg.iter("{http://www.w3.org/2000/svg}title")]
    # streaming draws per-layer download bars; every run draws each layer's compute
    assert sum(" download:" in t for t in titles) == 3 + 4
    assert sum(" compute:" in t for t in titles) == 3 * 4


def test_render_scales_columns_independently() -> None:
    col = [timeline.Panel("a", [timeline.Row("x", [timeline.Segment("compute", 0.0, 1.0)])])]
    col2 = [timeline.Panel("b", [timeline.Row("x", [timeline.Segment("compute", 0.0, 4.0)])])]
    svg = ET.fromstring(timeline.render([col, col2], title="t"))
    bars = [r for r in svg.iter("{http://www.w3.org/2000/svg}rect") if r.get("fill") == timeline.KINDS["compute"][0]]
    widths = [float(r.get("width", "0")) for r in bars[-2:]]
    assert math.isclose(widths[0], widths[1])  # each fills its own column's scale
    assert timeline._ticks(2.5)[:3] == [0.0, 0.5, 1.0]
