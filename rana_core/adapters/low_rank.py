"""Low-rank adapters of a linear (or of stacked linears): static SVD, and RaNA's rank adapter with per-token masks.

``LowRankUnit``: y = A (B x) + b at a static rank r; every token pays 2·r·(m + n).

RaNA's rank adapter (``RankMaskedUnit``): data-aware factors, a static rank, and per-token rank masks.

With the output basis U of the layer's calibration outputs, A = U[:, :r] (orthonormal columns) and B = Aᵀ W.
For a token x, z = B x; rank i contributes exactly z_i² to ‖A z‖², so rank i is kept iff z_i² ≥ τ and
y = A (z ⊙ mask) + b. A token pays 2·n·r for z and 2·m per active rank.

For a budget of a fraction f of the dense FLOPs 2mn, a static rank r leaves k = (f·m·n − n·r) / m active ranks
per token on average. ``plan_rank_adapter`` tries static ranks from full down, keeps for each the k·T largest
z_i² over T calibration tokens, and picks the rank whose kept share of the output energy ("coverage") is largest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rana_core.adapters.base import AdapterUnit, layer_members, stacked_bias
from rana_core.adapters.thresholds import Thresholded
from rana_core.residency import placed_like
from rana_core.selection import kth_largest

SEARCH_STEPS = 16  # static ranks tried on a coarse grid, then refined around the best


class LowRankUnit(AdapterUnit):
    """Static low rank: y = A (B x) + b, A: out × r, B: r × in. Every token pays for all r ranks."""

    adapter_name = "svd"
    kind = "svd"

    def __init__(self, members, layer, module, A: torch.Tensor, B: torch.Tensor):
        super().__init__(members, layer, module, static_rank=A.shape[1])
        like = members[0].weight  # the factors live where the layer's weights do, in their dtype
        self.A = nn.Parameter(placed_like(A, like), requires_grad=False)
        self.B = nn.Parameter(placed_like(B, like), requires_grad=False)
        self.bias = stacked_bias(members)

    def compute(self, x):
        z = F.linear(x, self.B)
        tokens = x.numel() // x.shape[-1]
        rank = self.A.shape[1]
        self.meter.count(tokens, tokens * 2 * rank * (self.in_features + self.out_features), tokens * rank)
        if self.tracking:
            self.meter.track_sparsity(z * z)
        return F.linear(z, self.A, self.bias)

    def state(self) -> tuple[dict, dict]:
        return {"module": self.module}, {"A": self.A, "B": self.B}

    @classmethod
    def rebuild(cls, layer, index: int, meta: dict, tensors: dict) -> "LowRankUnit":
        members, A, B = fitted_factors(layer, meta["module"], tensors)
        return cls(members, index, meta["module"], A, B)


def fitted_factors(layer, module: str, tensors: dict, prefix: str = "") -> tuple[list, torch.Tensor, torch.Tensor]:
    """The members of `module` in `layer` and the stored factors A, B (under `prefix`), checked to fit them."""
    members = layer_members(layer, module)
    A, B = tensors[f"{prefix}A"], tensors[f"{prefix}B"]
    out_f, in_f = sum(m.out_features for m in members), members[0].in_features
    if A.shape[0] != out_f or B.shape[1] != in_f or A.shape[1] != B.shape[0]:
        raise RuntimeError(f"{module} factors {tuple(A.shape)} x {tuple(B.shape)} do not fit a {out_f} x {in_f} layer")
    return members, A, B


@dataclass(frozen=True)
class RankPlan:
    keep: float  # fraction of the dense FLOPs this adapter may spend
    rank: int  # static rank r
    active: float  # mean active ranks per token, k
    tau: float  # threshold on z_i² that keeps k per token on the calibration tokens
    coverage: float  # share of the output energy kept on the calibration tokens (1 − relative error)


def active_for(keep: float, out_features: int, in_features: int, rank: int) -> float:
    return (keep * out_features * in_features - in_features * rank) / out_features


def plan_rank_adapter(energy: torch.Tensor, keep: float, out_features: int, in_features: int) -> RankPlan:
    """`energy`: (T, r_max) values z_i² of T calibration tokens on the full basis, whose row sums are ‖W x‖²."""
    tokens, max_rank = energy.shape
    total = energy.sum().item()
    if keep >= 1.0:
        return RankPlan(1.0, max_rank, float(max_rank), 0.0, 1.0)

    def score(rank: int) -> tuple[float, float, float]:
        active = min(active_for(keep, out_features, in_features, rank), rank)
        count = int(round(active * tokens))
        if active <= 0 or count <= 0:
            return -1.0, 0.0, active
        entries = energy[:, :rank].reshape(-1)
        tau = kth_largest(entries, min(count, entries.numel()))
        return entries[entries >= tau].sum().item() / total, tau.item(), active

    step = max(1, max_rank // SEARCH_STEPS)
    candidates = set(range(max_rank, 0, -step))
    results = {rank: score(rank) for rank in candidates}
    best = max(results, key=lambda r: results[r][0])
    for rank in range(max(1, best - step + 1), min(max_rank, best + step - 1) + 1, max(1, step // 4)):
        if rank not in results:
            results[rank] = score(rank)
    best = max(results, key=lambda r: results[r][0])
    coverage, tau, active = results[best]
    if coverage < 0:  # the budget cannot pay even for one static rank with one active rank
        rank = max(1, int(keep * out_features * in_features / (in_features + out_features)))
        return RankPlan(keep, rank, float(rank), 0.0, 0.0)
    return RankPlan(keep, best, active, tau, coverage)


class RankMaskedUnit(Thresholded, LowRankUnit):
    """The static low-rank factors, with a per-token mask on the ranks."""

    adapter_name = "rank"
    kind = "rank"

    def __init__(self, members, layer, module, A: torch.Tensor, B: torch.Tensor, plan: RankPlan):
        super().__init__(members, layer, module, A, B)
        self.register_buffer("tau", torch.tensor(plan.tau, dtype=torch.float32))
        self.target_active = plan.active
        self.plan = plan

    def compute(self, x):
        z = F.linear(x, self.B)
        scores = z.float().square()
        self.observe(scores)
        mask = scores >= self.tau
        active = mask.sum().item()
        tokens = x.numel() // x.shape[-1]
        rank = self.A.shape[1]
        self.meter.count(tokens, 2 * tokens * self.in_features * rank + 2 * self.out_features * active, active)
        if self.tracking:
            self.meter.track_sparsity(scores)
        return F.linear(z * mask.to(z.dtype), self.A, self.bias)

    def state(self, prefix: str = "") -> tuple[dict, dict]:
        return ({"module": self.module, "plan": asdict(self.plan)},
                {f"{prefix}A": self.A, f"{prefix}B": self.B, f"{prefix}tau": self.tau})

    @classmethod
    def rebuild(cls, layer, index: int, meta: dict, tensors: dict, prefix: str = "") -> "RankMaskedUnit":
        members, A, B = fitted_factors(layer, meta["module"], tensors, prefix)
        unit = cls(members, index, meta["module"], A, B, RankPlan(**meta["plan"]))
        unit.tau.copy_(tensors[f"{prefix}tau"])
        return unit
