"""Spreading one FLOP budget over modules (beyond the paper).

Each module has a curve: at keep fraction f of its dense FLOPs it loses error e(f). ``greedy_allocation``
starts with every module dense and repeatedly takes the step down its grid that costs the least error per FLOP
saved, until the model spends at most (1 − p) of its dense FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable


@dataclass
class Curve:
    dense_flops: float
    keeps: list[float]  # decreasing, starting at 1.0
    error: Callable[[float], float]  # error at a keep fraction


def greedy_allocation(curves: dict[Hashable, Curve], flop_reduction: float) -> dict[Hashable, float]:
    """A keep fraction per module such that Σ keep·dense ≤ (1 − p) Σ dense, chosen greedily."""
    total = sum(c.dense_flops for c in curves.values())
    budget = (1.0 - flop_reduction) * total
    position = {key: 0 for key in curves}
    errors = {key: c.error(c.keeps[0]) for key, c in curves.items()}
    spent = sum(c.dense_flops * c.keeps[0] for c in curves.values())
    next_error: dict[Hashable, float] = {}

    def step_cost(key) -> float:
        curve, i = curves[key], position[key]
        if i + 1 >= len(curve.keeps):
            return float("inf")
        if key not in next_error:
            next_error[key] = curve.error(curve.keeps[i + 1])
        saved = curve.dense_flops * (curve.keeps[i] - curve.keeps[i + 1])
        return (next_error[key] - errors[key]) / saved

    while spent > budget:
        key = min(curves, key=step_cost)
        if step_cost(key) == float("inf"):
            break  # every module is at its lowest keep: the budget cannot be met
        curve, i = curves[key], position[key]
        spent -= curve.dense_flops * (curve.keeps[i] - curve.keeps[i + 1])
        errors[key] = next_error.pop(key)
        position[key] = i + 1
    return {key: curves[key].keeps[position[key]] for key in curves}


@dataclass(frozen=True)
class Option:
    """One way to run a module: what it is (e.g. ("rana", 0.6)), the FLOPs it spends and the error it costs."""

    choice: Hashable
    flops: float
    error: float


def knapsack_allocation(options: dict[Hashable, list[Option]], budget_flops: float,
                        units: int = 4000) -> dict[Hashable, Option]:
    """One option per module minimising the summed error with Σ flops ≤ budget_flops: a multiple-choice knapsack
    solved exactly by dynamic programming over the budget cut into `units` steps. Each option's FLOPs are rounded
    *up* to whole steps, so the result never exceeds the budget (it may leave up to one step per module unspent).
    Raises ValueError when even the cheapest options do not fit."""
    import numpy as np

    quantum = budget_flops / units
    keys = list(options)
    best = np.zeros(units + 1)  # best[b]: least error of the modules so far within b steps
    picks = []
    for key in keys:
        costs = [min(units + 1, int(np.ceil(o.flops / quantum - 1e-9))) for o in options[key]]
        merged = np.full(units + 1, np.inf)
        pick = np.full(units + 1, -1)
        for index, (cost, option) in enumerate(zip(costs, options[key])):
            if cost > units:
                continue
            candidate = np.full(units + 1, np.inf)
            candidate[cost:] = best[: units + 1 - cost] + option.error
            better = candidate < merged
            merged[better], pick[better] = candidate[better], index
        best = merged
        picks.append(pick)
    if not np.isfinite(best[units]):
        raise ValueError("the budget cannot pay for the cheapest option of every module")
    chosen, remaining = {}, units
    for key, pick, in zip(reversed(keys), reversed(picks)):
        index = int(pick[remaining])
        option = options[key][index]
        chosen[key] = option
        remaining -= min(units + 1, int(np.ceil(option.flops / quantum - 1e-9)))
    return {key: chosen[key] for key in keys}


def _lower_hull(options: list[Option]) -> list[Option]:
    """The options on the lower convex hull of (flops, error) that trade error for FLOPs: from the least-error
    option (the cheapest of those) down to the cheapest option, each step dearer in error per FLOP saved."""
    cheapest_at: dict[float, Option] = {}
    for option in options:  # of options with equal FLOPs only the least error can be on the hull
        if option.flops not in cheapest_at or option.error < cheapest_at[option.flops].error:
            cheapest_at[option.flops] = option
    hull: list[Option] = []
    for c in sorted(cheapest_at.values(), key=lambda o: o.flops):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (b.flops - a.flops) * (c.error - a.error) - (b.error - a.error) * (c.flops - a.flops) > 0:
                break  # a → b → c turns left: b stays on the lower hull
            hull.pop()
        hull.append(c)
    best = min(range(len(hull)), key=lambda i: (hull[i].error, hull[i].flops))
    return hull[: best + 1][::-1]


def hull_greedy_allocation(options: dict[Hashable, list[Option]], budget_flops: float) -> dict[Hashable, Option]:
    """One option per module with Σ flops ≤ budget_flops, chosen greedily: every module starts at its least-error
    option and the step down any module's lower convex hull that costs the least error per FLOP saved is taken
    until the budget is met. Optimal whenever the budget falls on a step boundary (the hulls are convex); the
    last step may overshoot by one step. Raises ValueError when even the cheapest options do not fit."""
    import heapq

    hulls = {key: _lower_hull(opts) for key, opts in options.items()}
    position = {key: 0 for key in hulls}
    spent = sum(hull[0].flops for hull in hulls.values())
    if sum(hull[-1].flops for hull in hulls.values()) > budget_flops:
        raise ValueError("the budget cannot pay for the cheapest option of every module")
    order = {key: n for n, key in enumerate(hulls)}  # ties broken by module order, so runs are reproducible

    def step(key):
        hull, i = hulls[key], position[key]
        here, there = hull[i], hull[i + 1]
        return ((there.error - here.error) / (here.flops - there.flops), order[key], key)

    heap = [step(key) for key, hull in hulls.items() if len(hull) > 1]
    heapq.heapify(heap)
    while spent > budget_flops:
        _, _, key = heapq.heappop(heap)
        hull, i = hulls[key], position[key]
        spent -= hull[i].flops - hull[i + 1].flops
        position[key] = i + 1
        if i + 2 < len(hull):
            heapq.heappush(heap, step(key))
    return {key: hulls[key][position[key]] for key in hulls}
