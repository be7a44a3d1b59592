"""New run: pick a model, a method and a FLOP budget, and queue the job."""

import streamlit as st

from app import data

st.title("New run")
problem = data.schema_problem()
if problem:
    st.error(problem)
    st.stop()

defaults = data.default_options()
OTHER = "other: a local folder or hub id"

model_choice = st.selectbox("Model", data.model_names() + [OTHER], key="new_run_model")
model_other = ""
if model_choice == OTHER:
    model_other = st.text_input("Folder or hub id", key="new_run_model_other",
                                placeholder="/path/to/model or owner/name")
methods = data.method_names()
left, right = st.columns(2)
method = left.selectbox("Method", methods, index=methods.index(defaults["method"]), key="new_run_method",
                        format_func=lambda m: f"{m}: {data.method_summaries()[m]}")
allocation = right.selectbox("Allocation across layers", data.allocations(method), key="new_run_allocation",
                             help="uniform: every module gets the same cut (the paper); greedy: the budget goes "
                                  "where calibration error curves say it costs least")
budget = st.slider("FLOP reduction (share of QKV + MLP FLOPs removed)", 0.0, 0.7,
                   float(defaults["flop_reduction"]), 0.01, key="new_run_budget",
                   disabled=method == "dense")
left, middle, right = st.columns(3)
calib = left.number_input("Calibration tokens", min_value=1, value=defaults["calib_tokens"], step=1024,
                          key="new_run_calib")
evals = middle.number_input("Evaluation tokens", min_value=1, value=defaults["eval_tokens"], step=1024,
                            key="new_run_eval")
seq_len = right.number_input("Sequence length", min_value=2, value=defaults["seq_len"], step=64,
                             key="new_run_seq_len")

left, right = st.columns(2)
author = left.text_input("Your name", value=data.default_author(), key="new_run_author",
                         help="stored with the run, for the team's comparisons")
tags = right.text_input("Tags", key="new_run_tags", placeholder="baseline, ablation")

if st.button("Queue job", type="primary", key="new_run_submit"):
    model = model_other.strip() if model_choice == OTHER else model_choice
    payload = {"model": model, "method": method, "allocation": allocation, "flop_reduction": budget,
               "calib_tokens": int(calib), "eval_tokens": int(evals), "seq_len": int(seq_len)}
    try:
        job_id = data.submit_compress(payload, author=author.strip() or None, tags=tags)
    except data.specs.RanaError as exc:
        st.error(f"Not queued: {exc}")
    else:
        st.success(f"Queued job {job_id}: {model}, {method} ({allocation}) at {budget:.2f} FLOP reduction. "
                   "See Jobs.")
