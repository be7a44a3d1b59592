"""LoRA recovery on the tiny model: attachment to adapted modules, training, budgets, the rank strategies and the
performance-model search (on a synthetic objective), and a whole recovery through rana_core.recovery.recover."""

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from rana_core.adapters.artifacts import load_adapters
from rana_core.adapters.base import inject, unload
from rana_core.config import CompressConfig
from rana_core.errors import RanaError
from rana_core.pipeline import compress
from rana_core.recovery.lora import LINEARS, attach_lora, computing_spots, params_per_rank
from rana_core.recovery.rank_search import (RANK_CHOICES, SearchSettings, budget_of, cost, error_ranks, random_config,
                                   search_ranks, uniform_ranks)
from rana_core.recovery.config import RecoverConfig
from rana_core.recovery.recover import fine_tune, recover

METHODS = ("rana", "cats", "svd", "dense")


@pytest.fixture(scope="module")
def artifacts(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("artifacts")
    paths = {}
    for method in METHODS:
        paths[method] = folder / f"{method}.safetensors"
        compress(CompressConfig(model="tiny", method=method, flop_reduction=0.3, calib_tokens=1024, eval_tokens=512,
                                seq_len=128, track_layers=False), loaded=tiny, artifact_path=paths[method])
    return paths


@pytest.fixture
def adapted(tiny, artifacts, request):
    """The tiny model with a run's adapters injected; unloaded (and checked clean) afterwards."""
    def install(method):
        inject(tiny.layers, load_adapters(tiny, artifacts[method]))
        return tiny.model

    yield install
    unload(tiny.layers)


def tokens(n_windows=2, length=48, seed=0):
    return torch.randint(0, 256, (n_windows, length), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(x, use_cache=False).logits


@pytest.mark.parametrize("method", METHODS)
def test_zero_initialised_lora_leaves_logits_unchanged_and_every_lora_is_on_the_forward_path(adapted, method):
    model = adapted(method)
    x = tokens()
    before = logits(model, x)
    handle = attach_lora(model.get_decoder().layers, [4, 8], seed=0)
    try:
        assert torch.equal(logits(model, x), before)
        # Each of the 14 LoRA layers must change the output once its B is non-zero: none sits where the
        # forward pass never looks (CATS keeps its Linears under two names; RaNA's MLP calls its own units).
        for layer, linear, _, _, lora in handle.placed:
            B = lora.lora_B["recover"].weight
            with torch.no_grad():
                B.normal_(std=0.5)
            assert not torch.allclose(logits(model, x), before), f"layer {layer} {linear} LoRA is not used"
            with torch.no_grad():
                B.zero_()
        assert len(handle.placed) == 2 * len(LINEARS)
    finally:
        handle.detach()
    assert torch.equal(logits(model, x), before)


def test_detach_then_unload_restores_the_original_modules(tiny, adapted):
    x = tokens()
    dense = logits(tiny.model, x)
    model = adapted("rana")
    handle = attach_lora(tiny.layers, [2, 2], seed=1)
    handle.detach()
    unload(tiny.layers)
    assert torch.equal(logits(model, x), dense)
    assert all(type(getattr(parent, attribute)) is nn.Linear
               for layer in tiny.layers for parent, attribute in computing_spots(layer).values())


def test_ranks_and_trainable_parameters_follow_the_configuration_and_the_budget_formula(tiny, adapted):
    adapted("svd")
    c = tiny.config
    head_dim = c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    h, ff = c.hidden_size, c.intermediate_size
    per_rank = (h + q) + 2 * (h + kv) + (q + h) + 2 * (h + ff) + (ff + h)  # q, k, v, o, gate, up, down
    assert params_per_rank(tiny.layers) == [per_rank, per_rank]
    handle = attach_lora(tiny.layers, [6, 0], seed=0)
    try:
        assert handle.ranks(2) == [6, 0]
        assert {lora.r["recover"] for *_, lora in handle.placed} == {6}
        assert handle.trainable_parameters() == 6 * per_rank
        trainable = sum(p.numel() for p in tiny.model.parameters() if p.requires_grad)
        assert trainable == 6 * per_rank  # everything else frozen
    finally:
        handle.detach()
    with pytest.raises(RanaError):
        attach_lora(tiny.layers, [1, 2, 3])


def test_merging_into_plain_linears_computes_the_same_function_and_restores_the_weights(tiny, adapted):
    model = adapted("rana")  # q/k/v, o stay Linear here: mergeable; the MLP's units are not
    handle = attach_lora(tiny.layers, [4, 4], seed=0)
    try:
        for p in handle.parameters():
            with torch.no_grad():
                p.normal_(std=0.05)
        x = tokens()
        unmerged = logits(model, x)
        weights = [p.detach().clone() for p in tiny.model.parameters() if not p.requires_grad]
        with handle.merged() as count:
            assert count > 0
            assert torch.allclose(logits(model, x), unmerged, atol=1e-4)
        assert all(torch.equal(a, b) for a, b in zip(weights, [p for p in tiny.model.parameters()
                                                               if not p.requires_grad]))
        assert sum(handle.added_flops(merged=True).values()) < sum(handle.added_flops(merged=False).values())
    finally:
        handle.detach()


def test_a_few_steps_of_training_lower_the_loss(tiny, adapted):
    model = adapted("cats")
    windows = tokens(n_windows=4, length=64, seed=3).repeat(6, 1)  # the same batch again and again
    handle = attach_lora(tiny.layers, [8, 8], seed=0)
    try:
        config = RecoverConfig(batch_size=4, lr=1e-2, seed=0)
        losses = fine_tune(model, handle, windows, config)
        assert len(losses) == 6 and losses[-1] < losses[0] - 0.05
    finally:
        handle.detach()


PER_RANK = [100, 100, 120, 100, 80]


def test_every_strategy_respects_the_parameter_budget():
    budget = budget_of(PER_RANK, 8)
    assert cost(uniform_ranks(5, 8), PER_RANK) == budget
    assert cost(error_ranks([0.1, 0.9, 0.3, 0.05, 0.5], PER_RANK, 8), PER_RANK) <= budget
    rng = np.random.default_rng(0)
    for _ in range(200):
        config = random_config(rng, PER_RANK, budget)
        assert cost(config, PER_RANK) <= budget and set(config) <= set(RANK_CHOICES)
    result = search_ranks(lambda r: float(np.std(r)), [1] * 5, PER_RANK, 8, SearchSettings(rounds=2))
    assert all(cost(h["ranks"], PER_RANK) <= budget for h in result.history)


def test_the_search_stops_when_the_space_holds_fewer_configurations_than_asked():
    result = search_ranks(lambda r: float(r[0]), [1, 1], [10, 10], 8, SearchSettings(initial=8, rounds=3))
    assert len(result.history) == len({tuple(h["ranks"]) for h in result.history}) <= 6
    assert result.best[0] == 0


def test_error_ranks_follow_the_errors_order_and_fall_back_to_uniform():
    errors = [0.2, 0.05, 0.9, 0.4, 0.1]
    ranks = error_ranks(errors, [100] * 5, 8)
    order = np.argsort(errors)
    assert all(ranks[a] <= ranks[b] for a, b in zip(order, order[1:]))
    assert ranks[2] > 8 > ranks[1]
    assert error_ranks([0.0] * 5, [100] * 5, 8) == [8] * 5  # a dense run: nothing to weigh by
    assert max(error_ranks([1, 1, 1, 1, 100], [100] * 5, 8, max_rank=32)) == 32


def test_the_search_finds_the_best_configuration_of_an_objective_its_model_can_learn():
    errors = [0.1, 0.5, 0.2, 0.9, 0.3]
    weight = np.array(errors) / np.mean(errors)

    def objective(ranks):  # lower is better; more rank helps more where the error is larger
        return float(-(weight * np.log1p(ranks)).sum())

    per_rank = [100] * 5
    budget = budget_of(per_rank, 8)
    feasible = [c for c in itertools.product(RANK_CHOICES, repeat=5) if cost(c, per_rank) <= budget]
    best = min(feasible, key=objective)
    result = search_ranks(objective, errors, per_rank, 8, SearchSettings(initial=6, rounds=3, per_round=3))
    assert len(result.history) <= 15  # a handful of measurements out of len(feasible) configurations
    assert result.best == list(best)
    assert result.best_loss == min(h["measured"] for h in result.history)  # the best *measured*
    assert objective(result.best) < objective([8] * 5)
    assert all(h["predicted"] is not None for h in result.history if h["round"] > 0)


def test_recover_runs_end_to_end_and_leaves_the_model_as_it_was(tiny, artifacts):
    x = tokens()
    dense = logits(tiny.model, x)
    config = RecoverConfig(strategy="rankadaptor", train_tokens=1024, seq_len=64, batch_size=4, lr=1e-2,
                           eval_tokens=512, eval_seq_len=128, val_tokens=256, probe_tokens=256, initial_configs=3,
                           rounds=1, per_round=2)
    seen = []
    result = recover(tiny, Path(artifacts["rana"]), None, config, progress=lambda f, m: seen.append(f))
    assert torch.equal(logits(tiny.model, x), dense)
    assert len(result.history) == 5 and result.ranks in [h["ranks"] for h in result.history]
    assert result.trainable_params <= result.param_budget
    assert result.perplexity_after < result.perplexity_before
    assert result.flop_reduction_after <= result.flop_reduction_before
    assert seen == sorted(seen) and seen[-1] == 1.0
    json_ready = result.to_json()
    assert json_ready["strategy"] == "rankadaptor" and len(json_ready["layer_errors"]) == 2


def test_rethresholding_after_fine_tuning_brings_the_masks_back_to_their_budget(tiny, artifacts):
    config = RecoverConfig(strategy="uniform", train_tokens=2048, seq_len=64, batch_size=4, lr=3e-2,
                           eval_tokens=512, eval_seq_len=128, val_tokens=256, rethreshold=True)
    result = recover(tiny, Path(artifacts["rana"]), None, config)
    assert abs(result.flop_reduction_after_adapters_only - result.flop_reduction_before) < 0.02
    assert result.flop_reduction_after < result.flop_reduction_after_adapters_only  # the LoRA path is counted
