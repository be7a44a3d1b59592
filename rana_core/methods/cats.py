"""CATS: MLP only. The gate runs dense; neuron j of a token is kept iff |act(W_gate x)_j| ≥ τ, and
only the kept neurons' rows of W_up and columns of W_down are computed.

The budget is over the QKV + MLP FLOPs like every method's, so with QKV dense and the gate dense the up/down keep
fraction f solves (1 − f) · Σ(up + down) = p · Σ(all adaptable). Thresholds start at zero and are set by the
pipeline's calibration passes on the adapted model.
"""

from __future__ import annotations

from rana_core.adapters.base import module_shapes
from rana_core.adapters.mlp import CatsMLP
from rana_core.architecture import layer_mlp
from rana_core.errors import BudgetError
from rana_core.flops import linear_flops


def keep_for_budget(shapes: dict, flop_reduction: float) -> float:
    total = sum(linear_flops(*shape) for shape in shapes.values())
    skippable = sum(linear_flops(*shape) for (_, module), shape in shapes.items() if module in ("up", "down"))
    keep = 1.0 - flop_reduction * total / skippable
    if keep <= 0:
        raise BudgetError(f"CATS can remove at most {skippable / total:.0%} of the QKV+MLP FLOPs "
                          f"(up and down only); asked for {flop_reduction:.0%}")
    return keep


def build(loaded, calib_windows, config, progress, cache_dir=None):
    if config.flop_reduction == 0:
        return []
    keep = keep_for_budget(module_shapes(loaded.layers), config.flop_reduction)
    adapters, n_layers = [], len(loaded.layers)
    for index, layer in enumerate(loaded.layers):  # a step per layer, as every method reports its build
        adapters.append(CatsMLP(layer_mlp(layer), index, keep))
        progress((index + 1) / n_layers, f"layer {index + 1}/{n_layers}: keeping {keep:.1%} of MLP neurons")
    return adapters
