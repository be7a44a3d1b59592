import math

import pytest

from rana_core.config import CompressConfig
from rana_core.errors import BudgetError, RanaError
from rana_core.pipeline import compress

SMALL = dict(model="tiny", calib_tokens=2048, eval_tokens=1024, seq_len=128)


def test_svd_hits_its_budget_and_reports_every_module(tiny):
    messages = []
    result = compress(CompressConfig(method="svd", flop_reduction=0.3, **SMALL),
                      progress=lambda f, m: messages.append((f, m)), loaded=tiny)
    assert abs(result.measured_flop_reduction - 0.3) <= 0.015
    assert 0 < result.measured_flop_reduction_whole_model < result.measured_flop_reduction
    assert [(r.layer, r.module) for r in result.layers] == [(i, m) for i in range(2) for m in
                                                            ("qkv", "gate", "up", "down")]
    assert all(0 < r.recon_error < 1 and r.rank < r.max_rank and r.density == 1.0 for r in result.layers)
    assert result.perplexity != result.dense_perplexity
    fractions = [f for f, _ in messages]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert {"load", "data", "dense eval", "build", "adapted eval"} <= {m.split(":")[0] for _, m in messages}
    data = result.to_json()
    for key in ("model", "method", "target_flop_reduction", "measured_flop_reduction", "dense_perplexity",
                "perplexity", "calib_tokens", "eval_tokens", "seconds", "layers"):
        assert key in data
    assert set(data["layers"][0]) >= {"layer", "module", "rank", "density", "recon_error"}


def test_dense_is_the_reference(tiny):
    result = compress(CompressConfig(method="dense", flop_reduction=0.4, **SMALL), loaded=tiny)
    assert result.target_flop_reduction == 0.0 and result.measured_flop_reduction == 0.0
    assert math.isclose(result.perplexity, result.dense_perplexity, rel_tol=1e-9)


def test_model_is_restored_after_a_run(tiny, tiny_windows):
    import torch

    batch = tiny_windows["heldout"][:1]
    with torch.no_grad():
        before = tiny.model(batch).logits
    compress(CompressConfig(method="svd", flop_reduction=0.5, **SMALL), loaded=tiny)
    with torch.no_grad():
        assert torch.equal(tiny.model(batch).logits, before)


@pytest.mark.parametrize("change, error", [
    ({"flop_reduction": 0.95}, BudgetError),
    ({"flop_reduction": -0.1}, BudgetError),
    ({"method": "magic"}, RanaError),
    ({"eval_tokens": 0}, RanaError),
    ({"calib_tokens": 64}, RanaError),  # below one sequence of 128
    ({"model": "no-such-model"}, RanaError),
])
def test_bad_configs_fail_before_any_work(change, error):
    with pytest.raises(error):
        CompressConfig(**{**SMALL, **change}).validate()


def test_config_round_trips_and_rejects_unknown_keys():
    config = CompressConfig(**SMALL)
    assert CompressConfig.from_dict(config.to_dict()) == config
    with pytest.raises(RanaError, match="unknown option"):
        CompressConfig.from_dict({"budget": 0.3})


@pytest.mark.parametrize("method, allocation", [("svd", "uniform"), ("cats", "uniform"), ("rana", "uniform"),
                                                ("rana", "greedy"), ("teal", "greedy"), ("wina", "uniform")])
@pytest.mark.parametrize("budget", [0.3, 0.5])
def test_every_method_hits_its_budget_on_held_out_tokens(tiny, method, allocation, budget):
    config = CompressConfig(method=method, allocation=allocation, flop_reduction=budget,
                            **{**SMALL, "calib_tokens": 4096, "eval_tokens": 2048})
    result = compress(config, loaded=tiny)
    assert abs(result.measured_flop_reduction - budget) <= 0.015, result.measured_flop_reduction
    adapters = {row.adapter for row in result.layers}
    # tiny has grouped K/V heads, so uniform RaNA (like the paper on Gemma) leaves QKV dense
    expected = {"svd": {"svd"}, "cats": {"cats", "dense"}, "rana": {"rank", "neuron", "dense"}, "teal": {"teal"},
                "wina": {"wina"}}[method]
    if allocation == "greedy":
        assert adapters - {"dense"} == expected - {"dense"}  # greedy may leave a module whole
    else:
        assert adapters == expected
    if (method, allocation) == ("rana", "uniform"):
        assert {row.adapter for row in result.layers if row.module == "qkv"} == {"dense"}
    if method == "rana":
        adapted = [row for row in result.layers if row.adapter != "dense"]
        assert all(0 < row.density < 1 for row in adapted)  # masks are input-adaptive
        assert all(0 < row.sparsity <= 1 for row in adapted)


@pytest.mark.parametrize("method", ["svd", "cats", "rana", "a3", "hybrid", "teal", "wina"])
def test_the_build_stage_reports_progress_for_every_layer(method):
    """A build on a real model takes minutes; a worker's job row (and the CLI's bar) must move at least once per
    layer, saying which. A fresh model: methods keep per-layer analyses on a loaded model, and a second run on the
    same calibration tokens rightly skips that work (and its messages)."""
    import re

    from rana_core.loading import load_model
    from rana_core.methods import METHODS

    loaded = load_model("tiny")
    assert len(loaded.layers) == 2
    messages = []
    config = CompressConfig(method=method, allocation=METHODS[method].allocations[0], flop_reduction=0.3,
                            **{**SMALL, "calib_tokens": 1024, "eval_tokens": 256})
    compress(config, loaded=loaded, progress=lambda f, m: messages.append(m))
    build = [m for m in messages if m.startswith("build: ")]
    first_mention = [next((n for n, m in enumerate(build) if re.search(rf"\blayer {i}/2\b", m)), None)
                     for i in (1, 2)]
    assert None not in first_mention, build
    assert first_mention[0] < first_mention[1]  # in layer order, as the work goes


def test_greedy_rana_and_the_threshold_pass_report_each_layer():
    """Layer by layer, a 7B model's greedy RaNA takes its loss gradients, visits every layer for its profiles
    (probed as they are built) and again to build each candidate, and its threshold pass takes seconds: each of
    those says which layer it is at."""
    from rana_core.loading import load_model

    messages = []
    config = CompressConfig(method="rana", allocation="greedy", flop_reduction=0.3,
                            **{**SMALL, "calib_tokens": 1024, "eval_tokens": 256})
    compress(config, loaded=load_model("tiny"), progress=lambda f, m: messages.append(m))
    for expected in ("build: loss gradients", "build: calibration layer 1/2", "build: calibration layer 2/2",
                     "build: adapters of layer 1/2",
                     "build: adapters of layer 2/2", "thresholds: layer 1/2", "thresholds: layer 2/2"):
        assert expected in messages, expected


def test_hybrid_reports_each_layer_of_every_allocation_it_builds():
    """Hybrid builds a probe per module type, every candidate of its calibration check and the chosen
    allocation; layer by layer each build visits every layer, and says which."""
    from rana_core.loading import load_model

    messages = []
    config = CompressConfig(method="hybrid", allocation="exact-loss", flop_reduction=0.3,
                            **{**SMALL, "calib_tokens": 1024, "eval_tokens": 256})
    compress(config, loaded=load_model("tiny"), progress=lambda f, m: messages.append(m))
    for what in ("qkv probe", "mlp probe", "the as measured allocation", "the chosen allocation"):
        for layer in (1, 2):
            assert f"build: building {what}: layer {layer}/2" in messages, (what, layer)


def test_cats_refuses_a_budget_it_cannot_reach(tiny):
    with pytest.raises(BudgetError, match="CATS can remove at most"):
        compress(CompressConfig(method="cats", flop_reduction=0.9, **SMALL), loaded=tiny)


def test_adapted_model_generates_with_a_kv_cache(tiny):
    """Greedy decoding with the KV cache (one token per step through the masks) equals recomputing everything."""
    import torch

    from rana_core.adapters.base import inject, installed_adapters, unload
    from rana_core.corpus import token_windows
    from rana_core.layer_profiles import LayerProfiles
    from rana_core.methods import rana
    from rana_core.pipeline import calibrate_thresholds

    train = token_windows(tiny.tokenizer, "train", 4096, 128)
    calib = train[0::2]
    unload(tiny.layers)
    store = LayerProfiles(tiny, calib, lambda f, m: None, rana.SEARCH_TOKENS)
    keeps = rana.allocate(store, 0.4, "uniform", lambda f, m: None, adapt_qkv=True)  # QKV masked too, under GQA
    try:
        inject(tiny.layers, rana._model_adapters(store, {"uniform": (keeps, None)})["uniform"])
        calibrate_thresholds(tiny.model, tiny.layers, train[1::2], lambda f, m: None)
        assert {"qkv", "up", "gate", "down"} <= {getattr(a, "module", "") for a in installed_adapters(tiny.layers)}
        prompt = torch.tensor([tiny.tokenizer.encode("The jury said")])
        cached = tiny.model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
        uncached = tiny.model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
        assert cached.shape == (1, prompt.shape[1] + 12)
        assert torch.equal(cached, uncached)
        batch = calib[:3, :20]  # batched prefill: each row as if alone
        with torch.no_grad():
            together = tiny.model(batch).logits
            alone = torch.cat([tiny.model(row[None]).logits for row in batch])
        assert torch.allclose(together, alone, atol=1e-5)
    finally:
        unload(tiny.layers)


@pytest.mark.parametrize("winner", ["uniform", "greedy"])
def test_greedy_keeps_the_candidate_with_the_least_calibration_loss(tiny, monkeypatch, winner):
    """Greedy builds the allocation that wins on calibration loss; when that is uniform, it is the uniform
    model exactly (so greedy can never be worse than uniform on the calibration check)."""
    from rana_core.methods import rana

    real = rana.least_loss
    seen = []

    def rigged(loaded, candidates, windows, progress, what="allocation"):
        _, losses = real(loaded, candidates, windows, progress, what)  # every candidate is built and measured
        seen.extend(losses)
        return winner, losses

    monkeypatch.setattr(rana, "least_loss", rigged)
    config = dict(method="rana", flop_reduction=0.4, **{**SMALL, "calib_tokens": 2048, "eval_tokens": 1024})
    greedy = compress(CompressConfig(allocation="greedy", **config), loaded=tiny)
    uniform = compress(CompressConfig(allocation="uniform", **config), loaded=tiny)
    assert seen == ["greedy", "greedy over MLPs", "uniform"]  # every candidate was checked
    if winner == "uniform":
        assert greedy.perplexity == uniform.perplexity
        assert [r.rank for r in greedy.layers] == [r.rank for r in uniform.layers]
    else:
        assert greedy.perplexity != uniform.perplexity


def test_progress_only_moves_forward_when_a_run_scores_tasks():
    """The dense model's tasks run after its evaluation and the adapted model's after its own: a worker's bar and
    ETA follow the stages in that order."""
    from rana_core.loading import load_model

    fractions = []
    config = CompressConfig(method="svd", flop_reduction=0.3, tasks=["cloze"],
                            **{**SMALL, "calib_tokens": 1024, "eval_tokens": 256})
    result = compress(config, loaded=load_model("tiny"), progress=lambda f, m: fractions.append(f))
    assert set(result.tasks) == {"dense", "adapted"}
    assert all(b >= a for a, b in zip(fractions, fractions[1:])), fractions


@pytest.mark.parametrize("method, allocation", [("cats", "uniform"), ("hybrid", "exact-loss")])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_half_precision_run_measures_its_reduction(method, allocation, dtype):
    # on the GPU, float16 CATS read -inf (its mask summed in float16) and every bfloat16 hybrid of `tiny` failed to
    # hash its weights for the curve cache (numpy has no bfloat16)
    runs = {d: compress(CompressConfig(model="tiny", method=method, allocation=allocation, flop_reduction=0.3,
                                       dtype=d, calib_tokens=2048, eval_tokens=2048, seq_len=256))
            for d in ("float32", dtype)}
    # half-precision products move a threshold by a rounding step, not the budget
    assert abs(runs[dtype].measured_flop_reduction - runs["float32"].measured_flop_reduction) <= 0.005
    assert abs(runs[dtype].perplexity - runs["float32"].perplexity) <= 0.01 * runs["float32"].perplexity


def test_staged_progress_never_steps_back_from_one_stage_to_the_next():
    # with the probes' stages, "dense eval" done was 1.5/15 + 3/15 = 0.30000000000000004 and "dense probes" began
    # at 4.5/15 = 0.3: a run's progress stepped back when the dense probes were not cached
    from rana_core.pipeline import STAGES, _with_extras
    from rana_core.progress import StagedProgress

    seen = []
    weights = _with_extras(STAGES, [], True)
    plan = StagedProgress(lambda f, m: seen.append(f), weights)
    for name in weights:
        for fraction in (0.0, 0.5, 1.0):
            plan.stage(name)(fraction)
    assert seen == sorted(seen) and seen[0] == 0.0 and seen[-1] == 1.0
