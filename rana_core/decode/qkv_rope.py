"""One token's dense QKV product with rotary and both cache writes in its epilogue: one launch where the reference
takes two (dense_kernels.gemv, then rope_into_cache).

Why: on a small model every kernel on a step's critical path costs about the same couple of microseconds whatever
it reads (docs/latency.md, session 15), and the rotary kernel reads 2 KB. Rotary pairs output d of a head with
output d + D/2, so program p owns PAIRS such pairs: it computes both rows of each pair (dense_kernels._row_dots,
the GEMV's own row sums, so the values are the GEMV's), rounds them to the model's dtype as the GEMV stores
them, and then does what rope_head does with them: a query head's pair rotated into q, a key head's rotated into
the cache at pos, a value head's copied there. With the norm owed to the input (residual.PendingNorm), every
program makes it itself, as the GEMV's norm prologue does.

    q = qkv_rope(block.qkv.weight, normed, cos, sin, pos, k_cache, v_cache, heads, kv_heads)
"""

from __future__ import annotations

import math
import os

import torch

from rana_core.decode.dense_kernels import GEMV_CONFIG
from rana_core.decode.masked_kernels import pdl, triton

if triton is not None:
    import triton.language as tl

    from rana_core.decode.dense_kernels import _norm_prologue, _row_dots
    from rana_core.decode.masked_kernels import await_inputs

    @triton.jit
    def _qkv_rope_kernel(w_ptr, x_ptr, q_ptr, k_cache_ptr, v_cache_ptr, cos_ptr, sin_ptr, pos_ptr, max_seq,
                         stride_n, delta_ptr, norm_w_ptr, res_out_ptr, eps, K: tl.constexpr, K_P2: tl.constexpr,
                         HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr, PAIRS: tl.constexpr,
                         BLOCK_K: tl.constexpr, NORM: tl.constexpr, HAS_DELTA: tl.constexpr, PDL: tl.constexpr):
        """Program p: pairs p·PAIRS… of the (HEADS + 2·KV_HEADS)·HALF pairs (module docstring)."""
        pair = tl.program_id(0) * PAIRS + tl.arange(0, PAIRS)
        ok = pair < (HEADS + 2 * KV_HEADS) * HALF
        head, i = pair // HALF, pair % HALF
        row = head * 2 * HALF + i
        await_inputs(PDL)
        inv_rms = 1.0
        if NORM:
            inv_rms = _norm_prologue(x_ptr, delta_ptr, norm_w_ptr, res_out_ptr, eps, K, K_P2, HAS_DELTA)
        dtype = q_ptr.dtype.element_ty
        unused = tl.zeros([PAIRS, BLOCK_K], dtype=w_ptr.dtype.element_ty)
        x1 = _row_dots(w_ptr, x_ptr, row, ok, stride_n, unused, K, PAIRS, BLOCK_K, False, NORM, delta_ptr,
                       norm_w_ptr, inv_rms, HAS_DELTA).to(dtype).to(tl.float32)
        x2 = _row_dots(w_ptr, x_ptr, row + HALF, ok, stride_n, unused, K, PAIRS, BLOCK_K, False, NORM, delta_ptr,
                       norm_w_ptr, inv_rms, HAS_DELTA).to(dtype).to(tl.float32)
        pos = tl.load(pos_ptr)
        cos = tl.load(cos_ptr + pos * HALF + i, mask=ok, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + pos * HALF + i, mask=ok, other=0.0).to(tl.float32)
        first = ((x1 * cos).to(dtype).to(tl.float32) - (x2 * sin).to(dtype).to(tl.float32)).to(dtype)
        second = ((x2 * cos).to(dtype).to(tl.float32) + (x1 * sin).to(dtype).to(tl.float32)).to(dtype)
        is_q = ok & (head < HEADS)
        tl.store(q_ptr + row, first, mask=is_q)
        tl.store(q_ptr + row + HALF, second, mask=is_q)
        is_k = ok & (head >= HEADS) & (head < HEADS + KV_HEADS)
        key = k_cache_ptr + ((head - HEADS) * max_seq + pos) * 2 * HALF + i
        tl.store(key, first, mask=is_k)
        tl.store(key + HALF, second, mask=is_k)
        is_v = ok & (head >= HEADS + KV_HEADS)
        value = v_cache_ptr + ((head - HEADS - KV_HEADS) * max_seq + pos) * 2 * HALF + i
        tl.store(value, x1.to(dtype), mask=is_v)
        tl.store(value + HALF, x2.to(dtype), mask=is_v)


def applies() -> bool:
    """Whether one-token steps take QKV's product and rotary in one launch where QKV is one dense product
    (RANA_QKV_ROPE = "1"; "0", the default, until timed)."""
    choice = os.environ.get("RANA_QKV_ROPE", "0")
    if choice not in ("0", "1"):
        raise ValueError(f"RANA_QKV_ROPE={choice}: expected 0 or 1")
    return choice == "1"


def qkv_rope(weight: torch.Tensor, x: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
             pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int, kv_heads: int,
             norm: tuple | None = None) -> torch.Tensor:
    """q (heads, d) of one token, rotated at position pos (a (1,) tensor), with k rotated and v written into
    k_cache/v_cache (kv_heads, max_seq, d) at pos: rope_into_cache(gemv(weight, x)) in one launch. weight is
    [Wq; Wk; Wv] ((heads + 2·kv_heads)·d, K) row-major, x (K,); `norm` as dense_kernels.gemv takes it."""
    d = k_cache.shape[-1]
    N, K = weight.shape
    if N != (heads + 2 * kv_heads) * d or x.shape != (K,) or weight.stride(1) != 1:
        raise ValueError(f"weight {tuple(weight.shape)} and x {tuple(x.shape)} are not one token's stacked q/k/v "
                         f"of {heads} + 2·{kv_heads} heads of {d}")
    q = torch.empty(heads, d, dtype=k_cache.dtype, device=k_cache.device)
    pairs = GEMV_CONFIG["BLOCK_N"]  # rows of each half: the GEMV's own row block, so its row sums are the GEMV's
    delta, norm_weight, eps, res_out = norm if norm is not None else (None, x, 0.0, x)
    p = pdl(weight)
    _qkv_rope_kernel[(math.ceil(N // 2 / pairs),)](
        weight, x, q, k_cache, v_cache, cos_table, sin_table, pos, k_cache.shape[1], weight.stride(0),
        delta if delta is not None else x, norm_weight, res_out, eps, K=K, K_P2=triton.next_power_of_2(K),
        HEADS=heads, KV_HEADS=kv_heads, HALF=d // 2, PAIRS=pairs, BLOCK_K=GEMV_CONFIG["BLOCK_K"],
        NORM=norm is not None, HAS_DELTA=delta is not None, PDL=p, num_warps=GEMV_CONFIG["num_warps"],
        num_stages=GEMV_CONFIG["num_stages"], launch_pdl=p)
    return q
