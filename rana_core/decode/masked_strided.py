"""The masked product in one launch: each program decides the mask of its own rows and reads only the active ones.

masked_kernels' design takes three dependent steps per product: a compaction launch lists the active rows, the
gather reads the list's counts, then the listed indices, then the rows. Inside a CUDA graph a dependent launch
costs about 2 µs and each round trip to memory about 1 µs, and bench/gather_layout.py measured that fixed cost
at ~7.5 µs of every product (the bytes themselves move at the dense GEMV's speed). Here there is no list:

- program (m, s, g) takes column block m of the rows k = s, s + S, s + 2S, … of group g (a stride of S across
  K, so that every program meets the same mix of strong and weak ranks: the leading ranks of a rank adapter are
  active far more often than the trailing ones, and contiguous ranges of K would give a few programs most of the
  work);
- it loads those rows' coefficients, decides the mask (score ≥ threshold), and loads the rows with the mask as
  the load's predicate: a masked-off row issues no memory request, so only active rows are read;
- the partial sums go to partial[g, s, :], for the same consumers as masked_kernels' (reduce_partials, the
  rotary kernel).

A tile holds BLOCK_C candidate rows, of which only the active ones cost bandwidth, so S is chosen to give each
program one tile. (Session 4 measured a predicated gather over contiguous ranges of K with its reduction fused
by an arrival counter, on the H100: slower. This one differs in both: strided rows, no serial reduction.)
"""

from __future__ import annotations

import math

import torch

from rana_core.decode.masked_kernels import _buffer, _multiprocessors, await_inputs, pdl, triton

if triton is not None:
    import triton.language as tl

BLOCK_C = 256  # candidate rows per program (one tile)
BLOCK_M = 64  # output columns per program: a row segment of 128 bytes in fp16
WARPS = 4
PROGRAMS_PER_SM = 16  # the stride S grows until about this many programs per multiprocessor


def strides(K: int, M: int, groups: int, device: torch.device) -> int:
    """S: enough programs to fill the GPU, and at least K / BLOCK_C so that one tile covers a program's rows."""
    programs = math.ceil(M / BLOCK_M) * groups
    fill = math.ceil(PROGRAMS_PER_SM * _multiprocessors(device) / programs)
    return max(1, min(K, max(fill, math.ceil(K / BLOCK_C))))


if triton is not None:

    @triton.jit
    def _strided_kernel(rows_ptr, coeff_ptr, scale_ptr, threshold_ptr, partial_ptr, K, M, stride_k,
                        S: tl.constexpr, TILES: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_C: tl.constexpr,
                        BLOCK_M: tl.constexpr, WIDE: tl.constexpr, PDL: tl.constexpr):
        """Program (m, s, g): columns m·BLOCK_M… of Σ_{k ≡ s mod S, active} coeff_k · rows[g·K + k] into
        partial[g, s, :]."""
        pid_m, pid_s, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        await_inputs(PDL)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        threshold = tl.load(threshold_ptr + g)
        acc = tl.zeros([BLOCK_M], dtype=tl.float32)
        for t in tl.static_range(TILES):
            k = pid_s + S * (t * BLOCK_C + tl.arange(0, BLOCK_C))
            ok = k < K
            c = tl.load(coeff_ptr + g * K + k, mask=ok, other=0.0, cache_modifier=".cg").to(tl.float32)
            score = tl.abs(c)
            if HAS_SCALE:
                score = score * tl.load(scale_ptr + g * K + k, mask=ok, other=0.0).to(tl.float32)
            active = ok & (score >= threshold)
            row = g * K + k
            if WIDE:
                row = row.to(tl.int64)
            tile = tl.load(rows_ptr + row[:, None] * stride_k + offs_m[None, :],
                           mask=active[:, None] & m_ok[None, :], other=0.0)
            acc += tl.sum(tile.to(tl.float32) * c[:, None], axis=0)
        tl.store(partial_ptr + (g * S + pid_s) * M + offs_m, acc, mask=m_ok)


def strided_partials(rows: torch.Tensor, coeff: torch.Tensor, threshold: torch.Tensor,
                     scale: torch.Tensor | None = None, groups: int = 1) -> tuple[torch.Tensor, int]:
    """masked_kernels.masked_rows_partials' contract, in one launch: (partials (groups · S, M) in float32, S)."""
    K_all, M = rows.shape
    K = K_all // groups
    if coeff.shape != (K_all,) or K * groups != K_all:
        raise ValueError(f"coefficients {tuple(coeff.shape)} do not match rows {tuple(rows.shape)} in {groups} groups")
    if threshold.numel() != groups:
        raise ValueError(f"one threshold per group: {groups} groups, {threshold.numel()} thresholds")
    if rows.stride(1) != 1:
        raise ValueError("rows must be row-major (contiguous along M)")
    S = strides(K, M, groups, rows.device)
    partial = _buffer("strided partial", groups * S * M, torch.float32, rows.device)
    p = pdl(rows)
    _strided_kernel[(math.ceil(M / BLOCK_M), S, groups)](
        rows, coeff, scale if scale is not None else coeff, threshold, partial, K, M, rows.stride(0), S=S,
        TILES=math.ceil(math.ceil(K / S) / BLOCK_C), HAS_SCALE=scale is not None, BLOCK_C=BLOCK_C, BLOCK_M=BLOCK_M,
        WIDE=rows.numel() >= 2**31, PDL=p, num_warps=WARPS, launch_pdl=p)
    return partial, S
