"""One token's attention over its KV cache (batch 1), in three, two or one launches, with the PyTorch form.

- `decode_attention`: attention over the cached positions up to the token's own (flash-decoding: chunks of the
  prefix in parallel, each a running max, denominator and weighted value sum, then a combine), reading no position
  past it. The combine is a launch of its own, or made by the last chunk program of each KV head to arrive (an
  arrival counter per head, reset by that program for the next launch);
- `rope_attention`: the whole attention section of a decoder layer: rotary on q and k and the cache writes
  (dense_kernels.rope_into_cache), then decode_attention; in one launch the chunk programs rotate the queries
  themselves and the one whose chunk holds the position writes this step's key and value.

How many launches (`attention_launches`, RANA_ATTENTION_LAUNCHES) is a launch option until timed: fewer launches
are fewer gaps in the step's graph, and more work that waits on one program (the combine) or is made twice (each
chunk program rotates its group's queries). Every form computes the same bits.
"""

from __future__ import annotations

import math
import os

import torch

from rana_core.decode.dense_kernels import rope_into_cache
from rana_core.decode.masked_kernels import _buffer, pdl, triton, use_triton

if triton is not None:
    import triton.language as tl

    from rana_core.decode.dense_kernels import rope_head
    from rana_core.decode.masked_kernels import arrives_last, await_inputs

    @triton.jit
    def attention_chunk(j, s, q_ptr, k_cache_ptr, v_cache_ptr, pos, m_ptr, l_ptr, acc_ptr, max_seq, scale,
                        STRIDE: tl.constexpr, GROUP: tl.constexpr, CHUNK: tl.constexpr, D: tl.constexpr):
        """KV head j's positions s·CHUNK… (those ≤ pos) against each of its GROUP query heads: the chunk's running
        max m, softmax denominator l and weighted value sum acc (flash-decoding), at h·STRIDE + s."""
        t = s * CHUNK + tl.arange(0, CHUNK)
        t_ok = t <= pos
        d = tl.arange(0, D)
        keys = tl.load(k_cache_ptr + (j * max_seq + t[:, None]) * D + d[None, :], mask=t_ok[:, None], other=0.0,
                       cache_modifier=".cg")
        values = tl.load(v_cache_ptr + (j * max_seq + t[:, None]) * D + d[None, :], mask=t_ok[:, None], other=0.0,
                         cache_modifier=".cg")
        for g in tl.static_range(GROUP):
            h = j * GROUP + g
            q = tl.load(q_ptr + h * D + d, cache_modifier=".cg").to(tl.float32)
            scores = tl.sum(keys.to(tl.float32) * q[None, :], axis=1) * scale
            scores = tl.where(t_ok, scores, float("-inf"))
            m = tl.max(scores, axis=0)
            p = tl.where(t_ok, tl.exp(scores - m), 0.0)
            tl.store(m_ptr + h * STRIDE + s, m)
            tl.store(l_ptr + h * STRIDE + s, tl.sum(p, axis=0))
            tl.store(acc_ptr + (h * STRIDE + s) * D + d, tl.sum(p[:, None] * values.to(tl.float32), axis=0))

    @triton.jit
    def combine_head(h, m_ptr, l_ptr, acc_ptr, out_ptr, chunks, STRIDE: tl.constexpr, CHUNKS_P2: tl.constexpr,
                     D: tl.constexpr):
        """Query head h: its first `chunks` chunks' partial softmaxes rescaled to their common max and added
        (empty chunks, with m = -inf, weigh nothing)."""
        s = tl.arange(0, CHUNKS_P2)
        s_ok = s < chunks
        m = tl.load(m_ptr + h * STRIDE + s, mask=s_ok, other=float("-inf"), cache_modifier=".cg")
        weight = tl.where(s_ok & (m > float("-inf")), tl.exp(m - tl.max(m, axis=0)), 0.0)
        total = tl.sum(weight * tl.load(l_ptr + h * STRIDE + s, mask=s_ok, other=0.0, cache_modifier=".cg"), axis=0)
        d = tl.arange(0, D)
        acc = tl.load(acc_ptr + (h * STRIDE + s[:, None]) * D + d[None, :], mask=s_ok[:, None], other=0.0,
                      cache_modifier=".cg")
        out = tl.sum(weight[:, None] * acc, axis=0) / total
        tl.store(out_ptr + h * D + d, out.to(out_ptr.dtype.element_ty))

    @triton.jit
    def _attention_chunk_kernel(q_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, m_ptr, l_ptr, acc_ptr, max_seq, scale,
                                GROUP: tl.constexpr, SPLITS: tl.constexpr, CHUNK: tl.constexpr, D: tl.constexpr,
                                PDL: tl.constexpr):
        """Program (j, s): attention_chunk (j, s); chunks past pos come out empty."""
        await_inputs(PDL)
        attention_chunk(tl.program_id(0), tl.program_id(1), q_ptr, k_cache_ptr, v_cache_ptr, tl.load(pos_ptr),
                        m_ptr, l_ptr, acc_ptr, max_seq, scale, SPLITS, GROUP, CHUNK, D)

    @triton.jit
    def combine_if_last(j, m_ptr, l_ptr, acc_ptr, out_ptr, arrivals_ptr, GROUP: tl.constexpr, SPLITS: tl.constexpr,
                        SPLITS_P2: tl.constexpr, D: tl.constexpr):
        """This chunk program's arrival at KV head j's counter; the program that arrives last combines the group's
        query heads (combine_head), reading every chunk in a fixed order whichever program runs it (so the
        result does not depend on who came last), and sets the counter back to zero for the next launch (graph
        replays reuse it)."""
        if arrives_last(arrivals_ptr + j, SPLITS):
            for g in tl.static_range(GROUP):
                combine_head(j * GROUP + g, m_ptr, l_ptr, acc_ptr, out_ptr, SPLITS, SPLITS, SPLITS_P2, D)
            tl.store(arrivals_ptr + j, 0)

    @triton.jit
    def _attention_last_combines_kernel(q_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, m_ptr, l_ptr, acc_ptr, out_ptr,
                                        arrivals_ptr, max_seq, scale, GROUP: tl.constexpr, SPLITS: tl.constexpr,
                                        SPLITS_P2: tl.constexpr, CHUNK: tl.constexpr, D: tl.constexpr,
                                        PDL: tl.constexpr):
        """Program (j, s): attention_chunk (j, s), then combine_if_last: attention in one launch, not two."""
        await_inputs(PDL)
        j = tl.program_id(0)
        attention_chunk(j, tl.program_id(1), q_ptr, k_cache_ptr, v_cache_ptr, tl.load(pos_ptr), m_ptr, l_ptr,
                        acc_ptr, max_seq, scale, SPLITS, GROUP, CHUNK, D)
        combine_if_last(j, m_ptr, l_ptr, acc_ptr, out_ptr, arrivals_ptr, GROUP, SPLITS, SPLITS_P2, D)

    @triton.jit
    def _rope_attention_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_cache_ptr, v_cache_ptr, m_ptr, l_ptr,
                               acc_ptr, out_ptr, arrivals_ptr, max_seq, scale, HEADS: tl.constexpr,
                               KV_HEADS: tl.constexpr, HALF: tl.constexpr, QKV_SPLITS: tl.constexpr,
                               SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, CHUNK: tl.constexpr,
                               PDL: tl.constexpr):
        """Program (j, s): rotary, the cache writes and attention in one launch. The program rotates the group's
        queries into its own slot of q (every chunk program of the group makes the same values, none reads
        another's), the program whose chunk holds pos rotates this step's key and writes it and the value into
        the cache where it then reads them, and then it is _attention_last_combines_kernel's program."""
        await_inputs(PDL)
        j, s = tl.program_id(0), tl.program_id(1)
        GROUP: tl.constexpr = HEADS // KV_HEADS
        D: tl.constexpr = 2 * HALF
        pos = tl.load(pos_ptr)
        q_ptr += (j * SPLITS + s - j) * GROUP * D  # this program's slot, addressed by query head as rope_head does
        for g in tl.static_range(GROUP):
            rope_head(j * GROUP + g, qkv_ptr, cos_ptr, sin_ptr, pos, q_ptr, k_cache_ptr, v_cache_ptr, max_seq, HEADS,
                      KV_HEADS, HALF, QKV_SPLITS)
        if s == pos // CHUNK:
            rope_head(HEADS + j, qkv_ptr, cos_ptr, sin_ptr, pos, q_ptr, k_cache_ptr, v_cache_ptr, max_seq, HEADS,
                      KV_HEADS, HALF, QKV_SPLITS)
        tl.debug_barrier()  # the queries and this step's key and value stored before any thread loads them
        attention_chunk(j, s, q_ptr, k_cache_ptr, v_cache_ptr, pos, m_ptr, l_ptr, acc_ptr, max_seq, scale, SPLITS,
                        GROUP, CHUNK, D)
        combine_if_last(j, m_ptr, l_ptr, acc_ptr, out_ptr, arrivals_ptr, GROUP, SPLITS, SPLITS_P2, D)

    @triton.jit
    def _attention_combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr,
                                  D: tl.constexpr, PDL: tl.constexpr):
        """Program h: combine_head h over all SPLITS chunks."""
        await_inputs(PDL)
        combine_head(tl.program_id(0), m_ptr, l_ptr, acc_ptr, out_ptr, SPLITS, SPLITS, SPLITS_P2, D)


ATTENTION_CHUNK = 64  # cached positions per attention program


def attention_launches() -> int:
    """How many launches a one-token attention section takes (RANA_ATTENTION_LAUNCHES; 3 until timed): 3 rotary
    with the cache writes, the chunks, their combine; 2 the combine made by the last chunk program; 1 rotary and
    the cache writes made by the chunk programs too (rope_attention)."""
    launches = os.environ.get("RANA_ATTENTION_LAUNCHES", "3")
    if launches not in ("1", "2", "3"):
        raise ValueError(f"RANA_ATTENTION_LAUNCHES={launches!r}: use 1, 2 or 3")
    return int(launches)


def rope_attention(qkv: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor, pos: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int, kv_heads: int, out: torch.Tensor,
                   splits: int = 0) -> torch.Tensor:
    """One token's attention section: rope_into_cache, then decode_attention into out (heads, d), in the
    attention_launches() chosen; `qkv` and `splits` as rope_into_cache takes them."""
    if attention_launches() > 1 or not use_triton(qkv):
        q = rope_into_cache(qkv, cos_table, sin_table, pos, k_cache, v_cache, heads, kv_heads,
                            torch.empty(heads, k_cache.shape[-1], dtype=out.dtype, device=out.device), splits)
        return decode_attention(q, k_cache, v_cache, pos, out)
    d = k_cache.shape[-1]
    if splits and qkv.numel() != splits * (heads + 2 * kv_heads) * d:
        raise ValueError(f"{qkv.numel()} partial sums are not {splits} rows of qkv")
    max_seq = k_cache.shape[1]
    chunks = math.ceil(max_seq / ATTENTION_CHUNK)
    q = torch.empty(heads * chunks * d, dtype=out.dtype, device=out.device)  # each chunk program's own queries
    m = torch.empty(heads * chunks, dtype=torch.float32, device=out.device)
    l = torch.empty_like(m)
    acc = torch.empty(heads * chunks * d, dtype=torch.float32, device=out.device)
    p = pdl(qkv)
    _rope_attention_kernel[(kv_heads, chunks)](
        qkv, cos_table, sin_table, pos, q, k_cache, v_cache, m, l, acc, out, _arrivals(kv_heads, out.device),
        max_seq, 1.0 / math.sqrt(d), HEADS=heads, KV_HEADS=kv_heads, HALF=d // 2, QKV_SPLITS=splits, SPLITS=chunks,
        SPLITS_P2=triton.next_power_of_2(chunks), CHUNK=ATTENTION_CHUNK, PDL=p, num_warps=4, launch_pdl=p)
    return out


def _arrivals(kv_heads: int, device: torch.device) -> torch.Tensor:
    """Arrival counters of the one-launch attention, one per KV head (masked_kernels._buffer: zero between
    launches, and the same memory for every captured graph)."""
    return _buffer("attention arrivals", kv_heads, torch.int32, device, zero=True)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     out: torch.Tensor) -> torch.Tensor:
    """One token's attention over cached positions 0..pos (pos read from device memory, so a captured graph
    follows it): q (heads, d), k_cache/v_cache (kv_heads, max_seq, d), out (heads, d); softmax scale 1/√d.
    Only the chunks up to pos are read, not the whole static cache. Two launches (the chunks, then their
    combine), or one where attention_launches() is under 3 (the last chunk program of each KV head combines)."""
    heads, d = q.shape
    kv_heads, max_seq, _ = k_cache.shape
    if not use_triton(q):
        allowed = torch.arange(max_seq, device=q.device) <= pos
        attended = torch.nn.functional.scaled_dot_product_attention(
            q[None, :, None], k_cache[None], v_cache[None], attn_mask=allowed, enable_gqa=kv_heads != heads)
        return out.copy_(attended[0, :, 0])
    splits = math.ceil(max_seq / ATTENTION_CHUNK)
    m = torch.empty(heads * splits, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(heads * splits * d, dtype=torch.float32, device=q.device)
    p = pdl(q)
    if attention_launches() < 3:  # one launch: the last chunk program combines
        _attention_last_combines_kernel[(kv_heads, splits)](
            q, k_cache, v_cache, pos, m, l, acc, out, _arrivals(kv_heads, q.device), max_seq, 1.0 / math.sqrt(d),
            GROUP=heads // kv_heads, SPLITS=splits, SPLITS_P2=triton.next_power_of_2(splits), CHUNK=ATTENTION_CHUNK,
            D=d, PDL=p, num_warps=4, launch_pdl=p)
        return out
    _attention_chunk_kernel[(kv_heads, splits)](q, k_cache, v_cache, pos, m, l, acc, max_seq, 1.0 / math.sqrt(d),
                                                GROUP=heads // kv_heads, SPLITS=splits, CHUNK=ATTENTION_CHUNK, D=d,
                                                PDL=p, num_warps=4, launch_pdl=p)
    _attention_combine_kernel[(heads,)](m, l, acc, out, SPLITS=splits, SPLITS_P2=triton.next_power_of_2(splits),
                                        D=d, PDL=p, num_warps=4, launch_pdl=p)
    return out
