"""RaNA's masked SwiGLU MLP by blocks of neurons: one launch from the rank coefficients to down's partial sums
(RANA_MLP_BLOCKS).

The list design's chain after B is rank compaction → gate/up gather → down's compaction → down's gather →
reduction: five dependent launches, each hand-over 2-4 µs in which no weight moves on a 7B layer (docs/latency.md,
sessions 23-26: ~19 µs fixed a masked MLP). Only two of those hand-overs are forced by the arithmetic: gate and up
need every active rank (a sum over ranks), and down's output needs every active neuron (a sum over neurons).
Between them nothing is global: neuron j's h_j = silu(gate_j)·up_j and its mask need gate_j and up_j only. So
program (s, b) of one launch owns neuron block b (NB neurons: columns b·NB… of gate's and up's Aᵀ, rows b·NB… of
W_downᵀ) and column split s of down's outputs:

1. gate and up of its neurons: Σ over the active ranks k of z_k · Aᵀ[k, block], one 2·NB-byte segment of a rank
   row at a time. Each program reads every rank's coefficient and decides its mask itself; a rank masked off is a
   row whose load is predicated off, so none of its bytes move (no compaction launch). With RANK_LIST the ranks
   come from the list design's compaction instead (one launch more, denser loads);
2. h = silu(gate)·up, rounded as the unfused ops round it, and down's mask on h (|h_j|·‖W_down[:, j]‖ ≥ τ);
3. the active neurons' rows of W_downᵀ over its columns, into partial[b, columns].

The reduction (masked_kernels.reduce_partials, which may add the residual) sums the blocks' partials in a fixed
order: B → blocks → reduction, two hand-overs for the chain's five, and every replay adds in the same order. The
programs of one block's column splits are adjacent in the launch, so they read the block's rank segments at about
the same time (the second read finds them in L2). What it gives up: a program walks every rank of its block (the
list gather splits the list evenly over many programs), and the blocks' active neurons vary.
"""

from __future__ import annotations

import math
import os

import torch

from rana_core.decode.launch import interpreting, launch_ints, pdl, triton, work_buffer
from rana_core.decode.masked_kernels import compact_list, reduce_to

if triton is not None:
    import triton.language as tl

    from rana_core.decode.launch import await_inputs
    from rana_core.decode.masked_kernels import _list_entries, active_of, list_share, swiglu

# (neurons a block, ranks a step, down's columns a step, column splits, warps, stages, rank list 0/1);
# RANA_MLP_BLOCKS="64-64-128-2-4-2-0" overrides it, "0" (the default until timed) keeps the list design's chain.
CONFIG = (64, 64, 128, 2, 4, 2, 0)


def blocks_config() -> tuple[int, ...] | None:
    """The launch configuration of the design (CONFIG, or RANA_MLP_BLOCKS's seven integers; "1" CONFIG), or None
    where RANA_MLP_BLOCKS is unset or "0": the MLP runs the list design's chain (mlp_branches)."""
    text = os.environ.get("RANA_MLP_BLOCKS", "0")
    if text == "0":
        return None
    if text == "1":
        return CONFIG
    values = launch_ints("RANA_MLP_BLOCKS", text, (7,), "0, 1, or NB-BK-BD-splits-warps-stages-list, e.g. "
                         "64-64-128-2-4-2-0")
    if any(v < 1 or v & (v - 1) for v in values[:3]) or values[6] not in (0, 1):
        raise ValueError(f"RANA_MLP_BLOCKS={text}: NB, BK and BD are powers of two, the list flag 0 or 1")
    return values


if triton is not None:
    @triton.jit
    def _rank_sums_predicated(rows_ptr, coeff_ptr, up_coeff_ptr, scale_ptr, threshold_ptr, offs_n, n_ok,
                              K: tl.constexpr, M: tl.constexpr, HAS_SCALE: tl.constexpr, BK: tl.constexpr,
                              NB: tl.constexpr, WIDE: tl.constexpr):
        """(gate, up) of the neurons offs_n: every rank's coefficient read, the masked-off ranks' rows not."""
        gate = tl.zeros([NB], dtype=tl.float32)
        up = tl.zeros([NB], dtype=tl.float32)
        gate_threshold = tl.load(threshold_ptr)
        up_threshold = tl.load(threshold_ptr + 1)
        columns = offs_n
        if WIDE:
            columns = columns.to(tl.int64)
        for k0 in range(0, K, BK):
            offs_k = k0 + tl.arange(0, BK)
            k_ok = offs_k < K
            zg = tl.load(coeff_ptr + offs_k, mask=k_ok, other=0.0, cache_modifier=".cg")
            zu = tl.load(up_coeff_ptr + offs_k, mask=k_ok, other=0.0, cache_modifier=".cg")
            gate_on = active_of(zg, offs_k, k_ok, 0, scale_ptr, gate_threshold, K, HAS_SCALE)
            up_on = active_of(zu, offs_k, k_ok, 1, scale_ptr, up_threshold, K, HAS_SCALE)
            row = offs_k
            if WIDE:
                row = row.to(tl.int64)
            tile_g = tl.load(rows_ptr + row[:, None] * M + columns[None, :], mask=gate_on[:, None] & n_ok[None, :],
                             other=0.0)
            tile_u = tl.load(rows_ptr + (row + K)[:, None] * M + columns[None, :],
                             mask=up_on[:, None] & n_ok[None, :], other=0.0)
            gate += tl.sum(tile_g.to(tl.float32) * zg.to(tl.float32)[:, None], axis=0)
            up += tl.sum(tile_u.to(tl.float32) * zu.to(tl.float32)[:, None], axis=0)
        return gate, up

    @triton.jit
    def _listed_step(gate, up, j0, stop_g, ends_g, starts_g, stop_u, ends_u, starts_u, rows_ptr, index_ptr,
                     value_ptr, columns, n_ok, K: tl.constexpr, M: tl.constexpr,
                     CHUNK: tl.constexpr, BK: tl.constexpr, WIDE: tl.constexpr):
        """gate and up plus the rows of list positions j0… of each group's list."""
        row_g, c_g, ok_g = _list_entries(j0, stop_g, ends_g, starts_g, index_ptr, value_ptr, CHUNK, BK)
        row_u, c_u, ok_u = _list_entries(j0, stop_u, ends_u, starts_u, index_ptr + K, value_ptr + K, CHUNK, BK)
        if WIDE:
            row_g = row_g.to(tl.int64)
            row_u = row_u.to(tl.int64)
        tile_g = tl.load(rows_ptr + row_g[:, None] * M + columns[None, :], mask=ok_g[:, None] & n_ok[None, :],
                         other=0.0)
        tile_u = tl.load(rows_ptr + (row_u + K)[:, None] * M + columns[None, :], mask=ok_u[:, None] & n_ok[None, :],
                         other=0.0)
        return (gate + tl.sum(tile_g.to(tl.float32) * c_g[:, None], axis=0),
                up + tl.sum(tile_u.to(tl.float32) * c_u[:, None], axis=0))

    @triton.jit
    def _rank_sums_listed(rows_ptr, index_ptr, value_ptr, count_ptr, offs_n, n_ok, K: tl.constexpr, M: tl.constexpr,
                          CHUNKS: tl.constexpr, CHUNKS_P2: tl.constexpr, CHUNK: tl.constexpr, BK: tl.constexpr,
                          NB: tl.constexpr, WIDE: tl.constexpr, INTERPRET: tl.constexpr):
        """(gate, up) of the neurons offs_n over the two groups' rank lists (masked_kernels.compact_list)."""
        gate = tl.zeros([NB], dtype=tl.float32)
        up = tl.zeros([NB], dtype=tl.float32)
        ends_g, starts_g, _, stop_g = list_share(count_ptr, 0, CHUNKS, CHUNKS_P2, 1, BK)
        ends_u, starts_u, _, stop_u = list_share(count_ptr + CHUNKS, 0, CHUNKS, CHUNKS_P2, 1, BK)
        columns = offs_n
        if WIDE:
            columns = columns.to(tl.int64)
        stop = tl.maximum(stop_g, stop_u)
        if INTERPRET:  # the interpreter cannot take a loaded value as a range bound; a while loop it can
            j0 = 0
            while j0 < stop:
                gate, up = _listed_step(gate, up, j0, stop_g, ends_g, starts_g, stop_u, ends_u, starts_u, rows_ptr,
                                        index_ptr, value_ptr, columns, n_ok, K, M, CHUNK, BK, WIDE)
                j0 += BK
        else:
            for j0 in range(0, stop, BK):
                gate, up = _listed_step(gate, up, j0, stop_g, ends_g, starts_g, stop_u, ends_u, starts_u, rows_ptr,
                                        index_ptr, value_ptr, columns, n_ok, K, M, CHUNK, BK, WIDE)
        return gate, up

    @triton.jit
    def _blocks_kernel(rows_ptr, coeff_ptr, scale_ptr, threshold_ptr, down_ptr, down_scale_ptr, down_threshold_ptr,
                       index_ptr, value_ptr, count_ptr, partial_ptr, K: tl.constexpr, M: tl.constexpr,
                       D: tl.constexpr, NB: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, D_COLS: tl.constexpr,
                       HAS_SCALE: tl.constexpr,
                       HAS_DOWN_SCALE: tl.constexpr, SHARED_COEFF: tl.constexpr, RANK_LIST: tl.constexpr,
                       CHUNKS: tl.constexpr, CHUNKS_P2: tl.constexpr, CHUNK: tl.constexpr, WIDE: tl.constexpr,
                       INTERPRET: tl.constexpr, PDL: tl.constexpr):
        """Program (s, b): neuron block b's gate, up, h and mask, then its active rows of W_downᵀ over columns
        s·D_COLS… into partial[b, :] (see the module)."""
        await_inputs(PDL)
        s = tl.program_id(0)
        b = tl.program_id(1)
        offs_n = b * NB + tl.arange(0, NB)
        n_ok = offs_n < M
        if RANK_LIST:
            gate, up = _rank_sums_listed(rows_ptr, index_ptr, value_ptr, count_ptr, offs_n, n_ok, K, M, CHUNKS,
                                         CHUNKS_P2, CHUNK, BK, NB, WIDE, INTERPRET)
        else:
            up_coeff_ptr = coeff_ptr if SHARED_COEFF else coeff_ptr + K
            gate, up = _rank_sums_predicated(rows_ptr, coeff_ptr, up_coeff_ptr, scale_ptr, threshold_ptr, offs_n,
                                             n_ok, K, M, HAS_SCALE, BK, NB, WIDE)
        dtype = down_ptr.dtype.element_ty
        h = swiglu(gate, up, dtype).to(dtype)  # as the list design's down compaction makes it
        on = active_of(h, offs_n, n_ok, 0, down_scale_ptr, tl.load(down_threshold_ptr), M, HAS_DOWN_SCALE)
        h = h.to(tl.float32)
        neurons = offs_n
        if WIDE:
            neurons = neurons.to(tl.int64)
        for d0 in range(0, D_COLS, BD):
            offs_d = s * D_COLS + d0 + tl.arange(0, BD)
            d_ok = offs_d < D
            tile = tl.load(down_ptr + neurons[:, None] * D + offs_d[None, :], mask=on[:, None] & d_ok[None, :],
                           other=0.0)
            tl.store(partial_ptr + b * D + offs_d, tl.sum(tile.to(tl.float32) * h[:, None], axis=0), mask=d_ok)


def blocks_partials(gate_up_rows: torch.Tensor, coeff: torch.Tensor, gate_up_threshold: torch.Tensor,
                    scale: torch.Tensor | None, down, shared_coeff: bool = False,
                    config: tuple[int, ...] | None = None) -> tuple[torch.Tensor, int]:
    """One launch from the rank coefficients to down's partial sums: (partial, blocks), partial (blocks, D) in
    float32 for masked_kernels.reduce_to. `gate_up_rows` (2K, M): gate's and up's Aᵀ stacked (a neuron is a
    column); `coeff` their 2K coefficients (K with `shared_coeff`), `gate_up_threshold` one each, `scale` the
    optional per-row factors of their scores; `down` has rows (M, D) = W_downᵀ, threshold and scale."""
    nb, bk, bd, d_splits, warps, stages, rank_list = config or blocks_config() or CONFIG
    K2, M = gate_up_rows.shape
    K = K2 // 2
    D = down.rows.shape[1]
    if down.rows.shape[0] != M or coeff.numel() != (K if shared_coeff else K2) or gate_up_threshold.numel() != 2:
        raise ValueError(f"gate/up rows {tuple(gate_up_rows.shape)}, {coeff.numel()} coefficients, "
                         f"{gate_up_threshold.numel()} thresholds and down rows {tuple(down.rows.shape)} do not fit")
    rank_list = rank_list and not shared_coeff  # a list serves RaNA's own ranks; shared inputs stay predicated
    blocks = math.ceil(M / nb)
    d_cols = math.ceil(D / d_splits / bd) * bd
    partial = work_buffer("blocks partial", blocks * D, torch.float32, coeff.device)
    index = value = count = coeff
    chunk = chunks = 1
    if rank_list:
        index, value, count, chunk, chunks, _, _ = compact_list(coeff, gate_up_threshold, scale, K, 2)
    wide = max(gate_up_rows.numel(), down.rows.numel()) >= 2**31
    p = pdl(coeff)
    _blocks_kernel[(math.ceil(D / d_cols), blocks)](
        gate_up_rows, coeff, scale if scale is not None else coeff, gate_up_threshold, down.rows,
        down.scale if down.scale is not None else coeff, down.threshold, index, value, count, partial, K, M, D,
        NB=nb, BK=bk, BD=bd, D_COLS=d_cols, HAS_SCALE=scale is not None, HAS_DOWN_SCALE=down.scale is not None,
        SHARED_COEFF=shared_coeff, RANK_LIST=bool(rank_list), CHUNKS=chunks,
        CHUNKS_P2=triton.next_power_of_2(chunks), CHUNK=chunk, WIDE=wide, INTERPRET=interpreting(), PDL=p,
        num_warps=warps, num_stages=stages, launch_pdl=p)
    return partial, blocks


def blocked_swiglu_chain(gate_up_rows: torch.Tensor, coeff: torch.Tensor, gate_up_threshold: torch.Tensor, down,
                         scale: torch.Tensor | None = None, shared_coeff: bool = False,
                         residual: tuple | None = None) -> torch.Tensor:
    """parts.swiglu_chain by blocks of neurons (see the module): (1, D) of down's outputs in down.out, or with
    `residual` = (r, out) r + the MLP written to out and the reduction's sums of squares returned."""
    r, out = residual if residual is not None else (None, down.out)
    partial, blocks = blocks_partials(gate_up_rows, coeff, gate_up_threshold, scale, down, shared_coeff)
    reduced = reduce_to(partial, blocks, out, r)
    return reduced if r is not None else reduced[None]
