"""TEAL and WINA: every adaptable linear (stacked QKV, gate, up, down) keeps a share of its input coordinates per
token, chosen by magnitude (TEAL) or by magnitude times the weight's column norm (WINA); rana_core.adapters
.input_sparse. The attention output projection stays dense (it is outside the QKV + MLP budget every method shares).

Allocation (``uniform`` first, as every method's bare name means; TEAL as published is ``teal-greedy``):
- ``greedy`` (TEAL's): within each layer, the layer's share of the budget goes step by step to the projection
  whose next step of sparsity adds the least output error per FLOP removed (rana_core.allocation.greedy_allocation
  over the layer's modules), from error curves measured on calibration rows of the dense model: the relative
  output error ‖W(x ⊙ (1 − m))‖² / ‖Wx‖² with each keep's threshold taken over all calibration entries.
- ``uniform``: every module keeps 1 − p of its inputs.
The thresholds themselves are set afterwards by the pipeline on the adapted model, to each module's keep.
"""

from __future__ import annotations

import torch

from rana_core.adapters.base import layer_members
from rana_core.adapters.input_sparse import InputMaskedUnit, WeightedInputUnit
from rana_core.allocation import Curve, greedy_allocation
from rana_core.architecture import INPUT_OF, MODULES
from rana_core.calibration import each_layer_inputs
from rana_core.flops import linear_flops
from rana_core.selection import share_threshold

CURVE_KEEPS = [round(1.0 - 0.05 * i, 2) for i in range(19)]  # 1.0 .. 0.1
ROWS = 1024  # calibration rows per module input for the error curves


def build(loaded, calib_windows, config, progress, cache_dir=None, unit=InputMaskedUnit):
    if config.flop_reduction == 0:
        return []
    layers = loaded.layers
    if config.allocation == "uniform":
        keeps = {(index, module): 1.0 - config.flop_reduction for index in range(len(layers)) for module in MODULES}
        for index in range(len(layers)):
            progress((index + 1) / len(layers), f"layer {index + 1}/{len(layers)}: keeping "
                                                 f"{1.0 - config.flop_reduction:.1%} of every input")
    else:
        keeps = {}
        stride = max(1, calib_windows.numel() // ROWS)
        weighted = unit is WeightedInputUnit
        for index, stats in each_layer_inputs(loaded, calib_windows, lambda f, m: progress(f, f"curves of {m}"),
                                              row_stride=stride):
            keeps.update(layer_keeps(layers[index], index, stats, config.flop_reduction, weighted))
    return [unit(layer_members(layers[index], module), index, module, keep)
            for (index, module), keep in sorted(keeps.items()) if keep < 1.0]


def build_wina(loaded, calib_windows, config, progress, cache_dir=None):
    return build(loaded, calib_windows, config, progress, cache_dir, unit=WeightedInputUnit)


def layer_keeps(layer, index: int, stats: dict, flop_reduction: float, weighted: bool) -> dict:
    """TEAL's greedy within one layer: the keep per module that meets the layer's share of the budget at the
    least summed output error (each module's error relative to its own output)."""
    curves = {}
    for module in MODULES:
        members = layer_members(layer, module)
        weight = torch.cat([m.weight.detach() for m in members]).float()
        rows = stats[INPUT_OF[module]].rows.float()
        weight = weight.to(rows.device)
        errors = error_curve(weight, rows, weighted)
        curves[module] = Curve(float(linear_flops(*weight.shape)), CURVE_KEEPS, lambda keep, e=errors: e[keep])
    chosen = greedy_allocation(curves, flop_reduction)
    return {(index, module): keep for module, keep in chosen.items()}


def error_curve(weight: torch.Tensor, rows: torch.Tensor, weighted: bool) -> dict[float, float]:
    """Relative output error of W on `rows` with each keep's share of input entries kept (one threshold per
    keep, over all rows' entries, as the module will have)."""
    scores = rows.abs() * (weight.norm(dim=0) if weighted else 1.0)
    dense = rows @ weight.T
    energy = dense.square().sum().item()
    errors = {}
    for keep in CURVE_KEEPS:
        if keep >= 1.0:
            errors[keep] = 0.0
            continue
        tau = share_threshold(scores, keep)
        dropped = rows * (scores < tau)
        errors[keep] = (dropped @ weight.T).square().sum().item() / max(energy, 1e-30)
    return errors
