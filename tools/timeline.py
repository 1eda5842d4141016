"""A Gantt-style timeline as a standalone SVG (no plotting library): panels of rows, each row a
set of coloured segments on a shared time axis, with vertical marks.

    from timeline import Mark, Panel, Row, Segment, render
    svg = render([[Panel("300 MB/s: sequential", [Row("layers.0", [Segment("compute", 1.2, 1.3)])],
                         [Mark(2.0, "logits")])]], title="cold start")

``render`` takes a grid: a list of columns, each a list of panels drawn top to bottom; panels
of one column share one time scale so their lengths compare at a glance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from html import escape

# kind -> (fill colour, legend text); the order is the legend's
KINDS: dict[str, tuple[str, str]] = {
    "setup": ("#c6d7ea", "request → first byte"),
    "download": ("#4e79a7", "download (bytes on disk)"),
    "read": ("#f28e2b", "read (bytes → tensors)"),
    "wait": ("#d9d9d9", "forward waits for the layer"),
    "compute": ("#59a14f", "compute"),
}

ROW_H = 9  # pixels per row, bar included
BAR_H = 7
LABEL_W = 62
PANEL_W = 470
HEAD_H = 18
AXIS_H = 30  # mark labels (three staggered lines) and the axis
GAP = 14


@dataclass
class Segment:
    kind: str  # a key of KINDS
    t0: float  # seconds since the panel's time origin
    t1: float


@dataclass
class Row:
    label: str
    segments: list[Segment] = field(default_factory=list)


@dataclass
class Mark:
    t: float
    label: str
    colour: str = "#c0392b"


@dataclass
class Panel:
    title: str
    rows: list[Row]
    marks: list[Mark] = field(default_factory=list)

    def end(self) -> float:
        ends = [s.t1 for r in self.rows for s in r.segments] + [m.t for m in self.marks]
        return max(ends, default=0.0)


def _ticks(span: float) -> list[float]:
    """Round tick positions (1, 2 or 5 times a power of ten apart), about six across ``span``."""
    if span <= 0:
        return [0.0]
    raw = span / 6
    base = 10 ** len(str(int(raw))) / 10 if raw >= 1 else 1.0
    while base > raw:
        base /= 10
    step = next(m * base for m in (1, 2, 5, 10) if m * base >= raw)
    n = int(span / step) + 1
    return [round(i * step, 6) for i in range(n)]


def _panel(p: Panel, x: float, y: float, span: float, kinds: dict[str, tuple[str, str]]) -> tuple[list[str], float]:
    out: list[str] = []
    scale = (PANEL_W - LABEL_W - 8) / span if span > 0 else 0.0
    x0 = x + LABEL_W

    def px(t: float) -> float:
        return x0 + max(0.0, t) * scale

    out.append(f'<text x="{x:.1f}" y="{y + 12:.1f}" class="h">{escape(p.title)}</text>')
    top = y + HEAD_H
    body_h = len(p.rows) * ROW_H
    out.append(f'<rect x="{x0:.1f}" y="{top:.1f}" width="{PANEL_W - LABEL_W - 8:.1f}" height="{body_h}" class="bg"/>')
    for i, row in enumerate(p.rows):
        ry = top + i * ROW_H
        out.append(f'<text x="{x0 - 4:.1f}" y="{ry + BAR_H:.1f}" class="l">{escape(row.label)}</text>')
        for s in sorted(row.segments, key=lambda s: s.kind != "wait"):  # waits underneath
            w = max(px(s.t1) - px(s.t0), 0.8)  # a sub-pixel segment still shows
            colour = kinds[s.kind][0]
            h = BAR_H / 2 if s.kind == "wait" else BAR_H  # thin: a read or compute on top stays visible
            out.append(
                f'<rect x="{px(s.t0):.2f}" y="{ry + (ROW_H - h) / 2:.1f}" width="{w:.2f}" height="{h}" '
                f'fill="{colour}"><title>{escape(row.label)} {s.kind}: {s.t0:.3f} to {s.t1:.3f} s</title></rect>'
            )
    for k, m in enumerate(p.marks):
        mx = px(m.t)
        out.append(
            f'<line x1="{mx:.2f}" y1="{top - 2:.1f}" x2="{mx:.2f}" y2="{top + body_h + 2:.1f}" '
            f'stroke="{m.colour}" stroke-width="1.2" stroke-dasharray="3,2"/>'
        )
        ty = top + body_h + 10 + 9 * (k % 3)  # staggered so neighbouring labels do not collide
        out.append(f'<text x="{mx:.2f}" y="{ty:.1f}" class="m" fill="{m.colour}">{escape(m.label)}</text>')
    axis_y = top + body_h + AXIS_H + 6
    for t in _ticks(span):
        out.append(f'<line x1="{px(t):.2f}" y1="{axis_y - 4:.1f}" x2="{px(t):.2f}" y2="{axis_y:.1f}" class="ax"/>')
        out.append(f'<text x="{px(t):.2f}" y="{axis_y + 9:.1f}" class="t">{t:g} s</text>')
    out.append(f'<line x1="{x0:.1f}" y1="{axis_y:.1f}" x2="{px(span):.1f}" y2="{axis_y:.1f}" class="ax"/>')
    return out, HEAD_H + body_h + AXIS_H + 18


def render(
    columns: list[list[Panel]], title: str = "", note: str = "", kinds: dict[str, tuple[str, str]] | None = None
) -> str:
    """The SVG document for a grid of panels (columns of panels sharing a time scale). `kinds`:
    the segment kinds and legend (default KINDS, the cold-start timeline's)."""
    kinds = KINDS if kinds is None else kinds
    body: list[str] = []
    legend_y = 34 if title else 12
    lx = 8.0
    for colour, text in kinds.values():
        body.append(f'<rect x="{lx:.1f}" y="{legend_y - 8}" width="10" height="8" fill="{colour}"/>')
        body.append(f'<text x="{lx + 14:.1f}" y="{legend_y}" class="k">{escape(text)}</text>')
        lx += 14 + 5.6 * len(text) + 16
    y_start = legend_y + 16
    height = 0.0
    for c, panels in enumerate(columns):
        span = max((p.end() for p in panels), default=0.0) * 1.02
        x = 8 + c * (PANEL_W + GAP)
        y = float(y_start)
        for p in panels:
            parts, h = _panel(p, x, y, span, kinds)
            body += parts
            y += h
        height = max(height, y)
    # wide enough for the legend and the title too (text widths estimated from the font size)
    width = max(8 + len(columns) * (PANEL_W + GAP), lx + 8, 16 + 7.5 * len(title))
    if note:
        body.append(f'<text x="8" y="{height + 10:.1f}" class="k">{escape(note)}</text>')
        height += 16
    head = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 8:.0f}" '
        f'viewBox="0 0 {width} {height + 8:.0f}" font-family="Helvetica, Arial, sans-serif">',
        "<style>.h{font-size:11px;font-weight:bold}.l{font-size:7.5px;text-anchor:end;fill:#444}"
        ".t{font-size:8px;text-anchor:middle;fill:#444}.m{font-size:8px;text-anchor:middle}"
        ".k{font-size:10px;fill:#333}.ti{font-size:13px;font-weight:bold}.bg{fill:#f7f7f7}"
        ".ax{stroke:#888;stroke-width:0.8}</style>",
        f'<rect width="{width}" height="{height + 8:.0f}" fill="white"/>',
    ]
    if title:
        head.append(f'<text x="8" y="16" class="ti">{escape(title)}</text>')
    return "\n".join([*head, *body, "</svg>"]) + "\n"
