"""Pure Plotly builders: DataFrames in, figures out. No Streamlit, no database."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative

METHOD_COLOURS = dict(zip(["dense", "svd", "cats", "rana", "rana-greedy", "a3", "hybrid"], qualitative.D3))
HOVER = ("run %{customdata[0]}<br>target %{customdata[1]:.2f}, measured %{x:.3f}<br>perplexity %{y:.2f}"
         "<br>%{customdata[2]} held-out tokens<extra>%{fullData.name}</extra>")


def method_colour(method: str) -> str:
    if method not in METHOD_COLOURS:
        METHOD_COLOURS[method] = qualitative.D3[len(METHOD_COLOURS) % len(qualitative.D3)]
    return METHOD_COLOURS[method]


def pareto_figure(runs: pd.DataFrame, log_y: bool = False) -> go.Figure:
    """Measured FLOP reduction vs perplexity, one trace per series (method and allocation), and the dense model
    as a reference line."""
    fig = go.Figure()
    for series, group in runs.groupby("series", sort=True):
        group = group.sort_values("measured_flop_reduction")
        fig.add_trace(go.Scatter(
            x=group["measured_flop_reduction"], y=group["perplexity"], mode="markers", name=series,
            marker={"size": 10, "color": method_colour(series)},
            customdata=group[["run_id", "target_flop_reduction", "eval_tokens"]].to_numpy(),
            hovertemplate=HOVER,
        ))
    if not runs.empty:
        dense = float(runs["dense_perplexity"].median())
        right = max(0.7, float(runs["measured_flop_reduction"].max()) + 0.05)
        fig.add_trace(go.Scatter(x=[0.0, right], y=[dense, dense], mode="lines", name="dense (reference)",
                                 line={"dash": "dash", "color": "grey"}, hoverinfo="name+y"))
    fig.update_layout(
        xaxis_title="measured FLOP reduction (QKV + MLP, held-out tokens)", yaxis_title="held-out perplexity",
        yaxis_type="log" if log_y else "linear", legend_title="method", margin={"t": 30}, height=520,
    )
    return fig
