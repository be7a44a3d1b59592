"""Triton kernels for RaNA's masked products at batch 1, with a plain PyTorch path for batches.

Both of RaNA's masked products have the same form: y = Σ_{k active} c_k · R[k, :], a sum of the rows of a
K × M matrix R picked by a mask on the coefficients c.

- Rank adapter, A-part: c = z = B x, R = Aᵀ (rank k is row k), active iff z_k² ≥ τ, i.e. |z_k| ≥ √τ.
- Neuron adapter, W_down: c = h, R = W_downᵀ (neuron k is row k), active iff |h_k| · ‖W_down[:, k]‖ ≥ τ.

Storing R row-major makes an active rank or neuron one contiguous row, so a masked-off row is never read. At
batch 1 the product is bound by memory, so its time should follow the bytes of the active rows. Three launches:

1. compact: programs over chunks of c (the fused masker) each write their active rows' indices and
   coefficients, in order, and their count; the chunks' lists one after another are the list;
2. gather: programs over (output columns, equal shares of the *list*, group) stream only the listed rows,
   BLOCK_K at a time with several loads in flight, and store partial sums. Splitting the list rather than K
   keeps every program equally busy at any density, and no program rescans the mask;
3. reduce: the partial sums are added in a fixed order (deterministic: no atomics), fused with what the
   caller does next (a cast, or SwiGLU's silu(gate)·up for the gate and up groups).

A *group* is one independent product in the same launch: gate's and up's A-parts (equal rank, rows stacked)
run as two groups, so the MLP pays for one compaction and one gather launch, not two. Batches larger than one
fall back to a dense product of the masked coefficients. (bench/kernel_variants.py keeps earlier designs.)
"""

from __future__ import annotations

import math
import os

import torch

from rana_core.decode.launch import interpreting, launch_ints, multiprocessors, pdl, triton, use_triton, work_buffer

if triton is not None:
    import triton.language as tl

    from rana_core.decode.launch import await_inputs

# bench/masked_profile.py on an H100 (inside CUDA graphs): 128 rows of 128 bytes per step gather at 2.0-2.9 TB/s,
# 32 rows of 256 bytes at 1.1-1.3 TB/s: more independent rows in flight per step is what pays.
BLOCK_M = 64  # output columns per gather program: a row segment of 128 bytes in fp16
BLOCK_K = 128  # listed rows per gather step
PROGRAMS_PER_SM = 16  # the list is split until about this many gather programs per multiprocessor
GATHER_WARPS, GATHER_STAGES = 2, 3  # 2 warps: 5-20% faster than 4 at every 7B size (more programs resident)
COMPACT_CHUNK = 2048  # per compaction program: 2.6-3.2 µs at 7B sizes (one program: 3.4-8.5; 1024: 2.2-2.7 µs, but
# the gather then maps positions over twice the chunks, and a 7B RaNA step spent 280 µs more in it)


def gather_config() -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_K, warps, stages, programs per multiprocessor, compaction chunk) of the list design;
    RANA_GATHER_CONFIG="64-128-2-3-16[-2048]" overrides the module's constants (for bench/engine_ab.py's sweeps)."""
    text = os.environ.get("RANA_GATHER_CONFIG", "")
    if not text:
        return BLOCK_M, BLOCK_K, GATHER_WARPS, GATHER_STAGES, PROGRAMS_PER_SM, COMPACT_CHUNK
    values = launch_ints("RANA_GATHER_CONFIG", text, (5, 6), "BLOCK_M-BLOCK_K-warps-stages-programs per "
                         "multiprocessor[-compaction chunk], e.g. 64-128-2-3-16")
    return (*values, COMPACT_CHUNK) if len(values) == 5 else values


def _list_splits(K: int, M: int, groups: int, device: torch.device, share: int = 1) -> int:
    """Gather programs per (column block, group): enough to fill the GPU (1/share of it), never more than the list
    can feed."""
    block_m, block_k, _, _, per_sm, _ = gather_config()
    programs = math.ceil(M / block_m) * groups
    return max(1, min(math.ceil(K / block_k), math.ceil(per_sm * multiprocessors(device) / share / programs)))


if triton is not None:
    @triton.jit
    def swiglu(gate, up, dtype):
        """silu(gate) · up in float32 from float32 sums, each operand and the silu rounded to `dtype` on the way,
        as the unfused PyTorch ops (a linear, silu, a product, all in the model's dtype) round them."""
        gate = gate.to(dtype).to(tl.float32)
        return (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32) * up.to(dtype).to(tl.float32)

    @triton.jit
    def compact_chunk(c, g, coeff_ptr, scale_ptr, threshold_ptr, index_ptr, value_ptr, count_ptr, source_ptr,
                      K: tl.constexpr, CHUNKS: tl.constexpr, HAS_SCALE: tl.constexpr, CHUNK: tl.constexpr,
                      SOURCE_SPLITS: tl.constexpr):
        """Chunk c of group g: the indices and coefficients of chunk c of group g's coefficients c[g·K:(g+1)·K]
        whose score |c|(·scale) reaches threshold[g], in order, to index/value[g·K + c·CHUNK:], and their number
        to count[g·CHUNKS + c]. The chunks' lists, one after another, are group g's list.

        With SOURCE_SPLITS > 0 (one group) the coefficients are first made, and written to coeff, from the
        partial sums of a two-group product (gate's and up's A-parts: SOURCE_SPLITS rows each): silu(gate) · up,
        rounded as reduce_partials rounds it. This saves the gate/up reduction its own launch (or stage)."""
        offs = c * CHUNK + tl.arange(0, CHUNK)
        ok = offs < K
        coeff = make_coefficients(offs, ok, coeff_ptr + g * K, source_ptr, K, ok, SOURCE_SPLITS)
        list_chunk(c, g, coeff, offs, ok, scale_ptr, threshold_ptr, index_ptr, value_ptr, count_ptr, K, CHUNKS,
                   HAS_SCALE, CHUNK)

    @triton.jit
    def make_coefficients(offs, ok, coeff_ptr, source_ptr, K, store, SOURCE_SPLITS: tl.constexpr):
        """The coefficients at positions `offs` (any shape) of one group, whose first is at coeff_ptr: loaded, or
        with SOURCE_SPLITS > 0 made from the partial sums of a two-group product (gate's and up's A-parts:
        SOURCE_SPLITS rows each) as silu(gate) · up, rounded as reduce_partials rounds it, and written to coeff
        where `store`. In the coefficients' dtype."""
        if SOURCE_SPLITS > 0:
            gate = tl.zeros(offs.shape, dtype=tl.float32)
            up = tl.zeros(offs.shape, dtype=tl.float32)
            for s in tl.static_range(SOURCE_SPLITS):
                gate += tl.load(source_ptr + s * K + offs, mask=ok, other=0.0, cache_modifier=".cg")
                up += tl.load(source_ptr + (SOURCE_SPLITS + s) * K + offs, mask=ok, other=0.0, cache_modifier=".cg")
            coeff = swiglu(gate, up, coeff_ptr.dtype.element_ty).to(coeff_ptr.dtype.element_ty)
            tl.store(coeff_ptr + offs, coeff, mask=store)
        else:
            coeff = tl.load(coeff_ptr + offs, mask=ok, other=0.0, cache_modifier=".cg")
        return coeff

    @triton.jit
    def active_of(coeff, offs, ok, g, scale_ptr, threshold, K, HAS_SCALE: tl.constexpr):
        """Whether each coefficient of group g at `offs` is kept: its score |c| (· scale) reaches the threshold."""
        score = tl.abs(coeff.to(tl.float32))
        if HAS_SCALE:
            score = score * tl.load(scale_ptr + g * K + offs, mask=ok, other=0.0).to(tl.float32)
        return ok & (score >= threshold)

    @triton.jit
    def list_chunk(c, g, coeff, offs, ok, scale_ptr, threshold_ptr, index_ptr, value_ptr, count_ptr,
                   K: tl.constexpr, CHUNKS: tl.constexpr, HAS_SCALE: tl.constexpr, CHUNK: tl.constexpr):
        """The listing half of compact_chunk, for coefficients already at hand (`coeff` at positions `offs`)."""
        active = active_of(coeff, offs, ok, g, scale_ptr, tl.load(threshold_ptr + g), K, HAS_SCALE)
        slot = c * CHUNK + tl.cumsum(active.to(tl.int32), axis=0) - 1
        tl.store(index_ptr + g * K + slot, offs, mask=active)
        tl.store(value_ptr + g * K + slot, coeff.to(tl.float32), mask=active)
        tl.store(count_ptr + g * CHUNKS + c, tl.sum(active.to(tl.int32), axis=0))

    @triton.jit
    def _compact_kernel(coeff_ptr, scale_ptr, threshold_ptr, index_ptr, value_ptr, count_ptr, source_ptr,
                        K: tl.constexpr, CHUNKS: tl.constexpr, HAS_SCALE: tl.constexpr, CHUNK: tl.constexpr,
                        SOURCE_SPLITS: tl.constexpr, SHARED_COEFF: tl.constexpr, PDL: tl.constexpr):
        """Program (c, g): compact_chunk. With SHARED_COEFF every group lists the same K coefficients (TEAL's gate
        and up both masked on the input x), each against its own threshold and scale."""
        await_inputs(PDL)
        g = tl.program_id(1)
        if SHARED_COEFF:
            coeff_ptr -= g * K  # compact_chunk reads group g's coefficients at g·K
        compact_chunk(tl.program_id(0), g, coeff_ptr, scale_ptr, threshold_ptr, index_ptr, value_ptr, count_ptr,
                      source_ptr, K, CHUNKS, HAS_SCALE, CHUNK, SOURCE_SPLITS)

    @triton.jit
    def list_share(count_ptr, pid_s, CHUNKS: tl.constexpr, CHUNKS_P2: tl.constexpr, SPLITS: tl.constexpr,
                   BLOCK_K: tl.constexpr):
        """(ends, starts, begin, stop): where each chunk's entries lie in a list compacted chunk by chunk (counts
        at count_ptr), and the positions [begin, stop) of share pid_s of SPLITS, whole steps of BLOCK_K each."""
        q = tl.arange(0, CHUNKS_P2)
        counts = tl.load(count_ptr + q, mask=q < CHUNKS, other=0, cache_modifier=".cg")
        ends = tl.where(q < CHUNKS, tl.cumsum(counts, axis=0), 1 << 30)  # padding chunks end after every position
        starts = ends - counts
        count = tl.sum(counts, axis=0)
        share = tl.cdiv(tl.cdiv(count, SPLITS), BLOCK_K) * BLOCK_K
        begin = pid_s * share
        return ends, starts, begin, tl.minimum(begin + share, count)

    @triton.jit
    def list_slots(j0, stop, ends, starts, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr):
        """(slots, valid) of list positions j0… (< stop). Position j lies in chunk q = #(chunk ends ≤ j), at slot
        q·CHUNK + j − (q's start) = j + Σ over the chunks q' that end at or before j of (CHUNK − q''s count): one
        sum over a BLOCK_K × chunks tile (finding q first and then its start took two, the second waiting on the
        first)."""
        j = j0 + tl.arange(0, BLOCK_K)
        gaps = CHUNK - (ends - starts)  # each chunk's unused slots
        return j + tl.sum(tl.where(j[:, None] >= ends[None, :], gaps[None, :], 0), axis=1), j < stop

    @triton.jit
    def _list_entries(j0, stop, ends, starts, index_ptr, value_ptr, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr):
        """Rows and coefficients at list positions j0… (< stop) (list_slots)."""
        slot, j_ok = list_slots(j0, stop, ends, starts, CHUNK, BLOCK_K)
        return (tl.load(index_ptr + slot, mask=j_ok, other=0, cache_modifier=".cg"),
                tl.load(value_ptr + slot, mask=j_ok, other=0.0, cache_modifier=".cg"), j_ok)

    @triton.jit
    def _gather_step(acc, j0, stop, ends, starts, row, c, j_ok, index_ptr, value_ptr, rows_ptr, stride_k, offs_m,
                     m_ok, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, WIDE: tl.constexpr):
        """acc + the rows of this step's list entries; the next step's entries are loaded while this step's rows
        are in flight (the two loads would otherwise wait on each other, step after step)."""
        if WIDE:  # 64-bit offsets only where the matrix needs them: a tile of them costs twice the registers
            row = row.to(tl.int64)
        tile = tl.load(rows_ptr + row[:, None] * stride_k + offs_m[None, :], mask=j_ok[:, None] & m_ok[None, :],
                       other=0.0)
        next_row, next_c, next_ok = _list_entries(j0 + BLOCK_K, stop, ends, starts, index_ptr, value_ptr, CHUNK,
                                                  BLOCK_K)
        return acc + tl.sum(tile.to(tl.float32) * c[:, None], axis=0), next_row, next_c, next_ok

    @triton.jit
    def gather_share(pid_m, pid_s, g, rows_ptr, index_ptr, value_ptr, count_ptr, partial_ptr, K, M, stride_k,
                     SPLITS: tl.constexpr, CHUNKS: tl.constexpr, CHUNKS_P2: tl.constexpr, CHUNK: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, WIDE: tl.constexpr, INTERPRET: tl.constexpr):
        """Columns pid_m·BLOCK_M… of Σ value·rows[index] over share pid_s of group g's list, into
        partial[g, pid_s, :]. Group g's rows start at row g·K of `rows`."""
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        ends, starts, begin, stop = list_share(count_ptr + g * CHUNKS, pid_s, CHUNKS, CHUNKS_P2, SPLITS, BLOCK_K)
        index_ptr += g * K
        value_ptr += g * K
        rows_ptr += g * K * stride_k
        acc = tl.zeros([BLOCK_M], dtype=tl.float32)
        row, c, j_ok = _list_entries(begin, stop, ends, starts, index_ptr, value_ptr, CHUNK, BLOCK_K)
        if INTERPRET:  # the interpreter cannot take a loaded value as a range bound; a while loop it can
            j0 = begin
            while j0 < stop:
                acc, row, c, j_ok = _gather_step(acc, j0, stop, ends, starts, row, c, j_ok, index_ptr, value_ptr,
                                                 rows_ptr, stride_k, offs_m, m_ok, CHUNK, BLOCK_K, WIDE)
                j0 += BLOCK_K
        else:
            for j0 in range(begin, stop, BLOCK_K):
                acc, row, c, j_ok = _gather_step(acc, j0, stop, ends, starts, row, c, j_ok, index_ptr, value_ptr,
                                                 rows_ptr, stride_k, offs_m, m_ok, CHUNK, BLOCK_K, WIDE)
        tl.store(partial_ptr + (g * SPLITS + pid_s) * M + offs_m, acc, mask=m_ok)

    @triton.jit
    def _gather_kernel(rows_ptr, index_ptr, value_ptr, count_ptr, partial_ptr, K, M, stride_k,
                       SPLITS: tl.constexpr, CHUNKS: tl.constexpr, CHUNKS_P2: tl.constexpr, CHUNK: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, WIDE: tl.constexpr, INTERPRET: tl.constexpr,
                       PDL: tl.constexpr):
        """Program (m, s, g): gather_share. (Session 13 let the last program of each column block also sum the
        partials, saving the reduction launch; timed in session 14, ±0.5% on a step: removed.)"""
        await_inputs(PDL)
        gather_share(tl.program_id(0), tl.program_id(1), tl.program_id(2), rows_ptr, index_ptr, value_ptr,
                     count_ptr, partial_ptr, K, M, stride_k, SPLITS, CHUNKS, CHUNKS_P2, CHUNK, BLOCK_K, BLOCK_M,
                     WIDE, INTERPRET)

    @triton.jit
    def _reduce_kernel(partial_ptr, out_ptr, M, res_in_ptr, sums_ptr, SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr,
                       EPILOGUE: tl.constexpr, BLOCK: tl.constexpr, ADD_RESIDUAL: tl.constexpr, PDL: tl.constexpr):
        """out = epilogue(Σ_s partial[g, s, :]): EPILOGUE 0: group 0 as is (cast to out's dtype); 1: silu(group
        0) · group 1, rounded as the unfused ops would round. All of a column block's partials are loaded at once
        (one tile), so the loads are in flight together. With ADD_RESIDUAL (EPILOGUE 0), out is the residual
        res_in + the sum, rounded as add_rmsnorm rounds the add, and sums_ptr + pid its block's sum of squares
        (gemv.gemv's `residual`)."""
        await_inputs(PDL)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        residual = tl.zeros([BLOCK], dtype=tl.float32)
        if ADD_RESIDUAL:
            residual = tl.load(res_in_ptr + offs, mask=offs < M, other=0.0).to(tl.float32)
        split = tl.arange(0, SPLITS_P2)
        ok = (split[:, None] < SPLITS) & (offs[None, :] < M)
        tile = partial_ptr + split[:, None] * M + offs[None, :]
        first = tl.sum(tl.load(tile, mask=ok, other=0.0), axis=0)
        if EPILOGUE == 1:
            second = tl.sum(tl.load(tile + SPLITS * M, mask=ok, other=0.0), axis=0)
            first = swiglu(first, second, out_ptr.dtype.element_ty)
        if ADD_RESIDUAL:
            dtype = out_ptr.dtype.element_ty
            first = (residual + first.to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
            tl.store(sums_ptr + tl.program_id(0), tl.sum(tl.where(offs < M, first * first, 0.0), axis=0))
        tl.store(out_ptr + offs, first.to(out_ptr.dtype.element_ty), mask=offs < M)


def masked_rows_reduced(rows: torch.Tensor, coeff: torch.Tensor, threshold: torch.Tensor,
                        scale: torch.Tensor | None, out: torch.Tensor,
                        swiglu_of: tuple[torch.Tensor, int] | None = None,
                        residual: torch.Tensor | None = None) -> torch.Tensor:
    """out = the masked product of one group, summed: masked_rows_partials, then reduce_partials. With
    `residual` r, out = r + the product and what returns is the reduction's sums of squares (reduce_partials)."""
    return reduce_to(*masked_rows_partials(rows, coeff, threshold, scale, swiglu_of=swiglu_of), out, residual)


def reduce_to(partial: torch.Tensor, splits: int, out: torch.Tensor,
              residual: torch.Tensor | None = None) -> torch.Tensor:
    """reduce_partials into out, returning out; with `residual` r, out = r + the sum and what returns is the
    reduction's sums of squares for the next norm."""
    if residual is None:
        return reduce_partials(partial, splits, out)
    sums = torch.empty(reduce_programs(out.numel(), splits), dtype=torch.float32, device=out.device)
    reduce_partials(partial, splits, out, residual=(residual, sums))
    return sums


def masked_rows_partials(rows: torch.Tensor, coeff: torch.Tensor, threshold: torch.Tensor,
                         scale: torch.Tensor | None = None, groups: int = 1,
                         swiglu_of: tuple[torch.Tensor, int] | None = None,
                         shared_coeff: bool = False) -> tuple[torch.Tensor, int]:
    """Launches compact and gather for `groups` equal products stacked along K; returns (partials, splits),
    partials of shape (groups · splits, M) in float32, for `reduce_partials` (or for `rope_into_cache`, or as
    `swiglu_of` of the next product, which add them up themselves).

    `swiglu_of`: (partials, splits) of a two-group gate/up product whose silu(gate) · up are this product's
    coefficients: the compaction makes them (and writes them to `coeff`, an output buffer then), so the gate/up
    product needs no reduction launch of its own. `shared_coeff`: `coeff` holds K coefficients that every group
    reads (each with its own threshold and scale)."""
    K_all, M = rows.shape
    K = K_all // groups
    if swiglu_of is not None and (groups != 1 or swiglu_of[0].numel() != 2 * swiglu_of[1] * K):
        raise ValueError(f"swiglu_of needs one group and 2 × splits × {K} partial sums")
    if coeff.shape != ((K,) if shared_coeff else (K_all,)) or K * groups != K_all:
        raise ValueError(f"coefficients {tuple(coeff.shape)} do not match rows {tuple(rows.shape)} in {groups} groups")
    if threshold.numel() != groups:
        raise ValueError(f"one threshold per group: {groups} groups, {threshold.numel()} thresholds")
    if rows.stride(1) != 1:
        raise ValueError("rows must be row-major (contiguous along M)")
    source, source_splits = swiglu_of if swiglu_of is not None else (coeff, 0)
    from rana_core.decode import masked_wide  # imports this module

    if masked_wide.design(rows) == "wide":
        return masked_wide.wide_partials(rows, coeff, threshold, scale, groups, source if source_splits else None,
                                         source_splits, shared_coeff)
    lists = compact_list(coeff, threshold, scale, K, groups, source, source_splits, shared_coeff)
    return gather_list(rows, lists)


def compact_list(coeff: torch.Tensor, threshold: torch.Tensor, scale: torch.Tensor | None, K: int, groups: int,
                 source: torch.Tensor | None = None, source_splits: int = 0, shared_coeff: bool = False,
                 tag: str = "") -> tuple:
    """The compaction launch of the list design: each group's active rows of K, chunk by chunk, in work buffers
    named by `tag` (lists that must live at the same time take different tags). Returns the lists as
    gather_list takes them: (index, value, count, chunk, chunks, groups, K)."""
    device = coeff.device
    chunk = min(gather_config()[5], triton.next_power_of_2(K))
    chunks = math.ceil(K / chunk)
    index = work_buffer("index" + tag, groups * K, torch.int32, device)
    value = work_buffer("value" + tag, groups * K, torch.float32, device)
    count = work_buffer("count" + tag, groups * chunks, torch.int32, device)
    p = pdl(coeff)
    _compact_kernel[(chunks, groups)](coeff, scale if scale is not None else coeff, threshold, index, value, count,
                                      source if source is not None else coeff, K=K, CHUNKS=chunks,
                                      HAS_SCALE=scale is not None, CHUNK=chunk, SOURCE_SPLITS=source_splits,
                                      SHARED_COEFF=shared_coeff, PDL=p, num_warps=4 if chunk <= 1024 else 8,
                                      launch_pdl=p)
    return index, value, count, chunk, chunks, groups, K


def gather_list(rows: torch.Tensor, lists: tuple, share: int = 1, partial: torch.Tensor | None = None,
                tag: str = "") -> tuple[torch.Tensor, int]:
    """The gather launch of the list design over compact_list's `lists`: (partials, splits), partials
    (groups · splits, M) in float32. `rows` may be a block of columns of the listed matrix (its row stride kept);
    `share`: the launch sized for 1/share of the GPU (gathers that run side by side); `partial`: where to write
    (a view of a larger buffer), else a work buffer named by `tag`."""
    index, value, count, chunk, chunks, groups, K = lists
    M = rows.shape[1]
    block_m, block_k, warps, stages, _, _ = gather_config()
    splits = _list_splits(K, M, groups, rows.device, share)
    if partial is None:
        partial = work_buffer("partial" + tag, groups * splits * M, torch.float32, rows.device)
    p = pdl(rows)
    _gather_kernel[(math.ceil(M / block_m), splits, groups)](
        rows, index, value, count, partial, K, M, rows.stride(0), SPLITS=splits, CHUNKS=chunks,
        CHUNKS_P2=triton.next_power_of_2(chunks), CHUNK=chunk, BLOCK_K=block_k, BLOCK_M=block_m,
        WIDE=rows.shape[0] * rows.stride(0) >= 2**31, INTERPRET=interpreting(), PDL=p,
        num_warps=warps, num_stages=stages, launch_pdl=p)
    return partial, splits


REDUCE_PARTIALS = 4096  # partial sums a reduce_partials program adds at most (RANA_REDUCE_PARTIALS overrides)


def reduce_block(splits: int) -> int:
    """The columns a reduce_partials program sums: at most REDUCE_PARTIALS partial sums a program, or as many as
    RANA_REDUCE_PARTIALS says (a power of two; for bench/engine_ab.py's sweeps)."""
    most, text = REDUCE_PARTIALS, os.environ.get("RANA_REDUCE_PARTIALS", "")
    if text:
        most = launch_ints("RANA_REDUCE_PARTIALS", text, (1,), "a power of two of partial sums, e.g. 4096")[0]
        if most < 1 or most & (most - 1):
            raise ValueError(f"RANA_REDUCE_PARTIALS={text}: expected a power of two of partial sums, e.g. 4096")
    return max(16, min(256, most // triton.next_power_of_2(splits)))


def reduce_programs(M: int, splits: int) -> int:
    """The programs of reduce_partials over M columns of `splits` partial sums: a `residual` call's sums."""
    return math.ceil(M / reduce_block(splits))


def reduce_partials(partial: torch.Tensor, splits: int, out: torch.Tensor, epilogue: str = "sum",
                    residual: tuple | None = None) -> torch.Tensor:
    """out = Σ of the partial sums, then the epilogue: "sum", or "swiglu" (silu of group 0 times group 1). With
    `residual` = (r, sums) ("sum" only): out = r + the sum, and sums[p] the sum of squares of program p's
    columns of it (reduce_programs of them), as gemv's `residual` leaves them for the next norm."""
    M = out.numel()
    block = reduce_block(splits)
    if residual is not None and (epilogue != "sum" or residual[1].numel() != reduce_programs(M, splits)):
        raise ValueError(f"a residual reduction sums one group, with {reduce_programs(M, splits)} sums of squares")
    res_in, sums = residual if residual is not None else (out, out)
    p = pdl(out)
    _reduce_kernel[(math.ceil(M / block),)](partial, out, M, res_in, sums, SPLITS=splits,
                                            SPLITS_P2=triton.next_power_of_2(splits),
                                            EPILOGUE={"sum": 0, "swiglu": 1}[epilogue], BLOCK=block,
                                            ADD_RESIDUAL=residual is not None, PDL=p, launch_pdl=p)
    return out


def masked_rows_gemv(rows: torch.Tensor, coeff: torch.Tensor, threshold: torch.Tensor,
                     scale: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """y = Σ_k [score_k ≥ threshold] · coeff_k · rows[k, :] for one token (score_k = |coeff_k|, times scale_k).

    `rows`: (K, M), row-major. `coeff`: (K,). `threshold`: a one-element float32 tensor (so a captured CUDA graph
    sees a threshold changed later). `out`: an optional (M,) buffer (float32 or the rows' dtype), overwritten;
    by default float32."""
    K, M = rows.shape
    if coeff.shape != (K,):
        raise ValueError(f"coefficients {tuple(coeff.shape)} do not match rows {tuple(rows.shape)}")
    if out is None:
        out = torch.empty(M, dtype=torch.float32, device=rows.device)
    if not use_triton(rows):
        out.copy_(reference_masked_rows(rows, coeff, threshold, scale))
        return out
    return masked_rows_reduced(rows, coeff, threshold, scale, out)


def masked_rows_batched(rows: torch.Tensor, coeff: torch.Tensor, threshold: torch.Tensor,
                        scale: torch.Tensor | None = None) -> torch.Tensor:
    """The same product for a batch of tokens, (T, K) coefficients → (T, M): a dense product of the masked
    coefficients, which at T > 1 beats gathering rows token by token."""
    score = coeff.abs().float()
    if scale is not None:
        score = score * scale.float()
    return (coeff * (score >= threshold).to(coeff.dtype)) @ rows


def reference_masked_rows(rows, coeff, threshold, scale=None) -> torch.Tensor:
    """The product in float64 (the mask decided in float32, as the kernel decides it), for checks."""
    score = coeff.float().abs()
    if scale is not None:
        score = score * scale.float()
    mask = (score >= threshold.float()).double()
    return ((coeff.double() * mask) @ rows.double()).float()
