"""Plot bench/results/dataplane.json as an SVG (docs/img/dataplane.svg), hand-written, no deps.

Two panels on a log scale: the HTTP/1.1 echo round trip per path (no mesh, nodemesh L4,
nodemesh L7, sidecar) and the TCP echo (no mesh, L4), grouped by request size. A bar is the
p50 (its value printed above it), the whisker above it reaches the p99.
Run by `make bench` after the benchmarks; `bench/plot.py [JSON] [SVG]` for other files.
"""

from __future__ import annotations

import json
import math
import sys
from html import escape
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SIZES = ((1, "1 B"), (1024, "1 KiB"), (65536, "64 KiB"))
PATHS = {  # column in the JSON -> legend label, colour
    "no_mesh": ("no mesh", "#7f7f7f"),
    "nodemesh_l4": ("nodemesh L4", "#1f77b4"),
    "nodemesh_l7": ("nodemesh L7", "#2ca02c"),
    "sidecar": ("sidecar", "#d62728"),
}
BAR, GAP, GROUP_GAP = 22, 4, 30
TOP, BOTTOM, LEFT = 48, 52, 64  # margins of a panel's plot area
HEIGHT = 300  # of a plot area


def _decades(values: list[float]) -> tuple[int, int]:
    return math.floor(math.log10(min(values))), math.ceil(math.log10(max(values)))


def _panel(
    x0: float, title: str, table: dict[str, Any], paths: list[str]
) -> tuple[list[str], float]:
    """SVG elements of one panel starting at x0, and the panel's width."""
    values = [
        table[p][f"rr_{size}"][q] for p in paths for size, _ in SIZES for q in ("p50_us", "p99_us")
    ]
    lo, hi = _decades(values)

    def y(v: float) -> float:
        return TOP + HEIGHT * (1 - (math.log10(v) - lo) / (hi - lo))

    group = len(paths) * (BAR + GAP) - GAP
    width = LEFT + 20 + len(SIZES) * group + (len(SIZES) - 1) * GROUP_GAP + 20
    out = [
        f'<text x="{x0 + LEFT}" y="{TOP - 26}" class="title">{escape(title)}</text>',
        f'<text x="{x0 + 14}" y="{TOP + HEIGHT / 2}" class="axis" '
        f'transform="rotate(-90 {x0 + 14} {TOP + HEIGHT / 2})" text-anchor="middle">'
        "round trip (µs, log scale)</text>",
    ]
    for d in range(lo, hi + 1):  # gridlines at 1, 2, 5 per decade
        for m in (1, 2, 5):
            v = m * 10**d
            if v > 10**hi:
                break
            cls = "grid" if m == 1 else "grid minor"
            out.append(
                f'<line x1="{x0 + LEFT}" x2="{x0 + width - 20}" y1="{y(v):.1f}" y2="{y(v):.1f}" '
                f'class="{cls}"/>'
            )
            out.append(
                f'<text x="{x0 + LEFT - 6}" y="{y(v) + 4:.1f}" class="axis" text-anchor="end">'
                f"{v:g}</text>"
            )
    base = TOP + HEIGHT
    for i, (size, label) in enumerate(SIZES):
        gx = x0 + LEFT + 10 + i * (group + GROUP_GAP)
        out.append(
            f'<text x="{gx + group / 2:.1f}" y="{base + 20}" class="axis" '
            f'text-anchor="middle">{label}</text>'
        )
        for j, p in enumerate(paths):
            m = table[p][f"rr_{size}"]
            p50, p99 = m["p50_us"], m["p99_us"]
            bx = gx + j * (BAR + GAP)
            cx = bx + BAR / 2
            name, colour = PATHS[p]
            tip = f"{name}, {label}: p50 {p50:.1f} µs, p99 {p99:.1f} µs"
            out.append(
                f'<rect x="{bx:.1f}" y="{y(p50):.1f}" width="{BAR}" height="{base - y(p50):.1f}" '
                f'fill="{colour}"><title>{escape(tip)}</title></rect>'
            )
            out.append(
                f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{y(p50):.1f}" y2="{y(p99):.1f}" '
                'class="whisker"/>'
            )
            out.append(
                f'<line x1="{cx - 5:.1f}" x2="{cx + 5:.1f}" y1="{y(p99):.1f}" y2="{y(p99):.1f}" '
                'class="whisker"/>'
            )
            out.append(
                f'<text x="{cx:.1f}" y="{y(p50) - 3:.1f}" class="value" '
                f'text-anchor="middle">{p50:.0f}</text>'
            )
    out.append(
        f'<line x1="{x0 + LEFT}" x2="{x0 + width - 20}" y1="{base}" y2="{base}" class="frame"/>'
    )
    return out, width


def render(results: dict[str, Any]) -> str:
    http, tcp = results["http_echo"], results["tcp_echo"]
    left, w1 = _panel(0, "HTTP/1.1 echo (keep-alive POST)", http, list(PATHS))
    right, w2 = _panel(w1 + 20, "TCP byte echo", tcp, ["no_mesh", "nodemesh_l4"])
    width, height = w1 + 20 + w2, TOP + HEIGHT + BOTTOM + 44
    legend, lx = [], LEFT
    for name, colour in PATHS.values():
        legend.append(
            f'<rect x="{lx}" y="{height - 50}" width="12" height="12" fill="{colour}"/>'
            f'<text x="{lx + 16}" y="{height - 40}" class="axis">{escape(name)}</text>'
        )
        lx += 20 + 7 * len(name) + 14
    note = (
        f"bar: p50, whisker: p99 · {results['when']} · kernel {results['kernel']} · "
        f"{results['cpus']} CPUs · {results['rr_count']} round trips per bar"
    )
    legend.append(f'<text x="{LEFT}" y="{height - 14}" class="axis">{escape(note)}</text>')
    style = (
        "text{font-family:DejaVu Sans,Arial,sans-serif;fill:#222}"
        ".title{font-size:14px;font-weight:bold}.axis{font-size:11px}"
        ".value{font-size:9px;paint-order:stroke;stroke:#fff;stroke-width:3px}"
        ".grid{stroke:#ccc;stroke-width:1}.minor{stroke:#eee}"
        ".whisker{stroke:#222;stroke-width:1.2}.frame{stroke:#222;stroke-width:1}"
    )
    body = "\n".join([*left, *right, *legend])
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height}" '
        f'viewBox="0 0 {width:.0f} {height}">\n<style>{style}</style>\n'
        f'<rect width="100%" height="100%" fill="#fff"/>\n{body}\n</svg>\n'
    )


def main(argv: list[str]) -> int:
    src = Path(argv[0]) if argv else ROOT / "bench" / "results" / "dataplane.json"
    dst = Path(argv[1]) if len(argv) > 1 else ROOT / "docs" / "img" / "dataplane.svg"
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(render(json.loads(src.read_text())))
    print(f"wrote {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
