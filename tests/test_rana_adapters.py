"""RaNA's adapters on `tiny`: exactness at zero reduction, mask and threshold behaviour, FLOPs from the masks."""

import copy
import itertools

import pytest
import torch

from rana_core.adapters.base import MODULES, inject, installed_meters, layer_members, unload
from rana_core.adapters.low_rank import RankMaskedUnit, RankPlan, active_for, plan_rank_adapter
from rana_core.adapters.mlp import CatsMLP, NeuronMaskedUnit, RaNAMLP
from rana_core.adapters.thresholds import ScoreHistogram
from rana_core.architecture import INPUT_OF
from rana_core.profiles import MLPProfile, ProjectionFactors, split_triples
from tests.test_svd import _grams


@pytest.fixture(scope="module")
def grams(tiny, tiny_windows):
    return _grams(tiny, tiny_windows["train"])


def _rank_unit(tiny, grams, layer, module, rank=None, tau=0.0):
    members = layer_members(tiny.layers[layer], module)
    weight = torch.cat([m.weight for m in members])
    proj = ProjectionFactors.build(weight, grams[(layer, INPUT_OF[module])].gram, torch.zeros(1, weight.shape[1]))
    rank = rank or min(weight.shape)
    A, B = proj.factors(rank)
    return RankMaskedUnit(members, layer, module, A, B, RankPlan(1.0, rank, rank, tau, 1.0))


def test_rank_and_neuron_adapters_are_exact_at_zero_reduction(tiny, grams, tiny_windows):
    batch = tiny_windows["heldout"][:2]
    with torch.no_grad():
        before = tiny.model(batch).logits
    adapters = [_rank_unit(tiny, grams, i, "qkv") for i in range(2)]
    for i, layer in enumerate(tiny.layers):
        up, gate = _rank_unit(tiny, grams, i, "up"), _rank_unit(tiny, grams, i, "gate")
        adapters.append(RaNAMLP(layer.mlp, i, up, gate, NeuronMaskedUnit(layer.mlp.down_proj, i, keep=1.0)))
    inject(tiny.layers, adapters)
    try:
        with torch.no_grad():
            assert torch.allclose(tiny.model(batch).logits, before, atol=1e-4)
        meters = installed_meters(tiny.layers)
        assert set(meters) == {(i, m) for i in range(2) for m in MODULES}
        assert all(m.mean_active == m.static_rank for m in meters.values())  # τ = 0 keeps everything
    finally:
        unload(tiny.layers)
    with torch.no_grad():
        assert torch.equal(tiny.model(batch).logits, before)


def test_rank_mask_keeps_exactly_the_ranks_above_tau_and_counts_their_flops(tiny, grams):
    unit = _rank_unit(tiny, grams, 1, "up", rank=40)
    x = torch.randn(3, 5, 64)
    z = x @ unit.B.T
    tau = z.square().median().item()
    unit.tau.fill_(tau)
    y = unit(x)
    expected = (z * (z.square() >= tau)) @ unit.A.T
    assert torch.allclose(y, expected, atol=1e-6)
    active = (z.square() >= tau).sum().item()
    assert unit.meter.active == active and unit.meter.tokens == 15
    assert unit.meter.flops == 2 * 15 * 64 * 40 + 2 * 160 * active


def test_neuron_adapter_masks_by_importance():
    down = torch.nn.Linear(8, 3, bias=False)
    unit = NeuronMaskedUnit(down, 0, keep=0.5)
    h = torch.randn(4, 8)
    importance = h.abs() * down.weight.norm(dim=0)
    unit.tau.fill_(importance.median().item())
    mask = importance >= importance.median()
    assert torch.allclose(unit(h), (h * mask) @ down.weight.T.detach(), atol=1e-6)
    assert unit.meter.flops == 2 * 3 * mask.sum().item()


def test_cats_at_zero_threshold_is_the_mlp_and_counts_gate_dense(tiny):
    mlp = tiny.layers[0].mlp
    cats = CatsMLP(mlp, 0, keep=1.0)
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        assert torch.allclose(cats(x), mlp(x), atol=1e-6)
    meters = {m.module: m for m in cats.meters()}
    assert meters["gate"].flops == 14 * 2 * 64 * 160
    assert meters["up"].flops == meters["down"].flops == 2 * 64 * 14 * 160


def test_cats_in_half_precision_counts_past_what_a_half_sum_holds(tiny):
    # 800 tokens × 160 neurons kept = 128,000: a float16 sum of the mask would read inf (the GPU engine test's -inf)
    mlp = copy.deepcopy(tiny.layers[0].mlp).half()
    cats = CatsMLP(mlp, 0, keep=1.0)
    with torch.no_grad():
        cats(torch.randn(2, 400, 64).half())
    meters = {m.module: m for m in cats.meters()}
    assert meters["up"].active == 800 * 160 and meters["down"].flops == 2 * 64 * 800 * 160


def test_histogram_threshold_hits_the_wanted_count():
    scores = torch.rand(4000, 50).pow(4) * 10
    histogram = ScoreHistogram()
    histogram.add(scores)
    for k in (1.0, 12.5, 40.0):
        tau = histogram.threshold_for(k)
        assert (scores >= tau).sum().item() / 4000 == pytest.approx(k, rel=0.02)
    assert histogram.threshold_for(0) == float("inf") and histogram.threshold_for(50) == 0.0


def test_plan_beats_static_svd_at_the_same_budget_and_pays_exactly(tiny, grams, tiny_windows):
    from rana_core.calibration import capture_input_stats

    rows = capture_input_stats(tiny.model, tiny_windows["train"][:4], {"u": tiny.layers[1].mlp.up_proj},
                               row_stride=1)["u"].rows
    weight = tiny.layers[1].mlp.up_proj.weight
    proj = ProjectionFactors.build(weight, grams[(1, "mlp")].gram, rows)
    m, n = proj.shape
    for keep in (0.3, 0.5, 0.7):
        plan = proj.plan(keep)
        assert abs(2 * n * plan.rank + 2 * m * plan.active - keep * 2 * m * n) < 2 * m  # spends the budget
        static_rank = int(keep * m * n / (m + n))
        static = proj.energy[:, :static_rank].sum().item() / proj.energy.sum().item()
        assert plan.coverage >= static
        assert 0 < plan.coverage <= 1
    assert proj.plan(0.3).coverage < proj.plan(0.7).coverage
    assert active_for(0.5, 10, 20, 4) == (0.5 * 200 - 80) / 10


def test_plan_search_matches_brute_force_on_a_small_layer():
    torch.manual_seed(0)
    energy = (torch.randn(300, 24) * torch.linspace(3, 0.1, 24)).square()
    plan = plan_rank_adapter(energy, 0.5, 32, 24)
    best = 0.0
    for rank in range(1, 25):
        active = min(active_for(0.5, 32, 24, rank), rank)
        count = int(round(active * 300))
        if count > 0:
            best = max(best, energy[:, :rank].reshape(-1).topk(count).values.sum().item() / energy.sum().item())
    assert plan.coverage == pytest.approx(best, rel=1e-6)


def test_split_grid_is_the_papers_and_the_search_takes_its_best(tiny, tiny_windows, grams):
    triples = split_triples()
    assert all(sum(t) == 18 and min(t) >= 3 and max(t) <= 9 for t in triples)
    assert len(triples) == len({t for t in itertools.product(range(3, 10), repeat=3) if sum(t) == 18})
    from rana_core.calibration import capture_input_stats

    rows = capture_input_stats(tiny.model, tiny_windows["train"][:4], {"u": tiny.layers[0].mlp.up_proj},
                               row_stride=2)["u"].rows
    profile = MLPProfile(tiny.layers[0].mlp, grams[(0, "mlp")].gram, rows)
    choice = profile.best_split(0.6)
    errors = [profile.error(*[3 * 0.6 * s / 18 for s in t])[0] for t in triples if 3 * 0.6 * max(t) / 18 <= 1]
    assert choice.error == pytest.approx(min(errors))
    assert (choice.up + choice.gate + choice.down) / 3 == pytest.approx(0.6)
    assert profile.error(1.0, 1.0, 1.0)[0] < 1e-10  # dense projections reproduce the MLP
    # allocation curves search locally: never better than the full grid, never worse than the even split
    for keep in (0.8, 0.7, 0.6, 0.5):
        assert profile.best_split(keep).error <= profile.curve_error(keep) + 1e-12
        assert profile.curve_error(keep) <= profile.error(keep, keep, keep)[0] + 1e-12
    # no projection is planned at full keep: there its rank adapter is a full-rank A·B, ~1.4× its dense FLOPs,
    # while the split counts it as dense. At keep 0.75 an 8/18 share would land exactly there.
    fresh = MLPProfile(tiny.layers[0].mlp, grams[(0, "mlp")].gram, rows)
    evaluated = []
    measure = fresh.error
    fresh.error = lambda *fractions: evaluated.append(fractions[:3]) or measure(*fractions)
    for keep in (0.75, 2 / 3):
        fresh.curve_error(keep)
        fresh.best_split(keep)
    assert len(evaluated) > 20 and max(max(f) for f in evaluated) < 1.0


def test_sparsity_curve_rises_with_the_energy_share_and_holds_the_90_percent_point():
    from rana_core.adapters.base import SPARSITY_CURVE_SHARES, Meter, top_share_counts

    scores = torch.tensor([[8.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    # row 1: 8/10 reached with one entry, 9/10 with two; row 2 is flat: k entries carry k/4
    assert top_share_counts(scores, (0.5, 0.8, 0.9, 1.0)).tolist() == [[1, 1, 2, 3], [2, 4, 4, 4]]
    meter = Meter(0, "up", 4, 4, static_rank=4)
    meter.track_sparsity(torch.rand(50, 64, generator=torch.Generator().manual_seed(0)) ** 4)
    curve = meter.sparsity_curve
    assert len(curve) == len(SPARSITY_CURVE_SHARES) and curve == sorted(curve)
    assert curve[SPARSITY_CURVE_SHARES.index(0.9)] == pytest.approx(meter.sparsity, abs=1e-6)


def test_kth_largest_is_the_count_th_largest_value_with_ties_and_any_shape():
    from rana_core.selection import kth_largest

    values = torch.tensor([[3.0, 1.0, 4.0], [1.0, 5.0, 9.0], [2.0, 6.0, 5.0]])
    ordered = [9.0, 6.0, 5.0, 5.0, 4.0, 3.0, 2.0, 1.0, 1.0]  # by hand
    for count, expected in enumerate(ordered, start=1):
        assert kth_largest(values, count).item() == expected
        assert kth_largest(values.T, count).item() == expected  # a strided view
        picked = kth_largest(values.bfloat16(), count)  # NumPy has no bfloat16: it is widened, value and type kept
        assert picked.dtype == torch.bfloat16 and picked.item() == expected
        if torch.cuda.is_available():  # the GPU's sort gives the CPU's selection
            assert kth_largest(values.cuda(), count).item() == expected


def test_a_share_threshold_keeps_that_share_of_the_entries():
    from rana_core.selection import share_threshold

    values = torch.tensor([[3.0, 1.0, 4.0], [1.0, 5.0, 9.0], [2.0, 6.0, 5.0]])
    assert share_threshold(values, 3 / 9) == 5.0  # 9, 6, 5 reach it (and the other 5: a tie is kept)
    assert share_threshold(values, 0.01) == 9.0  # at least one entry is kept
    assert share_threshold(values, 1.0) == 0.0  # everything
