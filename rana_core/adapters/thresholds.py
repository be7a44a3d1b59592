"""Thresholds for input-adaptive masks, set from the distribution of mask scores on calibration tokens.

A masked adapter keeps entry i of a token iff its score s_i ≥ τ. To spend a budget, the mean number of kept
entries per token must be a target k. A ScoreHistogram gathers the scores of many tokens in log-spaced bins (cheap
in memory, so every module of the model can collect at once while the adapted model runs) and returns the τ at
which the expected count per token is k, interpolating geometrically inside a bin.
"""

from __future__ import annotations

import math

import torch

LOG10_LOW, LOG10_HIGH, BINS = -20.0, 12.0, 6400  # 200 bins per decade, wide enough for outlier features


class ScoreHistogram:
    def __init__(self):
        self.counts = torch.zeros(BINS + 2, dtype=torch.float64)  # [below range, bins..., above range]
        self.tokens = 0

    def add(self, scores: torch.Tensor) -> None:
        """`scores`: (..., entries) non-negative mask scores of a batch of tokens."""
        flat = scores.detach().reshape(-1).float().clamp_min(1e-30).log10()
        index = ((flat - LOG10_LOW) / (LOG10_HIGH - LOG10_LOW) * BINS).floor().long() + 1
        index = index.clamp(0, BINS + 1)
        if self.counts.device != index.device:  # count where the scores are: no copy of them per batch
            self.counts = self.counts.to(index.device)
        self.counts += torch.bincount(index, minlength=BINS + 2).double()
        self.tokens += scores.numel() // scores.shape[-1]

    def threshold_for(self, mean_kept: float) -> float:
        """τ such that on average `mean_kept` entries per token have a score ≥ τ."""
        if self.tokens == 0:
            raise ValueError("no scores collected")
        want = mean_kept * self.tokens
        self.counts = self.counts.cpu()
        above = torch.flip(self.counts, [0]).cumsum(0)  # entries at or above each bin, from the top
        if want <= 0:
            return math.inf
        if want >= above[-1]:
            return 0.0
        position = int(torch.searchsorted(above, torch.tensor(want, dtype=torch.float64)))
        bin_index = BINS + 1 - position  # histogram index of the bin where the cut falls
        before = above[position - 1].item() if position > 0 else 0.0
        in_bin = self.counts[bin_index].item()
        fraction = (want - before) / in_bin if in_bin else 0.0  # share of this bin kept, from its top
        if bin_index == 0:
            return 0.0
        if bin_index == BINS + 1:
            return 10.0 ** LOG10_HIGH
        width = (LOG10_HIGH - LOG10_LOW) / BINS
        top = LOG10_LOW + bin_index * width  # upper edge (bin_index counts from 1)
        return 10.0 ** (top - fraction * width)


class Thresholded:
    """Mixin for masked adapters: a `tau` buffer set so that `target_active` entries per token are kept on
    average, from the scores the adapter saw between begin_calibration and end_calibration.

    With ``immediate=True`` the threshold is set from the first batch the adapter sees, before that batch is
    masked: one forward pass over all calibration tokens then calibrates the layers in order, each on inputs
    that already come from the calibrated layers before it."""

    target_active: float
    histogram: ScoreHistogram | None
    _immediate: bool = False

    def begin_calibration(self, immediate: bool = False) -> None:
        self.histogram = ScoreHistogram()
        self._immediate = immediate

    def observe(self, scores: torch.Tensor) -> None:
        if self.histogram is not None:
            self.histogram.add(scores)
            if self._immediate:
                self.end_calibration()

    def end_calibration(self) -> None:
        self.tau.fill_(self.histogram.threshold_for(self.target_active))
        self.histogram = None
        self._immediate = False


class InputMasking(Thresholded):
    """Mixin for adapters that mask their linear's *input* coordinates (RaNA's neuron adapter on down, TEAL, WINA):
    coordinate j of a token is kept iff its score (the adapter's ``scores``) reaches τ, and the token pays
    2·out_features FLOPs per kept coordinate, since a kernel reads only those columns of W."""

    def masked_input(self, x: torch.Tensor) -> torch.Tensor:
        """`x` with the coordinates scored below τ zeroed, counted on the meter (and tracked, when tracking)."""
        scores = self.scores(x)
        self.observe(scores)
        mask = scores >= self.tau
        active = mask.sum().item()
        self.meter.count(x.numel() // x.shape[-1], 2 * self.out_features * active, active)
        if self.tracking:
            self.meter.track_sparsity(scores.square())
        return x * mask.to(x.dtype)
