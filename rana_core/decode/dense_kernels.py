"""Fused Triton kernels for the small steps of one decode token (batch 1), each with its PyTorch equivalent.

At batch 1 a Llama layer's matrices take microseconds, and so do its dozens of tiny elementwise kernels
(RMSNorm alone is six of them in PyTorch, rotary eight per tensor): inside a CUDA graph each still costs a launch
and a round trip through memory. These kernels replace them:

- `add_rmsnorm`: the residual add and the next RMSNorm, x ← x + delta, normed = weight · x/rms(x);
- `rope_into_cache`: rotary on q and k (Llama's rotate-half layout) at the current position, k and v written
  straight into the static cache at that position, the position read from device memory (graph-safe);
- (attention over the cache, one token: attention_kernels.py);
- (the one-token GEMV, with its fused options: gemv.py).

Rounding follows the unfused PyTorch code (fp16 results where PyTorch would store fp16), so that the fused and
the plain engine agree to rounding. On a CPU without TRITON_INTERPRET=1 the PyTorch forms run.
"""

from __future__ import annotations

import torch

from rana_core.decode.launch import pdl, triton, use_triton

if triton is not None:
    import triton.language as tl

    from rana_core.decode.launch import await_inputs

    @triton.jit
    def _add_rmsnorm_kernel(x_ptr, delta_ptr, weight_ptr, normed_ptr, N, eps, HAS_DELTA: tl.constexpr,
                            BLOCK: tl.constexpr, PDL: tl.constexpr):
        await_inputs(PDL)
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        ok = offs < N
        dtype = x_ptr.dtype.element_ty
        x = tl.load(x_ptr + row * N + offs, mask=ok, other=0.0).to(tl.float32)
        if HAS_DELTA:
            x += tl.load(delta_ptr + row * N + offs, mask=ok, other=0.0).to(tl.float32)
            x = x.to(dtype).to(tl.float32)  # the residual stream is stored in the model's dtype
            tl.store(x_ptr + row * N + offs, x.to(dtype), mask=ok)
        inv_rms = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
        weight = tl.load(weight_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        normed = (x * inv_rms).to(dtype).to(tl.float32) * weight
        tl.store(normed_ptr + row * N + offs, normed.to(dtype), mask=ok)

    @triton.jit
    def _qkv_values(qkv_ptr, offs, SPLITS: tl.constexpr, N: tl.constexpr, dtype):
        """qkv[offs] in float32: read as stored, or, with SPLITS > 0, added up from a masked product's SPLITS
        rows of float32 partial sums (rana_core.decode.masked_kernels) and rounded to `dtype` as reduce_partials would."""
        if SPLITS == 0:
            return tl.load(qkv_ptr + offs, cache_modifier=".cg").to(tl.float32)
        total = tl.load(qkv_ptr + offs, cache_modifier=".cg")
        for s in tl.static_range(1, SPLITS):
            total += tl.load(qkv_ptr + s * N + offs, cache_modifier=".cg")
        return total.to(dtype).to(tl.float32)

    @triton.jit
    def rope_head(h, qkv_ptr, cos_ptr, sin_ptr, pos, q_ptr, k_cache_ptr, v_cache_ptr, max_seq, HEADS: tl.constexpr,
                  KV_HEADS: tl.constexpr, HALF: tl.constexpr, SPLITS: tl.constexpr):
        """Head h < HEADS: query head h rotated into q; HEADS + j: key head j rotated into the cache and value
        head j copied beside it, both at position pos. With SPLITS > 0, qkv is the masked product's partial sums
        (SPLITS rows), added up here: the product then needs no reduction of its own."""
        i = tl.arange(0, HALF)
        dtype = q_ptr.dtype.element_ty
        N = (HEADS + 2 * KV_HEADS) * 2 * HALF
        cos = tl.load(cos_ptr + pos * HALF + i).to(tl.float32)
        sin = tl.load(sin_ptr + pos * HALF + i).to(tl.float32)
        x1 = _qkv_values(qkv_ptr, h * 2 * HALF + i, SPLITS, N, dtype)
        x2 = _qkv_values(qkv_ptr, h * 2 * HALF + HALF + i, SPLITS, N, dtype)
        first = ((x1 * cos).to(dtype).to(tl.float32) - (x2 * sin).to(dtype).to(tl.float32)).to(dtype)
        second = ((x2 * cos).to(dtype).to(tl.float32) + (x1 * sin).to(dtype).to(tl.float32)).to(dtype)
        if h < HEADS:
            tl.store(q_ptr + h * 2 * HALF + i, first)
            tl.store(q_ptr + h * 2 * HALF + HALF + i, second)
        else:
            j = h - HEADS
            target = k_cache_ptr + (j * max_seq + pos) * 2 * HALF
            tl.store(target + i, first)
            tl.store(target + HALF + i, second)
            d = tl.arange(0, 2 * HALF)
            value = _qkv_values(qkv_ptr, (HEADS + KV_HEADS + j) * 2 * HALF + d, SPLITS, N, dtype)
            tl.store(v_cache_ptr + (j * max_seq + pos) * 2 * HALF + d, value.to(dtype))

    @triton.jit
    def _rope_into_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_cache_ptr, v_cache_ptr, max_seq,
                                HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr,
                                SPLITS: tl.constexpr, PDL: tl.constexpr):
        """Program h: rope_head h."""
        await_inputs(PDL)
        rope_head(tl.program_id(0), qkv_ptr, cos_ptr, sin_ptr, tl.load(pos_ptr), q_ptr, k_cache_ptr, v_cache_ptr,
                  max_seq, HEADS, KV_HEADS, HALF, SPLITS)

def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def add_rmsnorm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                normed: torch.Tensor) -> torch.Tensor:
    """x += delta (in place, when given); normed ← RMSNorm(x) · weight. Both (T, N), contiguous."""
    if not use_triton(x):
        if delta is not None:
            x += delta
        normed.copy_(rmsnorm_reference(x, weight, eps))
        return normed
    T, N = x.shape
    p = pdl(x)
    _add_rmsnorm_kernel[(T,)](x, delta if delta is not None else x, weight, normed, N, eps,
                              HAS_DELTA=delta is not None, BLOCK=triton.next_power_of_2(N),
                              PDL=p, num_warps=8 if N >= 2048 else 4, launch_pdl=p)
    return normed


def rotate_half_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding on the two halves of each head (Llama's layout): x (T, heads, d), cos/sin (T, d/2)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def rope_into_cache(qkv: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor, pos: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int, kv_heads: int,
                    q_out: torch.Tensor, splits: int = 0) -> torch.Tensor:
    """One token: qkv (1, (heads + 2·kv_heads)·d) → q_out (heads, d) rotated at position pos (a (1,) tensor);
    k rotated and v written into k_cache/v_cache (kv_heads, max_seq, d) at pos. Returns q_out.

    With `splits` > 0, qkv is instead the float32 partial sums of the masked product that makes it
    (rana_core.decode.masked_kernels.masked_rows_partials: splits rows), added up here in the model's dtype."""
    d = k_cache.shape[-1]
    if splits:
        if qkv.numel() != splits * (heads + 2 * kv_heads) * d:
            raise ValueError(f"{qkv.numel()} partial sums are not {splits} rows of qkv")
        if not use_triton(qkv):
            qkv = qkv.view(splits, -1).sum(0).to(q_out.dtype)[None]
            splits = 0
    if not use_triton(qkv):
        q, k, v = qkv.view(1, heads + 2 * kv_heads, d).split([heads, kv_heads, kv_heads], dim=1)
        cos, sin = cos_table[pos], sin_table[pos]
        q_out.copy_(rotate_half_reference(q, cos, sin)[0])
        k_cache.index_copy_(1, pos, rotate_half_reference(k, cos, sin).transpose(0, 1))
        v_cache.index_copy_(1, pos, v.transpose(0, 1))
        return q_out
    p = pdl(qkv)
    _rope_into_cache_kernel[(heads + kv_heads,)](qkv, cos_table, sin_table, pos, q_out, k_cache, v_cache,
                                                 k_cache.shape[1], HEADS=heads, KV_HEADS=kv_heads, HALF=d // 2,
                                                 SPLITS=splits, PDL=p, num_warps=1, launch_pdl=p)
    return q_out
