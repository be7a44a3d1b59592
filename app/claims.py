"""The papers' claims checked against the runs in the database: each claim with the paper's number, ours with the
runs behind it, and a verdict (holds / partly / refuted / not testable here). Pure functions over the frames
app.data reads, so the page stays a view and the verdicts are tested without Streamlit.

Comparisons are at equal *measured* FLOPs: two runs are compared when their measured reductions differ by at most
MATCH, and "at ~44%" means the run whose measured reduction is nearest 0.44 within NEAR.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

MATCH = 0.01  # measured FLOP reductions this close count as the same budget
NEAR = 0.03  # "at ~44%": within this of 0.44
SPARSE = 0.5  # rank importances are "sparse" when a token's 90% of energy sits in fewer than this share of ranks


@dataclass
class Claim:
    claim: str
    paper: str
    ours: str = ""
    verdict: str = "not testable here"
    runs: list[int] = field(default_factory=list)


def _nearest(runs: pd.DataFrame, method: str, target: float) -> pd.DataFrame:
    """Per model, the run of `method` whose measured reduction is nearest `target` (within NEAR)."""
    rows = runs[(runs["method"] == method) & ((runs["measured_flop_reduction"] - target).abs() <= NEAR)]
    if rows.empty:
        return rows
    rows = rows.assign(distance=(rows["measured_flop_reduction"] - target).abs())
    return rows.sort_values(["distance", "perplexity"]).groupby("model", as_index=False).first()


def _verdict(wins: int, losses: int) -> str:
    if not wins + losses:
        return "not testable here"
    return "holds" if not losses else "refuted" if not wins else "partly"


def rana_beats_cats(runs: pd.DataFrame, accuracy: pd.DataFrame) -> Claim:
    claim = Claim("RaNA beats neuron adapters (CATS) in perplexity and accuracy at ~44% FLOPs",
                  "Llama-2-7B and Gemma-2b at ~44% FLOPs: lower perplexity than CATS and up to 8 points higher "
                  "accuracy (RaNA paper)")
    rana, cats = _nearest(runs, "rana", 0.44), _nearest(runs, "cats", 0.44)
    wins = losses = 0
    lines = []
    for r in rana.itertuples():
        match = cats[(cats["model"] == r.model)]
        if match.empty:
            continue
        c = next(match.itertuples())
        better = r.perplexity < c.perplexity
        wins, losses = wins + better, losses + (not better)
        line = (f"{r.model}: rana {r.perplexity:.1f} at −{r.measured_flop_reduction:.3f} against cats "
                f"{c.perplexity:.1f} at −{c.measured_flop_reduction:.3f}")
        for task in sorted(set(accuracy.loc[accuracy["run_id"] == r.run_id, "task"])
                           & set(accuracy.loc[accuracy["run_id"] == c.run_id, "task"])):
            ours = accuracy[(accuracy["run_id"] == r.run_id) & (accuracy["task"] == task)]["acc"].iloc[0]
            theirs = accuracy[(accuracy["run_id"] == c.run_id) & (accuracy["task"] == task)]["acc"].iloc[0]
            line += f"; {task} {ours:.3f} against {theirs:.3f}"
            wins, losses = wins + (ours > theirs), losses + (ours <= theirs)
        lines.append(line)
        claim.runs += [int(r.run_id), int(c.run_id)]
    claim.ours = "; ".join(lines) or "needs a rana and a cats run of one model near a 0.44 cut"
    claim.verdict = _verdict(wins, losses)
    return claim


def a3_beats_svd(runs: pd.DataFrame) -> Claim:
    claim = Claim("A3 beats SVD-style low rank at equal budget",
                  "LLaMA-7B at 20% compression: WikiText-2 perplexity 7.11 against SVD-LLM v2's 10.53 (A3 paper)")
    wins = losses = 0
    lines = []
    for model, rows in runs.groupby("model"):
        a3, svd = rows[rows["method"] == "a3"], rows[rows["method"] == "svd"]
        for a in a3.itertuples():
            close = svd[(svd["measured_flop_reduction"] - a.measured_flop_reduction).abs() <= MATCH]
            if close.empty:
                continue
            s = close.loc[(close["measured_flop_reduction"] - a.measured_flop_reduction).abs().idxmin()]
            better = a.perplexity < s["perplexity"]
            wins, losses = wins + better, losses + (not better)
            lines.append(f"{model} at −{a.measured_flop_reduction:.2f}: a3 {a.perplexity:.1f} against svd "
                         f"{s['perplexity']:.1f}")
            claim.runs += [int(a.run_id), int(s["run_id"])]
    claim.ours = "; ".join(lines) or "needs an a3 and an svd run of one model at the same measured cut"
    claim.verdict = _verdict(wins, losses)
    return claim


def rank_importances_are_sparse(runs: pd.DataFrame, layers_of) -> Claim:
    """`layers_of(run_id)`: the run's layer rows (app.data.layer_metrics)."""
    claim = Claim("Rank importances are sparse and input-dependent",
                  "a few ranks carry most of each token's output, and which ones changes from token to token "
                  "(RaNA paper)")
    rana = runs[runs["method"] == "rana"]
    if rana.empty:
        claim.ours = "needs a rana run"
        return claim
    run = rana.loc[(rana["measured_flop_reduction"] - 0.44).abs().idxmin()]
    rows = layers_of(int(run["run_id"]))
    rows = rows[(rows["adapter"] == "rank") & rows["sparsity"].notna()]
    if rows.empty:
        claim.ours = f"run {int(run['run_id'])} stored no rank sparsity (tracking was off)"
        return claim
    sparsity, density = rows["sparsity"].mean(), rows["density"].mean()
    adaptive = bool(((rows["density"] > 0) & (rows["density"] < 1)).all())
    claim.ours = (f"{run['model']}, run {int(run['run_id'])}: 90% of a token's rank energy in {sparsity:.0%} of the "
                  f"ranks on average over {len(rows)} rank adapters; masks keep {density:.0%} of the ranks, "
                  f"{'a share that varies per token' if adaptive else 'all or none in some module'}")
    claim.verdict = "holds" if sparsity < SPARSE and adaptive else "partly" if sparsity < SPARSE else "refuted"
    claim.runs = [int(run["run_id"])]
    return claim


def rankadaptor_beats_uniform(recoveries: pd.DataFrame) -> Claim:
    """`recoveries`: rows with run_id, strategy, perplexity_after (every recovery in the database)."""
    claim = Claim("Per-layer LoRA ranks (RankAdaptor) beat uniform ranks in recovery",
                  "0.1–1.6 points of mean accuracy over uniform-rank LoRA on pruned LLaMA-7B/Vicuna-7B "
                  "(RankAdaptor paper)")
    wins = losses = 0
    lines = []
    for run_id, rows in recoveries.groupby("run_id"):
        best = rows.groupby("strategy")["perplexity_after"].min()
        if "uniform" not in best or "rankadaptor" not in best:
            continue
        better = best["rankadaptor"] < best["uniform"]
        wins, losses = wins + better, losses + (not better)
        lines.append(f"run {run_id}: rankadaptor {best['rankadaptor']:.2f} against uniform {best['uniform']:.2f}")
        claim.runs.append(int(run_id))
    claim.ours = "; ".join(lines) or "needs one run recovered with both uniform and rankadaptor ranks"
    claim.verdict = _verdict(wins, losses)
    return claim


def rana_reconstructs_best() -> Claim:
    return Claim("RaNA has the lowest MLP reconstruction error", "lower MLP output error than CATS and SVD at equal "
                 "FLOPs, layer by layer (RaNA paper)",
                 "runs store each linear's own error (down's given its already approximated input), not the MLP "
                 "output's; hybrid's curves measure the MLP output error of rana, cats, teal and svd at each keep, "
                 "but they stay in the curve cache")


def all_claims(runs: pd.DataFrame, accuracy: pd.DataFrame, recoveries: pd.DataFrame, layers_of) -> list[Claim]:
    return [rana_beats_cats(runs, accuracy), rana_reconstructs_best(), rank_importances_are_sparse(runs, layers_of),
            a3_beats_svd(runs), rankadaptor_beats_uniform(recoveries)]
