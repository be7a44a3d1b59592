"""The count-th largest of many values: the threshold that keeps a given number of mask scores.

``torch.kthvalue`` selects within each slice on one GPU thread block, so over one flat slice of millions of scores
(a layer's calibration rows × ranks or neurons) it takes tens of milliseconds on a GPU, and a rank plan or a split
search asks for hundreds. A GPU sorts millions of values in about a millisecond, so there the value is read off a
sort; on the CPU ``kthvalue``'s selection stays the faster way. Both give the same value.
"""

from __future__ import annotations

import torch


def kth_largest(values: torch.Tensor, count: int) -> torch.Tensor:
    """The `count`-th largest entry of `values` (any shape, 1 ≤ count ≤ numel), as a 0-d tensor."""
    flat = values.reshape(-1)
    if flat.is_cuda:
        return flat.sort(descending=True).values[count - 1]
    return flat.kthvalue(flat.numel() - count + 1).values


def share_threshold(scores: torch.Tensor, keep: float) -> float:
    """The score that keeps a share `keep` of all entries of `scores` (the count-th largest; 0.0 keeps them all)."""
    flat = scores.reshape(-1)
    count = max(1, int(round(keep * flat.numel())))
    return 0.0 if count >= flat.numel() else kth_largest(flat, count).item()
