"""What each module of a layer loses at each budget, measured on calibration rows: the raw material of both
RaNA's within-MLP split search and the allocation across layers (rana_core.allocation).

- ``QKVProfile``: the stacked QKV rank adapter; its relative output error at keep fraction f is 1 − coverage.
- ``MLPProfile``: rank adapters on up and gate, the neuron adapter on down. ``error(f_up, f_gate, f_down)`` runs
  the adapted MLP on the calibration rows (down's threshold set on the *adapted* h) against the dense MLP.
  ``best_split(f)`` searches the paper's grid of keep-ratio triples {3..9}/18 for the MLP keep fraction f.

Rank plans are cached per keep fraction rounded to ``GRID``, so curves over many budgets reuse them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rana_core.adapters.low_rank import RankPlan, plan_rank_adapter
from rana_core.architecture import mlp_parts
from rana_core.decompose import OutputBasis, output_basis
from rana_core.residency import visiting
from rana_core.selection import share_threshold

GRID = 0.025  # keep fractions of up/gate plans are rounded to this step for caching
SPLIT_PARTS = 18
SPLIT_RANGE = range(3, 10)  # each projection's share of the MLP budget is 3/18 .. 9/18


def split_triples() -> list[tuple[int, int, int]]:
    """(up, gate, down) shares in eighteenths, summing to 18."""
    return [(u, g, SPLIT_PARTS - u - g) for u in SPLIT_RANGE for g in SPLIT_RANGE
            if SPLIT_PARTS - u - g in SPLIT_RANGE]


def _moved(shares: tuple[int, int, int], source: int, target: int) -> tuple[int, int, int]:
    moved = list(shares)
    moved[source] -= 1
    moved[target] += 1
    return tuple(moved)


def _round(keep: float) -> float:
    return min(1.0, max(GRID, round(keep / GRID) * GRID))


@dataclass
class ProjectionFactors:
    """One linear's data-aware basis, factors and calibration energies on the full basis."""

    weight: torch.Tensor  # float32 (m, n)
    basis: OutputBasis
    B_full: torch.Tensor  # float32 (r_max, n) = Uᵀ W
    energy: torch.Tensor  # float32 (T, r_max): z_i² of the calibration rows

    @classmethod
    def build(cls, weight: torch.Tensor, gram: torch.Tensor, rows: torch.Tensor,
              basis: OutputBasis | None = None) -> "ProjectionFactors":
        """On the gram's device (where calibration ran); `basis` if already computed for this weight and gram."""
        basis = basis or output_basis(weight, gram)
        weight = weight.detach().to(gram.device)
        B_full = (basis.U.T @ weight.double()).float()
        return cls(weight.float(), basis, B_full, (rows.to(gram.device) @ B_full.T).square())

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def plan(self, keep: float) -> RankPlan:
        return plan_rank_adapter(self.energy, keep, *self.shape)

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) in float64 for a static rank."""
        A = self.basis.U[:, :rank]
        return A, self.B_full[:rank].double()

    def adapted_output(self, rows: torch.Tensor, plan: RankPlan) -> torch.Tensor:
        z = rows @ self.B_full[: plan.rank].T
        z = z * (z.square() >= plan.tau)
        return z @ self.basis.U[:, : plan.rank].T.float()


class QKVProfile:
    def __init__(self, weight: torch.Tensor, gram: torch.Tensor, rows: torch.Tensor):
        self.proj = ProjectionFactors.build(weight, gram, rows)
        self.rows = rows.to(gram.device)
        self.dense = self.rows @ self.proj.weight.T
        self._plans: dict[float, RankPlan] = {}
        self._loss_errors: dict[float, float] = {}

    memos = ("_plans", "_loss_errors")  # what a rebuilt profile takes over (LayerProfiles)

    def plan(self, keep: float) -> RankPlan:
        if keep not in self._plans:
            self._plans[keep] = self.proj.plan(keep)
        return self._plans[keep]

    def error(self, keep: float) -> float:
        return 1.0 - self.plan(_round(keep)).coverage if keep < 1 else 0.0

    def loss_error(self, keep: float, fisher: torch.Tensor) -> float:
        """Mean Fisher-weighted squared output error per token (see rana_core.sensitivity)."""
        if keep >= 1:
            return 0.0
        if keep not in self._loss_errors:
            diff = self.proj.adapted_output(self.rows, self.plan(_round(keep))) - self.dense
            self._loss_errors[keep] = (diff.square() @ fisher).mean().item()
        return self._loss_errors[keep]


@dataclass(frozen=True)
class MLPChoice:
    keep: float  # fraction of the MLP's dense FLOPs
    up: float
    gate: float
    down: float  # per-projection keep fractions; their mean is `keep` (the three cost the same dense)
    error: float  # relative MLP output error on the calibration rows


class MLPProfile:
    def __init__(self, mlp, gram: torch.Tensor, rows: torch.Tensor):
        self.rows = rows = rows.to(gram.device)  # all of the profile lives where the gram does
        gate, up, down, self.act = mlp_parts(mlp)
        self.up = ProjectionFactors.build(up.weight, gram, rows)
        self.gate = ProjectionFactors.build(gate.weight, gram, rows)
        self.down_weight = down.weight.detach().to(gram.device).float()
        self.column_norms = self.down_weight.norm(dim=0)
        with torch.no_grad(), visiting(mlp, gram.device):  # the MLP's layer may rest on the CPU
            self.dense = mlp(rows.to(dtype=down.weight.dtype)).float()
        self.dense_energy = self.dense.square().sum().item()
        self._outputs: dict[tuple[str, float], torch.Tensor] = {}
        self._plans: dict[tuple[str, float], RankPlan] = {}
        self._splits: dict[tuple[float, bool], MLPChoice] = {}
        # (keep, Fisher-weighted?) -> (shares, error)
        self._curve: dict[tuple[float, bool], tuple[tuple[int, int, int], float]] = {}

    memos = ("_plans", "_splits", "_curve")

    def plan(self, which: str, keep: float) -> RankPlan:
        key = (which, _round(keep))
        if key not in self._plans:
            self._plans[key] = getattr(self, which).plan(key[1])
        return self._plans[key]

    def _output(self, which: str, keep: float) -> torch.Tensor:
        key = (which, _round(keep))
        if key not in self._outputs:
            proj = getattr(self, which)
            if key[1] >= 1.0:
                self._outputs[key] = self.rows @ proj.weight.T
            else:
                self._outputs[key] = proj.adapted_output(self.rows, self.plan(which, keep))
        return self._outputs[key]

    def down_threshold(self, h: torch.Tensor, keep: float) -> float:
        return share_threshold(h.abs() * self.column_norms, keep)

    def error(self, up: float, gate: float, down: float, fisher: torch.Tensor | None = None) -> tuple[float, float]:
        """(MLP output error, the down threshold that kept `down` of the neurons). The error is relative
        (‖Δ‖² / ‖y‖²), or with `fisher` the mean Fisher-weighted squared error per token."""
        h = self.act(self._output("gate", gate)) * self._output("up", up)
        tau = self.down_threshold(h, down)
        mask = (h.abs() * self.column_norms) >= tau
        y = (h * mask) @ self.down_weight.T
        if fisher is not None:
            return ((y - self.dense).square() @ fisher).mean().item(), tau
        return (y - self.dense).square().sum().item() / self.dense_energy, tau

    def best_split(self, keep: float, fisher: torch.Tensor | None = None) -> MLPChoice:
        """Search the grid of triples for MLP keep fraction `keep`; dense when keep ≥ 1. Memoised."""
        if keep >= 1.0:
            return MLPChoice(1.0, 1.0, 1.0, 1.0, 0.0)
        key = (keep, fisher is not None)
        if key not in self._splits:
            self._splits[key] = self._search_split(keep, fisher)
        return self._splits[key]

    def curve_error(self, keep: float, fisher: torch.Tensor | None = None) -> float:
        """The MLP's error at `keep` for allocation curves: a local search from the split that was best at the
        nearest keep already evaluated (moving one eighteenth between two projections), 5× cheaper than the
        full grid. The split actually built is always searched on the full grid (best_split)."""
        if keep >= 1.0:
            return 0.0
        key = (keep, fisher is not None)
        if key in self._splits:
            return self._splits[key].error
        if key not in self._curve:
            seed = (6, 6, 6)
            same_metric = [k for k in self._curve if k[1] == key[1]]
            if same_metric:
                seed = self._curve[min(same_metric, key=lambda k: abs(k[0] - keep))][0]
            candidates = {seed} | {_moved(seed, a, b) for a in range(3) for b in range(3) if a != b}
            best = None
            for shares in candidates:
                fractions = [3 * keep * share / SPLIT_PARTS for share in shares]
                if min(shares) < SPLIT_RANGE.start or max(shares) >= SPLIT_RANGE.stop or max(fractions) >= 1.0:
                    continue
                error, _ = self.error(*fractions, fisher)
                if best is None or error < best[1]:
                    best = (shares, error)
            if best is None:
                best = (seed, self.error(keep, keep, keep, fisher)[0])
            self._curve[key] = best
        return self._curve[key][1]

    def _search_split(self, keep: float, fisher: torch.Tensor | None) -> MLPChoice:
        best = None
        for shares in split_triples():
            fractions = [3 * keep * share / SPLIT_PARTS for share in shares]
            if max(fractions) >= 1.0:  # a projection at full keep would be a full-rank A·B: ~1.4× its dense FLOPs
                continue
            error, _ = self.error(*fractions, fisher)
            if best is None or error < best.error:
                best = MLPChoice(keep, *fractions, error)
        if best is None:  # no triple fits under 1 per projection: only near-dense budgets, split evenly
            error, _ = self.error(keep, keep, keep, fisher)
            best = MLPChoice(keep, keep, keep, keep, error)
        return best

    def forget_outputs_above(self, keep: float) -> None:
        """Drop the cached up/gate outputs of keep fractions above `keep` (45 MB each on a 7B MLP)."""
        for key in [key for key in self._outputs if key[1] > keep]:
            del self._outputs[key]

    def release(self) -> None:
        """Drop cached outputs (tens of MB per layer) once the layer's choices are made."""
        self._outputs.clear()

