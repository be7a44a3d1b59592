"""Jobs: the queue as it stands, refreshed every two seconds."""

import streamlit as st

from app import data

st.title("Jobs")
problem = data.schema_problem()
if problem:
    st.error(problem)
    st.stop()


@st.fragment(run_every=2)
def job_table():
    frame = data.jobs(data.url())
    if frame.empty:
        st.info("No jobs yet: queue one on New run.")
        return
    counts = frame["status"].value_counts()
    st.caption(" · ".join(f"{status}: {counts.get(status, 0)}" for status in
                          ("queued", "running", "done", "failed", "cancelled")))
    st.dataframe(
        frame, hide_index=True, width="stretch", key="jobs_table",
        column_config={
            "progress": st.column_config.ProgressColumn("progress", min_value=0.0, max_value=1.0, format="percent"),
            "budget": st.column_config.NumberColumn("budget", format="%.2f"),
            "created": st.column_config.DatetimeColumn("created", format="YYYY-MM-DD HH:mm:ss"),
        },
    )
    failed = frame[frame["status"] == "failed"]
    for _, row in failed.iterrows():
        st.error(f"Job {row['job']} failed: {row['error']}")


job_table()
