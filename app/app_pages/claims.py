"""Claims: each claim of the RaNA, A3 and RankAdaptor papers with the paper's number, ours from the runs in the
database (with links to them) and a verdict. New runs update it (app.claims)."""

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


COLOURS = {"holds": "green", "partly": "orange", "refuted": "red", "not testable here": "gray"}
for claim in found:
    with st.container(border=True):
        st.markdown(f"**{claim.claim}** :{COLOURS[claim.verdict]}-badge[{claim.verdict}]")
        st.markdown(f"**Paper:** {claim.paper}")
        st.markdown(f"**Ours:** {claim.ours}")
        if claim.runs:
            st.markdown(f"[The runs behind it]({link(claim.runs)})")
