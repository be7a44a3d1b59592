"""The count-th largest of many values: the threshold that keeps a given number of mask scores.

``torch.kthvalue`` selects within each slice on one GPU thread block, so over one flat slice of millions of scores
(a layer's calibration rows × ranks or neurons) it takes tens of milliseconds on a GPU, and a rank plan or a split
search asks for hundreds. A GPU sorts millions of values in about a millisecond, so there the value is read off a
sort. On the CPU ``kthvalue`` is slow too (15 ms for 1.5 M floats on this project's CI machine, 44% of a SmolLM2
hybrid build), where NumPy's introselect (``np.partition``) takes 1 ms. All give the same value: a selection
returns an entry of `values`, whatever the algorithm.
"""

from __future__ import annotations

import numpy as np
import torch


def kth_largest(values: torch.Tensor, count: int) -> torch.Tensor:
    """The `count`-th largest entry of `values` (any shape, 1 ≤ count ≤ numel), as a 0-d tensor."""
    flat = values.detach().reshape(-1)
    if flat.is_cuda:
        return flat.sort(descending=True).values[count - 1]
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()  # NumPy has no bfloat16; widening keeps every value and the order
    position = flat.numel() - count
    return torch.as_tensor(np.partition(flat.numpy(), position)[position]).to(values.dtype)


def share_threshold(scores: torch.Tensor, keep: float) -> float:
    """The score that keeps a share `keep` of all entries of `scores` (the count-th largest; 0.0 keeps them all)."""
    flat = scores.reshape(-1)
    count = max(1, int(round(keep * flat.numel())))
    return 0.0 if count >= flat.numel() else kth_largest(flat, count).item()
