"""Spreading one FLOP budget over modules (design §4, beyond the paper).

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
