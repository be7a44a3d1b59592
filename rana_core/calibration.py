"""Capture statistics of linear layers' inputs with forward hooks on the unmodified model.

For a module with input x (n features), InputStats accumulates the second-moment matrix C = Σ x xᵀ in float64 over
all calibration tokens. Data-aware decompositions need only C: the output covariance is W C Wᵀ.

    stats = capture_module_inputs(loaded, windows, progress, inputs=("attention", "mlp"))
    stats[(layer, "attention")].gram        # the input of q/k/v;  "mlp": of gate/up;  "down": of down

Every method that decomposes or profiles modules captures through ``capture_module_inputs``, so each layer's
inputs are read where the model family (rana_core.architecture) says they are.
"""

from __future__ import annotations

from typing import Hashable

import torch
from torch import nn

from rana_core.architecture import INPUT_OF, family_of
from rana_core.progress import ProgressFn, no_progress

LAYER_INPUTS = tuple(dict.fromkeys(INPUT_OF.values()))  # "attention", "mlp", "down"


class InputStats:
    """C = Σ x xᵀ over every token, and (if `row_stride`) every `row_stride`-th input row itself, in float32."""

    def __init__(self, n_features: int, row_stride: int = 0):
        self.gram = torch.zeros(n_features, n_features, dtype=torch.float64)
        self.tokens = 0
        self.row_stride = row_stride
        self.kept: list[torch.Tensor] = []

    @property
    def rows(self) -> torch.Tensor:
        return torch.cat(self.kept) if self.kept else torch.empty(0, self.gram.shape[0])

    def add(self, x: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1]).float()
        if self.row_stride:
            offset = (-self.tokens) % self.row_stride  # the stride runs on across batches
            self.kept.append(rows[offset :: self.row_stride].cpu().clone())
        # One batch's product in float32 is accurate to ~1e-7 relative; the running sum across batches is float64.
        self.gram += (rows.T @ rows).to(device="cpu", dtype=torch.float64)
        self.tokens += rows.shape[0]


@torch.no_grad()
def capture_input_stats(
    model: nn.Module,
    windows: torch.Tensor,
    modules: dict[Hashable, nn.Linear],
    batch_size: int = 4,
    progress: ProgressFn = no_progress,
    row_stride: int = 0,
) -> dict[Hashable, InputStats]:
    """Run `windows` (n, seq_len) through `model` and return InputStats for every named linear module."""
    stats = {name: InputStats(module.in_features, row_stride) for name, module in modules.items()}
    handles = []
    for name, module in modules.items():
        def hook(_module, inputs, _name=name):
            stats[_name].add(inputs[0])

        handles.append(module.register_forward_pre_hook(hook))
    device = next(model.parameters()).device
    try:
        n = windows.shape[0]
        for start in range(0, n, batch_size):
            model(windows[start : start + batch_size].to(device), use_cache=False)
            done = min(start + batch_size, n)
            progress(done / n, f"{done}/{n} sequences")
    finally:
        for handle in handles:
            handle.remove()
    return stats


def capture_module_inputs(loaded, windows: torch.Tensor, progress: ProgressFn = no_progress, row_stride: int = 0,
                          inputs=LAYER_INPUTS) -> dict[tuple[int, str], InputStats]:
    """InputStats of each of `inputs` of every layer (one calibration pass of the dense model), keyed
    (layer, input). `row_stride` also keeps every row_stride-th input row (profiles and curves need rows)."""
    hooks = {}
    for index, layer in enumerate(loaded.layers):
        family = family_of(layer)
        for name in inputs:
            hooks[(index, name)] = layer.get_submodule(family.input_path(name))
    return capture_input_stats(loaded.model, windows, hooks, progress=progress, row_stride=row_stride)
