"""RaNA Studio's dashboard: navigation and the frame every page shares. Run with `rana app`."""

import streamlit as st

st.set_page_config(page_title="RaNA Studio", layout="wide")

pages = [
    st.Page("app_pages/new_run.py", title="New run", icon=":material/add_circle:", default=True),
    st.Page("app_pages/job_list.py", title="Jobs", icon=":material/list:"),
    st.Page("app_pages/pareto.py", title="Pareto", icon=":material/scatter_plot:"),
    st.Page("app_pages/run_detail.py", title="Run detail", icon=":material/grid_on:"),
    st.Page("app_pages/compare.py", title="Compare", icon=":material/compare_arrows:"),
    st.Page("app_pages/latency.py", title="Latency", icon=":material/speed:"),
    st.Page("app_pages/claims.py", title="Claims", icon=":material/fact_check:"),
]
st.navigation(pages).run()
