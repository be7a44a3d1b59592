"""Pareto: measured FLOP reduction against held-out perplexity, one colour per method, dense as the reference."""

import streamlit as st

from app import charts, data

st.title("Pareto")
problem = data.schema_problem()
if problem:
    st.error(problem)
    st.stop()

runs = data.runs(data.url())
if runs.empty:
    st.info("No finished runs yet: queue one on New run, and a worker will fill this page.")
    st.stop()

left, right = st.columns([3, 1])
model = left.selectbox("Model", sorted(runs["model"].unique()), key="pareto_model")
log_y = right.toggle("Log perplexity axis", value=True, key="pareto_log_y")
shown = runs[runs["model"] == model]
st.plotly_chart(charts.pareto_figure(shown, log_y=log_y), key="pareto_chart")
st.dataframe(
    shown[["run_id", "series", "target_flop_reduction", "measured_flop_reduction",
           "measured_flop_reduction_whole_model", "perplexity", "dense_perplexity", "eval_tokens", "created_at"]],
    hide_index=True, width="stretch", key="pareto_table",
)
