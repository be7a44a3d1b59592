"""Compare (team): every run with its author, tags and provenance; pick two or more for a metric and
configuration diff, and export them. The selection lives in the URL (?runs=3,7,12), so a link reopens it."""

import json

import pandas as pd
import streamlit as st

from app import data

data.page("Compare")

runs = data.finished_runs("No finished runs yet.")

labels = {int(r.run_id): f"run {r.run_id}: {r.model} · {r.series} · −{r.target_flop_reduction:.0%} · "
                         f"{r.author or '?'}" for r in runs.itertuples()}
from_url = []
for part in st.query_params.get("runs", "").split(","):
    if part.strip().isdigit() and int(part) in labels:
        from_url.append(int(part))

table = runs[["run_id", "model", "series", "target_flop_reduction", "measured_flop_reduction", "perplexity",
              "author", "tags", "created_at"]].copy()
table["tags"] = table["tags"].map(", ".join)
with st.expander(f"All {len(runs)} runs", expanded=not from_url):
    st.dataframe(table, hide_index=True, width="stretch", key="compare_all")

chosen = st.multiselect("Runs to compare", sorted(labels, reverse=True), default=from_url,
                        format_func=labels.get, key="compare_runs")
st.query_params["runs"] = ",".join(str(i) for i in chosen)
if len(chosen) < 2:
    st.info("Pick two or more runs; the link in the address bar then reopens this comparison.")
    st.stop()

details = data.run_details(data.url(), tuple(chosen))


accuracy = data.accuracy(data.url())


def flat(run: dict, run_id: int) -> dict:
    """One column of the diff: results first (decode speed where measured), then configuration and provenance,
    flattened."""
    heldout = run["evaluations"][0] if run["evaluations"] else {}
    row = {"perplexity": heldout.get("perplexity"), "dense perplexity": heldout.get("dense_perplexity"),
           "measured FLOP reduction": heldout.get("measured_flop_reduction"),
           "whole-model FLOP reduction": heldout.get("measured_flop_reduction_whole_model"),
           "target": run["target_flop_reduction"], "author": run["author"], "tags": ", ".join(run["tags"]),
           "seconds": run["seconds"]}
    for role, record in run["corpora"].items():  # which text calibrated and evaluated it, and which version
        row[f"{role} text"] = data.corpus_label(record)
    for r in accuracy[accuracy["run_id"] == run_id].itertuples():
        row[f"accuracy · {r.task}"] = f"{r.acc:.3f} ± {r.acc_stderr:.3f} (dense {r.dense_acc:.3f})"
    adapted = (run.get("probes") or {}).get("adapted") or {}
    if adapted.get("chat_accuracy") is not None:
        row["questions answered (probes)"] = f"{adapted['chat_accuracy']:.0%}"
    speed, _ = data.run_speed(data.url(), run_id)
    for r in speed.itertuples():
        row[f"ms/token · {r.device_name} · {r.dtype} · context {r.context_tokens}"] = (
            f"{r.ms_per_token:.3f} ({r.speedup:.2f}× dense)")
    row.update({f"config.{k}": v for k, v in sorted(run["config"].items())})
    for key, value in sorted(run["provenance"].items()):
        if isinstance(value, dict):
            row.update({f"provenance.{key}.{k}": v for k, v in sorted(value.items())})
        else:
            row[f"provenance.{key}"] = value
    return {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in row.items()}


diff = pd.DataFrame({f"run {i}": flat(details[i], i) for i in chosen if i in details})
differs = diff.astype(str).nunique(axis=1) > 1
only_diff = st.toggle("Only what differs", value=True, key="compare_only_diff")
shown = diff[differs] if only_diff else diff
st.dataframe(shown.astype(str), width="stretch", key="compare_diff")
st.caption(f"{int(differs.sum())} of {len(diff)} fields differ")

replies = {i: data.probe_table(details[i].get("probes")) for i in chosen if i in details}
replies = {i: table for i, table in replies.items() if not table.empty}
if replies:
    st.subheader("What the models say")
    side = pd.DataFrame({"prompt": next(iter(replies.values()))["prompt"]})
    side["dense"] = next(iter(replies.values()))["dense reply"]
    for i, table in replies.items():
        side[f"run {i}"] = side["prompt"].map(dict(zip(table["prompt"], table["reply"])))
    st.dataframe(side, hide_index=True, width="stretch", key="compare_probes")

left, right = st.columns(2)
left.download_button("Export CSV", diff.to_csv().encode(), file_name="rana-compare.csv", mime="text/csv",
                     key="compare_csv")
right.download_button("Export JSON", json.dumps([details[i] for i in chosen], default=str, indent=2).encode(),
                      file_name="rana-compare.json", mime="application/json", key="compare_json")
