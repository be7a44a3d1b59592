"""RaNA: a rank adapter on each layer's stacked QKV, and on each MLP rank adapters for up and
gate with the neuron adapter on down, the MLP's budget split by the grid search on its output error.

Allocation:
- ``uniform`` (the paper): every adapted module gets the same FLOP reduction. Like the paper, QKV is adapted only
  when every query head has its own K/V head (Llama-2 in the paper); with grouped or multi-query attention
  (Gemma there; SmolLM2 and Gemma 3 here) only the MLPs are, and they carry the whole budget. Measured on
  SmolLM2-135M at a 0.3 cut (8k held-out tokens): perplexity 59.7 with QKV adapted, 54.0 without.
- ``greedy`` (beyond the paper): spreads the budget over modules by their loss-weighted error curves on
  calibration rows (rana_core.allocation), once over QKV and MLPs and once over MLPs alone, and keeps whichever
  of those two and the uniform allocation loses least language-model loss on a calibration slice. The loss
  model is a linear estimate and misjudges large cuts; the check on real loss keeps greedy from ever being
  worse than uniform on calibration data.
Thresholds are set here on calibration rows and corrected by the pipeline on the adapted model (see
pipeline.calibrate_thresholds).
"""

from __future__ import annotations

import torch

from rana_core.adapters.base import inject, layer_members, unload
from rana_core.adapters.low_rank import RankMaskedUnit
from rana_core.adapters.mlp import NeuronMaskedUnit, RaNAMLP
from rana_core.allocation import Curve, greedy_allocation
from rana_core.architecture import layer_mlp, mlp_parts, shape_of
from rana_core.corpus import windows_digest
from rana_core.errors import BudgetError
from rana_core.evaluate import perplexity
from rana_core.methods.calibration_check import calibration_slices, least_loss
from rana_core.layer_profiles import LayerProfiles, layer_dense_flops
from rana_core.profiles import MLPProfile, QKVProfile
from rana_core.progress import ProgressFn, no_progress
from rana_core.sensitivity import fisher_diagonals

SEARCH_TOKENS = 1024  # calibration rows kept per module input for plans and split searches
PROBE_KEEP = 0.7  # keep fraction at which each module type's loss estimate is checked against the real loss
SENSITIVITY_TOKENS = 2048  # calibration tokens whose loss gradients weight the modules for greedy allocation
VALIDATION_TOKENS = 2048  # calibration tokens (after the sensitivity slice) on which greedy's candidates compete
CURVE_KEEPS = [round(1.0 - 0.05 * i, 2) for i in range(17)]  # 1.0 .. 0.2


def build(loaded, calib_windows, config, progress, cache_dir=None):
    if config.flop_reduction == 0:
        return []
    key = ("rana profiles", windows_digest(calib_windows))
    adapt_qkv = not shape_of(loaded.config).grouped
    if config.allocation == "uniform" and key not in loaded.cache:
        # The first run on these windows builds its adapters as each layer's profiles are made: layer by layer,
        # that spares rebuilding every layer's profiles once more.
        keeps = uniform_keeps(loaded.layers, config.flop_reduction, adapt_qkv)
        adapters = []

        def build_layer(index: int, qkv: QKVProfile, mlp: MLPProfile, parks: bool) -> None:
            adapters.extend(_layer_adapters(loaded.layers[index], index, qkv, mlp, keeps[(index, "qkv")],
                                            keeps[(index, "mlp")], None))

        store = loaded.cached(key, lambda: LayerProfiles(loaded, calib_windows, progress, SEARCH_TOKENS,
                                                         on_layer=build_layer))
        store.release()
        progress(1.0, f"built {len(adapters)} adapters")
        return adapters
    if config.allocation == "greedy":
        slice_, validation = calibration_slices(calib_windows, SENSITIVITY_TOKENS, VALIDATION_TOKENS)
        loss = loaded.cached(("loss model", windows_digest(slice_)),
                             lambda: LossModel(loaded, slice_, lambda f, m: progress(0.1 * f, m)))
        # Where the profiles are parked (a resting model, or one whose profiles do not fit the GPU), a layer
        # visits the GPU once for its profiles, probes and curve points, and once for the adapters: each visit
        # rebuilds the layer's profiles (bases, factors), the bulk of the time.
        store = loaded.cached(key, lambda: LayerProfiles(
            loaded, calib_windows, lambda f, m: progress(0.1 + 0.8 * f, m), SEARCH_TOKENS,
            on_layer=lambda index, qkv, mlp, parks: loss.measure(index, qkv, mlp, curves=parks)))
        for index in range(len(store)):  # profiles made before, by another allocation: visit what is missing
            if not loss.measured(index, curves=store.parks):
                with store.layer(index) as (qkv, mlp):
                    loss.measure(index, qkv, mlp, curves=store.parks)
                progress(0.5, f"probes of layer {index + 1}/{len(store)}")
        loss.measure_scales(loaded, lambda f, m: progress(0.5, m))
        plans = {
            "greedy": lambda: allocate(store, config.flop_reduction, "greedy",
                                       lambda f, m: progress(0.5 + 0.1 * f, m), loss),
            "greedy over MLPs": lambda: allocate(store, config.flop_reduction, "greedy",
                                                 lambda f, m: progress(0.6, m), loss, adapt_qkv=False),
            "uniform": lambda: allocate(store, config.flop_reduction, "uniform", progress, adapt_qkv=adapt_qkv),
        }
        candidates = {}
        for name, plan in plans.items():
            try:
                candidates[name] = plan()
            except BudgetError:  # the MLPs alone cannot carry this budget
                continue
        # the uniform candidate is built exactly as the uniform method builds it (splits on plain output error),
        # so that choosing it gives the uniform model itself; all candidates are built in one visit per layer
        built = _model_adapters(store, {name: (keeps, None if name == "uniform" else loss.fisher)
                                        for name, keeps in candidates.items()}, lambda f, m: progress(0.65, m))
        chosen, _ = least_loss(loaded, {name: lambda name=name: built[name] for name in candidates}, validation,
                               lambda f, m: progress(0.65 + 0.25 * f, m))
        adapters = built[chosen]
    else:
        store = loaded.cached(key, lambda: LayerProfiles(loaded, calib_windows, progress, SEARCH_TOKENS))
        keeps = allocate(store, config.flop_reduction, config.allocation, progress, adapt_qkv=adapt_qkv)
        adapters = _model_adapters(store, {"built": (keeps, None)}, lambda f, m: progress(0.5 + 0.5 * f, m))["built"]
    store.release()
    progress(1.0, f"built {len(adapters)} adapters")
    return adapters


def _model_adapters(store: LayerProfiles, allocations: dict[str, tuple[dict, dict | None]],
                    progress: ProgressFn = no_progress) -> dict[str, list]:
    """The adapters of each named allocation (keeps, and the Fisher diagonals its MLP splits minimise or None),
    every allocation built from one visit of each layer's profiles."""
    adapters = {name: [] for name in allocations}
    for index, layer in enumerate(store.layers):
        with store.layer(index) as (qkv, mlp):
            for name, (keeps, fisher) in allocations.items():
                adapters[name] += _layer_adapters(layer, index, qkv, mlp, keeps[(index, "qkv")],
                                                  keeps[(index, "mlp")], fisher[(index, "mlp")] if fisher else None)
        progress((index + 1) / len(store), f"adapters of layer {index + 1}/{len(store)}")
    return adapters


class LossModel:
    """Fisher diagonals of every module's output, and one measured scale per module type.

    The diagonal-Fisher estimate of the loss increase misses how errors interact (the softmax of attention
    scores, errors that line up across layers), and it misses by different factors for QKV and for the MLP. So
    each type is probed once: every layer's QKV (then every MLP) adapted at PROBE_KEEP, the real loss increase on
    `windows` measured, and the type's estimates scaled to match it.

    The gradients come first (they need only the model), so that each layer's probes, and while the model rests
    its curve points, are measured from the layer's profiles as soon as they are built (``measure``)."""

    def __init__(self, loaded, windows: torch.Tensor, progress: ProgressFn):
        self.layers, self.windows = loaded.layers, windows
        self.fisher = fisher_diagonals(loaded.model, self.layers, windows, progress=progress)
        self.probes: dict[int, dict[str, tuple[list, float]]] = {}  # layer -> part -> (adapters, estimated error)
        self.points: dict[tuple[int, str, float], float] = {}  # (layer, part, keep) -> Fisher-weighted error
        self.scales: dict[str, float] | None = None

    def measured(self, index: int, curves: bool) -> bool:
        probed = self.scales is not None or index in self.probes
        return probed and (not curves or (index, "mlp", CURVE_KEEPS[-1]) in self.points)

    def measure(self, index: int, qkv: QKVProfile, mlp: MLPProfile, curves: bool) -> None:
        """Layer `index`'s probe adapters and estimates, and with `curves` its errors at every CURVE_KEEPS."""
        layer, fisher_qkv, fisher_mlp = self.layers[index], self.fisher[(index, "qkv")], self.fisher[(index, "mlp")]
        if index not in self.probes and self.scales is None:
            self.probes[index] = {
                "qkv": (_layer_adapters(layer, index, qkv, mlp, PROBE_KEEP, 1.0, fisher_mlp),
                        qkv.loss_error(PROBE_KEEP, fisher_qkv)),
                "mlp": (_layer_adapters(layer, index, qkv, mlp, 1.0, PROBE_KEEP, fisher_mlp),
                        mlp.best_split(PROBE_KEEP, fisher_mlp).error)}
        if curves:
            for keep in CURVE_KEEPS:  # decreasing, as the greedy allocation asks for them
                self.points[(index, "qkv", keep)] = qkv.loss_error(keep, fisher_qkv)
                self.points[(index, "mlp", keep)] = mlp.curve_error(keep, fisher_mlp)
                mlp.forget_outputs_above(1.5 * keep)  # the next, smaller keeps never ask for these again

    def measure_scales(self, loaded, progress: ProgressFn) -> None:
        if self.scales is not None:
            return
        base = perplexity(loaded.model, self.windows).mean_nll
        self.scales = {}
        for part in ("qkv", "mlp"):
            progress(0.5, f"probing {part}")
            inject(self.layers, [a for index in sorted(self.probes) for a in self.probes[index][part][0]])
            try:
                actual = perplexity(loaded.model, self.windows).mean_nll - base
            finally:
                unload(self.layers)
            estimated = sum(self.probes[index][part][1] for index in self.probes)
            self.scales[part] = max(actual, 1e-6) / max(estimated / 2, 1e-12)
        self.probes.clear()  # the probe adapters are not needed again

    def error(self, store: LayerProfiles, index: int, part: str, keep: float) -> float:
        """The estimated loss increase of module (index, part) at `keep`."""
        raw = self.points.get((index, part, keep))
        if raw is None:
            with store.layer(index) as (qkv, mlp):
                raw = (qkv.loss_error(keep, self.fisher[(index, "qkv")]) if part == "qkv"
                       else mlp.curve_error(keep, self.fisher[(index, "mlp")]))
        return self.scales[part] * raw


def allocate(store: LayerProfiles, flop_reduction: float, allocation: str, progress,
             loss: LossModel | None = None, adapt_qkv: bool = True) -> dict:
    """Keep fraction per (layer, "qkv" | "mlp"). Without `adapt_qkv` QKV stays dense and the MLPs carry the whole
    budget. Greedy compares modules by their Fisher-weighted output error (rana_core.sensitivity) times a
    measured scale per module type (see LossModel), so that an error costs what it costs the language model."""
    if allocation == "uniform":
        return uniform_keeps(store.layers, flop_reduction, adapt_qkv)
    qkv_flops, mlp_flops, reduction = _budget(store.layers, flop_reduction, adapt_qkv)
    layers = range(len(store))
    parts = ("qkv", "mlp") if adapt_qkv else ("mlp",)
    keeps = {(i, "qkv"): 1.0 for i in layers} | {(i, "mlp"): 1.0 for i in layers}
    curves = {(i, part): Curve(qkv_flops[i] if part == "qkv" else mlp_flops[i], CURVE_KEEPS,
                               lambda keep, i=i, part=part: loss.error(store, i, part, keep))
              for i in layers for part in parts}
    done = [0]

    def counted(curve_error):
        def inner(keep):
            done[0] += 1
            progress(min(done[0] / (len(curves) * 8), 1.0), f"allocation: {done[0]} curve points")
            return curve_error(keep)
        return inner

    for curve in curves.values():
        curve.error = counted(curve.error)
    return keeps | greedy_allocation(curves, reduction)


def uniform_keeps(layers, flop_reduction: float, adapt_qkv: bool) -> dict:
    """The paper's allocation: every adapted module keeps the same share of its FLOPs."""
    _, _, reduction = _budget(layers, flop_reduction, adapt_qkv)
    parts = ("qkv", "mlp") if adapt_qkv else ("mlp",)
    return {(i, part): 1.0 - reduction if part in parts else 1.0 for i in range(len(layers)) for part in ("qkv", "mlp")}


def _budget(layers, flop_reduction: float, adapt_qkv: bool) -> tuple[dict, dict, float]:
    """Dense FLOPs of each layer's QKV and MLP, and the share of the adapted modules' FLOPs to remove (a RanaError
    when the MLPs alone cannot carry the cut)."""
    qkv_flops, mlp_flops = {}, {}
    for i, layer in enumerate(layers):
        qkv_flops[i], mlp_flops[i] = layer_dense_flops(layer)
    total = sum(qkv_flops.values()) + sum(mlp_flops.values())
    adapted_total = total if adapt_qkv else sum(mlp_flops.values())
    reduction = flop_reduction * total / adapted_total  # the adapted modules' share of the model's cut
    if reduction >= 1.0:
        raise BudgetError(f"RaNA on the MLPs alone can remove at most {adapted_total / total:.0%} of the QKV+MLP "
                          f"FLOPs; asked for {flop_reduction:.0%}")
    return qkv_flops, mlp_flops, reduction


def _layer_adapters(layer, index, qkv: QKVProfile, mlp: MLPProfile, qkv_keep: float, mlp_keep: float,
                    mlp_fisher: torch.Tensor | None) -> list:
    adapters = []
    if qkv_keep < 1.0:
        plan = qkv.proj.plan(qkv_keep)
        A, B = qkv.proj.factors(plan.rank)
        adapters.append(RankMaskedUnit(layer_members(layer, "qkv"), index, "qkv", A, B, plan))
    if mlp_keep < 1.0:
        choice = mlp.best_split(mlp_keep, mlp_fisher)  # the split minimises the same error the allocation did
        _, down_tau = mlp.error(choice.up, choice.gate, choice.down)
        units = {}
        for which in ("up", "gate"):
            proj = getattr(mlp, which)
            plan = proj.plan(getattr(choice, which))
            A, B = proj.factors(plan.rank)
            units[which] = RankMaskedUnit(layer_members(layer, which), index, which, A, B, plan)
        base = layer_mlp(layer)
        down = NeuronMaskedUnit(mlp_parts(base)[2], index, choice.down, down_tau)
        adapters.append(RaNAMLP(base, index, units["up"], units["gate"], down))
    return adapters
