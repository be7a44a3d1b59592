"""Pure Plotly builders: DataFrames in, figures out. No Streamlit, no database."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative

METHOD_COLOURS = dict(zip(["dense", "svd", "cats", "rana", "rana-greedy", "a3", "hybrid"], qualitative.D3))
HOVER = ("run %{customdata[0]}<br>target %{customdata[1]:.2f}, measured %{x:.3f}<br>{y} %{y:.3f}"
         "<br>%{customdata[2]} held-out tokens<extra>%{fullData.name}</extra>")


def method_colour(method: str) -> str:
    if method not in METHOD_COLOURS:
        METHOD_COLOURS[method] = qualitative.D3[len(METHOD_COLOURS) % len(qualitative.D3)]
    return METHOD_COLOURS[method]


def pareto_frontier(points: pd.DataFrame, x: str = "measured_flop_reduction", y: str = "perplexity",
                    lower: bool = True) -> pd.DataFrame:
    """The runs no other run beats on both axes: more of `x` (FLOPs removed, speedup) and a better `y` (lower
    perplexity, or with `lower` off, higher accuracy)."""
    ordered = points.sort_values([x, y], ascending=[False, lower])
    sign = 1.0 if lower else -1.0
    best, keep = float("inf"), []
    for index, row in ordered.iterrows():
        if sign * row[y] < best:
            best = sign * row[y]
            keep.append(index)
    return points.loc[keep].sort_values(x)


def run_id_of(point: dict) -> int | None:
    """The run behind a selected Pareto point: the first entry of its customdata (which the browser may send as
    a list or as an object keyed "0", "1", …); None for the frontier lines and the dense line."""
    data = point.get("customdata")
    if isinstance(data, dict):
        data = data.get("0", data.get(0))
    elif isinstance(data, (list, tuple)):
        data = data[0] if data else None
    try:
        return int(data) if data is not None else None
    except (TypeError, ValueError):
        return None


PARETO_AXES = {"measured_flop_reduction": "measured FLOP reduction (QKV + MLP, held-out tokens)",
               "speedup": "decode speedup over dense (same engine, same GPU)"}


def pareto_figure(runs: pd.DataFrame, log_y: bool = False, x: str = "measured_flop_reduction",
                  y: str = "perplexity") -> go.Figure:
    """Measured FLOP reduction (or measured decode speedup) vs perplexity (or accuracy on a task, column "acc"
    beside "dense_acc"): one colour per series (method and allocation, and the GPU for speed), each series'
    Pareto frontier as a line through its points, and the dense model as a reference line."""
    lower = y == "perplexity"
    y_title = "held-out perplexity" if lower else "accuracy (higher is better)"
    fig = go.Figure()
    for series, group in runs.groupby("series", sort=True):
        colour = method_colour(series)
        group = group.sort_values(x)
        fig.add_trace(go.Scatter(
            x=group[x], y=group[y], mode="markers", name=series,
            legendgroup=series, marker={"size": 10, "color": colour},
            customdata=group[["run_id", "target_flop_reduction", "eval_tokens"]].to_numpy(),
            hovertemplate=HOVER.replace("{y}", "perplexity" if lower else "accuracy"),
        ))
        frontier = pareto_frontier(group, x, y, lower)
        if len(frontier) > 1:
            fig.add_trace(go.Scatter(
                x=frontier[x], y=frontier[y], mode="lines",
                name=f"{series} frontier", legendgroup=series, showlegend=False, hoverinfo="skip",
                line={"color": colour, "width": 2},
            ))
    if not runs.empty:
        dense = float(runs[f"dense_{'perplexity' if lower else 'acc'}"].median())
        left, right = (0.0, max(0.7, float(runs[x].max()) + 0.05)) if x == "measured_flop_reduction" else (
            min(1.0, float(runs[x].min())) - 0.05, max(1.0, float(runs[x].max())) + 0.05)
        fig.add_trace(go.Scatter(x=[left, right], y=[dense, dense], mode="lines", name="dense (reference)",
                                 line={"dash": "dash", "color": "grey"}, hoverinfo="name+y"))
    fig.update_layout(
        xaxis_title=PARETO_AXES.get(x, x), yaxis_title=y_title,
        yaxis_type="log" if log_y and lower else "linear", legend_title="method", margin={"t": 30}, height=520,
        clickmode="event+select",
    )
    return fig


MODULE_ORDER = ["qkv", "gate", "up", "down"]
ADAPTER_CODES = ["dense", "svd", "rank", "neuron", "cats", "a3"]  # categorical colour for the adapter heatmap
HEATMAP_METRICS = {
    "adapter": "adapter that ran the module",
    "keep": "FLOPs spent / dense FLOPs",
    "planned_keep": "keep the allocation chose (QKV / whole MLP)",
    "rank_share": "static rank / max rank",
    "density": "mean active ranks / static rank",
    "recon_error": "reconstruction error ‖f−f̂‖²/‖f‖²",
    "sparsity": "rank-importance sparsity (share for 90% energy)",
}


SHARE_METRICS = ("keep", "planned_keep", "rank_share", "density", "sparsity")


def layer_grid(layers: pd.DataFrame, metric: str) -> pd.DataFrame:
    """modules × layers table of one metric (the adapter as its code in ADAPTER_CODES)."""
    frame = layers.copy()
    frame["rank_share"] = frame["rank"] / frame["max_rank"]
    if metric == "adapter":
        frame["adapter"] = frame["adapter"].fillna("dense").map(
            lambda a: ADAPTER_CODES.index(a) if a in ADAPTER_CODES else len(ADAPTER_CODES))
    grid = frame.pivot_table(index="module", columns="layer", values=metric, aggfunc="first")
    return grid.reindex([m for m in MODULE_ORDER if m in grid.index])


def heatmap_figure(layers: pd.DataFrame, metric: str, title: str | None = None) -> go.Figure:
    """A layers × modules heatmap of one run's `metric`."""
    return grid_heatmap(layer_grid(layers, metric), metric, title)


def grid_heatmap(grid: pd.DataFrame, metric: str, title: str | None = None, difference: bool = False) -> go.Figure:
    """A heatmap of a layer_grid; with `difference` (run B − run A), a diverging scale centred on 0."""
    z = grid.to_numpy(dtype=float)
    kwargs = {"colorscale": "Viridis"}
    if metric == "adapter":
        colours = qualitative.Set2[: len(ADAPTER_CODES)]
        steps = len(ADAPTER_CODES)
        scale = []
        for i, colour in enumerate(colours):
            scale += [(i / steps, colour), ((i + 1) / steps, colour)]
        kwargs = {"colorscale": scale, "zmin": -0.5, "zmax": steps - 0.5,
                  "colorbar": {"tickvals": list(range(steps)), "ticktext": ADAPTER_CODES}}
    elif metric in SHARE_METRICS and not difference:
        kwargs = {"colorscale": "Viridis", "zmin": 0.0, "zmax": 1.0}  # shares on one scale, run to run
    elif difference:
        limit = float(abs(z[~pd.isna(z)]).max()) if (~pd.isna(z)).any() else 1.0
        kwargs = {"colorscale": "RdBu", "zmid": 0.0, "zmin": -limit or -1.0, "zmax": limit or 1.0}
    fig = go.Figure(go.Heatmap(z=z, x=[int(c) for c in grid.columns], y=list(grid.index), **kwargs,
                               hovertemplate="layer %{x}, %{y}: %{z:.4g}<extra></extra>"))
    fig.update_layout(title=title or HEATMAP_METRICS.get(metric, metric), xaxis={"title": "layer", "dtick": 1},
                      yaxis={"autorange": "reversed"}, height=260, margin={"t": 40, "b": 40})
    return fig


def layer_lines_figure(runs: dict[str, pd.DataFrame], metric: str) -> go.Figure:
    """`metric` per layer, one line per (run, module)."""
    fig = go.Figure()
    for label, layers in runs.items():
        frame = layers.copy()
        frame["rank_share"] = frame["rank"] / frame["max_rank"]
        for module in [m for m in MODULE_ORDER if m in set(frame["module"])]:
            rows = frame[frame["module"] == module].sort_values("layer")
            fig.add_trace(go.Scatter(x=rows["layer"], y=rows[metric], mode="lines+markers",
                                     name=f"{label} · {module}"))
    fig.update_layout(xaxis_title="layer", yaxis_title=HEATMAP_METRICS.get(metric, metric), height=360,
                      margin={"t": 30})
    return fig


def latency_figures(latency: pd.DataFrame) -> tuple[go.Figure, go.Figure]:
    """ms/token against context length, and speedup over dense, one line per (model, engine, budget)."""
    per_token, speedup = go.Figure(), go.Figure()
    for (model, engine, budget), rows in latency.groupby(["model", "engine", "flop_reduction"], sort=True):
        rows = rows.sort_values("context_tokens")
        name = f"{model} · {engine} · −{budget:.0%}"
        per_token.add_trace(go.Scatter(x=rows["context_tokens"], y=rows["ms_per_token"], mode="lines+markers",
                                       name=name))
        if budget > 0:
            speedup.add_trace(go.Scatter(x=rows["context_tokens"], y=rows["speedup"], mode="lines+markers",
                                         name=name))
    per_token.update_layout(xaxis_title="context tokens", yaxis_title="median ms / token", height=400)
    speedup.update_layout(xaxis_title="context tokens", yaxis_title="speedup vs dense (same engine)", height=400)
    return per_token, speedup


def batch_figure(batches: pd.DataFrame) -> go.Figure:
    """Tokens per second against batch size, the run solid and the dense model dashed in the same colour, one
    colour per (device, dtype, context)."""
    fig = go.Figure()
    for index, (series, rows) in enumerate(batches.groupby("series", sort=True)):
        rows = rows.sort_values("batch")
        colour = qualitative.D3[index % len(qualitative.D3)]
        fig.add_trace(go.Scatter(x=rows["batch"], y=rows["tokens_per_s"], mode="lines+markers",
                                 name=f"run · {series}", line={"color": colour}))
        fig.add_trace(go.Scatter(x=rows["batch"], y=rows["dense_tokens_per_s"], mode="lines+markers",
                                 name=f"dense · {series}", line={"color": colour, "dash": "dash"}))
    fig.update_layout(xaxis_title="sequences decoding together (batch)", yaxis_title="tokens / s (all sequences)",
                      height=360, margin={"t": 30})
    return fig


SECTION_KINDS = {"qkv": "QKV product", "mlp": "MLP"}


def section_costs_figure(layers: pd.DataFrame, costs: dict | None) -> go.Figure:
    """Each layer's QKV and MLP section time (µs, profiled replay) against the share of its FLOPs the masks kept,
    one colour per kind; where the worker fitted a line to the cut sections (costs: section_costs), it is drawn
    dashed from k = 0 to 1: its height at 0 is what a cut section costs whatever it keeps."""
    fig = go.Figure()
    for index, (kind, label) in enumerate(SECTION_KINDS.items()):
        colour = qualitative.D3[index]
        fig.add_trace(go.Scatter(x=layers[f"{kind}_kept"], y=1e3 * layers[f"{kind}_ms"], mode="markers",
                                 name=f"{label} · layers", marker={"color": colour},
                                 text=[f"layer {i}" for i in layers["layer"]]))
        fit = (costs or {}).get(kind) or {}
        if fit.get("fixed_ms") is not None:
            fixed, slope = 1e3 * fit["fixed_ms"], 1e3 * fit["per_kept_ms"]
            fig.add_trace(go.Scatter(x=[0.0, 1.0], y=[fixed, fixed + slope], mode="lines",
                                     name=f"{label} · cut: {fixed:.1f} + {slope:.1f}·k µs",
                                     line={"color": colour, "dash": "dash"}))
    fig.update_layout(xaxis_title="FLOPs kept / dense (k)", yaxis_title="µs per section (profiled replay)",
                      xaxis_range=[0, 1.05], height=360, margin={"t": 30})
    return fig


CURVE_SHARES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)  # rana_core.adapters.base.SPARSITY_CURVE_SHARES (app does not import it)


def sparsity_curves_figure(layers: pd.DataFrame) -> go.Figure:
    """Share of ranks (neurons, for down) needed to reach each share of a token's energy, averaged over layers,
    one line per module: the lower the line, the sparser the importances."""
    fig = go.Figure()
    rows = layers.dropna(subset=["sparsity_curve"])
    for module in [m for m in MODULE_ORDER if m in set(rows["module"])]:
        curves = [c for c in rows[rows["module"] == module]["sparsity_curve"] if c]
        if not curves:
            continue
        mean = [sum(c[i] for c in curves) / len(curves) for i in range(len(CURVE_SHARES))]
        fig.add_trace(go.Scatter(x=list(CURVE_SHARES), y=mean, mode="lines+markers", name=module))
    fig.update_layout(xaxis_title="share of a token's energy", yaxis_title="share of ranks (neurons) needed",
                      yaxis_range=[0, 1], height=340, margin={"t": 30})
    return fig


def recovery_ranks_figure(recoveries: pd.DataFrame) -> go.Figure:
    """Per-layer LoRA ranks of a run's recoveries: one row per recovery (its id and strategy), layers across."""
    labels = [f"#{r.recovery_id} {r.strategy}" for r in recoveries.itertuples()]
    z = [list(ranks) for ranks in recoveries["ranks"]]
    fig = go.Figure(go.Heatmap(z=z, x=list(range(len(z[0]) if z else 0)), y=labels, colorscale="Viridis", zmin=0,
                               colorbar={"title": "rank"},
                               hovertemplate="layer %{x}, %{y}: rank %{z}<extra></extra>"))
    fig.update_layout(title="LoRA rank per layer", xaxis={"title": "layer", "dtick": 1},
                      yaxis={"autorange": "reversed"}, height=120 + 30 * len(labels), margin={"t": 40, "b": 40})
    return fig
