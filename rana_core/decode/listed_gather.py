"""The gather of a masked product whose coefficients the GEMV that made them already listed (gemv's `lists`: RaNA's
B, RANA_B_LISTS=1), so no compaction launch runs between the two.

Each B GEMV program lists its own BLOCK_N rows: a chunk of at most that many entries, in the list format of
masked_kernels (index/value at the chunk's first slot, count per chunk). There are hundreds of such chunks (431 for
a 7B QKV B), where the compaction makes two; the list gather's way of mapping a share's positions over every chunk
(masked_kernels.list_slots, a [positions × chunks] tile) would not fit in registers. Here a program's share is a
range of whole chunks, read slot by slot: a step covers BLOCK_K slots (BLOCK_K / chunk chunks), a slot past its
chunk's count is masked (its row is not read), so nothing maps positions, and the splits are the list design's.
The price is masked lanes: a step at density d reads d · BLOCK_K rows, not BLOCK_K.
"""

from __future__ import annotations

import math

import torch

from rana_core.decode.launch import pdl, triton, work_buffer
from rana_core.decode.masked_kernels import _list_splits, gather_config

if triton is not None:
    import triton.language as tl

    from rana_core.decode.launch import await_inputs

    @triton.jit
    def _slots(c, stop, count_ptr, index_ptr, value_ptr, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr):
        """(rows, coefficients, valid) of the BLOCK_K slots of chunks c… (those before `stop`): slot e of a chunk
        is valid below the chunk's count."""
        slot = tl.arange(0, BLOCK_K)
        chunk = c + slot // CHUNK
        in_range = chunk < stop
        valid = in_range & (slot % CHUNK < tl.load(count_ptr + chunk, mask=in_range, other=0, cache_modifier=".cg"))
        at = chunk * CHUNK + slot % CHUNK
        return (tl.load(index_ptr + at, mask=valid, other=0, cache_modifier=".cg"),
                tl.load(value_ptr + at, mask=valid, other=0.0, cache_modifier=".cg"), valid)

    @triton.jit
    def _listed_gather_kernel(rows_ptr, index_ptr, value_ptr, count_ptr, partial_ptr, K, M, stride_k,
                              SPLITS: tl.constexpr, CHUNKS: tl.constexpr, SPAN: tl.constexpr, CHUNK: tl.constexpr,
                              BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, WIDE: tl.constexpr, PDL: tl.constexpr):
        """Program (m, s, g): columns m·BLOCK_M… of Σ value·rows[index] over chunks s·SPAN… of group g's list, into
        partial[g, s, :]; the next step's slots are loaded while this step's rows are in flight."""
        await_inputs(PDL)
        pid_m, pid_s, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        count_ptr += g * CHUNKS
        index_ptr += g * K
        value_ptr += g * K
        rows_ptr += g * K * stride_k
        first = pid_s * SPAN
        stop = tl.minimum(first + SPAN, CHUNKS)
        STEP: tl.constexpr = BLOCK_K // CHUNK  # chunks a step
        acc = tl.zeros([BLOCK_M], dtype=tl.float32)
        row, c, valid = _slots(first, stop, count_ptr, index_ptr, value_ptr, CHUNK, BLOCK_K)
        for step in tl.static_range(0, SPAN, STEP):
            if WIDE:
                row = row.to(tl.int64)
            tile = tl.load(rows_ptr + row[:, None] * stride_k + offs_m[None, :],
                           mask=valid[:, None] & m_ok[None, :], other=0.0)
            row, c_next, valid = _slots(first + step + STEP, stop, count_ptr, index_ptr, value_ptr, CHUNK, BLOCK_K)
            acc += tl.sum(tile.to(tl.float32) * c[:, None], axis=0)
            c = c_next
        tl.store(partial_ptr + (g * SPLITS + pid_s) * M + offs_m, acc, mask=m_ok)


def listed_shape(K: int, M: int, groups: int, chunk: int, device: torch.device) -> tuple[int, int, int]:
    """(slots a step, chunks a share, splits) of the listed gather over groups of K rows of M columns listed in
    chunks of `chunk`: the list design's splits, each share whole steps of whole chunks."""
    block_k = max(gather_config()[1], chunk)
    step = block_k // chunk
    splits = _list_splits(K, M, groups, device)
    span = math.ceil(math.ceil(K / chunk) / splits / step) * step
    return block_k, span, math.ceil(math.ceil(K / chunk) / span)


def masked_rows_listed(rows: torch.Tensor, lists: tuple, groups: int, chunk: int) -> tuple[torch.Tensor, int]:
    """masked_rows_partials for coefficients a GEMV already listed (gemv's `lists`, chunks of `chunk` rows:
    (threshold, index, value, count)): the gather alone, a share a range of whole chunks; (partials, splits) as
    masked_rows_partials returns them, for the same consumers."""
    K_all, M = rows.shape
    K = K_all // groups
    _, index, value, count = lists
    chunks = math.ceil(K / chunk)
    if count.numel() != groups * chunks or index.numel() < K_all:
        raise ValueError(f"lists of {groups} groups of {chunks} chunks of {chunk} rows for rows {tuple(rows.shape)}")
    block_m, _, warps, stages, _, _ = gather_config()
    block_k, span, splits = listed_shape(K, M, groups, chunk, rows.device)
    partial = work_buffer("partial", groups * splits * M, torch.float32, rows.device)
    p = pdl(rows)
    _listed_gather_kernel[(math.ceil(M / block_m), splits, groups)](
        rows, index, value, count, partial, K, M, rows.stride(0), SPLITS=splits, CHUNKS=chunks, SPAN=span,
        CHUNK=chunk, BLOCK_K=block_k, BLOCK_M=block_m, WIDE=rows.numel() >= 2**31, PDL=p, num_warps=warps,
        num_stages=stages, launch_pdl=p)
    return partial, splits
