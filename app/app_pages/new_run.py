"""New run / Sweep: pick a model, methods and FLOP budgets, and queue the jobs. Everything is validated before
anything is queued: a bad request is one message and no row."""

import numpy as np
import streamlit as st

from app import auth, data, readings

data.page("New run")
me = auth.actor()  # team mode: the signed-in user, who queues under their own name
if not me.may("runner"):  # reached by its URL: a viewer gets no form
    st.info("Your role reads the team's runs; ask an admin for the runner role to queue them.")
    st.stop()

defaults = data.default_options()
OTHER = "other: a local folder or hub id"
ALLOCATION_HELP = ("uniform: every adapted module gets the same cut (the paper); greedy: the budget goes where "
                   "calibration error curves and a check on calibration loss say it costs least")

mode = st.segmented_control("What to queue", ["One run", "Sweep"], default="One run", key="new_run_mode")
model_choice = st.selectbox("Model", data.model_names() + [OTHER], key="new_run_model")
model_other = ""
if model_choice == OTHER:
    model_other = st.text_input("Folder or hub id", key="new_run_model_other",
                                placeholder="/path/to/model or owner/name")
methods = data.method_names()

if mode == "Sweep":
    choices = [data.method_label(m, a) for m in methods for a in data.allocations(m)]
    picked = st.multiselect("Methods", choices, default=["cats", "rana", "rana-greedy", "svd"], key="sweep_methods",
                            help=ALLOCATION_HELP)
    left, right = st.columns([3, 1])
    low, high = left.slider("FLOP reductions from … to", 0.0, 0.7, (0.2, 0.5), 0.01, key="sweep_range")
    step = right.number_input("Step", min_value=0.01, max_value=0.5, value=0.1, step=0.01, key="sweep_step")
    budgets = [round(float(b), 4) for b in np.arange(low, high + step / 2, step)] if step > 0 else [low]
    st.caption(f"{len(budgets)} budgets ({', '.join(f'{b:.2f}' for b in budgets)}) × {len(picked)} methods")
else:
    left, right = st.columns(2)
    method = left.selectbox("Method", methods, index=methods.index(defaults["method"]), key="new_run_method",
                            format_func=lambda m: f"{m}: {data.method_summaries()[m]}")
    allocation = right.selectbox("Allocation across layers", data.allocations(method), key="new_run_allocation",
                                 help=ALLOCATION_HELP)
    budget = st.slider("FLOP reduction (share of QKV + MLP FLOPs removed)", 0.0, 0.7,
                       float(defaults["flop_reduction"]), 0.01, key="new_run_budget", disabled=method == "dense")

left, middle, right = st.columns(3)
calib = left.number_input("Calibration tokens", min_value=1, value=defaults["calib_tokens"], step=1024,
                          key="new_run_calib")
evals = middle.number_input("Evaluation tokens", min_value=1, value=defaults["eval_tokens"], step=1024,
                            key="new_run_eval")
seq_len = right.number_input("Sequence length", min_value=2, value=defaults["seq_len"], step=64,
                             key="new_run_seq_len")
left, right = st.columns(2)
author = left.text_input("Your name", value=me.name or data.default_author(), key="new_run_author",
                         disabled=me.name is not None,
                         help="stored with the run, for the team's comparisons")
tags = right.text_input("Tags", key="new_run_tags", placeholder="baseline, ablation")
left, right = st.columns(2)
tasks = left.text_input("Accuracy on tasks (optional)", key="new_run_tasks", placeholder="cloze, /data/piqa.jsonl",
                        help="cloze: last words of held-out Brown sentences; or multiple-choice JSON-lines files "
                             "({context, choices, gold}) the worker can read. Adapted and dense are both scored.")
speed = right.checkbox("Then measure each run's decode speed (a GPU worker)", key="new_run_speed")
chosen = model_other.strip() if model_choice == OTHER else model_choice
measured_before = readings.prior_speed(chosen, data.model_speed_history(data.url(), chosen)) if chosen else None
if measured_before:
    st.caption("Decode speed measured before on this model. " + measured_before)
left, right = st.columns(2)
corpus = left.text_input("Calibration text", "brown", key="new_run_corpus",
                         help="its training split sets the adapters: brown (bundled), a .txt/.jsonl/.json/.csv/"
                              ".parquet file or folder the worker can read (PATH:FIELD names the text field), or a "
                              "hub id")
eval_corpus = right.text_input("Evaluation text (default: the same)", key="new_run_eval_corpus",
                               placeholder="brown", help="its held-out split (every 10th document) measures "
                                                         "perplexity and the FLOP reduction")

if st.button("Queue sweep" if mode == "Sweep" else "Queue job", type="primary", key="new_run_submit"):
    model = model_other.strip() if model_choice == OTHER else model_choice
    base = {"model": model, "calib_tokens": int(calib), "eval_tokens": int(evals), "seq_len": int(seq_len),
            "tasks": [t.strip() for t in tasks.split(",") if t.strip()],
            "corpus": corpus.strip(), "eval_corpus": eval_corpus.strip()}
    try:
        if mode == "Sweep":
            job_id = data.submit_sweep({"base": base, "methods": picked, "budgets": budgets}
                                       | ({"latency": {}} if speed else {}), author=author.strip() or None, tags=tags)
            message = f"Queued sweep {job_id}: {len(picked)} methods × {len(budgets)} budgets on {model}."
        else:
            payload = {**base, "method": method, "allocation": allocation, "flop_reduction": budget}
            job_id = data.submit_compress(payload, author=author.strip() or None, tags=tags)
            message = f"Queued job {job_id}: {model}, {method} ({allocation}) at {budget:.2f} FLOP reduction."
    except data.specs.RanaError as exc:
        st.error(f"Not queued: {exc}")
    else:
        st.success(message + " See Jobs.")
