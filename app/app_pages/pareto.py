"""Pareto explorer: measured FLOP reduction (or measured decode speedup over dense, one series per method and
GPU) against held-out perplexity (or accuracy on a task) for one model, a colour and a frontier per series,
dense as the reference line;
filters; clicking a point opens its run."""

import pandas as pd
import streamlit as st

from app import charts, data

data.page("Pareto")

runs = data.finished_runs(
    "No finished runs yet: queue one on New run, and a worker will fill this page."
)
recovered = data.recovered_points(data.url())
if not recovered.empty:  # LoRA-recovered runs: their own series ("<series>+lora-<strategy>")
    runs = pd.concat([runs, recovered], ignore_index=True)

models = sorted(runs["model"].unique())
params = st.query_params
default_model = params.get("model") if params.get("model") in models else models[0]
top = st.columns([2, 2, 1, 1])
model = top[0].selectbox("Model", models, index=models.index(default_model), key="pareto_model")
axes = {"measured_flop_reduction": "FLOP reduction", "speedup": "decode speedup"}
x_axis = top[3].radio("x axis", list(axes), format_func=axes.get, key="pareto_x",
                      index=1 if params.get("x") == "speedup" else 0)
shown = runs[runs["model"] == model]
if x_axis == "speedup":
    shown = data.speed_points(shown, data.url())
    if shown.empty:
        st.info("No decode speed measured for this model's runs yet: open a run and press Measure decode speed.")
        st.stop()
accuracy = data.accuracy(data.url())
tasks = sorted(accuracy[accuracy["run_id"].isin(shown["run_id"])]["task"].unique())
y_axis = "perplexity"
if tasks:
    options = ["perplexity"] + tasks
    y_axis = st.radio("y axis", options, horizontal=True, key="pareto_y",
                      index=options.index(params.get("y")) if params.get("y") in options else 0)
if y_axis != "perplexity":  # accuracy on that task: runs without it drop out
    shown = shown.merge(accuracy[accuracy["task"] == y_axis][["run_id", "acc", "dense_acc"]], on="run_id")
series = sorted(shown["series"].unique())
from_url = [m for m in params.get("methods", "").split(",") if m in series]
picked = top[1].multiselect("Methods", series, default=from_url or series, key="pareto_methods")
log_y = top[2].toggle("Log perplexity axis", value=params.get("log", "1") != "0", key="pareto_log_y")

with st.expander("Filters: author, tag, date, text"):
    left, middle, right = st.columns(3)
    corpora = sorted(shown["corpora"].unique())
    chosen_corpora = left.multiselect("Calibration → evaluation text", corpora, key="pareto_corpora",
                                      default=[c for c in params.get("corpora", "").split("|") if c in corpora])
    authors = sorted(a for a in shown["author"].dropna().unique())
    chosen_authors = left.multiselect("Author", authors, key="pareto_authors")
    tags = sorted({t for row in shown["tags"] for t in row})
    chosen_tags = middle.multiselect("Tag (any of)", tags, key="pareto_tags")
    dates = pd.to_datetime(shown["created_at"])
    first, last = dates.min().date(), dates.max().date()
    span = right.date_input("Created between", value=(first, last), key="pareto_dates")

keep = shown["series"].isin(picked)
if chosen_corpora:
    keep &= shown["corpora"].isin(chosen_corpora)
if chosen_authors:
    keep &= shown["author"].isin(chosen_authors)
if chosen_tags:
    keep &= shown["tags"].map(lambda row: bool(set(row) & set(chosen_tags))).astype(bool)
if isinstance(span, (tuple, list)) and len(span) == 2:
    created = dates.dt.date
    keep &= (created >= span[0]) & (created <= span[1])
shown = shown[keep]
st.query_params.update({"model": model, "methods": ",".join(picked), "log": "1" if log_y else "0", "x": x_axis,
                        "y": y_axis, "corpora": "|".join(chosen_corpora)})

if shown.empty:
    st.info("No run matches these filters.")
    st.stop()
st.caption(f"{len(shown)} runs · click a point to open it")
figure = charts.pareto_figure(shown, log_y=log_y, x=x_axis, y="perplexity" if y_axis == "perplexity" else "acc")
event = st.plotly_chart(figure, key="pareto_chart", on_select="rerun", selection_mode="points")
run_ids = [charts.run_id_of(point) for point in (event.selection.points if event else [])]
run_ids = [run_id for run_id in run_ids if run_id is not None]
if run_ids:
    st.switch_page("app_pages/run_detail.py", query_params={"run": run_ids[0]})
st.dataframe(
    shown[["run_id", "series", "target_flop_reduction", "measured_flop_reduction",
           "measured_flop_reduction_whole_model", "perplexity", "dense_perplexity", "eval_tokens", "corpora",
           "author", "created_at"] + (["ms_per_token", "dense_ms_per_token", "speedup", "context_tokens"]
                            if x_axis == "speedup" else []) + (["acc", "dense_acc"] if y_axis != "perplexity" else [])],
    hide_index=True, width="stretch", key="pareto_table",
)
