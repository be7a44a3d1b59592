"""Claims: each claim of the RaNA, A3 and RankAdaptor papers with the paper's number, ours from the runs in the
database (with links to them) and a verdict. New runs update it (app.claims)."""

import pandas as pd
import streamlit as st

from app import claims, data

data.page("Claims")
st.caption("Each claim with the paper's number, ours from the runs stored here, and a verdict: holds, partly, "
           "refuted, or not testable here (and what would make it testable). Comparisons are at equal measured "
           f"FLOPs (within {claims.MATCH}); \"~44%\" means the run nearest a 0.44 cut within {claims.NEAR}.")

url = data.url()
found = claims.all_claims(data.runs(url), data.accuracy(url), data.all_recoveries(url),
                          lambda run_id: data.layer_metrics(url, run_id))


def link(run_ids: list[int]) -> str | None:
    """The runs behind a claim: one run's page, or several side by side on Compare."""
    if not run_ids:
        return None
    if len(run_ids) == 1:
        return f"/run_detail?run={run_ids[0]}"
    return "/compare?runs=" + ",".join(str(i) for i in dict.fromkeys(run_ids))


table = pd.DataFrame([{"claim": c.claim, "paper": c.paper, "ours": c.ours, "verdict": c.verdict,
                       "runs": link(c.runs)} for c in found])
st.dataframe(table, hide_index=True, width="stretch", key="claims_table",
             column_config={"runs": st.column_config.LinkColumn("runs", display_text=r"runs?=([\d,]+)")})
