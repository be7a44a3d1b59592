"""Run detail and layer inspector: heatmaps of layers × modules (adapter, keep, static rank, density, error,
sparsity) for one run, or for two side by side with their difference; per-layer lines; the run's decode speed on
each GPU measured (per layer: time of attention and MLP beside the FLOPs kept) and a button that measures it; the
run's LoRA recoveries (per-layer ranks by strategy, perplexity before and after). URL: ?run=A&other=B."""

import pandas as pd
import streamlit as st

from app import charts, data, readings

data.page("Run detail")

runs = data.finished_runs("No finished runs yet.")

labels = {int(r.run_id): f"run {r.run_id}: {r.model} · {r.series} · −{r.target_flop_reduction:.0%} · "
                         f"ppl {r.perplexity:.2f}" for r in runs.itertuples()}
ids = sorted(labels, reverse=True)


def from_url(name: str, fallback):
    try:
        value = int(st.query_params.get(name, ""))
    except ValueError:
        return fallback
    return value if value in labels else fallback


left, right = st.columns(2)
run_id = left.selectbox("Run", ids, index=ids.index(from_url("run", ids[0])), format_func=labels.get,
                        key="detail_run")
options = [None] + [i for i in ids if i != run_id]
other_default = from_url("other", None)
other_id = right.selectbox("Compare with", options, format_func=lambda i: "—" if i is None else labels[i],
                           index=options.index(other_default) if other_default in options else 0,
                           key="detail_other")
st.query_params["run"] = run_id
if other_id is None:
    st.query_params.pop("other", None)
else:
    st.query_params["other"] = other_id

details = data.run_details(data.url(), tuple(i for i in (run_id, other_id) if i is not None))
run = details[run_id]
heldout = run["evaluations"][0] if run["evaluations"] else {}
cols = st.columns(4)
cols[0].metric("Perplexity", f"{heldout.get('perplexity', float('nan')):.2f}",
               f"dense {heldout.get('dense_perplexity', float('nan')):.2f}", delta_color="off",
               delta_arrow="off")
cols[1].metric("FLOP reduction (QKV+MLP)", f"{heldout.get('measured_flop_reduction', 0):.3f}",
               f"target {run['target_flop_reduction']:.2f}", delta_color="off",
               delta_arrow="off")
cols[2].metric("Whole model", f"{heldout.get('measured_flop_reduction_whole_model', 0):.3f}")
cols[3].metric("Author", run["author"] or "—", ", ".join(run["tags"]) or None, delta_color="off",
               delta_arrow="off")
texts = {role: data.corpus_label(record) for role, record in run["corpora"].items()}
st.caption(f"Calibrated on {texts.get('calibration', 'brown')}, evaluated on {texts.get('evaluation', 'brown')} "
           "(held out: every 10th document).")
SIZE_METRICS = {"params": ("Parameters", 1e6, "M"), "decoder_linear_params": ("Decoder linear params", 1e6, "M"),
                "kv_bytes_per_token": ("KV cache (fp16)", 1024, " KiB/token"),
                "flops_per_token": ("FLOPs", 1e6, "M/token")}
stats = run["model_stats"]
if stats:  # runs stored before model_stats existed have none
    dense_stats = stats.get("dense", {})
    for col, (key, (label, scale, unit)) in zip(st.columns(len(SIZE_METRICS)), SIZE_METRICS.items()):
        dense_value = dense_stats.get(key)
        col.metric(label, f"{stats.get(key, float('nan')) / scale:,.1f}{unit}",
                   f"dense {dense_value / scale:,.1f}{unit}" if dense_value is not None else None,
                   delta_color="off", delta_arrow="off")

st.subheader("Decode speed")
speed, sections = data.run_speed(data.url(), run_id)
if speed.empty:
    st.caption("Not measured yet: a GPU worker measures it in the run's own engine, beside the dense model's.")
else:
    for col, row in zip(st.columns(min(len(speed), 4)), speed.itertuples()):
        col.metric(f"{row.device_name} · {row.dtype} · context {row.context_tokens}",
                   f"{row.ms_per_token:.3f} ms/token",
                   f"{row.speedup:.2f}× dense ({row.dense_ms_per_token:.3f} ms)", delta_color="off", delta_arrow="off")
    reading = readings.speed_reading(speed.iloc[0].to_dict(), sections["costs"])  # the first GPU's shortest context
    if reading:
        st.caption(reading)
    if sections["layers"]:
        by_layer = pd.DataFrame(sections["layers"]).set_index("layer")
        times = by_layer[["qkv_ms", "attention_ms", "mlp_ms"]].T.rename(
            index={"qkv_ms": "QKV product", "attention_ms": "rest of attention", "mlp_ms": "MLP"})
        kept = by_layer[["qkv_kept", "mlp_kept"]].T.rename(index={"qkv_kept": "qkv", "mlp_kept": "MLP"})
        left, right = st.columns(2)
        left.plotly_chart(charts.grid_heatmap(times, "time", f"ms per layer section (profiled replay, context "
                                                             f"{sections['context']})"),
                          key="detail_speed_times")
        right.plotly_chart(charts.grid_heatmap(kept, "keep", "FLOPs kept / dense (engine's masks)"),
                           key="detail_speed_kept")
        st.caption("Where a step goes: each layer's section time against the FLOPs its masks kept. A dashed line "
                   "is fitted to the cut sections: its slope is what the kept bytes cost, its height at 0 what a "
                   "cut section costs whatever it keeps (its extra launches). Timing events sit in every section, "
                   "so each carries a few µs of their own.")
        st.plotly_chart(charts.section_costs_figure(by_layer.reset_index(), sections["costs"]),
                        key="detail_speed_costs")
    batches = data.run_batches(data.url(), run_id)
    if not batches.empty:
        st.caption("Sequences decoding together: tokens/s of all of them, the run beside the dense model on the same "
                   "GPU (batch 1 is the one-token engine above; larger batches read each weight once per step for "
                   "every sequence, and each sequence keeps its own masks).")
        st.plotly_chart(charts.batch_figure(batches), key="detail_speed_batches")
with st.form("measure_speed"):
    left, right = st.columns(2)
    contexts = left.text_input("Contexts (prompt tokens before the timed steps)", "1,512", key="speed_contexts")
    batch_sizes = right.text_input("Batches also timed (sequences decoding together)", "", key="speed_batches",
                                   placeholder="e.g. 4,8", help="2 to 16; batch 1 is always measured")
    if st.form_submit_button("Measure decode speed"):
        try:
            parsed = {name: [int(c) for c in text.split(",") if c.strip()]
                      for name, text in (("contexts", contexts), ("batches", batch_sizes))}
            job_id = data.submit_run_latency(run_id, parsed["contexts"], author=data.default_author(),
                                             batches=parsed["batches"])
            st.success(f"Queued job {job_id}: a GPU worker measures it (the Jobs page shows it waiting until one "
                       "is free).")
        except data.specs.RanaError as exc:  # before ValueError, which it is: the queue's own reason
            st.error(str(exc))
        except ValueError:
            st.error(f"Contexts and batches must be whole numbers separated by commas, got {contexts!r} and "
                     f"{batch_sizes!r}.")

st.subheader("Accuracy on tasks")
accuracy = data.accuracy(data.url())
accuracy = accuracy[accuracy["run_id"] == run_id].drop(columns=["run_id"])
if accuracy.empty:
    st.caption("Not measured yet: cloze (held-out Brown, built in) or your own multiple-choice JSON-lines files.")
else:
    st.dataframe(accuracy, hide_index=True, width="stretch", key="detail_accuracy")
with st.form("measure_accuracy"):
    left, right = st.columns(2)
    tasks = left.text_input("Tasks (cloze, and multiple-choice files the worker can read)", "cloze",
                            key="accuracy_tasks")
    corpus = right.text_input("Perplexity on (default brown)", key="accuracy_corpus",
                              placeholder="brown, /data/mine.jsonl:body or a hub id",
                              help="the held-out split (every 10th document) of this text")
    if st.form_submit_button("Measure accuracy"):
        try:
            job_id = data.submit_evaluate(run_id, tasks, author=data.default_author(), corpus=corpus)
            st.success(f"Queued job {job_id}: the run is evaluated again with its accuracy on each task.")
        except data.specs.RanaError as exc:
            st.error(str(exc))

st.subheader("What the model says")
replies = data.probe_table(run["probes"])
if replies.empty:
    st.caption("No replies stored: the run was made before probes existed, with probes off, or layer by layer.")
else:
    adapted, dense = (run["probes"].get(k) or {} for k in ("adapted", "dense"))
    st.caption(f"Greedy replies to fixed questions (scored: the reply holds the answer) and openings. Questions "
               f"answered: {adapted.get('chat_accuracy', float('nan')):.0%} "
               f"(dense {dense.get('chat_accuracy', float('nan')):.0%}).")
    st.dataframe(replies, hide_index=True, width="stretch", key="detail_probes")

recoveries = data.recoveries(data.url(), run_id)
if not recoveries.empty:
    st.subheader("LoRA recoveries")
    st.plotly_chart(charts.recovery_ranks_figure(recoveries), key="detail_recovery_ranks")
    st.dataframe(recoveries.drop(columns=["ranks"]), hide_index=True, width="stretch", key="detail_recoveries")

layers = data.layer_metrics(data.url(), run_id)
if layers.empty:
    st.info("This run stored no per-layer metrics.")
    st.stop()
# the chosen keep per module exists only for methods that plan one (hybrid); other runs skip its heatmap
metrics = [m for m in charts.HEATMAP_METRICS if m != "planned_keep" or layers["planned_keep"].notna().any()]
if other_id is None:
    for metric in metrics:
        st.plotly_chart(charts.heatmap_figure(layers, metric), key=f"heat_{metric}")
else:
    other_layers = data.layer_metrics(data.url(), other_id)
    for metric in metrics:
        a, b, diff = st.columns(3)
        a.plotly_chart(charts.heatmap_figure(layers, metric, f"run {run_id}: {metric}"), key=f"heat_a_{metric}")
        b.plotly_chart(charts.heatmap_figure(other_layers, metric, f"run {other_id}: {metric}"),
                       key=f"heat_b_{metric}")
        if metric != "adapter":
            grid = charts.layer_grid(other_layers, metric) - charts.layer_grid(layers, metric)
            diff.plotly_chart(charts.grid_heatmap(grid, metric, f"{other_id} − {run_id}", difference=True),
                              key=f"heat_diff_{metric}")

line_metric = st.selectbox("Per-layer lines", [m for m in metrics if m != "adapter"], index=1, key="detail_line")
series = {f"run {run_id}": layers}
if other_id is not None:
    series[f"run {other_id}"] = data.layer_metrics(data.url(), other_id)
st.plotly_chart(charts.layer_lines_figure(series, line_metric), key="detail_lines")
if layers["sparsity_curve"].notna().any():
    st.subheader("Rank- and neuron-importance sparsity")
    st.plotly_chart(charts.sparsity_curves_figure(layers), key="detail_sparsity_curves")
with st.expander("Layers table"):
    st.dataframe(layers, hide_index=True, width="stretch", key="detail_layers")
with st.expander("Configuration and provenance"):
    st.json({"config": run["config"], "corpora": run["corpora"], "provenance": run["provenance"],
             "evaluations": run["evaluations"],
             "artifact": run["artifact"]})
