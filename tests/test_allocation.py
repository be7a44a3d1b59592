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
