"""RaNA Studio's dashboard: navigation and the frame every page shares. Run with `rana app`."""

import streamlit as st

from app import auth, data

st.set_page_config(page_title="RaNA Studio", page_icon=":material/compress:", layout="wide")

user = auth.signed_in(data.url())  # team mode: None until someone signs in
may_queue = user is not None and user.may("runner")
pages = [
    st.Page("app_pages/new_run.py", title="New run", icon=":material/add_circle:", default=may_queue),
    st.Page("app_pages/job_list.py", title="Jobs", icon=":material/list:"),
    st.Page("app_pages/pareto.py", title="Pareto", icon=":material/scatter_plot:", default=not may_queue),
    st.Page("app_pages/run_detail.py", title="Run detail", icon=":material/grid_on:"),
    st.Page("app_pages/compare.py", title="Compare", icon=":material/compare_arrows:"),
    st.Page("app_pages/latency.py", title="Latency", icon=":material/speed:"),
    st.Page("app_pages/claims.py", title="Claims", icon=":material/fact_check:"),
]
if user is not None and not may_queue:  # a viewer reads; the form that queues is not theirs
    pages = pages[1:]
# Navigation first, hidden until someone signs in: the page a link asked for (?run=… included) is kept through
# the sign-in form, and opens once it is passed.
page = st.navigation(pages, position="sidebar" if user is not None else "hidden")
user = auth.gate(data.url())  # team mode: nothing but the sign-in form until someone signs in
auth.remember(user)
if user.name is not None:
    st.sidebar.caption(f"Signed in as **{user.name}** ({user.role})")
    if st.sidebar.button("Sign out", key="sign_out"):
        auth.sign_out()
        st.rerun()
page.run()
