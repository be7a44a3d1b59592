"""The masked product in one launch, each program listing its own rows (RANA_MASKED_PRODUCT=local; not yet timed).

The list design (masked_kernels) pays for its list with a launch: the compaction runs, finishes and flushes
before the first gather program may read a count, then each gather program reads the counts, then its list
entries, then its rows. The wide design (masked_wide) has no list, so it loads every candidate row's tile with
the mask as the predicate: a memory round trip per tile however few of its rows are active. This design keeps
the list and drops its launch:

- program (m, s, g) owns column block m of group g and the row runs s, s + S, s + 2S, … of RUN contiguous rows
  (interleaved, so that every program meets strong leading ranks and weak trailing ones alike and their lists
  are about equally long; runs, not single rows, so that its coefficient loads are whole sectors);
- it loads all its candidates' coefficients at once (one round trip), decides their masks, and writes the
  active rows' indices and coefficients, in order, to its own slice of a scratch buffer (a prefix sum gives
  each its slot); a barrier makes them visible to the program's other threads;
- it then gathers the listed rows BLOCK_K at a time as the list gather does, the next step's entries loaded
  while this step's rows are in flight, with no chunk lookup (its list is contiguous);
- the partial sums go to partial[g, s, :], so every consumer (reduce_partials, the rotary kernel, the next
  product's SwiGLU) is the list design's.

Every column block's program lists the same rows for itself: the price of not waiting for one another is the
coefficients read once per column block (from L2) and a short list written and read back per program.
"""

from __future__ import annotations

import math
import os

import torch

from rana_core.decode.masked_kernels import (_buffer, _interpreting, _multiprocessors, await_inputs, launch_ints, pdl,
                                             triton)

if triton is not None:
    import triton.language as tl

    from rana_core.decode.masked_wide import _coefficients

RUN = 32  # contiguous candidate rows: 64 bytes of fp16 coefficients, 128 of float32 partial sums
CONFIG = (64, 128, 2, 1, 16)  # BLOCK_M, BLOCK_K, warps, stages, programs per multiprocessor: the list gather's


def config() -> tuple[int, int, int, int, int]:
    """CONFIG, or RANA_LOCAL_CONFIG="64-128-2-1-16" (for bench/engine_ab.py's and bench/masked_designs.py's sweeps)."""
    text = os.environ.get("RANA_LOCAL_CONFIG", "")
    if not text:
        return CONFIG
    return launch_ints("RANA_LOCAL_CONFIG", text, (5,), "BLOCK_M-BLOCK_K-warps-stages-programs per multiprocessor, "
                       "e.g. 64-128-2-1-16")


def shape(K: int, M: int, groups: int, device: torch.device) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_K, warps, stages, S, P): S programs per column block and group, enough for the configured
    programs a multiprocessor, and the power of two P ≥ ⌈K / S⌉ of candidate rows a program holds."""
    block_m, block_k, warps, stages, per_sm = config()
    block_m = min(block_m, max(32, triton.next_power_of_2(M)))
    programs = math.ceil(M / block_m) * groups
    S = max(1, min(math.ceil(K / RUN), math.ceil(per_sm * _multiprocessors(device) / programs)))
    return block_m, block_k, warps, stages, S, triton.next_power_of_2(math.ceil(K / (S * RUN)) * RUN)


if triton is not None:

    @triton.jit
    def _entries(j0, n, list_ptr, value_ptr, BLOCK_K: tl.constexpr):
        """Rows and coefficients at this program's list positions j0… (< n)."""
        j = j0 + tl.arange(0, BLOCK_K)
        ok = j < n
        return (tl.load(list_ptr + j, mask=ok, other=0, cache_modifier=".cg"),
                tl.load(value_ptr + j, mask=ok, other=0.0, cache_modifier=".cg"), ok)

    @triton.jit
    def _step(acc, j0, n, row, c, ok, list_ptr, value_ptr, rows_ptr, stride_k, offs_m, m_ok,
              BLOCK_K: tl.constexpr, WIDE: tl.constexpr):
        """acc + this step's listed rows; the next step's entries are loaded while the rows are in flight."""
        if WIDE:
            row = row.to(tl.int64)
        tile = tl.load(rows_ptr + row[:, None] * stride_k + offs_m[None, :], mask=ok[:, None] & m_ok[None, :],
                       other=0.0)
        next_row, next_c, next_ok = _entries(j0 + BLOCK_K, n, list_ptr, value_ptr, BLOCK_K)
        return acc + tl.sum(tile.to(tl.float32) * c[:, None], axis=0), next_row, next_c, next_ok

    @triton.jit
    def _local_kernel(rows_ptr, coeff_ptr, scale_ptr, threshold_ptr, partial_ptr, source_ptr, list_ptr, value_ptr,
                      K, M, stride_k, S: tl.constexpr, P: tl.constexpr, RUN: tl.constexpr, HAS_SCALE: tl.constexpr,
                      SHARED_COEFF: tl.constexpr, SOURCE_SPLITS: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_M: tl.constexpr, WIDE: tl.constexpr, INTERPRET: tl.constexpr, PDL: tl.constexpr):
        """Program (m, s, g): columns m·BLOCK_M… of Σ over the active rows of runs s, s + S, … of group g, into
        partial[g, s, :] (the module's docstring)."""
        pid_m, pid_s, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        await_inputs(PDL)
        i = tl.arange(0, P)
        k = ((i // RUN) * S + pid_s) * RUN + i % RUN
        ok = k < K
        c, active = _coefficients(k, ok, g, coeff_ptr, scale_ptr, tl.load(threshold_ptr + g), source_ptr, K, pid_m,
                                  HAS_SCALE, SHARED_COEFF, SOURCE_SPLITS)
        slot = tl.cumsum(active.to(tl.int32), axis=0) - 1
        n = tl.sum(active.to(tl.int32), axis=0)
        mine = ((g * S + pid_s) * tl.num_programs(0) + pid_m) * P  # this program's slice of the scratch lists
        list_ptr += mine
        value_ptr += mine
        tl.store(list_ptr + slot, g * K + k, mask=active)
        tl.store(value_ptr + slot, c, mask=active)
        tl.debug_barrier()  # the whole list written before any thread reads it back
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        acc = tl.zeros([BLOCK_M], dtype=tl.float32)
        row, c, j_ok = _entries(0, n, list_ptr, value_ptr, BLOCK_K)
        if INTERPRET:  # the interpreter cannot take a loaded value as a range bound; a while loop it can
            j0 = 0
            while j0 < n:
                acc, row, c, j_ok = _step(acc, j0, n, row, c, j_ok, list_ptr, value_ptr, rows_ptr, stride_k, offs_m,
                                          m_ok, BLOCK_K, WIDE)
                j0 += BLOCK_K
        else:
            for j0 in range(0, n, BLOCK_K):
                acc, row, c, j_ok = _step(acc, j0, n, row, c, j_ok, list_ptr, value_ptr, rows_ptr, stride_k, offs_m,
                                          m_ok, BLOCK_K, WIDE)
        tl.store(partial_ptr + (g * S + pid_s) * M + offs_m, acc, mask=m_ok)


def local_partials(rows: torch.Tensor, coeff: torch.Tensor, threshold: torch.Tensor, scale: torch.Tensor | None,
                   groups: int, source: torch.Tensor | None, source_splits: int,
                   shared_coeff: bool) -> tuple[torch.Tensor, int]:
    """masked_kernels.masked_rows_partials' contract (its arguments already checked there), in one launch:
    (partials (groups · S, M) in float32, S)."""
    K_all, M = rows.shape
    K = K_all // groups
    block_m, block_k, warps, stages, S, P = shape(K, M, groups, rows.device)
    blocks = math.ceil(M / block_m)
    partial = _buffer("local partial", groups * S * M, torch.float32, rows.device)
    lists = _buffer("local list", groups * S * blocks * P, torch.int32, rows.device)
    values = _buffer("local value", groups * S * blocks * P, torch.float32, rows.device)
    p = pdl(rows)
    _local_kernel[(blocks, S, groups)](
        rows, coeff, scale if scale is not None else coeff, threshold, partial,
        source if source is not None else coeff, lists, values, K, M, rows.stride(0), S=S, P=P, RUN=RUN,
        HAS_SCALE=scale is not None, SHARED_COEFF=shared_coeff, SOURCE_SPLITS=source_splits, BLOCK_K=block_k,
        BLOCK_M=block_m, WIDE=rows.numel() >= 2**31, INTERPRET=_interpreting(), PDL=p, num_warps=warps,
        num_stages=stages, launch_pdl=p)
    return partial, S
