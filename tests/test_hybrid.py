"""The hybrid method: allocation over adapter types, the curve cache, and adapters built from curve
points, on the tiny model."""

import itertools
import threading

import pytest
import torch

from rana_core.allocation import Option, hull_greedy_allocation, knapsack_allocation
from rana_core.curves import CurveCache, Point, halves

KEEPS = [1.0, 0.8, 0.6, 0.4, 0.2]


def convex_options(dense, scale):
    return [Option(k, dense * k, scale * (1 - k) ** 2) for k in KEEPS]


def cost(chosen):
    return sum(o.error for o in chosen.values())


def best_within(options, budget):
    combos = [c for c in itertools.product(*options.values()) if sum(o.flops for o in c) <= budget + 1e-9]
    return min(sum(o.error for o in c) for c in combos)


def test_hull_greedy_is_optimal_for_what_it_spends_on_convex_curves():
    options = {i: convex_options(dense, scale) for i, (dense, scale) in
               enumerate([(100, 1.0), (50, 3.0), (200, 0.5), (80, 2.0)])}
    total = 430
    for cut in (0.1, 0.25, 0.4, 0.55, 0.7):
        chosen = hull_greedy_allocation(options, (1 - cut) * total)
        spent = sum(o.flops for o in chosen.values())
        assert spent <= (1 - cut) * total + 1e-9
        assert cost(chosen) == pytest.approx(best_within(options, spent))


def test_hull_greedy_on_hand_made_hulls_skips_off_hull_options_and_overshoots_by_at_most_one_step():
    """Two modules whose lower hulls are worked out by hand (error per FLOP saved on each hull step):
    a: (100, 0) → (50, 5) → (20, 20), slopes 0.1 then 0.5; (90, 4) lies above the chord (100, 0)–(50, 5) without
       being dominated, (60, 6) is dominated by (50, 5);
    b: (100, 0) → (70, 6) → (40, 18), slopes 0.2 then 0.4; (55, 13) lies above the chord (70, 6)–(40, 18).
    Taken in order of slope, the steps pass through (spend, error) (200, 0), (150, 5), (120, 11), (90, 23),
    (60, 38): the greedy must stop at the first of these within the budget."""
    a = {f: Option(("a", f), f, e) for f, e in ((100, 0.0), (90, 4.0), (60, 6.0), (50, 5.0), (20, 20.0))}
    b = {f: Option(("b", f), f, e) for f, e in ((100, 0.0), (70, 6.0), (55, 13.0), (40, 18.0))}
    options = {"a": list(a.values()), "b": list(b.values())}
    off_hull = {a[90], a[60], b[55]}
    steps = [(200, 0.0, (a[100], b[100])), (150, 5.0, (a[50], b[100])), (120, 11.0, (a[50], b[70])),
             (90, 23.0, (a[50], b[40])), (60, 38.0, (a[20], b[40]))]
    for budget in range(60, 201, 5):
        k = next(i for i, (spend, _, _) in enumerate(steps) if spend <= budget)
        spend, error, (pick_a, pick_b) = steps[k]
        chosen = hull_greedy_allocation(options, budget)
        assert chosen == {"a": pick_a, "b": pick_b}, budget
        assert not off_hull & set(chosen.values())
        assert sum(o.flops for o in chosen.values()) == spend <= budget and cost(chosen) == error
        optimum = best_within(options, budget)  # brute force over all 20 combinations
        if budget == spend:  # on a step boundary the greedy is optimal
            assert error == pytest.approx(optimum)
        else:  # between boundaries it may lose, but no more than its last step cost
            assert error <= optimum + (error - steps[k - 1][1]) + 1e-9, budget
    # where it does lose: at 110 the optimum takes a(50, 5) with the off-hull b(55, 13) for 18; the greedy stops
    # at (90, 23), one step (12) past (120, 11)
    assert best_within(options, 110) == pytest.approx(18.0)
    assert cost(hull_greedy_allocation(options, 110)) == pytest.approx(23.0)
    with pytest.raises(ValueError):
        hull_greedy_allocation(options, 59)


def lagrangian_path(options):
    """An oracle independent of the greedy: for each price λ ≥ 0 per FLOP, every module's option minimising
    error + λ·flops, i.e. the lower-hull vertex that a supporting line of slope −λ touches. Sweeping λ up from 0
    (between every pair's slope) gives the solutions at the hull step boundaries, from least error to cheapest,
    as (spend, error, chosen)."""
    slopes = sorted({(q.error - p.error) / (p.flops - q.flops) for opts in options.values()
                     for p in opts for q in opts if p.flops > q.flops and q.error > p.error})
    prices = [0.0] + [(x + y) / 2 for x, y in zip(slopes, slopes[1:])] + [slopes[-1] + 1.0]
    path = []
    for price in prices:
        chosen = {m: min(opts, key=lambda o: (o.error + price * o.flops, o.flops)) for m, opts in options.items()}
        spend = sum(o.flops for o in chosen.values())
        if not path or spend < path[-1][0]:
            path.append((spend, cost(chosen), chosen))
    return path


def test_hull_greedy_on_random_options_stops_at_the_first_hull_boundary_within_the_budget():
    """Random options (most of them off the hull): the greedy's choice is the price-supported solution at the
    first hull step boundary within the budget, so it is optimal for what it spends and overshoots the optimum
    within the budget by at most its last step."""
    import random

    rng = random.Random(1)
    for _ in range(30):
        options = {m: [Option((m, "dense"), 100.0, 0.0)] +
                   [Option((m, j), rng.uniform(10, 100), rng.uniform(0, 10)) for j in range(5)] for m in range(3)}
        budget = rng.uniform(60, 300)
        if sum(min(o.flops for o in opts) for opts in options.values()) > budget:
            with pytest.raises(ValueError):
                hull_greedy_allocation(options, budget)
            continue
        chosen = hull_greedy_allocation(options, budget)
        path = lagrangian_path(options)
        k = next(i for i, (spend, _, _) in enumerate(path) if spend <= budget)
        spend, error, expected = path[k]
        assert chosen == expected  # only hull vertices, and not one step more or less than needed
        assert sum(o.flops for o in chosen.values()) <= budget
        assert cost(chosen) == pytest.approx(best_within(options, spend))  # optimal for what it spends
        if k > 0:
            assert cost(chosen) <= best_within(options, budget) + (error - path[k - 1][1]) + 1e-9


def point(adapter, keep, flops, error):
    return Point(adapter, keep, flops, error, {})


def test_hybrid_allocation_mixes_adapters_and_the_exact_solver_matches_brute_force():
    from rana_core.methods.hybrid import allocate

    # module 0: rana wins at every cut; module 1: cats wins; module 2: cheap to cut with either
    curves = {
        (0, "mlp"): {"rana": {"loss": [point("rana", k, 100 * k, (1 - k) ** 2) for k in (0.8, 0.6, 0.4)]},
                     "cats": {"loss": [point("cats", k, 100 * k, 3 * (1 - k) ** 2) for k in (0.8, 0.6)]}},
        (1, "mlp"): {"rana": {"loss": [point("rana", k, 100 * k, 4 * (1 - k) ** 2) for k in (0.8, 0.6, 0.4)]},
                     "cats": {"loss": [point("cats", k, 100 * k, (1 - k) ** 2) for k in (0.8, 0.6)]}},
        (2, "qkv"): {"rank": {"loss": [point("rank", k, 50 * k, 0.1 * (1 - k)) for k in (0.8, 0.6, 0.4, 0.2)]}},
    }
    dense = {(0, "mlp"): 100.0, (1, "mlp"): 100.0, (2, "qkv"): 50.0}
    scales = {"mlp": 1.0, "qkv": 1.0}
    options = {key: [point("dense", 1.0, dense[key], 0.0)] + [p for a in by.values() for p in a["loss"]]
               for key, by in curves.items()}
    # budgets whose knapsack step divides every option's FLOPs, so the discretised problem is the exact one
    for cut in (0.2, 0.5, 0.6):
        budget = (1 - cut) * 250
        chosen = allocate(curves, dense, "loss", scales, cut, "exact")
        assert sum(p.flops for p in chosen.values()) <= budget + 1e-9
        assert sum(p.error for p in chosen.values()) == pytest.approx(best_within(options, budget))
        greedy = allocate(curves, dense, "loss", scales, cut, "greedy")
        assert sum(p.flops for p in greedy.values()) <= budget + 1e-9
    chosen = allocate(curves, dense, "loss", scales, 0.3, "exact")
    assert chosen[(0, "mlp")].adapter in ("rana", "dense") and chosen[(1, "mlp")].adapter in ("cats", "dense")


def test_knapsack_over_adapter_choices_never_exceeds_the_budget():
    options = {m: [Option((m, a, k), flops=100 * k, error=(1 + a) * (1 - k) ** 2) for a in range(2)
                   for k in (1.0, 0.7, 0.5, 0.3)] for m in range(3)}
    chosen = knapsack_allocation(options, 150, units=300)
    assert sum(o.flops for o in chosen.values()) <= 150
    assert cost(chosen) == pytest.approx(best_within(options, 150))


@pytest.fixture
def hybrid_state(tiny, tiny_windows, tmp_path, monkeypatch):
    from rana_core.methods.hybrid import HybridState

    tiny.cache.clear()

    def make(windows=tiny_windows["train"][:8]):
        tiny.cache.clear()  # only the disk cache may carry curves from one state to the next
        return HybridState(tiny, windows, lambda f, m: None, cache_dir=tmp_path / "curves")

    yield make
    tiny.cache.clear()


def test_curves_are_cached_on_disk_and_a_new_calibration_digest_misses(hybrid_state, tiny_windows):
    first = hybrid_state()
    curves = first.curves()
    assert first.cache.computed == 2 * (3 + 4)  # two layers × (QKV: rank, teal, svd; MLP: rana, cats, teal, svd)
    again = hybrid_state()
    assert again.curves() == curves
    assert again.cache.computed == 0
    assert "inputs" not in again.memory and "fisher" not in again.memory  # no model work on a hit
    other = hybrid_state(tiny_windows["train"][8:16])
    other.curves()
    assert other.cache.computed == 14


def test_points_spend_flops_below_dense_and_errors_fall_with_keep(hybrid_state):
    state = hybrid_state()
    dense = state.dense_flops()
    for key, by_adapter in state.curves().items():
        for adapter, by_weight in by_adapter.items():
            for weight, points in by_weight.items():
                assert all(0 < p.flops < dense[key] for p in points), (key, adapter)
                errors = [p.error for p in points]  # points go from the largest keep to the smallest
                assert errors[-1] > errors[0] >= 0, (key, adapter, weight)


def test_an_adapter_built_from_a_point_reproduces_its_error_and_flops(hybrid_state, tiny):
    """Every point of every curve: the adapter the allocation would build spends, on the check rows, the FLOPs the
    point promised and loses the error it promised (a projection planned at full keep once cost 1.4× dense)."""
    state = hybrid_state()
    for (index, module), by_adapter in state.curves().items():
        stats = state.inputs()[(index, "attention" if module == "qkv" else "mlp")]
        check = halves(stats.rows)[1]
        layer = tiny.layers[index]
        for adapter, by_weight in by_adapter.items():
            for p in by_weight["output"]:
                units = state.build_point((index, module), p)
                with torch.no_grad():
                    if module == "qkv":
                        attn = layer.self_attn
                        dense = check @ torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).T
                        out = units[0](check)
                    elif len(units) == 1:  # RaNA or CATS: one MLP wrapper
                        dense, out = layer.mlp(check), units[0](check)
                    else:  # static SVD or TEAL: gate, up, down units
                        gate, up, down = units
                        dense, out = layer.mlp(check), down(layer.mlp.act_fn(gate(check)) * up(check))
                error = (out - dense).square().sum().item() / dense.square().sum().item()
                flops = sum(m.flops for u in units for m in u.meters()) / check.shape[0]
                assert error == pytest.approx(p.error, rel=0.05, abs=1e-4), (index, module, p.adapter, p.keep)
                assert flops == pytest.approx(p.flops, rel=0.02), (index, module, p.adapter, p.keep)


def test_hybrid_runs_end_to_end_and_stores_the_chosen_keep(tiny, tmp_path, monkeypatch):
    from rana_core.config import CompressConfig
    from rana_core.pipeline import compress

    for allocation in ("exact-loss", "greedy-output"):
        result = compress(CompressConfig(model="tiny", method="hybrid", allocation=allocation, flop_reduction=0.4,
                                         calib_tokens=1024, eval_tokens=512, seq_len=128), loaded=tiny)
        assert result.measured_flop_reduction == pytest.approx(0.4, abs=0.05)
        adapted = [row for row in result.layers if row.adapter != "dense"]
        assert adapted and all(0 < row.planned_keep < 1 for row in adapted)
        assert all(row.planned_keep is None for row in result.layers if row.adapter == "dense")


def test_the_candidate_with_the_least_calibration_loss_is_kept(tiny, tmp_path, monkeypatch):
    from rana_core.config import CompressConfig
    from rana_core.methods import hybrid
    from rana_core.pipeline import compress

    judged = {}

    def fake_losses(self, allocations):  # the last distinct candidate wins, whatever the loss model said
        judged.update(allocations)
        return {name: 0.0 if n == len(allocations) - 1 else 1.0 for n, name in enumerate(allocations)}

    monkeypatch.setattr(hybrid.HybridState, "check_losses", fake_losses)
    messages = []
    result = compress(CompressConfig(model="tiny", method="hybrid", allocation="exact-output", flop_reduction=0.4,
                                     calib_tokens=1024, eval_tokens=512, seq_len=128), loaded=tiny,
                      progress=lambda f, m: messages.append(m))
    assert len(judged) > 1
    winner = list(judged)[-1]
    assert any(m.endswith(f"kept {winner}") for m in messages)
    built = {(row.layer, row.module): row for row in result.layers}
    for (layer, module), point in judged[winner].items():  # the model is built from the winner's points
        rows = ["qkv"] if module == "qkv" else ["gate", "up", "down"]
        dense = sum(built[(layer, row)].dense_flops_per_token for row in rows)
        for row in rows:
            adapter = ("neuron" if row == "down" else "rank") if point.adapter == "rana" else point.adapter
            assert built[(layer, row)].adapter == adapter
            if adapter != "dense":
                assert built[(layer, row)].planned_keep == pytest.approx(point.flops / dense)


def compress_with_winner(tiny, monkeypatch, winner: str, flop_reduction: float):
    """(every allocation hybrid's check judged, the result) of a hybrid run on tiny in which the check's loss is
    least for the candidate named `winner`, whatever the real losses are."""
    from rana_core.config import CompressConfig
    from rana_core.methods import hybrid
    from rana_core.pipeline import compress

    judged = {}

    def fake_losses(self, allocations):
        judged.update(allocations)
        return {name: 0.0 if name == winner else 1.0 for name in allocations}

    monkeypatch.setattr(hybrid.HybridState, "check_losses", fake_losses)
    result = compress(CompressConfig(model="tiny", method="hybrid", allocation="exact-loss",
                                     flop_reduction=flop_reduction, calib_tokens=1024, eval_tokens=512, seq_len=128),
                      loaded=tiny)
    return judged, result


def test_the_check_judges_the_single_adapter_allocations_and_may_keep_one(tiny, monkeypatch):
    """Hybrid contains TEAL and RaNA: their single-adapter allocations at the same budget are judged beside the
    mixed ones (an allocation equal to one already judged is judged once), and when one of them has the least
    calibration loss the model is built from it."""
    judged, result = compress_with_winner(tiny, monkeypatch, "only teal", 0.4)
    adapters = {name: {point.adapter for point in chosen.values()} - {"dense"} for name, chosen in judged.items()}
    assert adapters["only teal"] == {"teal"}
    assert any(used and used <= {"rank", "rana"} for used in adapters.values())  # RaNA's own, under some name
    assert {row.adapter for row in result.layers} - {"dense"} == {"teal"}  # the winner was built
    assert result.measured_flop_reduction == pytest.approx(0.4, abs=0.05)


def test_the_check_judges_the_teal_method_allocation_and_builds_it_when_it_wins(tiny, monkeypatch):
    """The ``teal`` method (every input keeping 1 - p) is a peer hybrid contains: it is judged beside the solver's
    allocations, and when its calibration loss is the least every QKV, gate, up and down input keeps 1 - p."""
    judged, result = compress_with_winner(tiny, monkeypatch, "teal everywhere", 0.35)
    assert all(point.keep == pytest.approx(0.65) for point in judged["teal everywhere"].values())
    assert len(judged["teal everywhere"]) == 2 * len(tiny.layers)  # no module left dense
    adapted = [row for row in result.layers if row.module in ("qkv", "gate", "up", "down")]
    assert len(adapted) == 4 * len(tiny.layers)
    assert all(row.adapter == "teal" and row.planned_keep == pytest.approx(0.65) for row in adapted)
    assert result.measured_flop_reduction == pytest.approx(0.35, abs=0.01)


def test_the_check_judges_teal_greedy_allocation_and_builds_it_when_it_wins(tiny, monkeypatch):
    """TEAL's greedy allocation (per layer, keeps on TEAL's 0.05 grid spread over q/k/v, gate, up and down by their
    output errors) is judged too; when it wins, the model is built from it: TEAL masks only, keeps that differ
    between modules, and the budget's FLOPs within ±0.01 (measured here: 0.4036)."""
    judged, result = compress_with_winner(tiny, monkeypatch, "teal greedy", 0.4)
    assert "teal greedy" in judged
    adapted = [row for row in result.layers if row.module in ("qkv", "gate", "up", "down") and row.adapter != "dense"]
    assert adapted and {row.adapter for row in adapted} == {"teal"}
    keeps = {round(row.planned_keep, 6) for row in adapted}
    assert len(keeps) > 1  # spread, not one keep everywhere
    assert result.measured_flop_reduction == pytest.approx(0.4, abs=0.01)


def test_two_workers_filling_one_curve_cache_never_trip_over_each_other(tmp_path):
    """Two workers on one data folder (one per GPU) may compute the same curves at the same time: each write lands
    whole under its final name, and neither fails on the other's temporary file."""
    errors, barrier = [], threading.Barrier(2)

    def fill():
        cache = CurveCache("model", "data", tmp_path)
        barrier.wait()
        try:
            for n in range(300):
                assert cache.value(f"point-{n}", lambda: {"n": n, "pad": "x" * 2000}) == {"n": n, "pad": "x" * 2000}
        except Exception as exc:  # noqa: BLE001 - any failure in a worker thread is the finding
            errors.append(repr(exc))

    threads = [threading.Thread(target=fill) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert not list(tmp_path.rglob("*.partial"))


def test_teal_curves_spend_what_they_keep_and_lose_more_as_they_keep_less(tiny, tiny_windows):
    """The TEAL points hybrid will choose from (not yet a candidate): on the stacked QKV a point keeping a share
    of the inputs spends 2·m per kept input, close to that share of the dense FLOPs on the check rows; on the MLP
    the gate/up and down keeps are split so that the MLP spends its keep; errors grow as less is kept."""
    from rana_core.adapters.base import layer_members
    from rana_core.architecture import layer_mlp
    from rana_core.calibration import capture_module_inputs
    from rana_core.curves import mlp_curves, mlp_dense_flops, qkv_curves

    stats = capture_module_inputs(tiny, tiny_windows["train"][:8], row_stride=1, inputs=("attention", "mlp"))
    layer = tiny.layers[0]
    weight = torch.cat([m.weight for m in layer_members(layer, "qkv")])
    attention, mlp_in = stats[(0, "attention")], stats[(0, "mlp")]
    fisher_qkv, fisher_mlp = torch.ones(weight.shape[0]), torch.ones(weight.shape[1])
    qkv = {p.keep: p for p in qkv_curves(weight, attention.gram, attention.rows, fisher_qkv, "teal")["output"]}
    m, n = weight.shape
    for keep, p in qkv.items():
        assert p.adapter == "teal" and p.flops == pytest.approx(2 * m * p.params["active"])
        assert abs(p.params["active"] / n - keep) <= 0.05  # thresholds from the fit rows hold on the check rows
    assert qkv[0.2].error > qkv[0.5].error > qkv[0.95].error > 0

    mlp = layer_mlp(layer)
    points = {p.keep: p for p in mlp_curves(mlp, mlp_in.gram, mlp_in.rows, fisher_mlp, "teal")["output"]}
    dense = mlp_dense_flops(mlp)
    for keep, p in points.items():
        assert abs(p.flops / dense - keep) <= 0.05, (keep, p.flops / dense)
    assert points[0.2].error > points[0.5].error > points[0.95].error > 0
