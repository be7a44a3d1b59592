"""Per-module error curves for the hybrid allocation: for each adaptable module (a layer's stacked QKV,
a layer's MLP) and each candidate adapter, the error and the FLOPs at a grid of keep fractions.

Candidates: QKV: ``rank`` (RaNA's rank adapter), ``teal`` (a mask on its input) and ``svd`` (static low rank);
MLP: ``rana`` (rank adapters on up/gate, neuron adapter on down, the up/gate/down split searched per keep),
``cats`` (gate dense, neurons masked on |act(gate)|), ``teal`` (masks on gate/up's input and on down's, the split
searched per keep) and ``svd`` (static low rank on all three). ``dense`` is always a candidate, with no error.

Every point is measured on *check* rows that are held out from the *fit* rows that set its thresholds (the two
halves of the calibration rows): a threshold set on some tokens keeps too few ranks on others, so the
FLOPs a point really spends are those measured on the check rows, and its error is measured there too. The
adapter that the allocation builds asks for exactly that measured spending (its ``target_active``), which the
pipeline's threshold correction then holds on the adapted model.

Two error weights per point: ``output``, the relative output error ‖Δ‖²/‖y‖², and ``loss``, the mean
Fisher-weighted squared error per token (rana_core.sensitivity: about twice the loss increase it causes).

Curves are cached on disk per (model weights, calibration windows, module, adapter) under a folder the caller
passes in (``CurveCache``; the worker and the CLI pass ``$RANA_DATA_DIR/curves``), so a sweep over budgets computes
them once. Without a folder they live as long as the cache object.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rana_core.architecture import mlp_parts
from rana_core.decompose import output_basis, rank_for_budget
from rana_core.flops import linear_flops, low_rank_flops
from rana_core.residency import visiting
from rana_core.selection import share_threshold
from rana_core.profiles import GRID, SPLIT_PARTS, SPLIT_RANGE, ProjectionFactors, _moved, _round

CURVES_VERSION = 2  # bump when what a point means changes: old cache entries then miss
WEIGHTS = ("loss", "output")
KEEPS = [round(0.95 - 0.05 * i, 2) for i in range(16)]  # 0.95 .. 0.2 of a module's dense FLOPs
CATS_NEURONS = [round(0.95 - 0.05 * i, 2) for i in range(19)]  # share of neurons kept, 0.95 .. 0.05
SVD_KEEPS = [round(0.9 - 0.1 * i, 1) for i in range(8)]  # 0.9 .. 0.2: static SVD is never close, a coarse grid


@dataclass(frozen=True)
class Point:
    adapter: str  # dense | rank | teal | svd (QKV); dense | rana | cats | teal | svd (MLP)
    keep: float  # the share of dense FLOPs the point was planned for
    flops: float  # FLOPs per token measured on the check rows
    error: float  # under the curve's weight, on the check rows
    params: dict  # what building it needs besides the model and the bases (rana_core.methods.hybrid)


def dense_point(flops: float) -> Point:
    return Point("dense", 1.0, float(flops), 0.0, {})


class CurveCache:
    """One JSON file per (model, calibration data, module, adapter) under `root`; `computed` counts the misses.
    With no `root` nothing is written and values are kept in memory."""

    def __init__(self, model_id: str, data_id: str, root: Path | None = None):
        self.folder = Path(root) / f"v{CURVES_VERSION}" / model_id[:16] / data_id if root is not None else None
        self.memory: dict[str, object] = {}
        self.computed = 0

    def get(self, module: tuple, adapter: str, compute) -> dict[str, list[Point]]:
        """The curves of `module` (layer, "qkv" | "mlp") for `adapter`, computed by `compute` on a miss."""
        stored = self.value(f"{module[0]}-{module[1]}-{adapter}",
                            lambda: {w: [asdict(p) for p in points] for w, points in compute().items()})
        return {w: [Point(**p) for p in points] for w, points in stored.items()}

    def value(self, name: str, compute):
        """Any JSON value stored under `name` for this model and data."""
        if self.folder is None:
            if name not in self.memory:
                self.memory[name] = json.loads(json.dumps(compute()))  # the same values a file would give back
                self.computed += 1
            return self.memory[name]
        path = self.folder / f"{name}.json"
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except ValueError:  # a torn or foreign file is recomputed, not trusted
                pass
        value = compute()
        self.computed += 1
        path.parent.mkdir(parents=True, exist_ok=True)
        # A temporary file of this writer's own: workers on several GPUs share the folder and may compute the same
        # curve at once (one shared ".partial" name let one worker move the other's file away mid-write).
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f"{name}.", suffix=".partial",
                                         delete=False) as partial:
            partial.write(json.dumps(value))
        Path(partial.name).replace(path)  # atomic: readers see the old file or the whole new one
        return value


def halves(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, check): the first and second half of the calibration rows (different windows, not neighbours)."""
    half = rows.shape[0] // 2
    return rows[:half], rows[half:]


def _errors(diff: torch.Tensor, dense_energy: float, fisher: torch.Tensor) -> dict[str, float]:
    squares = diff.square()
    return {"output": squares.sum().item() / dense_energy, "loss": (squares @ fisher).mean().item()}


class _RankProjection:
    """A rank adapter's plans from the fit rows, its masked outputs on fit and check rows, and its spending on
    the check rows; cached per keep fraction rounded to profiles.GRID."""

    def __init__(self, weight: torch.Tensor, gram: torch.Tensor, fit: torch.Tensor, check: torch.Tensor):
        self.factors = ProjectionFactors.build(weight, gram, fit)
        self.fit, self.check = fit, check
        self.check_z = check @ self.factors.B_full.T
        self._at: dict[float, tuple] = {}

    def at(self, keep: float):
        """(plan, output on fit rows, output on check rows, mean active ranks on check rows)."""
        keep = _round(keep)
        if keep not in self._at:
            if keep >= 1.0:
                raise ValueError("a rank adapter at full keep costs more than the dense product")
            f = self.factors
            plan = f.plan(keep)
            z = self.check_z[:, : plan.rank]
            mask = z.square() >= plan.tau
            check_out = (z * mask) @ f.basis.U[:, : plan.rank].T.float()
            active = mask.sum(1).float().mean().item()
            self._at[keep] = (plan, f.adapted_output(self.fit, plan), check_out, active)
        return self._at[keep]

    def forget_above(self, keep: float) -> None:
        """Drop the outputs kept for keeps above `keep` (the curves walk keeps downwards; a 7B MLP's outputs are
        ~90 MB per keep on the device). A dropped keep asked again is computed again, to the same values."""
        for key in [k for k in self._at if k > keep]:
            del self._at[key]

    def flops(self, plan, active: float) -> float:
        m, n = self.factors.shape
        return 2.0 * (n * plan.rank + m * active)  # B for every token, A's active columns

    def params(self, keep: float) -> dict:
        plan, _, _, active = self.at(keep)
        return {"keep": plan.keep, "rank": plan.rank, "active": active, "tau": plan.tau, "coverage": plan.coverage}


@torch.no_grad()
def qkv_curves(weight: torch.Tensor, gram: torch.Tensor, rows: torch.Tensor, fisher: torch.Tensor,
               adapter: str) -> dict[str, list[Point]]:
    """The stacked QKV's points for `adapter` ("rank", "svd" or "teal"), per weight."""
    fit, check = halves(rows.to(gram.device))
    if adapter == "teal":
        return _teal_qkv_curves(weight.detach().to(gram.device).float(), fit, check, fisher.to(gram.device))
    proj = _RankProjection(weight, gram, fit, check)
    fisher = fisher.to(gram.device)
    dense = check @ proj.factors.weight.T
    dense_energy = dense.square().sum().item()
    m, n = proj.factors.shape
    curves = {w: [] for w in WEIGHTS}
    if adapter == "rank":
        for keep in KEEPS:
            plan, _, out, active = proj.at(keep)
            errors = _errors(out - dense, dense_energy, fisher)
            for w in WEIGHTS:
                curves[w].append(Point("rank", keep, proj.flops(plan, active), errors[w], proj.params(keep)))
    elif adapter == "svd":
        U = proj.factors.basis.U.float()
        for keep in SVD_KEEPS:
            rank = rank_for_budget(m, n, 1.0 - keep)
            out = proj.check_z[:, :rank] @ U[:, :rank].T
            errors = _errors(out - dense, dense_energy, fisher)
            for w in WEIGHTS:
                curves[w].append(Point("svd", keep, float(low_rank_flops(m, n, rank)), errors[w], {"rank": rank}))
    else:
        raise ValueError(f"no QKV adapter {adapter!r}")
    return curves


def mlp_dense_flops(mlp) -> float:
    return float(sum(linear_flops(*p.weight.shape) for p in mlp_parts(mlp)[:3]))


@torch.no_grad()
def mlp_curves(mlp, gram: torch.Tensor, rows: torch.Tensor, fisher: torch.Tensor,
               adapter: str) -> dict[str, list[Point]]:
    """The MLP's points for `adapter` ("rana", "cats" or "svd"), per weight."""
    _, _, down_proj, act = mlp_parts(mlp)
    weight = down_proj.weight
    device = gram.device  # the curves are measured where calibration ran
    fit, check = (r.to(device=device, dtype=torch.float32) for r in halves(rows))
    with visiting(mlp, device):  # the MLP's layer may rest on the CPU
        dense = mlp(check.to(dtype=weight.dtype)).float()
    dense_energy = dense.square().sum().item()
    down = weight.detach().to(device).float()
    fisher = fisher.to(device)
    if adapter == "rana":
        return _rana_curves(mlp, gram, fit, check, dense, dense_energy, down, act, fisher)
    if adapter == "cats":
        return _cats_curves(mlp, fit, check, dense, dense_energy, down, act, fisher)
    if adapter == "svd":
        return _svd_curves(mlp, gram, fit, check, dense, dense_energy, down, act, fisher)
    if adapter == "teal":
        return _teal_mlp_curves(mlp, fit, check, dense, dense_energy, down, act, fisher)
    raise ValueError(f"no MLP adapter {adapter!r}")


def _rana_curves(mlp, gram, fit, check, dense, dense_energy, down, act, fisher):
    """RaNA's MLP at every keep: the split is searched locally (one eighteenth moved between two projections)
    around the best split of the previous keep, separately for each weight (the paper's full grid is 3× the
    work for the same optimum in our measurements of profiles.MLPProfile.curve_error)."""
    gate_proj, up_proj, _, _ = mlp_parts(mlp)
    up = _RankProjection(up_proj.weight, gram, fit, check)
    gate = _RankProjection(gate_proj.weight, gram, fit, check)
    column_norms = down.norm(dim=0)
    hidden, inner = down.shape
    curves = {w: [] for w in WEIGHTS}
    seeds = {w: (6, 6, 6) for w in WEIGHTS}
    for keep in KEEPS:
        for projection in (up, gate):  # a projection's share is at most 9/18 of three times the keep
            projection.forget_above(1.5 * keep + GRID)
        candidates = set()
        for seed in seeds.values():
            candidates |= {seed} | {_moved(seed, a, b) for a in range(3) for b in range(3) if a != b}
        best: dict[str, tuple] = {}
        for shares in sorted(candidates):
            fractions = [3 * keep * share / SPLIT_PARTS for share in shares]
            if min(shares) < SPLIT_RANGE.start or max(shares) >= SPLIT_RANGE.stop or max(fractions) > 1.0:
                continue
            if max(_round(fractions[0]), _round(fractions[1])) >= 1.0:
                continue  # a rank adapter at full keep is a full-rank A·B: 1.4× the dense product, never a saving
            (u_plan, u_fit, u_check, u_active) = up.at(fractions[0])
            (g_plan, g_fit, g_check, g_active) = gate.at(fractions[1])
            h_fit, h_check = act(g_fit) * u_fit, act(g_check) * u_check
            tau = share_threshold(h_fit.abs() * column_norms, fractions[2])
            mask = (h_check.abs() * column_norms) >= tau
            errors = _errors((h_check * mask) @ down.T - dense, dense_energy, fisher)
            down_active = mask.sum(1).float().mean().item()
            flops = up.flops(u_plan, u_active) + gate.flops(g_plan, g_active) + 2.0 * hidden * down_active
            for w in WEIGHTS:
                if w not in best or errors[w] < best[w][1]:
                    best[w] = (shares, errors[w], flops, fractions, tau, down_active)
        for w, (shares, error, flops, fractions, tau, down_active) in best.items():
            seeds[w] = shares
            params = {"up": up.params(fractions[0]), "gate": gate.params(fractions[1]),
                      "down": {"keep": fractions[2], "active": down_active, "tau": tau}}
            curves[w].append(Point("rana", keep, flops, error, params))
    return curves


def _cats_curves(mlp, fit, check, dense, dense_energy, down, act, fisher):
    """CATS at each share of neurons: the gate runs dense, a neuron is kept where |act(gate x)| clears a
    threshold set on the fit rows, and only kept neurons' rows of up and columns of down are computed."""
    gate_w, up_w = (p.weight.detach().to(fit.device).float() for p in mlp_parts(mlp)[:2])
    g_fit = act(fit @ gate_w.T)
    g_check = act(check @ gate_w.T)
    u_check = check @ up_w.T
    hidden, inner = down.shape
    curves = {w: [] for w in WEIGHTS}
    for share in CATS_NEURONS:
        tau = share_threshold(g_fit.abs(), share)
        mask = g_check.abs() >= tau
        active = mask.sum(1).float().mean().item()
        errors = _errors((g_check * u_check * mask) @ down.T - dense, dense_energy, fisher)
        flops = 2.0 * hidden * inner + 4.0 * hidden * active
        keep = round((1 + 2 * share) / 3, 4)
        for w in WEIGHTS:
            curves[w].append(Point("cats", keep, flops, errors[w], {"active": active, "tau": tau}))
    return curves


def mlp_svd_bases(mlp, gram: torch.Tensor, fit: torch.Tensor) -> dict:
    """Data-aware output bases of gate and up (from the input gram) and of down (from the dense h of the fit
    rows): the same for the curve and for the adapter built from it."""
    gate, up, down, act = mlp_parts(mlp)
    fit = fit.to(gram.device)
    gate_w, up_w = (p.weight.detach().to(gram.device).float() for p in (gate, up))
    h_fit = act(fit @ gate_w.T) * (fit @ up_w.T)
    return {"gate": output_basis(gate_w, gram), "up": output_basis(up_w, gram),
            "down": output_basis(down.weight, h_fit.double().T @ h_fit.double())}


def _svd_curves(mlp, gram, fit, check, dense, dense_energy, down, act, fisher):
    """Static data-aware low rank on gate, up and down at the same keep."""
    bases = mlp_svd_bases(mlp, gram, fit)
    gate, up, _, _ = mlp_parts(mlp)
    weights = {"gate": gate.weight.detach().to(down.device).float(),
               "up": up.weight.detach().to(down.device).float(), "down": down}
    curves = {w: [] for w in WEIGHTS}
    for keep in SVD_KEEPS:
        ranks = {name: rank_for_budget(*weights[name].shape, 1.0 - keep) for name in bases}

        def low(name, x):
            U = bases[name].U[:, : ranks[name]].float()
            return (x @ (U.T @ weights[name]).T) @ U.T

        h = act(low("gate", check)) * low("up", check)
        errors = _errors(low("down", h) - dense, dense_energy, fisher)
        flops = float(sum(low_rank_flops(*weights[name].shape, ranks[name]) for name in bases))
        for w in WEIGHTS:
            curves[w].append(Point("svd", keep, flops, errors[w], {"ranks": ranks}))
    return curves


def _teal_qkv_curves(weight, fit, check, fisher):
    """TEAL on the stacked QKV's input: at each keep, the threshold on |x| that keeps that share of the fit rows'
    entries; its spending and error measured on the check rows."""
    dense = check @ weight.T
    dense_energy = dense.square().sum().item()
    curves = {w: [] for w in WEIGHTS}
    for keep in KEEPS:
        tau = share_threshold(fit.abs(), keep)
        mask = check.abs() >= tau
        active = mask.sum(1).float().mean().item()
        errors = _errors((check * mask) @ weight.T - dense, dense_energy, fisher)
        for w in WEIGHTS:
            curves[w].append(Point("teal", keep, 2.0 * weight.shape[0] * active, errors[w],
                                   {"active": active, "tau": tau}))
    return curves


def teal_params(module: str, weights: list[torch.Tensor], act, fit: torch.Tensor, keeps: dict) -> dict:
    """TEAL's point params at given keeps per linear (``keeps``: "qkv", or "gate", "up" and "down"), thresholds
    from the fit rows: q/k/v's and gate's and up's on their input, down's on the h that the masked gate and up
    give there. `weights`: none for the stacked QKV, the MLP's gate and up."""
    fit = fit.float()
    if module == "qkv":
        return {"active": keeps["qkv"] * fit.shape[1], "tau": share_threshold(fit.abs(), keeps["qkv"])}
    params, products = {}, {}
    for which, weight in zip(("gate", "up"), weights):
        tau = share_threshold(fit.abs(), keeps[which])
        params[which] = {"active": keeps[which] * fit.shape[1], "tau": tau}
        products[which] = (fit * (fit.abs() >= tau)) @ weight.detach().to(fit.device).float().T
    h = act(products["gate"]) * products["up"]
    params["down"] = {"active": keeps["down"] * h.shape[1], "tau": share_threshold(h.abs(), keeps["down"])}
    return params


TEAL_DOWN_SHIFTS = [round(0.05 * i, 2) for i in range(-4, 5)]  # down's keep − the MLP's keep, searched per keep


def _teal_mlp_curves(mlp, fit, check, dense, dense_energy, down, act, fisher):
    """TEAL on the MLP: gate and up share their input and its mask (keep a), down masks its input h (keep d),
    with (2a + d) / 3 the MLP's keep; d searched around it, the best split per weight. Thresholds from the fit
    rows (down's on the h the masked gate and up give there), spending and error on the check rows."""
    gate_w, up_w = (p.weight.detach().to(fit.device).float() for p in mlp_parts(mlp)[:2])
    hidden, inner = down.shape
    curves = {w: [] for w in WEIGHTS}
    # a = keep − shift/2 recurs across keeps: each a's masked gate/up products are computed once, for every
    # (keep, d) that uses it, and dropped before the next a
    splits: dict[float, list[tuple[float, float]]] = {}
    for keep in KEEPS:
        for shift in TEAL_DOWN_SHIFTS:
            d = round(keep + shift, 4)
            a = round((3 * keep - d) / 2, 4)
            if 0.0 < d <= 1.0 and 0.0 < a <= 1.0:
                splits.setdefault(a, []).append((keep, d))
    best: dict[tuple[float, str], tuple] = {}
    for a, uses in splits.items():
        tau_x = share_threshold(fit.abs(), a)
        kept = check.abs() >= tau_x
        x_fit, x_check = fit * (fit.abs() >= tau_x), check * kept
        h_fit = act(x_fit @ gate_w.T) * (x_fit @ up_w.T)
        h_check = act(x_check @ gate_w.T) * (x_check @ up_w.T)
        active_x = kept.sum(1).float().mean().item()
        for keep, d in uses:
            tau_h = share_threshold(h_fit.abs(), d)
            mask_h = h_check.abs() >= tau_h
            active_h = mask_h.sum(1).float().mean().item()
            errors = _errors((h_check * mask_h) @ down.T - dense, dense_energy, fisher)
            flops = 4.0 * inner * active_x + 2.0 * hidden * active_h
            params = {"gate_up": {"active": active_x, "tau": tau_x}, "down": {"active": active_h, "tau": tau_h}}
            for w in WEIGHTS:
                if (keep, w) not in best or errors[w] < best[(keep, w)][0]:
                    best[(keep, w)] = (errors[w], flops, params)
    for keep in KEEPS:
        for w in WEIGHTS:
            if (keep, w) in best:
                error, flops, params = best[(keep, w)]
                curves[w].append(Point("teal", keep, flops, error, params))
    return curves
