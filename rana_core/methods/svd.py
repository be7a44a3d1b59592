"""Static SVD: every adaptable module replaced by its data-aware low-rank factors at the budget's rank (§8).

No masking: every token pays for all r ranks. Modules whose low-rank form cannot be cheaper than dense at the
budget (only at a zero budget) stay dense.
"""

from __future__ import annotations

import torch

from rana_core.adapters.base import layer_members
from rana_core.adapters.low_rank import LowRankUnit
from rana_core.architecture import INPUT_OF, MODULES
from rana_core.calibration import each_layer_inputs
from rana_core.decompose import low_rank_factors, output_basis, rank_for_budget
from rana_core.flops import linear_flops, low_rank_flops


def build(loaded, calib_windows, config, progress, cache_dir=None):
    p = config.flop_reduction
    if p == 0:
        return []
    units = []
    n_layers = len(loaded.layers)
    # layer after layer: each layer's grams are decomposed and freed before the next layer's are gathered
    for index, stats in each_layer_inputs(loaded, calib_windows, lambda f, m: progress(f, f"calibration {m}")):
        layer = loaded.layers[index]
        for module in MODULES:
            members = layer_members(layer, module)
            weight = torch.cat([m.weight for m in members])
            out_f, in_f = weight.shape
            rank = rank_for_budget(out_f, in_f, p)
            if low_rank_flops(out_f, in_f, rank) >= linear_flops(out_f, in_f):
                continue
            basis = output_basis(weight, stats[INPUT_OF[module]].gram)
            A, B = low_rank_factors(weight, basis, rank)
            units.append(LowRankUnit(members, index, module, A, B))
        progress((index + 1) / n_layers, f"decomposed layer {index + 1}/{n_layers}")
    return units
