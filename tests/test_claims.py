"""The claims page's verdicts from hand-made runs: which runs are compared, at which budget, and the verdict."""

import pandas as pd

from app import claims


def runs_frame(rows):
    return pd.DataFrame(rows, columns=["run_id", "model", "method", "measured_flop_reduction", "perplexity"])


NO_ACCURACY = pd.DataFrame(columns=["run_id", "task", "acc"])


def test_rana_against_cats_compares_the_runs_nearest_a_44_percent_cut_per_model():
    runs = runs_frame([
        (1, "smol", "rana", 0.30, 50.0), (2, "smol", "rana", 0.44, 110.0), (3, "smol", "cats", 0.439, 900.0),
        (4, "smol", "cats", 0.30, 60.0),  # too far from 0.44: not the comparison
        (5, "gemma", "rana", 0.445, 80.0), (6, "gemma", "cats", 0.46, 70.0),
        (7, "tiny", "rana", 0.44, 250.0),  # no cats run of tiny: not compared
    ])
    claim = claims.rana_beats_cats(runs, NO_ACCURACY)
    assert sorted(claim.runs) == [2, 3, 5, 6]
    assert claim.verdict == "partly"  # smol: rana better; gemma: cats better
    accuracy = pd.DataFrame([(2, "cloze", 0.30), (3, "cloze", 0.10)], columns=["run_id", "task", "acc"])
    only_smol = runs[runs["model"] == "smol"]
    claim = claims.rana_beats_cats(only_smol, accuracy)
    assert claim.verdict == "holds" and "cloze 0.300 against 0.100" in claim.ours


def test_a_claim_without_the_runs_it_needs_is_not_testable_and_says_what_it_needs():
    claim = claims.rana_beats_cats(runs_frame([(1, "smol", "rana", 0.44, 100.0)]), NO_ACCURACY)
    assert claim.verdict == "not testable here" and "needs a rana and a cats run" in claim.ours
    assert claims.rana_reconstructs_best().verdict == "not testable here"


def test_a3_against_svd_only_at_the_same_measured_cut():
    runs = runs_frame([(1, "smol", "a3", 0.20, 76.0), (2, "smol", "svd", 0.205, 176.0),
                       (3, "smol", "a3", 0.44, 278.0), (4, "smol", "svd", 0.47, 1500.0)])  # 0.03 apart: no pair
    claim = claims.a3_beats_svd(runs)
    assert (claim.verdict, claim.runs) == ("holds", [1, 2])


def test_rank_sparsity_reads_the_rank_adapters_of_the_rana_run_nearest_44_percent():
    runs = runs_frame([(1, "smol", "rana", 0.30, 57.0), (2, "smol", "rana", 0.44, 110.0)])
    layers = {2: pd.DataFrame({"adapter": ["rank", "rank", "neuron"], "sparsity": [0.2, 0.4, 0.9],
                               "density": [0.5, 0.6, 0.4]})}
    claim = claims.rank_importances_are_sparse(runs, layers.get)
    assert (claim.verdict, claim.runs) == ("holds", [2])
    assert "in 30% of the ranks" in claim.ours  # (0.2 + 0.4) / 2, the neuron row left out
    layers[2]["sparsity"] = [0.7, 0.8, 0.1]
    assert claims.rank_importances_are_sparse(runs, layers.get).verdict == "refuted"


def test_rankadaptor_against_uniform_takes_each_strategys_best_recovery_of_a_run():
    recoveries = pd.DataFrame([(5, "uniform", 70.0), (5, "rankadaptor", 68.0), (5, "uniform", 66.0),
                               (6, "rankadaptor", 50.0)], columns=["run_id", "strategy", "perplexity_after"])
    claim = claims.rankadaptor_beats_uniform(recoveries)
    assert (claim.verdict, claim.runs) == ("refuted", [5])  # uniform's best 66.0 beats 68.0; run 6 has no pair
