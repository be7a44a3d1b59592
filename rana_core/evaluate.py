"""Perplexity on token windows: exp of the mean next-token negative log-likelihood over all predicted tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rana_core.progress import ProgressFn, no_progress


@dataclass
class Perplexity:
    nll_sum: float
    predicted_tokens: int

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.predicted_tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)


@torch.no_grad()
def perplexity(
    model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: ProgressFn = no_progress
) -> Perplexity:
    """Each window (n, seq_len) is scored independently; its first token is context only."""
    device = next(model.parameters()).device
    nll_sum, predicted = 0.0, 0
    n = windows.shape[0]
    for start in range(0, n, batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = model(batch, use_cache=False).logits[:, :-1]
        targets = batch[:, 1:]
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        nll_sum += loss.item()
        predicted += targets.numel()
        done = min(start + batch_size, n)
        progress(done / n, f"{done}/{n} sequences")
    return Perplexity(nll_sum, predicted)
