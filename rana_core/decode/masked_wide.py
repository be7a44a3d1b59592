"""The masked product in one launch (masked_kernels' contract; RANA_MASKED_PRODUCT=auto|list|wide).

masked_kernels lists the active rows first (a compaction launch), then gathers the listed rows: two dependent
launches and a round trip to memory for the list before any weight moves, the ~6-7 µs fixed cost measured under
each masked product (bench/masked_designs.py). On a small model every step is bound by such latencies, not by
bytes, so there one launch pays even when it reads less efficiently:

- program (m, s, g) owns column block m of group g and the row tiles t = s, s + S, s + 2S, … of BLOCK_K
  contiguous rows (dealt round-robin, so that every program meets the same mix of strong leading ranks and weak
  trailing ones);
- it decides each tile's mask from its coefficients (score ≥ threshold) and loads the tile's rows with the mask
  as the load's predicate (a masked-off row issues no memory request). A program of one or two tiles loads all
  their coefficients first and unrolls the tiles (_wide_kernel); a program of more takes _wide_loop_kernel,
  which loads the next tile's coefficients with this tile's rows;
- the partial sums go to partial[g, s, :], so every consumer (reduce_partials, the rotary kernel, the next
  product's SwiGLU) is the list design's.

Measured on an H200 (docs/latency.md, session 14): SmolLM2's RaNA −44% step 0.743 → 0.627 ms (every program one
tile). On Llama-2-7B's products the unrolled kernel was slower than the list at every density (13-35 µs with
nothing active, against 6-8: six unrolled tiles took 233 registers, 4 waves of programs); the loop kernel that
replaced it there is not yet timed, so "auto" takes the wide design only for products of at most
WIDE_MAX_BYTES.
"""

from __future__ import annotations

import math
import os

import torch

from rana_core.decode.launch import await_inputs, interpreting, multiprocessors, pdl, triton, work_buffer

if triton is not None:
    import triton.language as tl

    from rana_core.decode.masked_kernels import active_of, make_coefficients

# (BLOCK_M, BLOCK_K, warps, stages, programs per multiprocessor); RANA_WIDE_CONFIG="64,64,2,1,16" (or 64-64-2-1-16,
# for bench/engine_ab.py's comma-separated values) overrides it
# (bench/masked_designs.py sweeps it). BLOCK_M is capped by the outputs' count on small models' rows.
CONFIG = (64, 64, 2, 1, 16)
UNROLLED_TILES = 2  # programs of more tiles take the loop kernel (registers: _wide_kernel's docstring)


# Below this many bytes of rows a product takes the wide design by default. Measured on an H200
# (bench/masked_designs.py, bench/engine_ab.py): SmolLM2's products (at most ~4 MB) made its RaNA −44% step 16%
# faster in one launch; Llama-2-7B's (33-90 MB) were 1.4× slower than the list's. Between the two, unmeasured.
WIDE_MAX_BYTES = 16 * 2**20


# Below this many bytes of rows (gate/up's and down's together) a masked SwiGLU MLP runs as two GEMVs over every
# row with the masks on their inputs (parts.swiglu_chain): at a small model's sizes a step is bound by launches,
# not bytes, and the GEMVs need neither a compaction nor a reduction launch. Llama-2-7B's (140 MB) never do.
GEMV_MAX_BYTES = 8 * 2**20


def design(rows: torch.Tensor) -> str:
    """Which masked product runs on `rows`: RANA_MASKED_PRODUCT = "list" (compaction, then gather), "wide" (one
    launch), or "auto" (the default: wide up to WIDE_MAX_BYTES of rows); "gemv" is auto's for a product that
    cannot run as a GEMV (chain_design)."""
    choice = _choice()
    if choice in ("auto", "gemv"):
        return "wide" if rows.numel() * rows.element_size() <= WIDE_MAX_BYTES else "list"
    return choice


def chain_design(*rows: torch.Tensor) -> str:
    """How a masked SwiGLU MLP of these rows runs at one token: "gemv" (two GEMVs over every row, the masks on
    their inputs) where RANA_MASKED_PRODUCT is "gemv", or "auto" and the rows take at most GEMV_MAX_BYTES; else
    "products" (masked products as design() picks them)."""
    choice = _choice()
    total = sum(r.numel() * r.element_size() for r in rows)
    return "gemv" if choice == "gemv" or (choice == "auto" and total <= GEMV_MAX_BYTES) else "products"


def product_design(rows: torch.Tensor) -> str:
    """How one token's masked product over `rows` runs where a GEMV can take it (a masked QKV product): "gemv"
    (every row, the mask on the input, a residual norm still owed folded in) where RANA_MASKED_PRODUCT is "gemv",
    or "auto" and the rows take at most GEMV_MAX_BYTES; else design()'s. On an H200 the GEMV made SmolLM2's real
    TEAL run 0.88 → 1.01× dense and hybrid's 0.84 → 0.98× (session 20, run-latency-…-masked-auto-gemv): the norm
    needs no launch of its own."""
    choice = _choice()
    small = rows.numel() * rows.element_size() <= GEMV_MAX_BYTES
    return "gemv" if choice == "gemv" or (choice == "auto" and small) else design(rows)


def _choice() -> str:
    choice = os.environ.get("RANA_MASKED_PRODUCT", "auto")
    if choice not in ("auto", "list", "wide", "gemv"):
        raise ValueError(f"RANA_MASKED_PRODUCT={choice}: expected auto, list, wide or gemv")
    return choice


def config() -> tuple[int, int, int, int, int]:
    text = os.environ.get("RANA_WIDE_CONFIG")
    return tuple(int(v) for v in text.replace("-", ",").split(",")) if text else CONFIG


def shape(K: int, M: int, groups: int, device: torch.device) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_K, warps, stages, S): S splits of the row tiles, enough for the configured number of
    programs per multiprocessor."""
    block_m, block_k, warps, stages, per_sm = config()
    block_m = min(block_m, max(32, triton.next_power_of_2(M)))
    programs = math.ceil(M / block_m) * groups
    fill = math.ceil(per_sm * multiprocessors(device) / programs)
    tiles = math.ceil(K / block_k)
    return block_m, block_k, warps, stages, max(1, min(tiles, fill))


if triton is not None:

    @triton.jit
    def _coefficients(k, ok, g, coeff_ptr, scale_ptr, threshold, source_ptr, K, pid_m, HAS_SCALE: tl.constexpr,
                      SHARED_COEFF: tl.constexpr, SOURCE_SPLITS: tl.constexpr):
        """(c in float32, active) of group g's rows k (any shape), as the list design's compaction decides them;
        coefficients made from gate/up's partial sums are written once, by the programs of column block 0."""
        first = coeff_ptr if SHARED_COEFF else coeff_ptr + g * K  # every group reads the same K, or its own
        c = make_coefficients(k, ok, first, source_ptr, K, ok & (pid_m == 0), SOURCE_SPLITS)
        return c.to(tl.float32), active_of(c, k, ok, g, scale_ptr, threshold, K, HAS_SCALE)

    @triton.jit
    def _wide_kernel(rows_ptr, coeff_ptr, scale_ptr, threshold_ptr, partial_ptr, source_ptr, K, M, stride_k,
                     S: tl.constexpr, TILES: tl.constexpr, PER_PROGRAM: tl.constexpr, PER_PROGRAM_P2: tl.constexpr,
                     HAS_SCALE: tl.constexpr, SHARED_COEFF: tl.constexpr, SOURCE_SPLITS: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, WIDE: tl.constexpr, PDL: tl.constexpr):
        """Program (m, s, g): columns m·BLOCK_M… of Σ over the active rows of tiles s, s + S, … of group g, into
        partial[g, s, :].

        Every coefficient of the program's PER_PROGRAM tiles is loaded and its mask decided first, in one round
        trip; the tiles' row loads then depend on nothing loaded in the loop, which is unrolled so that they can
        be in flight together. Its registers grow with the tiles (ptxas -v for sm_90a, 64 × 64 tiles, 2 warps, the
        launch's divisibility specialisation: 56 at 1 tile, 96 at 2, 233 at 6), and at 6 only 4 programs fit on a
        multiprocessor where 16 were planned: 7B's 2,112 programs a product ran in 4 waves, 13-35 µs with nothing
        active. So programs of more than UNROLLED_TILES tiles take _wide_loop_kernel (127 registers)."""
        pid_m, pid_s, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        await_inputs(PDL)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        j = tl.arange(0, PER_PROGRAM_P2)
        tile = pid_s + j * S
        k_all = tile[:, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
        c_all, active_all = _coefficients(k_all, (tile[:, None] < TILES) & (k_all < K), g, coeff_ptr, scale_ptr,
                                          tl.load(threshold_ptr + g), source_ptr, K, pid_m, HAS_SCALE,
                                          SHARED_COEFF, SOURCE_SPLITS)
        acc = tl.zeros([BLOCK_K, BLOCK_M], dtype=tl.float32)
        for i in tl.static_range(PER_PROGRAM):
            mine = (j == i)[:, None]  # tile i's row of the coefficients, taken out of the loaded block
            c = tl.sum(tl.where(mine, c_all, 0.0), axis=0)
            active = tl.sum(tl.where(mine & active_all, 1, 0), axis=0) > 0
            row = (pid_s + i * S) * BLOCK_K + tl.arange(0, BLOCK_K) + g * K
            if WIDE:
                row = row.to(tl.int64)
            rows = tl.load(rows_ptr + row[:, None] * stride_k + offs_m[None, :],
                           mask=active[:, None] & m_ok[None, :], other=0.0)
            acc += rows.to(tl.float32) * c[:, None]  # summed over the rows once, after the last tile
        tl.store(partial_ptr + (g * S + pid_s) * M + offs_m, tl.sum(acc, axis=0), mask=m_ok)

    @triton.jit
    def _loop_tile(acc, i, k, c, active, g, pid_s, pid_m, rows_ptr, coeff_ptr, scale_ptr, threshold, source_ptr, K,
                   stride_k, offs_m, m_ok, S: tl.constexpr, TILES: tl.constexpr, HAS_SCALE: tl.constexpr,
                   SHARED_COEFF: tl.constexpr, SOURCE_SPLITS: tl.constexpr, BLOCK_K: tl.constexpr,
                   WIDE: tl.constexpr):
        """Tile i of the loop kernel's program: its rows (k, with c and active already at hand) go out, then the
        next tile's coefficients; returns acc + this tile and the next tile's (k, c, active)."""
        row = g * K + k
        if WIDE:
            row = row.to(tl.int64)
        rows = tl.load(rows_ptr + row[:, None] * stride_k + offs_m[None, :], mask=active[:, None] & m_ok[None, :],
                       other=0.0)
        tile_next = pid_s + (i + 1) * S
        k_next = tile_next * BLOCK_K + tl.arange(0, BLOCK_K)
        c_next, active_next = _coefficients(k_next, (tile_next < TILES) & (k_next < K), g, coeff_ptr, scale_ptr,
                                            threshold, source_ptr, K, pid_m, HAS_SCALE, SHARED_COEFF, SOURCE_SPLITS)
        return acc + rows.to(tl.float32) * c[:, None], k_next, c_next, active_next

    @triton.jit
    def _wide_loop_kernel(rows_ptr, coeff_ptr, scale_ptr, threshold_ptr, partial_ptr, source_ptr, K, M, stride_k,
                          per_program, S: tl.constexpr, TILES: tl.constexpr, HAS_SCALE: tl.constexpr,
                          SHARED_COEFF: tl.constexpr, SOURCE_SPLITS: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_M: tl.constexpr, WIDE: tl.constexpr, INTERPRET: tl.constexpr, PDL: tl.constexpr):
        """_wide_kernel for programs of many tiles (large products; not yet timed): each tile's coefficients are
        loaded, and its mask decided, one tile ahead, so the loads of tile i + 1's coefficients go out with tile
        i's rows and a program pays one memory latency per tile, not two (loading a tile's coefficients just
        before its rows cost 13-26 µs per 7B product with nothing active)."""
        pid_m, pid_s, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        await_inputs(PDL)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        threshold = tl.load(threshold_ptr + g)
        k = pid_s * BLOCK_K + tl.arange(0, BLOCK_K)
        c, active = _coefficients(k, (pid_s < TILES) & (k < K), g, coeff_ptr, scale_ptr, threshold, source_ptr, K,
                                  pid_m, HAS_SCALE, SHARED_COEFF, SOURCE_SPLITS)
        acc = tl.zeros([BLOCK_K, BLOCK_M], dtype=tl.float32)
        if INTERPRET:  # the interpreter cannot take an argument as a range's bound; a while loop it can
            i = 0
            while i < per_program:
                acc, k, c, active = _loop_tile(acc, i, k, c, active, g, pid_s, pid_m, rows_ptr, coeff_ptr, scale_ptr,
                                               threshold, source_ptr, K, stride_k, offs_m, m_ok, S, TILES, HAS_SCALE,
                                               SHARED_COEFF, SOURCE_SPLITS, BLOCK_K, WIDE)
                i += 1
        else:
            for i in tl.range(per_program, num_stages=1):  # a bound known only at launch: not unrolled
                acc, k, c, active = _loop_tile(acc, i, k, c, active, g, pid_s, pid_m, rows_ptr, coeff_ptr, scale_ptr,
                                               threshold, source_ptr, K, stride_k, offs_m, m_ok, S, TILES, HAS_SCALE,
                                               SHARED_COEFF, SOURCE_SPLITS, BLOCK_K, WIDE)
        tl.store(partial_ptr + (g * S + pid_s) * M + offs_m, tl.sum(acc, axis=0), mask=m_ok)


def wide_partials(rows: torch.Tensor, coeff: torch.Tensor, threshold: torch.Tensor, scale: torch.Tensor | None,
                  groups: int, source: torch.Tensor | None, source_splits: int,
                  shared_coeff: bool) -> tuple[torch.Tensor, int]:
    """masked_kernels.masked_rows_partials' contract (its arguments already checked there), in one launch:
    (partials (groups · S, M) in float32, S)."""
    K_all, M = rows.shape
    K = K_all // groups
    block_m, block_k, warps, stages, S = shape(K, M, groups, rows.device)
    partial = work_buffer("wide partial", groups * S * M, torch.float32, rows.device)
    tiles = math.ceil(K / block_k)
    per_program = math.ceil(tiles / S)
    p = pdl(rows)
    grid = (math.ceil(M / block_m), S, groups)
    args = (rows, coeff, scale if scale is not None else coeff, threshold, partial,
            source if source is not None else coeff, K, M, rows.stride(0))
    options = dict(S=S, TILES=tiles, HAS_SCALE=scale is not None, SHARED_COEFF=shared_coeff,
                   SOURCE_SPLITS=source_splits, BLOCK_K=block_k, BLOCK_M=block_m, WIDE=rows.numel() >= 2**31, PDL=p,
                   num_warps=warps, num_stages=stages, launch_pdl=p)
    if per_program <= UNROLLED_TILES:
        _wide_kernel[grid](*args, PER_PROGRAM=per_program, PER_PROGRAM_P2=triton.next_power_of_2(per_program),
                           **options)
    else:
        _wide_loop_kernel[grid](*args, per_program, INTERPRET=interpreting(), **options)
    return partial, S
