"""The calibration check that rana-greedy, a3-greedy and hybrid share: build each candidate allocation, measure
its language-model loss on calibration text, and keep the least.

An allocation chosen by a model of the loss (summed per-module errors, local error curves) misjudges how errors
compound across layers; the check makes the real loss the judge. It runs on the *last* calibration windows, the
*first* ones being where methods measure their loss gradients (``calibration_slices``), so the two never overlap
while there are at least two windows. Held-out text is never used.
"""

from __future__ import annotations

from typing import Callable

import torch

from rana_core.adapters.base import inject, unload
from rana_core.evaluate import perplexity
from rana_core.progress import ProgressFn


def calibration_slices(windows: torch.Tensor, first_tokens: int, last_tokens: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, last): the first windows holding about `first_tokens` (for loss gradients) and the last ones
    holding about `last_tokens` (for the check), each at least one window. The last take at most half of the
    windows, and the first at most what the last leave."""
    count, per_window = windows.shape
    n_last = max(1, min(last_tokens // per_window, count // 2))
    n_first = max(1, min(first_tokens // per_window, count - n_last))
    return windows[:n_first], windows[count - n_last:]


def least_loss(loaded, candidates: dict[str, Callable[[], list]], windows: torch.Tensor, progress: ProgressFn,
               what: str = "allocation") -> tuple[str, dict[str, float]]:
    """Build each candidate's adapters (a callable returning them, not injected), measure the mean next-token loss
    of the adapted model on `windows`, unload; return the name with the least loss (the first on a tie) and
    every loss."""
    losses = {}
    for n, (name, build) in enumerate(candidates.items()):
        progress(n / len(candidates), f"checking the {name} {what} on calibration text")
        inject(loaded.layers, build())
        try:
            losses[name] = perplexity(loaded.model, windows).mean_nll
        finally:
            unload(loaded.layers)
    chosen = min(losses, key=losses.get)
    progress(1.0, f"{what}: " + ", ".join(f"{n} {v:.4f}" for n, v in losses.items()) + f"; kept {chosen}")
    return chosen, losses
