"""Jobs: the queue as it stands, refreshed every two seconds; cancel and retry."""

import streamlit as st

from app import auth, data

data.page("Jobs")


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
            "created": st.column_config.DatetimeColumn("created", format="YYYY-MM-DD HH:mm:ss"),
            "elapsed_s": st.column_config.NumberColumn("elapsed (s)", format="%.0f"),
            "eta_s": st.column_config.NumberColumn("ETA (s)", format="%.0f"),
            "sweep": st.column_config.NumberColumn("sweep", format="%d"),
        },
    )
    failed = frame[frame["status"] == "failed"]
    for _, row in failed.iterrows():
        st.error(f"Job {row['job']} failed: {row['error']}")



def job_actions():
    frame = data.jobs(data.url())
    if frame.empty or not auth.actor().may("runner"):  # viewers read; the queue would refuse them anyway
        return
    left, middle, right = st.columns([2, 1, 1], vertical_alignment="bottom")
    job_id = left.selectbox("Job", frame["job"].tolist(), key="job_action_id",
                            format_func=lambda j: f"{j} ({frame.loc[frame['job'] == j, 'status'].iloc[0]})")
    for column, label, action in ((middle, "Cancel", data.cancel_job), (right, "Retry", data.retry_job)):
        if column.button(label, key=f"job_{label.lower()}"):
            try:
                count = action(job_id)
                st.success(f"{label}: {count} job(s) from job {job_id}")
            except data.specs.RanaError as exc:
                st.error(str(exc))


job_table()
job_actions()
