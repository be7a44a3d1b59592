"""Pareto plot of the quality bench: held-out perplexity (log scale) against the measured FLOP reduction, one line
per method, from one or more bench/results/quality-*.json files.

    python bench/pareto_plot.py bench/results/quality-smollm2-135m.json bench/results/quality-smollm2-135m-hybrid.json \
        --methods dense,cats,rana-uniform,rana-greedy,svd,hybrid-exact-loss,hybrid-exact-output --out docs/pareto.svg

Writes a plain SVG by hand: the environment has no plot exporter (kaleido, matplotlib), and an SVG renders in the
README as it is.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]
WIDTH, HEIGHT = 760, 460
LEFT, RIGHT, TOP, BOTTOM = 70, 210, 30, 60  # margins; the legend sits in the right one


def series(paths: list[Path], wanted: list[str] | None) -> tuple[dict[str, list[tuple[float, float]]], float | None]:
    """{"method-allocation": [(measured reduction, perplexity)]} and the dense perplexity, later files winning."""
    found: dict[str, dict[float, tuple[float, float]]] = {}
    dense = None
    for path in paths:
        for row in json.loads(path.read_text())["rows"]:
            if "skipped" in row or row.get("perplexity") is None or row.get("measured_flop_reduction") is None:
                continue
            name = row["method"] if row["allocation"] == "uniform" and row["method"] in ("dense", "svd", "cats") \
                else f"{row['method']}-{row['allocation']}"
            if row["method"] == "dense":
                dense = row["perplexity"]
                continue
            found.setdefault(name, {})[row["target"]] = (row["measured_flop_reduction"], row["perplexity"])
            dense = dense or row.get("dense_perplexity")
    names = [n for n in (wanted or sorted(found)) if n in found]
    return {n: sorted(found[n].values()) for n in names}, dense


def svg(lines: dict[str, list[tuple[float, float]]], dense: float | None, title: str) -> str:
    xs = [x for points in lines.values() for x, _ in points]
    ys = [y for points in lines.values() for _, y in points] + ([dense] if dense else [])
    x0, x1 = max(0.0, math.floor((min(xs) - 0.05) * 10) / 10), max(0.55, max(xs) + 0.03)
    y0, y1 = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x):
        return LEFT + (x - x0) / (x1 - x0) * plot_w

    def py(y):
        return TOP + (1 - (math.log10(y) - y0) / (y1 - y0)) * plot_h

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
           f'<text x="{LEFT}" y="18" font-size="14">{title}</text>']
    for decade in range(y0, y1 + 1):
        for mult in (1, 2, 5):
            value = mult * 10 ** decade
            if not 10 ** y0 <= value <= 10 ** y1:
                continue
            y = py(value)
            out.append(f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e5e5"/>')
            out.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{value:g}</text>')
    tick = x0
    while tick <= x1 + 1e-9:
        x = px(tick)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{TOP + plot_h}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{x:.1f}" y="{TOP + plot_h + 16}" text-anchor="middle">{tick:.1f}</text>')
        tick += 0.1
    out.append(f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>')
    out.append(f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 18}" text-anchor="middle">measured FLOP reduction '
               f'(QKV + MLP, held-out tokens)</text>')
    out.append(f'<text x="16" y="{TOP + plot_h / 2}" text-anchor="middle" transform="rotate(-90 16 '
               f'{TOP + plot_h / 2})">held-out perplexity (log)</text>')
    legend_y = TOP + 10
    if dense:
        y = py(dense)
        out.append(f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#555" '
                   f'stroke-dasharray="6 4"/>')
        out.append(f'<line x1="{WIDTH - RIGHT + 15}" x2="{WIDTH - RIGHT + 40}" y1="{legend_y}" y2="{legend_y}" '
                   f'stroke="#555" stroke-dasharray="6 4"/>')
        out.append(f'<text x="{WIDTH - RIGHT + 46}" y="{legend_y + 4}">dense {dense:.2f}</text>')
        legend_y += 20
    for n, (name, points) in enumerate(lines.items()):
        colour = COLOURS[n % len(COLOURS)]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="4" fill="{colour}"/>' for x, y in points]
        out.append(f'<line x1="{WIDTH - RIGHT + 15}" x2="{WIDTH - RIGHT + 40}" y1="{legend_y}" y2="{legend_y}" '
                   f'stroke="{colour}" stroke-width="2"/>')
        out.append(f'<circle cx="{WIDTH - RIGHT + 27.5}" cy="{legend_y}" r="4" fill="{colour}"/>')
        out.append(f'<text x="{WIDTH - RIGHT + 46}" y="{legend_y + 4}">{name}</text>')
        legend_y += 20
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--methods", help="comma-separated series to draw, in legend order (default: all)")
    parser.add_argument("--title", default="SmolLM2-135M: held-out perplexity at equal measured FLOPs")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.results if not p.is_file()]
    if missing:
        print(f"bench/pareto_plot.py: no such results file: {', '.join(missing)}", file=sys.stderr)
        return 2
    lines, dense = series(args.results, args.methods.split(",") if args.methods else None)
    if not lines:
        print("bench/pareto_plot.py: no rows to plot", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(svg(lines, dense, args.title))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
