"""Activation sparsity on a linear's *input*: TEAL and WINA.

A token's input coordinate j is kept iff its score s_j ≥ τ, and the linear runs on the kept coordinates only:
y = W (x ⊙ m) + b, 2·m·k FLOPs for k kept of n inputs (a kernel reads only the kept columns of W, i.e. the kept
rows of Wᵀ: the shape of RaNA's masked products).

- ``InputMaskedUnit`` (TEAL): s_j = |x_j|.
- ``WeightedInputUnit`` (WINA): s_j = |x_j| · ‖W[:, j]‖₂, the column norm of the (stacked) weight, so that a small
  input on a heavy column can outrank a larger one on a light column.

On stacked QKV the three projections share their input and one mask. Thresholds start at zero; the pipeline sets
them on the adapted model so that `keep` of the inputs are kept per token on average; the masking and its FLOP
count are RaNA's neuron adapter's (InputMasking).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rana_core.adapters.base import AdapterUnit, layer_members
from rana_core.adapters.thresholds import InputMasking


class InputMaskedUnit(InputMasking, AdapterUnit):
    adapter_name = "teal"
    kind = "teal"

    def __init__(self, members, layer: int, module: str, keep: float, tau: float = 0.0):
        super().__init__(members, layer, module, static_rank=members[0].in_features,
                         max_rank=members[0].in_features)
        self.register_buffer("tau", torch.tensor(tau, dtype=torch.float32))
        self.keep = keep
        self.target_active = keep * self.in_features
        self.histogram = None

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().abs()

    def compute(self, x):
        masked = self.masked_input(x)
        return torch.cat([F.linear(masked, m.weight, m.bias) for m in self._members], dim=-1)

    def state(self) -> tuple[dict, dict]:
        return {"module": self.module, "keep": self.keep}, {"tau": self.tau}

    @classmethod
    def rebuild(cls, layer, index: int, meta: dict, tensors: dict):
        unit = cls(layer_members(layer, meta["module"]), index, meta["module"], meta["keep"])
        unit.tau.copy_(tensors["tau"])
        return unit


class WeightedInputUnit(InputMaskedUnit):
    adapter_name = "wina"
    kind = "wina"

    def __init__(self, members, layer: int, module: str, keep: float, tau: float = 0.0):
        super().__init__(members, layer, module, keep, tau)
        squares = sum(m.weight.detach().float().square().sum(dim=0) for m in members)
        self.register_buffer("column_norms", squares.sqrt())

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().abs() * self.column_norms
