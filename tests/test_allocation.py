import itertools

import pytest

from rana_core.allocation import Curve, greedy_allocation

KEEPS = [1.0, 0.8, 0.6, 0.4, 0.2]


def convex(scale):
    return lambda keep: scale * (1 - keep) ** 2


def test_greedy_respects_the_budget_and_favours_cheap_modules():
    curves = {"easy": Curve(100, KEEPS, convex(0.1)), "hard": Curve(100, KEEPS, convex(10.0))}
    keeps = greedy_allocation(curves, 0.3)
    spent = sum(curves[k].dense_flops * keeps[k] for k in curves)
    assert spent <= 0.7 * 200
    assert keeps["easy"] < keeps["hard"]


def test_greedy_finds_the_optimum_on_convex_curves():
    curves = {i: Curve(flops, KEEPS, convex(scale)) for i, (flops, scale) in
              enumerate([(100, 1.0), (50, 3.0), (200, 0.5), (80, 2.0)])}
    keeps = greedy_allocation(curves, 0.4)
    total = sum(c.dense_flops for c in curves.values())

    def cost(choice):
        return sum(curves[i].error(k) for i, k in choice.items())

    feasible = [dict(enumerate(combo)) for combo in itertools.product(KEEPS, repeat=len(curves))
                if sum(curves[i].dense_flops * k for i, k in enumerate(combo)) <= 0.6 * total]
    best = min(feasible, key=cost)
    assert cost(keeps) == pytest.approx(cost(best))


def test_an_impossible_budget_stops_at_the_lowest_keeps():
    curves = {0: Curve(10, [1.0, 0.5], convex(1.0))}
    assert greedy_allocation(curves, 0.9) == {0: 0.5}


def test_knapsack_finds_the_brute_force_optimum_and_never_exceeds_the_budget():
    import random

    from rana_core.allocation import Option, knapsack_allocation

    rng = random.Random(0)
    for trial in range(20):
        options = {m: [Option((m, j), flops=rng.choice([0, 5, 10, 15, 20, 30, 40]), error=rng.random() * 10)
                       for j in range(4)] for m in range(4)}
        budget = rng.choice([40, 60, 80, 100])
        feasible = [combo for combo in itertools.product(*options.values()) if sum(o.flops for o in combo) <= budget]
        if not feasible:
            with pytest.raises(ValueError):
                knapsack_allocation(options, budget, units=budget)
            continue
        best = min(sum(o.error for o in combo) for combo in feasible)
        # costs are whole multiples of the step here, so the discretised problem is the exact one
        chosen = knapsack_allocation(options, budget, units=budget // 5)
        assert sum(o.flops for o in chosen.values()) <= budget
        assert sum(o.error for o in chosen.values()) == pytest.approx(best)


def test_knapsack_rounds_costs_up_so_odd_costs_stay_within_budget():
    from rana_core.allocation import Option, knapsack_allocation

    options = {m: [Option(k, flops=100 * k + 0.37, error=(1 - k) ** 2 * (m + 1)) for k in (0.2, 0.5, 0.8, 1.0)]
               for m in range(6)}
    budget = 0.6 * sum(100.37 for _ in range(6))
    chosen = knapsack_allocation(options, budget, units=997)
    assert sum(o.flops for o in chosen.values()) <= budget
    assert chosen[5].choice >= chosen[0].choice  # the module whose error weighs most keeps the most
