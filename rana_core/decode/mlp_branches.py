"""RaNA's masked SwiGLU MLP of the list design in branches that run side by side, so that the hand-overs of one
branch overlap the bytes of another (RANA_MLP_BRANCHES).

parts.swiglu_chain runs the MLP as one chain of dependent launches: rank compaction, gate/up gather, down's
compaction (h = silu(gate)·up, its neurons listed), down's gather, the reduction. Each hand-over costs a 7B layer
2-4 µs in which no weight bytes move (docs/latency.md, session 23's step timeline). Here the neurons are split in
`branches` ranges of whole column blocks: after the rank compaction (shared), each range's gate/up gather (its
columns of Aᵀ), down compaction (its neurons) and down gather (its rows of W_downᵀ) run on a CUDA stream of their
own, captured as parallel branches of the step's graph, each launch sized for its share of the GPU; their partial
sums land in one buffer, and one reduction adds them up (and the residual). The branches compute what the chain
computes, with the sums split differently: the same products to float32 rounding. Two branches are the default
(MLP_BRANCHES, measured on an H200); RANA_MLP_BRANCHES=1 runs the single chain."""

from __future__ import annotations

import os

import torch

from rana_core.decode.branches import run_in_branches
from rana_core.decode.launch import work_buffer
from rana_core.decode.masked_kernels import _list_splits, compact_list, gather_config, gather_list, reduce_to


MLP_BRANCHES = 2  # on an H200, 7B-shape RaNA steps at -44% and -50% 3.5-4.1% faster than the chain; 3 no better


def mlp_branches() -> int:
    """How many branches the list design's masked MLP runs in: RANA_MLP_BRANCHES (1 the single chain, for A/Bs)
    or MLP_BRANCHES (bench/results/engine-ab-mlp-branches-nvidia-h200.json, session 24)."""
    text = os.environ.get("RANA_MLP_BRANCHES", str(MLP_BRANCHES))
    if text not in ("1", "2", "3", "4"):
        raise ValueError(f"RANA_MLP_BRANCHES={text}: expected 1 to 4 branches")
    return int(text)


def neuron_ranges(M: int, branches: int) -> list[tuple[int, int]]:
    """[lo, hi) of each branch's neurons: near-equal ranges of whole gather column blocks."""
    block = gather_config()[0]
    blocks = -(-M // block)
    cuts = [min(M, round(blocks * b / branches) * block) for b in range(branches + 1)]
    return [(lo, hi) for lo, hi in zip(cuts, cuts[1:]) if hi > lo]


def branched_swiglu_chain(gate_up_rows: torch.Tensor, coeff: torch.Tensor, gate_up_threshold: torch.Tensor,
                          down, h: torch.Tensor, scale: torch.Tensor | None = None, shared_coeff: bool = False,
                          residual: tuple | None = None, branches: int = 2) -> torch.Tensor:
    """parts.swiglu_chain's list design in `branches` branches (see the module): (1, M) of down's outputs, or with
    `residual` = (r, out) the reduction's sums of squares for the next norm, r + the MLP written to out."""
    K = gate_up_rows.shape[0] // 2
    M = gate_up_rows.shape[1]
    r, out = residual if residual is not None else (None, down.out)
    device = gate_up_rows.device
    ranges = neuron_ranges(M, branches)
    out_columns = down.rows.shape[1]
    splits = [_list_splits(hi - lo, out_columns, 1, device, len(ranges)) for lo, hi in ranges]
    partial = work_buffer("branch partial", sum(splits) * out_columns, torch.float32, device)
    ranks = compact_list(coeff, gate_up_threshold, scale, K, 2, shared_coeff=shared_coeff)
    offsets = [sum(splits[:b]) for b in range(len(ranges) + 1)]

    def branch(b: int) -> None:
        (lo, hi), tag = ranges[b], f" branch {b}"
        gate_up, gate_up_splits = gather_list(gate_up_rows[:, lo:hi], ranks, share=len(ranges), tag=tag)
        neurons = compact_list(h[lo:hi], down.threshold, None if down.scale is None else down.scale[lo:hi], hi - lo,
                               1, source=gate_up, source_splits=gate_up_splits, tag=tag)
        written = gather_list(down.rows[lo:hi], neurons, share=len(ranges),
                              partial=partial[offsets[b] * out_columns:offsets[b + 1] * out_columns])[1]
        assert written == splits[b], "the buffer was sized for another split of the list"

    run_in_branches(device, len(ranges), branch)
    reduced = reduce_to(partial, offsets[-1], out, r)
    return reduced if r is not None else reduced[None]
