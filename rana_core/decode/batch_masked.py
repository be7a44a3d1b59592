"""RaNA's masked products for a small batch of tokens (2-16) decoding together: the union of their masks.

At batch 1 a masked product reads only the rows its token activates (masked_kernels). With B tokens each has its
own mask, and the rows any of them activates must be read; each row read is then used by all B tokens, every
token that did not activate it multiplying it by zero. So a row is read once per step, not once per token, and
the product stays exact for every token. What it buys depends on how much the masks overlap: at density d per
token and independent masks the union keeps 1 − (1 − d)^B of the rows (d = 0.5: 0.94 at B = 4), which is why
activation-sparsity kernels are asked about batches (bench/masked_batch.py measures it).

Two launches and a reduction, as at batch 1:
1. compact: programs over chunks of the coefficients (B × K) list the rows any token activates, in order, with
   each token's coefficient for them (0 where its own mask is off);
2. gather: programs over (output columns, equal shares of the list) stream the listed rows, BLOCK_K at a time,
   and multiply them by the B tokens' coefficients in one small matrix product (tensor cores; the batch is
   padded to 16 rows, the smallest such product);
3. the shares' partial sums added in a fixed order (deterministic).

Once the union keeps most rows (a few tokens at the densities RaNA runs at), listing them costs more than it
saves: `masked_rows_dense` reads every row in order, the masks applied to the coefficients as they are loaded,
with no list (one product launch and its reduction).
"""

from __future__ import annotations

import math

import torch

from rana_core.decode.launch import interpreting, multiprocessors, triton, use_triton
from rana_core.decode.masked_kernels import BLOCK_K, BLOCK_M, COMPACT_CHUNK, masked_rows_batched, reduce_partials

MAX_BATCH = 16  # the padded batch of the gather's matrix product


def check_batch(x: torch.Tensor, inner: int, what: str) -> None:
    """One line unless x is a small batch's (B ≤ MAX_BATCH, inner) input; `what` names x and its partner."""
    if x.dim() != 2 or x.shape[1] != inner or not 1 <= x.shape[0] <= MAX_BATCH:
        raise ValueError(f"{what}: need (B ≤ {MAX_BATCH}, {inner})")

if triton is not None:
    import triton.language as tl

    from rana_core.decode.masked_kernels import list_share, list_slots

    @triton.jit
    def _union_compact_kernel(coeff_ptr, scale_ptr, threshold_ptr, index_ptr, value_ptr, count_ptr, B, K,
                              HAS_SCALE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_B: tl.constexpr):
        """Program c: the rows of chunk c that any of the B tokens activates, to index[c·CHUNK…] in order, each
        token's coefficient for them (0 where its mask is off) to value[b, c·CHUNK…], their number to count[c]."""
        c = tl.program_id(0)
        offs = c * CHUNK + tl.arange(0, CHUNK)
        ok = offs < K
        b = tl.arange(0, BLOCK_B)
        b_ok = b < B
        both = b_ok[:, None] & ok[None, :]
        coeff = tl.load(coeff_ptr + b[:, None] * K + offs[None, :], mask=both, other=0.0).to(tl.float32)
        score = tl.abs(coeff)
        if HAS_SCALE:
            score = score * tl.load(scale_ptr + offs, mask=ok, other=0.0).to(tl.float32)[None, :]
        active = both & (score >= tl.load(threshold_ptr))
        listed = tl.max(active.to(tl.int32), axis=0) > 0
        slot = c * CHUNK + tl.cumsum(listed.to(tl.int32), axis=0) - 1
        tl.store(index_ptr + slot, offs, mask=listed)
        tl.store(value_ptr + b[:, None] * K + slot[None, :], tl.where(active, coeff, 0.0),
                 mask=b_ok[:, None] & listed[None, :])
        tl.store(count_ptr + c, tl.sum(listed.to(tl.int32), axis=0))

    @triton.jit
    def _union_entries(j0, stop, ends, starts, index_ptr, value_ptr, b, b_ok, K, CHUNK: tl.constexpr,
                       BLOCK_K: tl.constexpr):
        """The rows at list positions j0… (< stop) and the B tokens' coefficients for them (BLOCK_B × BLOCK_K)."""
        slot, j_ok = list_slots(j0, stop, ends, starts, CHUNK, BLOCK_K)
        row = tl.load(index_ptr + slot, mask=j_ok, other=0)
        c = tl.load(value_ptr + b[:, None] * K + slot[None, :], mask=b_ok[:, None] & j_ok[None, :], other=0.0)
        return row, c, j_ok

    @triton.jit
    def _union_gather_step(acc, j0, stop, ends, starts, row, c, j_ok, index_ptr, value_ptr, rows_ptr, b, b_ok,
                           offs_m, m_ok, K, M, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr):
        """acc (BLOCK_B × BLOCK_M) + this step's coefficients times its rows; the next step's list entries are
        loaded while this step's rows are in flight (as masked_kernels' batch-1 gather does: otherwise the entry
        and row loads wait on each other, step after step)."""
        tile = tl.load(rows_ptr + row[:, None].to(tl.int64) * M + offs_m[None, :], mask=j_ok[:, None] & m_ok[None, :],
                       other=0.0)
        next_row, next_c, next_ok = _union_entries(j0 + BLOCK_K, stop, ends, starts, index_ptr, value_ptr, b, b_ok,
                                                   K, CHUNK, BLOCK_K)
        # the coefficients are values of the rows' dtype (or zero), so casting them back to it is exact
        return tl.dot(c.to(tile.dtype), tile, acc, input_precision="ieee"), next_row, next_c, next_ok

    @triton.jit
    def _union_gather_kernel(rows_ptr, index_ptr, value_ptr, count_ptr, partial_ptr, B, K, M,
                             SPLITS: tl.constexpr, CHUNKS: tl.constexpr, CHUNKS_P2: tl.constexpr,
                             CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_B: tl.constexpr, INTERPRET: tl.constexpr):
        """Program (m, s): columns m·BLOCK_M… of every token's product over share s of the list, into
        partial[s, b, :]."""
        pid_m, pid_s = tl.program_id(0), tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        b = tl.arange(0, BLOCK_B)
        b_ok = b < B
        ends, starts, begin, stop = list_share(count_ptr, pid_s, CHUNKS, CHUNKS_P2, SPLITS, BLOCK_K)
        acc = tl.zeros([BLOCK_B, BLOCK_M], dtype=tl.float32)
        row, c, j_ok = _union_entries(begin, stop, ends, starts, index_ptr, value_ptr, b, b_ok, K, CHUNK, BLOCK_K)
        if INTERPRET:  # the interpreter takes no loaded value as a range bound; a while loop it does
            j0 = begin
            while j0 < stop:
                acc, row, c, j_ok = _union_gather_step(acc, j0, stop, ends, starts, row, c, j_ok, index_ptr,
                                                       value_ptr, rows_ptr, b, b_ok, offs_m, m_ok, K, M, CHUNK,
                                                       BLOCK_K)
                j0 += BLOCK_K
        else:
            for j0 in range(begin, stop, BLOCK_K):
                acc, row, c, j_ok = _union_gather_step(acc, j0, stop, ends, starts, row, c, j_ok, index_ptr,
                                                       value_ptr, rows_ptr, b, b_ok, offs_m, m_ok, K, M, CHUNK,
                                                       BLOCK_K)
        tl.store(partial_ptr + (pid_s * B + b[:, None]) * M + offs_m[None, :], acc,
                 mask=b_ok[:, None] & m_ok[None, :])

    @triton.jit
    def _dense_masked_kernel(rows_ptr, coeff_ptr, coeff_stride, scale_ptr, threshold_ptr, partial_ptr, B, K, M,
                             K_PER: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_K: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr):
        """Program (m, s): columns m·BLOCK_M… of every token's product over rows s·K_PER… (all of them, in
        order), each token's coefficients zeroed where its mask is off, into partial[s, b, :]."""
        pid_m, pid_s = tl.program_id(0), tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        b = tl.arange(0, BLOCK_B)
        b_ok = b < B
        threshold = tl.load(threshold_ptr)
        acc = tl.zeros([BLOCK_B, BLOCK_M], dtype=tl.float32)
        for step in range(0, K_PER, BLOCK_K):
            offs_k = pid_s * K_PER + step + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            c = tl.load(coeff_ptr + b[:, None] * coeff_stride + offs_k[None, :], mask=b_ok[:, None] & k_ok[None, :],
                        other=0.0)
            score = tl.abs(c.to(tl.float32))
            if HAS_SCALE:
                score = score * tl.load(scale_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            tile = tl.load(rows_ptr + offs_k[:, None].to(tl.int64) * M + offs_m[None, :],
                           mask=k_ok[:, None] & m_ok[None, :], other=0.0)
            # coefficients of the rows' dtype, or zero: exact in it
            acc = tl.dot(tl.where(score >= threshold, c, 0.0).to(tile.dtype), tile, acc, input_precision="ieee")
        tl.store(partial_ptr + (pid_s * B + b[:, None]) * M + offs_m[None, :], acc,
                 mask=b_ok[:, None] & m_ok[None, :])


DENSE_BLOCK_K, DENSE_BLOCK_M = 64, 128  # rows and columns per step of masked_rows_dense: 16 KB of fp16 rows


def masked_rows_dense(rows: torch.Tensor, coeff: torch.Tensor, threshold: torch.Tensor,
                      scale: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The union product's result, (B, M) in `out` (default: the coefficients' dtype), reading every row: each
    token's mask applied to its coefficients on the way. `coeff` (B, K) may be a view with a row stride (a slice
    of a wider product); the rest as masked_rows_union."""
    check_batch(coeff, rows.shape[0], f"coefficients {tuple(coeff.shape)} for rows {tuple(rows.shape)}")
    if coeff.stride(1) != 1 or rows.stride(1) != 1:
        raise ValueError("coefficients and rows must be contiguous along their last axis")
    B, K = coeff.shape
    M = rows.shape[1]
    out = out if out is not None else torch.empty(B, M, dtype=coeff.dtype, device=rows.device)
    if not use_triton(rows):
        return out.copy_(masked_rows_batched(rows, coeff, threshold, scale))
    blocks_m = math.ceil(M / DENSE_BLOCK_M)
    steps = math.ceil(K / DENSE_BLOCK_K)
    splits = max(1, min(steps, math.ceil(4 * multiprocessors(rows.device) / blocks_m)))
    k_per = math.ceil(steps / splits) * DENSE_BLOCK_K
    splits = math.ceil(K / k_per)
    partial = torch.empty(splits * B * M, dtype=torch.float32, device=rows.device)
    _dense_masked_kernel[(blocks_m, splits)](rows, coeff, coeff.stride(0), scale if scale is not None else coeff,
                                             threshold, partial, B, K, M, K_PER=k_per, HAS_SCALE=scale is not None,
                                             BLOCK_K=DENSE_BLOCK_K, BLOCK_M=DENSE_BLOCK_M, BLOCK_B=MAX_BATCH,
                                             num_warps=4, num_stages=3)
    return reduce_partials(partial, splits, out.view(-1)).view(B, M)


def masked_rows_union(rows: torch.Tensor, coeff: torch.Tensor, threshold: torch.Tensor,
                      scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, listed): y[b] = Σ_k [score_bk ≥ threshold] · coeff_bk · rows[k, :] for each of B tokens, float32
    (B, M), and how many of the K rows the union of their masks listed (a device tensor: reading it waits for
    the GPU, which a captured graph must not). `rows` (K, M) row-major, `coeff` (B, K) in the rows' dtype,
    `threshold` one float32 element, `scale` (K,) for neuron scores (|h_k| · scale_k)."""
    check_batch(coeff, rows.shape[0], f"coefficients {tuple(coeff.shape)} for rows {tuple(rows.shape)}")
    B, K = coeff.shape
    M = rows.shape[1]
    if not use_triton(rows):
        score = coeff.float().abs() * (scale.float() if scale is not None else 1.0)
        active = score >= threshold
        return (coeff.float() * active) @ rows.float(), active.any(0).sum()
    device = rows.device
    chunk = min(COMPACT_CHUNK, triton.next_power_of_2(K))
    chunks = math.ceil(K / chunk)
    index = torch.empty(K, dtype=torch.int32, device=device)
    value = torch.empty(B * K, dtype=torch.float32, device=device)
    count = torch.empty(chunks, dtype=torch.int32, device=device)
    coeff = coeff.contiguous()
    _union_compact_kernel[(chunks,)](coeff, scale if scale is not None else coeff, threshold, index, value, count,
                                     B, K, HAS_SCALE=scale is not None, CHUNK=chunk, BLOCK_B=MAX_BATCH,
                                     num_warps=4 if chunk <= 1024 else 8)
    blocks_m = math.ceil(M / BLOCK_M)
    splits = max(1, min(math.ceil(K / BLOCK_K), math.ceil(16 * multiprocessors(device) / blocks_m)))
    partial = torch.empty(splits * B * M, dtype=torch.float32, device=device)
    _union_gather_kernel[(blocks_m, splits)](rows, index, value, count, partial, B, K, M, SPLITS=splits,
                                             CHUNKS=chunks, CHUNKS_P2=triton.next_power_of_2(chunks), CHUNK=chunk,
                                             BLOCK_K=BLOCK_K, BLOCK_M=BLOCK_M, BLOCK_B=MAX_BATCH,
                                             INTERPRET=interpreting(), num_warps=4)
    return partial.view(splits, B, M).sum(0), count.sum()
