"""Rotary + cache write and attention for B sequences decoding together, each with its own cache and position.

The batch-1 engine's fused kernels (dense_kernels: rope_head, attention_chunk, combine_head) with one more grid
axis, the sequence: program (…, b) reads sequence b's position and works in its slice of the qkv rows, of the
caches (B, kv_heads, max_seq, d) and of the outputs. In PyTorch the same step is about twenty small kernels per
layer (rotary alone is eight per tensor) and attention over the whole static cache; here it is three launches,
and attention reads each sequence's chunks up to its own position only.
"""

from __future__ import annotations

import math

import torch

from rana_core.decode.attention_kernels import ATTENTION_CHUNK
from rana_core.decode.dense_kernels import rotate_half_reference
from rana_core.decode.launch import triton, use_triton

if triton is not None:
    import triton.language as tl

    from rana_core.decode.attention_kernels import attention_chunk, combine_head
    from rana_core.decode.dense_kernels import rope_head

    @triton.jit
    def _batch_rope_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_cache_ptr, v_cache_ptr, max_seq,
                           HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr):
        """Program (h, b): rope_head h of sequence b."""
        h, b = tl.program_id(0), tl.program_id(1)
        width = (HEADS + 2 * KV_HEADS) * 2 * HALF
        cache = KV_HEADS * max_seq * 2 * HALF
        rope_head(h, qkv_ptr + b * width, cos_ptr, sin_ptr, tl.load(pos_ptr + b), q_ptr + b * HEADS * 2 * HALF,
                  k_cache_ptr + b * cache, v_cache_ptr + b * cache, max_seq, HEADS, KV_HEADS, HALF, 0)

    @triton.jit
    def _batch_attention_chunk_kernel(q_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, m_ptr, l_ptr, acc_ptr, max_seq,
                                      scale, HEADS: tl.constexpr, KV_HEADS: tl.constexpr, SPLITS: tl.constexpr,
                                      CHUNK: tl.constexpr, D: tl.constexpr):
        """Program (j, s, b): attention_chunk (j, s) of sequence b; chunks past its position come out empty."""
        j, s, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        cache = KV_HEADS * max_seq * D
        partial = HEADS * SPLITS
        attention_chunk(j, s, q_ptr + b * HEADS * D, k_cache_ptr + b * cache, v_cache_ptr + b * cache,
                        tl.load(pos_ptr + b), m_ptr + b * partial, l_ptr + b * partial, acc_ptr + b * partial * D,
                        max_seq, scale, SPLITS, HEADS // KV_HEADS, CHUNK, D, False)

    @triton.jit
    def _batch_attention_combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, HEADS: tl.constexpr, SPLITS: tl.constexpr,
                                        SPLITS_P2: tl.constexpr, D: tl.constexpr):
        """Program (h, b): combine_head h of sequence b over all SPLITS chunks."""
        h, b = tl.program_id(0), tl.program_id(1)
        partial = HEADS * SPLITS
        combine_head(h, m_ptr + b * partial, l_ptr + b * partial, acc_ptr + b * partial * D, out_ptr + b * HEADS * D,
                     SPLITS, SPLITS, SPLITS_P2, D)


def batch_rope_into_cache(qkv: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor, pos: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int) -> torch.Tensor:
    """qkv (B, (heads + 2·kv_heads)·d) of B sequences at positions pos (B,): q rotated, returned (B, heads, d);
    each sequence's k rotated and v written into its cache (B, kv_heads, max_seq, d) at its position."""
    B = qkv.shape[0]
    kv_heads, max_seq, d = k_cache.shape[1:]
    if not use_triton(qkv):
        q, k, v = qkv.view(B, heads + 2 * kv_heads, d).split([heads, kv_heads, kv_heads], dim=1)
        cos, sin = cos_table[pos], sin_table[pos]
        rows = torch.arange(B, device=qkv.device)
        k_cache[rows, :, pos] = rotate_half_reference(k, cos, sin)
        v_cache[rows, :, pos] = v
        return rotate_half_reference(q, cos, sin)
    q = torch.empty(B, heads, d, dtype=qkv.dtype, device=qkv.device)
    _batch_rope_kernel[(heads + kv_heads, B)](qkv.contiguous(), cos_table, sin_table, pos, q, k_cache, v_cache,
                                              max_seq, HEADS=heads, KV_HEADS=kv_heads, HALF=d // 2, num_warps=1)
    return q


def batch_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           pos: torch.Tensor) -> torch.Tensor:
    """Each sequence's token attending over its own cache up to its position: q (B, heads, d), caches
    (B, kv_heads, max_seq, d), pos (B,) → (B, heads, d); softmax scale 1/√d."""
    B, heads, d = q.shape
    kv_heads, max_seq = k_cache.shape[1:3]
    if not use_triton(q):
        allowed = (torch.arange(max_seq, device=q.device)[None, :] <= pos[:, None])[:, None, None, :]
        attended = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k_cache, v_cache,
                                                                    attn_mask=allowed, enable_gqa=kv_heads != heads)
        return attended[:, :, 0]
    splits = math.ceil(max_seq / ATTENTION_CHUNK)
    m = torch.empty(B * heads * splits, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(B * heads * splits * d, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    _batch_attention_chunk_kernel[(kv_heads, splits, B)](q.contiguous(), k_cache, v_cache, pos, m, l, acc, max_seq,
                                                         1.0 / math.sqrt(d), HEADS=heads, KV_HEADS=kv_heads,
                                                         SPLITS=splits, CHUNK=ATTENTION_CHUNK, D=d, num_warps=4)
    _batch_attention_combine_kernel[(heads, B)](m, l, acc, out, HEADS=heads, SPLITS=splits,
                                                SPLITS_P2=triton.next_power_of_2(splits), D=d, num_warps=4)
    return out
