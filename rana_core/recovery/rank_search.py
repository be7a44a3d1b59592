"""Per-layer LoRA ranks under a parameter budget: the uniform and error-proportional rules, and RankAdaptor's
search (a performance model fitted online to measured configurations). Pure numpy, no torch, no model.

Budget: a configuration r (one rank per layer) costs sum_l r_l·p_l trainable parameters, p_l = LoRA parameters per
unit rank in layer l (rana_core.recovery.lora.params_per_rank); the budget is that of uniform rank `rank_budget`.

The search: measure uniform plus a few random configurations, fit
the performance model, then in rounds propose the configurations with the best predicted score (minus an
exploration bonus from the ensemble's spread), measure them and refit; return the best *measured* configuration.
`measure(ranks) -> loss` is the caller's (a short fine-tune scored on a validation slice); lower is better.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

RANK_CHOICES = (0, 2, 4, 8, 12, 16)


def budget_of(params_per_rank: list[int], rank_budget: int) -> int:
    return rank_budget * sum(params_per_rank)


def cost(ranks, params_per_rank) -> int:
    return int(sum(r * p for r, p in zip(ranks, params_per_rank)))


def uniform_ranks(n_layers: int, rank_budget: int) -> list[int]:
    return [rank_budget] * n_layers


def error_ranks(errors: list[float], params_per_rank: list[int], rank_budget: int, max_rank: int = 32) -> list[int]:
    """Ranks proportional to each layer's reconstruction error, at most `max_rank`, spending at most the budget:
    water-filling over the uncapped layers, then the leftover parameters go one rank at a time to the layers
    whose integer rank falls furthest below their share. All errors zero (a dense run): uniform."""
    errors = np.clip(np.nan_to_num(np.asarray(errors, dtype=float)), 0.0, None)
    p = np.asarray(params_per_rank, dtype=float)
    budget = budget_of(params_per_rank, rank_budget)
    if errors.sum() <= 0:
        return uniform_ranks(len(p), rank_budget)
    share = np.zeros_like(errors)
    free = errors > 0
    for _ in range(len(errors)):  # cap, then spread what the capped layers could not take over the rest
        left = budget - (share[~free] * p[~free]).sum()
        share[free] = errors[free] * left / (errors[free] * p[free]).sum()
        over = free & (share > max_rank)
        if not over.any():
            break
        share[over] = max_rank
        free &= ~over
    ranks = np.minimum(np.floor(share), max_rank).astype(int)
    for layer in np.argsort(-(share - ranks), kind="stable"):  # largest remainders first
        if ranks[layer] < max_rank and cost(ranks, p) + p[layer] <= budget and share[layer] > ranks[layer]:
            ranks[layer] += 1
    return [int(r) for r in ranks]


def random_config(rng: np.random.Generator, params_per_rank, budget: int, choices=RANK_CHOICES) -> list[int]:
    """Each layer draws a rank from `choices`; over budget, random layers step down; then random layers step up
    while the budget allows, so configurations spend (nearly) the whole budget."""
    steps = list(choices)
    level = rng.integers(0, len(steps), size=len(params_per_rank))
    while cost([steps[i] for i in level], params_per_rank) > budget:
        down = [i for i in range(len(level)) if level[i] > 0]
        level[rng.choice(down)] -= 1
    while True:
        spent = cost([steps[i] for i in level], params_per_rank)
        up = [i for i in range(len(level)) if level[i] + 1 < len(steps)
              and spent + (steps[level[i] + 1] - steps[level[i]]) * params_per_rank[i] <= budget]
        if not up:
            return [steps[i] for i in level]
        level[rng.choice(up)] += 1


def config_features(ranks, errors, depth_buckets: int = 3) -> np.ndarray:
    """Features of a configuration for the performance model, additive over layers so that a few measured
    configurations suffice: log(1 + r_l) summed per depth third and weighted by the layer's relative error, the
    share of layers left without LoRA (and their error), and the mean rank."""
    r = np.asarray(ranks, dtype=float)
    e = np.asarray(errors, dtype=float)
    e = e / e.mean() if e.mean() > 0 else np.ones_like(r)
    n = len(r)
    depth = np.arange(n) / max(n - 1, 1)
    lr = np.log1p(r)
    bucket = np.minimum((depth * depth_buckets).astype(int), depth_buckets - 1)
    per_bucket = [lr[bucket == b].sum() / n for b in range(depth_buckets)]
    zero = (r == 0).astype(float)
    return np.array(per_bucket + [(e * lr).sum() / n, zero.mean(), (e * zero).sum() / n, r.mean() / 16])


class PerformanceModel:
    """A bootstrap ensemble of ridge regressions from configuration features to the measured loss."""

    def __init__(self, errors, members: int = 16, alpha: float = 1.0, seed: int = 0):
        self.errors, self.members, self.alpha = list(errors), members, alpha
        self.rng = np.random.default_rng(seed)
        self.weights: list[np.ndarray] = []

    def features(self, configs) -> np.ndarray:
        return np.stack([config_features(c, self.errors) for c in configs])

    def fit(self, configs, losses) -> "PerformanceModel":
        X, y = self.features(configs), np.asarray(losses, dtype=float)
        self.x_mean, self.x_std = X.mean(0), X.std(0) + 1e-9
        self.y_mean, self.y_std = y.mean(), y.std() + 1e-12
        Z, t = (X - self.x_mean) / self.x_std, (y - self.y_mean) / self.y_std
        self.weights = []
        for member in range(self.members):
            rows = np.arange(len(y)) if member == 0 else self.rng.integers(0, len(y), size=len(y))
            A = np.hstack([Z[rows], np.ones((len(rows), 1))])
            penalty = self.alpha * np.diag([1.0] * Z.shape[1] + [0.0])  # the intercept is not shrunk
            self.weights.append(np.linalg.solve(A.T @ A + penalty, A.T @ t[rows]))
        return self

    def predict(self, configs) -> tuple[np.ndarray, np.ndarray]:
        """Mean and spread of the members' predicted losses."""
        Z = (self.features(configs) - self.x_mean) / self.x_std
        A = np.hstack([Z, np.ones((len(Z), 1))])
        predictions = np.stack([A @ w for w in self.weights]) * self.y_std + self.y_mean
        return predictions.mean(0), predictions.std(0)


@dataclass
class SearchSettings:
    initial: int = 6  # measured before the first fit: uniform plus random configurations
    rounds: int = 3
    per_round: int = 3
    candidates: int = 2000  # random configurations scored by the model per round
    exploration: float = 1.0  # acquisition = predicted − exploration · spread
    choices: tuple = RANK_CHOICES
    seed: int = 0


@dataclass
class SearchResult:
    best: list[int]
    best_loss: float
    history: list[dict] = field(default_factory=list)  # {round, ranks, predicted, spread, measured}


def search_ranks(measure: Callable[[list[int]], float], errors, params_per_rank, rank_budget: int,
                 settings: SearchSettings = SearchSettings(), on_measured: Callable[[dict], None] | None = None
                 ) -> SearchResult:
    """RankAdaptor's online loop; see the module docstring. `on_measured` sees each history entry as it lands."""
    rng = np.random.default_rng(settings.seed)
    budget = budget_of(params_per_rank, rank_budget)
    history: list[dict] = []
    seen: set[tuple] = set()

    def record(ranks, round_, predicted=None, spread=None):
        entry = {"round": round_, "ranks": list(ranks), "predicted": predicted, "spread": spread,
                 "measured": float(measure(list(ranks)))}
        history.append(entry)
        seen.add(tuple(ranks))
        if on_measured:
            on_measured(entry)

    initial = [uniform_ranks(len(params_per_rank), rank_budget)]
    for _ in range(100 * settings.initial):  # a small space may hold fewer distinct configurations than asked
        if len(initial) >= settings.initial:
            break
        config = random_config(rng, params_per_rank, budget, settings.choices)
        if tuple(config) not in {tuple(c) for c in initial}:
            initial.append(config)
    for config in initial:
        record(config, 0)
    model = PerformanceModel(errors, seed=settings.seed)
    for round_ in range(1, settings.rounds + 1):
        model.fit([h["ranks"] for h in history], [h["measured"] for h in history])
        pool = _candidate_pool(rng, model, history, params_per_rank, budget, settings)
        pool = [c for c in pool if tuple(c) not in seen]
        if not pool:
            break
        mean, spread = model.predict(pool)
        order = np.argsort(mean - settings.exploration * spread)
        for index in order[: settings.per_round]:
            record(pool[index], round_, float(mean[index]), float(spread[index]))
    best = min(history, key=lambda h: h["measured"])
    return SearchResult(best=list(best["ranks"]), best_loss=best["measured"], history=history)


def _candidate_pool(rng, model, history, params_per_rank, budget, settings) -> list[list[int]]:
    """Random configurations, plus a greedy descent on the model's prediction from the best measured ones and
    from the best random one (moves of one step up in one layer and one step down in another)."""
    pool = [random_config(rng, params_per_rank, budget, settings.choices) for _ in range(settings.candidates)]
    mean, _ = model.predict(pool)
    starts = [h["ranks"] for h in sorted(history, key=lambda h: h["measured"])[:2]] + [pool[int(np.argmin(mean))]]
    for start in starts:
        pool.append(_descend(model, start, params_per_rank, budget, settings.choices))
    unique = {tuple(c): c for c in pool}
    return list(unique.values())


def _descend(model, start, params_per_rank, budget, choices, max_moves: int = 64) -> list[int]:
    steps = list(choices)
    current = list(start)
    best = model.predict([current])[0][0]
    for _ in range(max_moves):
        neighbours = []
        for up in range(len(current)):
            for down in [None] + list(range(len(current))):
                if down == up:
                    continue
                config = list(current)
                if config[up] not in steps or config[up] == steps[-1]:
                    continue
                config[up] = steps[steps.index(config[up]) + 1]
                if down is not None:
                    if config[down] not in steps or config[down] == steps[0]:
                        continue
                    config[down] = steps[steps.index(config[down]) - 1]
                if cost(config, params_per_rank) <= budget:
                    neighbours.append(config)
        if not neighbours:
            break
        mean, _ = model.predict(neighbours)
        if mean.min() >= best:
            break
        best, current = mean.min(), neighbours[int(np.argmin(mean))]
    return current
