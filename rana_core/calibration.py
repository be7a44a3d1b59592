"""Capture statistics of linear layers' inputs with forward hooks on the unmodified model.

For a module with input x (n features), InputStats accumulates the second-moment matrix C = Σ x xᵀ in float64 over
all calibration tokens. Data-aware decompositions need only C: the output covariance is W C Wᵀ.
"""

from __future__ import annotations

import torch
from torch import nn

from rana_core.progress import ProgressFn, no_progress


class InputStats:
    def __init__(self, n_features: int):
        self.gram = torch.zeros(n_features, n_features, dtype=torch.float64)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1]).float()
        # One batch's product in float32 is accurate to ~1e-7 relative; the running sum across batches is float64.
        self.gram += (rows.T @ rows).to(device="cpu", dtype=torch.float64)
        self.tokens += rows.shape[0]


@torch.no_grad()
def capture_input_stats(
    model: nn.Module,
    windows: torch.Tensor,
    modules: dict[str, nn.Linear],
    batch_size: int = 4,
    progress: ProgressFn = no_progress,
) -> dict[str, InputStats]:
    """Run `windows` (n, seq_len) through `model` and return InputStats for every named linear module."""
    stats = {name: InputStats(module.in_features) for name, module in modules.items()}
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
