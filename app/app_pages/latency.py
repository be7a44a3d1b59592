"""Latency: decode ms/token against context length and speedup over dense in the same engine, per device, for the
synthetic shapes (random weights, thresholds set on synthetic activations) and for stored runs."""

import streamlit as st

from app import charts, data

data.page("Latency")

latency = data.latency(data.url())
if latency.empty:
    st.info("No latency results yet: a `latency` job on a GPU worker (RANA_DEVICE=cuda) fills this page.")
    st.stop()
kinds = {"synthetic": "synthetic shapes (random weights)", "runs": "stored runs (their own weights and masks)"}
available = [k for k in kinds if (latency["run_id"].isna() if k == "synthetic" else latency["run_id"].notna()).any()]
left, right = st.columns(2)
which = left.radio("Measurements", available, format_func=kinds.get, key="latency_kind", horizontal=True)
latency = latency[latency["run_id"].isna() if which == "synthetic" else latency["run_id"].notna()]
if which == "runs":  # one line per run in the figures
    latency = latency.assign(model=latency["model"] + " · run " + latency["run_id"].astype(int).astype(str))
devices = sorted(latency["device_name"].unique())
device = right.selectbox("Device", devices, key="latency_device")
shown = latency[latency["device_name"] == device]
per_token, speedup = charts.latency_figures(shown)
left, right = st.columns(2)
left.plotly_chart(per_token, key="latency_ms")
right.plotly_chart(speedup, key="latency_speedup")
st.dataframe(shown, hide_index=True, width="stretch", key="latency_table")
