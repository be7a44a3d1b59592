"""Hybrid (beyond the paper): one model-wide FLOP budget allocated per module over adapter types.

Every layer's stacked QKV may stay dense, take RaNA's rank adapter, TEAL's input mask or a static SVD; every
layer's MLP may stay dense, take RaNA's MLP (split searched), CATS, TEAL (gate/up input and down input masks, split
searched) or a static SVD; each at its own keep fraction. The per-module
curves (rana_core.curves, cached on disk) give each candidate's error and its FLOPs measured on calibration rows
held out from those that set its thresholds; the allocation picks one point per module minimising the summed
error with the summed FLOPs within (1 − p) of the dense QKV + MLP FLOPs.

Allocations are "<solver>-<weight>":
- solver ``exact``: a multiple-choice knapsack by dynamic programming (rana_core.allocation.knapsack_allocation);
  ``greedy``: least error per FLOP saved along each module's lower convex hull (hull_greedy_allocation).
- weight ``loss``: each point's Fisher-weighted output error (rana_core.sensitivity) times one scale per module
  type, measured by adapting every QKV (then every MLP) at PROBE_KEEP and comparing the real loss increase on a
  calibration slice with the estimate (as rana's greedy does); ``output``: the relative output error ‖Δ‖²/‖y‖².
The default is ``exact-loss``. Measured on SmolLM2-135M on training-split text that neither built the curves nor
set the thresholds (bench/hybrid_weights.py; dense 47.06), its perplexity at cuts 0.2/0.3/0.44/0.5 was
50.8/62.0/110.9/163.8 against ``exact-output``'s 62.4/98.9/160.7/204.4: a relative error prices every module's
output as equally important, so it cuts modules whose output energy sits in a few directions (layer 11's MLP to
a 20% static SVD) and QKV everywhere.

Whichever weight, the summed estimate cannot see how errors compound, and the exchange rate between a QKV (or a
CATS) error and a RaNA MLP error is its least sure number: so the allocation under the measured scales competes
with those rates halved and doubled on real calibration loss (``HybridState.check_losses``), and the least loss is
kept (on the same validation text: 163.8 against 190.0 without the check at 0.5, 110.9 against 114.7 at 0.44).
The same check also judges each single-adapter allocation hybrid contains (``SINGLE_ADAPTER``: only TEAL, only
RaNA, CATS on every MLP), chosen by the same solver at the same budget, and the TEAL methods' own allocations
(every input keeping 1 − p: ``HybridState.teal_everywhere``; TEAL's greedy within each layer:
``HybridState.teal_greedy``), so that on calibration loss hybrid never ends behind a peer it contains. They
matter: on SmolLM2-135M uniform TEAL read held-out text at 41.67 and 43.27 at cuts 0.2 and 0.3, where hybrid
without it read 41.93 and 43.30; on Gemma-3-270M at 0.3 TEAL's greedy read 42.11, hybrid without it 42.40.
"""

from __future__ import annotations

from itertools import groupby
from types import SimpleNamespace

import torch

from rana_core import layer_profiles
from rana_core.adapters.base import inject, layer_members, unload
from rana_core.adapters.input_sparse import InputMaskedUnit
from rana_core.adapters.low_rank import LowRankUnit, RankMaskedUnit, RankPlan
from rana_core.adapters.mlp import CatsMLP, NeuronMaskedUnit, RaNAMLP
from rana_core.allocation import Option, hull_greedy_allocation, knapsack_allocation
from rana_core.architecture import MODULES, layer_mlp, mlp_parts
from rana_core.calibration import capture_module_inputs
from rana_core.corpus import windows_digest
from rana_core.curves import (CurveCache, Point, dense_point, halves, mlp_curves, mlp_dense_flops, mlp_svd_bases,
                              qkv_curves, teal_params)
from rana_core.decompose import OutputBasis, low_rank_factors, output_basis
from rana_core.errors import BudgetError
from rana_core.flops import linear_flops
from rana_core.methods import teal
from rana_core.methods.calibration_check import calibration_slices, least_loss
from rana_core.residency import resting_device

ROWS = 2048  # calibration rows kept per module input: half fit the thresholds, half check error and FLOPs
KEEP_ROOM = 1.25  # what a resident model's kept inputs and bases hold, times this: room for a layer's working copies
SENSITIVITY_TOKENS = 2048  # calibration tokens whose loss gradients weight the modules, and that probe the scales
PROBE_KEEP = 0.7
KNAPSACK_UNITS = 20000  # budget steps of the exact solver: rounding loses at most 60/20000 of the budget here
QKV_ADAPTERS = ("rank", "teal", "svd")
MLP_ADAPTERS = ("rana", "cats", "teal", "svd")
CHECK_TOKENS = 2048  # calibration tokens (the last windows, apart from the sensitivity slice) that judge candidates
CHECK_FACTORS = (0.5, 2.0)  # how far the QKV and the CATS errors are re-weighted, one at a time, in the check
# The single-adapter allocations the check also judges: the adapters each module type may take ("dense" always).
SINGLE_ADAPTER = {"only teal": {"qkv": {"teal"}, "mlp": {"teal"}},
                  "only rana": {"qkv": {"rank"}, "mlp": {"rana"}},
                  "cats mlps": {"qkv": set(), "mlp": {"cats"}}}


def build(loaded, calib_windows, config, progress, cache_dir=None):
    if config.flop_reduction == 0:
        return []
    solver, _, weight = config.allocation.partition("-")
    state = HybridState(loaded, calib_windows, progress, cache_dir)
    curves = state.curves()
    scales = state.scales(curves) if weight == "loss" else {"qkv": 1.0, "mlp": 1.0}
    dense = state.dense_flops()
    candidates = {"as measured": scales}
    for factor in CHECK_FACTORS:
        candidates[f"qkv x{factor:g}"] = {**scales, "qkv": scales["qkv"] * factor}
        candidates[f"cats x{factor:g}"] = {**scales, "cats": scales["mlp"] * factor}
    allocations: dict[str, dict] = {}

    def add(name, chosen):
        if all(chosen != other for other in allocations.values()):  # identical allocations are judged once
            allocations[name] = chosen

    for name, candidate in candidates.items():
        add(name, allocate(curves, dense, weight, candidate, config.flop_reduction, solver))
    for name, adapters in SINGLE_ADAPTER.items():
        try:
            add(name, allocate(only(curves, adapters), dense, weight, scales, config.flop_reduction, solver))
        except BudgetError:  # CATS alone cannot reach every budget
            continue
    add("teal everywhere", state.teal_everywhere(1.0 - config.flop_reduction))
    add("teal greedy", state.teal_greedy(config.flop_reduction))
    losses = state.check_losses(allocations) if len(allocations) > 1 else {"as measured": float("nan")}
    kept = min(losses, key=lambda n: (losses[n], n != "as measured"))
    chosen = allocations[kept]
    progress(0.95, "hybrid allocation: " + summary(chosen) + "; calibration loss " +
             ", ".join(f"{n} {v:.4f}" for n, v in losses.items()) + f"; kept {kept}")
    adapters = state.build_allocation(chosen, "the chosen allocation", 0.95)
    progress(1.0, f"built {len(adapters)} adapters")
    return adapters


def summary(chosen: dict) -> str:
    """How many modules took each adapter, e.g. "qkv: dense 20, rank 10; mlp: cats 4, rana 26"."""
    parts = []
    for module in ("qkv", "mlp"):
        counts: dict[str, int] = {}
        for (_, m), point in chosen.items():
            if m == module:
                counts[point.adapter] = counts.get(point.adapter, 0) + 1
        parts.append(f"{module}: " + ", ".join(f"{a} {n}" for a, n in sorted(counts.items())))
    return "; ".join(parts)


def only(curves: dict, adapters: dict[str, set]) -> dict:
    """The curves restricted to some adapters per module type (dense stays a choice)."""
    return {key: {a: c for a, c in by_adapter.items() if a in adapters[key[1]]} for key, by_adapter in curves.items()}


def allocate(curves: dict, dense_flops: dict, weight: str, scales: dict, flop_reduction: float,
             solver: str) -> dict[tuple, Point]:
    """One point per module (dense included) minimising the summed (scaled) error within the budget."""
    points, options = {}, {}
    for key, by_adapter in curves.items():
        points[key] = [dense_point(dense_flops[key])] + [
            p for adapter in by_adapter.values() for p in adapter[weight] if p.flops < dense_flops[key]]
        options[key] = [Option(n, p.flops, scales.get(p.adapter, scales[key[1]]) * p.error)
                        for n, p in enumerate(points[key])]
    budget = (1.0 - flop_reduction) * sum(dense_flops.values())
    try:
        if solver == "exact":
            picked = knapsack_allocation(options, budget, units=KNAPSACK_UNITS)
        else:
            picked = hull_greedy_allocation(options, budget)
    except ValueError:
        raise BudgetError(f"the hybrid candidates cannot remove {flop_reduction:.0%} of the QKV+MLP FLOPs") from None
    return {key: points[key][option.choice] for key, option in picked.items()}


def kept_bytes(layers) -> int:
    """What HybridState keeps for all `layers` at most: each layer's attention and MLP inputs (a float64 gram and
    ROWS float32 rows each) and the float64 output bases of its QKV, gate and up (out × min(out, in) each; the loss
    probes build them for every layer). Llama-2-7B's shape: 10.7 GB of inputs and 36 GB of bases."""
    total = 0
    for layer in layers:
        qkv = layer_members(layer, "qkv")
        gate, up, _, _ = mlp_parts(layer_mlp(layer))
        hidden = qkv[0].in_features
        total += 2 * (hidden * hidden * 8 + ROWS * hidden * 4)
        outputs = ((sum(m.out_features for m in qkv), hidden), (gate.out_features, gate.in_features),
                   (up.out_features, up.in_features))
        total += sum(out * min(out, inputs) * 8 for out, inputs in outputs)
    return total


class HybridState:
    """What building a hybrid model needs from the calibration data, computed lazily: module inputs (grams and
    rows), Fisher diagonals, curves (from the disk cache when present) and the output bases of chosen modules.
    Kept on the loaded model per calibration digest, so a sweep over budgets captures once."""

    def __init__(self, loaded, calib_windows, progress, cache_dir=None):
        from rana_core.provenance import model_hash

        self.loaded, self.windows, self.progress = loaded, calib_windows, progress
        self.digest = windows_digest(calib_windows)
        self.sensitivity, self.check = calibration_slices(calib_windows, SENSITIVITY_TOKENS, CHECK_TOKENS)
        self.cache = CurveCache(model_hash(loaded), f"{self.digest}-r{ROWS}-s{SENSITIVITY_TOKENS}", cache_dir)
        self.memory = loaded.cached(("hybrid", self.digest), dict)  # inputs, fisher, bases, curves
        # With the layers resting on the CPU (a model larger than the GPU allows), what is kept for all layers
        # (inputs, bases) is parked in CPU memory too, and each layer's share visits the device when it is used.
        # A resident model parks them too where every layer's would not fit beside it (a 7B model keeps ~47 GB).
        self.device = loaded.device
        self.park = torch.device("cpu") if resting_device(loaded.model) is not None else None
        if self.park is None and not layer_profiles.fits(KEEP_ROOM * kept_bytes(loaded.layers), self.device):
            self.park = torch.device("cpu")
            progress(0.0, "inputs and bases kept in CPU memory: every layer's would not fit on the GPU")

    def inputs(self) -> dict:
        if "inputs" not in self.memory:
            stride = max(1, self.windows.numel() // ROWS)
            self.memory["inputs"] = capture_module_inputs(
                self.loaded, self.windows, lambda f, m: self.progress(0.1 * f, f"calibration {m}"),
                row_stride=stride, inputs=("attention", "mlp"), keep_on=self.park)
        return self.memory["inputs"]

    def layer_inputs(self, index: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(gram, rows) of one layer's input, on the run's device."""
        stats = self.inputs()[(index, name)]
        return stats.gram.to(self.device), stats.rows.to(self.device)

    def fisher(self) -> dict:
        if "fisher" not in self.memory:
            from rana_core.sensitivity import fisher_diagonals

            self.progress(0.1, "loss gradients")
            self.memory["fisher"] = fisher_diagonals(self.loaded.model, self.loaded.layers, self.sensitivity)
        return self.memory["fisher"]

    def dense_flops(self) -> dict:
        flops = {}
        for index, layer in enumerate(self.loaded.layers):
            qkv = layer_members(layer, "qkv")
            flops[(index, "qkv")] = float(linear_flops(sum(m.out_features for m in qkv), qkv[0].in_features))
            flops[(index, "mlp")] = mlp_dense_flops(layer_mlp(layer))
        return flops

    def curves(self) -> dict:
        if "curves" in self.memory:
            return self.memory["curves"]
        layers = self.loaded.layers
        curves = {}
        for index, layer in enumerate(layers):
            def qkv(adapter, index=index, layer=layer):
                weight = torch.cat([m.weight for m in layer_members(layer, "qkv")])
                return qkv_curves(weight, *self.layer_inputs(index, "attention"), self.fisher()[(index, "qkv")],
                                  adapter)

            def mlp(adapter, index=index, layer=layer):
                return mlp_curves(layer_mlp(layer), *self.layer_inputs(index, "mlp"), self.fisher()[(index, "mlp")],
                                  adapter)

            curves[(index, "qkv")] = {a: self.cache.get((index, "qkv"), a, lambda a=a: qkv(a)) for a in QKV_ADAPTERS}
            curves[(index, "mlp")] = {a: self.cache.get((index, "mlp"), a, lambda a=a: mlp(a)) for a in MLP_ADAPTERS}
            self.progress(0.1 + 0.6 * (index + 1) / len(layers), f"curves of layer {index + 1}/{len(layers)}")
        self.memory["curves"] = curves
        return curves

    def scales(self, curves: dict) -> dict:
        """Loss increase per unit of Fisher-weighted error, per module type, measured once on the sensitivity
        slice: every QKV (then every MLP) adapted with RaNA at PROBE_KEEP, the real loss increase over the
        estimate (half the summed Fisher errors). The Fisher estimate misses how errors compound across layers
        and through attention's softmax, by different factors for QKV and MLPs."""
        return self.cache.value("scales", lambda: self._probe_scales(curves))

    def _probe_scales(self, curves: dict) -> dict:
        from rana_core.evaluate import perplexity

        layers = self.loaded.layers
        base = perplexity(self.loaded.model, self.sensitivity).mean_nll
        scales = {}
        for module, adapter in (("qkv", "rank"), ("mlp", "rana")):
            self.progress(0.8, f"probing the loss of {module} adapters")
            points = {key: min(by[adapter]["loss"], key=lambda p: abs(p.keep - PROBE_KEEP))
                      for key, by in curves.items() if key[1] == module}
            inject(layers, self.build_allocation(points, f"{module} probe", 0.8))
            try:
                actual = perplexity(self.loaded.model, self.sensitivity).mean_nll - base
            finally:
                unload(layers)
            predicted = sum(point.error for point in points.values()) / 2
            scales[module] = max(actual, 1e-6) / max(predicted, 1e-12)
        return scales

    def teal_everywhere(self, keep: float) -> dict[tuple, Point]:
        """The ``teal`` method's allocation as hybrid points: every QKV and MLP input keeps `keep` (at equal
        FLOPs to hybrid's budget by construction: each module spends `keep` of its dense FLOPs)."""
        return self.teal_allocation(lambda index, layer, fits: {module: keep for module in MODULES})

    def teal_greedy(self, flop_reduction: float) -> dict[tuple, Point]:
        """``teal-greedy``'s allocation as hybrid points: within each layer, TEAL's greedy spreads the layer's
        share of the budget over q/k/v, gate, up and down by their relative output errors on the dense model's
        inputs (rana_core.methods.teal.layer_keeps), here on hybrid's fit rows."""
        def keeps(index, layer, fits):
            gate, up, _, act = mlp_parts(layer_mlp(layer))
            x = fits["mlp"]
            h = act(x @ gate.weight.detach().to(x.device).float().T) * (x @ up.weight.detach().to(x.device).float().T)
            rows = {"attention": fits["attention"], "mlp": x, "down": h}
            stats = {name: SimpleNamespace(rows=value) for name, value in rows.items()}
            return {module: keep for (_, module), keep in
                    teal.layer_keeps(layer, index, stats, flop_reduction, weighted=False).items()}

        return self.teal_allocation(keeps)

    def teal_allocation(self, keeps_of) -> dict[tuple, Point]:
        """TEAL's masks on every QKV and MLP at the keeps per linear that ``keeps_of(index, layer, fit rows)``
        gives, thresholds on the fit rows, as hybrid points (a module keeping everything stays dense)."""
        chosen, dense = {}, self.dense_flops()
        for index, layer in enumerate(self.loaded.layers):
            fits = {name: halves(self.layer_inputs(index, name)[1])[0].float() for name in ("attention", "mlp")}
            keeps = keeps_of(index, layer, fits)
            gate, up, _, act = mlp_parts(layer_mlp(layer))
            for module, share in (("qkv", keeps["qkv"]), ("mlp", (keeps["gate"] + keeps["up"] + keeps["down"]) / 3)):
                if share >= 1.0:
                    chosen[(index, module)] = dense_point(dense[(index, module)])
                    continue
                params = teal_params(module, [gate.weight, up.weight], act,
                                     fits["attention" if module == "qkv" else "mlp"], keeps)
                chosen[(index, module)] = Point("teal", share, share * dense[(index, module)], float("nan"), params)
        return chosen

    def check_losses(self, allocations: dict[str, dict]) -> dict[str, float]:
        """Mean next-token loss of each candidate allocation on the last CHECK_TOKENS of the calibration windows
        (thresholds as planned on the fit rows). The loss model is a sum of per-module estimates: it cannot see
        how errors compound, and how much a QKV or a CATS error costs next to a RaNA MLP error is its least sure
        number, so a few re-weightings of those compete on real calibration loss."""
        return least_loss(self.loaded, {name: lambda chosen=chosen, name=name: self.build_allocation(
            chosen, f"the {name} allocation", 0.85) for name, chosen in allocations.items()}, self.check,
            lambda f, m: self.progress(0.85 + 0.1 * f, m))[1]

    def build_allocation(self, chosen: dict, what: str, fraction: float) -> list:
        """The adapters of one point per module, built layer after layer, saying which layer (a 7B model's
        layers each take a visit of their bases to the device)."""
        units, layers, dense = [], len(self.loaded.layers), self.dense_flops()
        for index, modules in groupby(sorted(chosen.items()), key=lambda item: item[0][0]):
            for key, point in modules:
                for unit in self.build_point(key, point):
                    for meter in unit.meters():  # stored per layer row, so the inspector shows what was chosen
                        meter.planned_keep = point.flops / dense[key]
                    units.append(unit)
            self.progress(fraction, f"building {what}: layer {index + 1}/{layers}")
        return units

    def basis(self, index: int, name: str, weight: torch.Tensor, input_name: str) -> OutputBasis:
        """The output basis of `weight` on the layer's `input_name` gram, kept (parked) for later builds and
        handed out on the run's device."""
        key = ("basis", index, name)
        if key not in self.memory:
            self.memory[key] = self._parked(output_basis(weight, self.layer_inputs(index, input_name)[0]))
        return self._on_device(self.memory[key])

    def _parked(self, basis: OutputBasis) -> OutputBasis:
        return basis if self.park is None else OutputBasis(basis.U.to(self.park), basis.energy.to(self.park))

    def _on_device(self, basis: OutputBasis) -> OutputBasis:
        return OutputBasis(basis.U.to(self.device), basis.energy.to(self.device))

    def build_point(self, key: tuple, point: Point) -> list:
        """The adapter(s) of one module at one curve point; thresholds start at the fit rows' values and the
        targets at the spending measured on the check rows (the pipeline then corrects thresholds to it)."""
        index, module = key
        layer = self.loaded.layers[index]
        if point.adapter == "dense":
            return []
        if point.adapter == "teal":
            return _teal_units(layer, index, module, point.params)
        if module == "qkv":
            members = layer_members(layer, "qkv")
            weight = torch.cat([m.weight for m in members])
            basis = self.basis(index, "qkv", weight, "attention")
            if point.adapter == "rank":
                return [_rank_unit(members, index, "qkv", weight, basis, point.params)]
            return [LowRankUnit(members, index, "qkv", *low_rank_factors(weight, basis, point.params["rank"]))]
        mlp = layer_mlp(layer)
        gate, _, down_proj, _ = mlp_parts(mlp)
        if point.adapter == "rana":
            units = {}
            for which in ("up", "gate"):
                members = layer_members(layer, which)
                basis = self.basis(index, which, members[0].weight, "mlp")
                units[which] = _rank_unit(members, index, which, members[0].weight, basis, point.params[which])
            down = point.params["down"]
            inner = down_proj.in_features
            neuron = NeuronMaskedUnit(down_proj, index, down["active"] / inner, down["tau"])
            return [RaNAMLP(mlp, index, units["up"], units["gate"], neuron)]
        if point.adapter == "cats":
            cats = CatsMLP(mlp, index, point.params["active"] / gate.out_features, point.params["tau"])
            return [cats]
        if ("svd bases", index) not in self.memory:
            gram, rows = self.layer_inputs(index, "mlp")
            self.memory[("svd bases", index)] = {
                which: self._parked(basis) for which, basis in mlp_svd_bases(mlp, gram, halves(rows)[0]).items()}
        bases = {which: self._on_device(basis) for which, basis in self.memory[("svd bases", index)].items()}
        units = []
        for which in ("gate", "up", "down"):
            members = layer_members(layer, which)
            A, B = low_rank_factors(members[0].weight, bases[which], point.params["ranks"][which])
            units.append(LowRankUnit(members, index, which, A, B))
        return units


def _teal_units(layer, index: int, module: str, params: dict) -> list:
    """TEAL's input masks at a point: one on the stacked QKV's input, or on the MLP one each for gate and up (a
    curve point gives both one threshold, "gate_up", on their shared input) and one for down's input. A linear
    that keeps all its inputs gets none."""
    if module == "qkv":
        parts = {"qkv": params}
    else:
        parts = {"gate": params.get("gate", params.get("gate_up")), "up": params.get("up", params.get("gate_up")),
                 "down": params["down"]}
    units = []
    for which, part in parts.items():
        members = layer_members(layer, which)
        keep = part["active"] / members[0].in_features
        if keep < 1.0:
            units.append(InputMaskedUnit(members, index, which, keep, part["tau"]))
    return units


def _rank_unit(members, index, module, weight, basis, params: dict) -> RankMaskedUnit:
    A, B = low_rank_factors(weight, basis, params["rank"])
    plan = RankPlan(params["keep"], params["rank"], params["active"], params["tau"], params["coverage"])
    return RankMaskedUnit(members, index, module, A, B, plan)
