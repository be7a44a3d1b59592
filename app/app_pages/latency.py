"""Latency: decode ms/token against context length and speedup over dense in the same engine, per device."""

import streamlit as st

from app import charts, data

data.page("Latency")

latency = data.latency(data.url())
if latency.empty:
    st.info("No latency results yet: a `latency` job on a GPU worker (RANA_DEVICE=cuda) fills this page.")
    st.stop()
devices = sorted(latency["device_name"].unique())
device = st.selectbox("Device", devices, key="latency_device")
shown = latency[latency["device_name"] == device]
per_token, speedup = charts.latency_figures(shown)
left, right = st.columns(2)
left.plotly_chart(per_token, key="latency_ms")
right.plotly_chart(speedup, key="latency_speedup")
st.dataframe(shown, hide_index=True, width="stretch", key="latency_table")
