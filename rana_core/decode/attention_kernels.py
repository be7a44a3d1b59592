"""One token's attention over its KV cache (batch 1), in two or three launches, with the PyTorch form.

- `decode_attention`: attention over the cached positions up to the token's own (flash-decoding: chunks of the
  prefix in parallel, each a running max, denominator and weighted value sum, then a combine), reading no position
  past it. The combine is a launch of its own, or made by the last chunk program of each KV head to arrive (an
  arrival counter per head, reset by that program for the next launch);
- `rope_attention`: the whole attention section of a decoder layer: rotary on q and k and the cache writes
  (dense_kernels.rope_into_cache), then decode_attention.

How many launches (`attention_launches`, RANA_ATTENTION_LAUNCHES) follows what was measured per shape: fewer
launches are fewer gaps in the step's graph, and more work that waits on one program (the combine). Both forms
compute the same bits.
"""

from __future__ import annotations

import math
import os

import torch

from rana_core.decode.dense_kernels import rope_into_cache
from rana_core.decode.launch import launch_ints, pdl, triton, use_triton, work_buffer

if triton is not None:
    import triton.language as tl

    from rana_core.decode.launch import arrives_last, await_inputs

    @triton.jit
    def attention_chunk(j, s, q_ptr, k_cache_ptr, v_cache_ptr, pos, m_ptr, l_ptr, acc_ptr, max_seq, scale,
                        STRIDE: tl.constexpr, GROUP: tl.constexpr, CHUNK: tl.constexpr, D: tl.constexpr,
                        DOT: tl.constexpr):
        """KV head j's positions s·CHUNK… (those ≤ pos) against each of its GROUP query heads: the chunk's running
        max m, softmax denominator l and weighted value sum acc (flash-decoding), at h·STRIDE + s.

        DOT: the group's queries as the rows of one product with the chunk's keys, and the weights of one with its
        values (tl.dot, rows padded to 16, float32 sums: "ieee" keeps float32 operands out of TF32), so every
        load of the group is issued at once; else head after head (each head's loads wait for the stores of the
        one before, which they might alias)."""
        t = s * CHUNK + tl.arange(0, CHUNK)
        t_ok = t <= pos
        d = tl.arange(0, D)
        keys = tl.load(k_cache_ptr + (j * max_seq + t[:, None]) * D + d[None, :], mask=t_ok[:, None], other=0.0,
                       cache_modifier=".cg")
        values = tl.load(v_cache_ptr + (j * max_seq + t[:, None]) * D + d[None, :], mask=t_ok[:, None], other=0.0,
                         cache_modifier=".cg")
        if DOT:
            ROWS: tl.constexpr = 16 if GROUP <= 16 else GROUP
            g = tl.arange(0, ROWS)
            g_ok = g < GROUP
            h = j * GROUP + g
            q = tl.load(q_ptr + h[:, None] * D + d[None, :], mask=g_ok[:, None], other=0.0, cache_modifier=".cg")
            scores = tl.dot(q, tl.trans(keys), input_precision="ieee") * scale
            scores = tl.where(t_ok[None, :], scores, float("-inf"))
            m = tl.max(scores, axis=1)
            p = tl.where(t_ok[None, :], tl.exp(scores - m[:, None]), 0.0)
            tl.store(m_ptr + h * STRIDE + s, m, mask=g_ok)
            tl.store(l_ptr + h * STRIDE + s, tl.sum(p, axis=1), mask=g_ok)
            acc = tl.dot(p, values.to(tl.float32), input_precision="ieee")
            tl.store(acc_ptr + (h[:, None] * STRIDE + s) * D + d[None, :], acc, mask=g_ok[:, None])
        else:
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
    def combine_group(j, m_ptr, l_ptr, acc_ptr, out_ptr, chunks, STRIDE: tl.constexpr, CHUNKS_P2: tl.constexpr,
                      GROUP: tl.constexpr, GROUP_P2: tl.constexpr, D: tl.constexpr):
        """The GROUP query heads of KV head j, each its first `chunks` chunks' partial softmaxes rescaled to their
        common max and added (empty chunks, with m = -inf, weigh nothing), as one tile: every load of the group in
        flight at once, and the same bits for each head whichever program runs it."""
        g = tl.arange(0, GROUP_P2)
        s = tl.arange(0, CHUNKS_P2)
        h = j * GROUP + g
        ok = (g < GROUP)[:, None] & (s < chunks)[None, :]
        at = h[:, None] * STRIDE + s[None, :]
        m = tl.load(m_ptr + at, mask=ok, other=float("-inf"), cache_modifier=".cg")
        weight = tl.where(ok & (m > float("-inf")), tl.exp(m - tl.max(m, axis=1)[:, None]), 0.0)
        total = tl.sum(weight * tl.load(l_ptr + at, mask=ok, other=0.0, cache_modifier=".cg"), axis=1)
        d = tl.arange(0, D)
        acc = tl.load(acc_ptr + at[:, :, None] * D + d[None, None, :], mask=ok[:, :, None], other=0.0,
                      cache_modifier=".cg")
        out = tl.sum(weight[:, :, None] * acc, axis=1) / total[:, None]
        tl.store(out_ptr + h[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty), mask=(g < GROUP)[:, None])

    @triton.jit
    def combine_head(h, m_ptr, l_ptr, acc_ptr, out_ptr, chunks, STRIDE: tl.constexpr, CHUNKS_P2: tl.constexpr,
                     D: tl.constexpr):
        """Query head h alone (combine_group of one head): for kernels that combine head by head."""
        combine_group(h, m_ptr, l_ptr, acc_ptr, out_ptr, chunks, STRIDE, CHUNKS_P2, 1, 1, D)

    @triton.jit
    def _attention_chunk_kernel(q_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, m_ptr, l_ptr, acc_ptr, max_seq, scale,
                                GROUP: tl.constexpr, SPLITS: tl.constexpr, CHUNK: tl.constexpr, D: tl.constexpr,
                                DOT: tl.constexpr, PDL: tl.constexpr):
        """Program (j, s): attention_chunk (j, s); chunks past pos come out empty."""
        await_inputs(PDL)
        attention_chunk(tl.program_id(0), tl.program_id(1), q_ptr, k_cache_ptr, v_cache_ptr, tl.load(pos_ptr),
                        m_ptr, l_ptr, acc_ptr, max_seq, scale, SPLITS, GROUP, CHUNK, D, DOT)

    @triton.jit
    def _attention_last_combines_kernel(q_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, m_ptr, l_ptr, acc_ptr, out_ptr,
                                        arrivals_ptr, max_seq, scale, GROUP: tl.constexpr, GROUP_P2: tl.constexpr,
                                        SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, CHUNK: tl.constexpr,
                                        D: tl.constexpr, DOT: tl.constexpr, PDL: tl.constexpr):
        """Program (j, s): attention_chunk (j, s); then the program that arrives last at KV head j's counter
        combines the group's heads (combine_group, reading every chunk in a fixed order whichever program runs
        it) and sets the counter back to zero for the next launch (graph replays reuse it): one launch, not two."""
        await_inputs(PDL)
        j = tl.program_id(0)
        attention_chunk(j, tl.program_id(1), q_ptr, k_cache_ptr, v_cache_ptr, tl.load(pos_ptr), m_ptr, l_ptr,
                        acc_ptr, max_seq, scale, SPLITS, GROUP, CHUNK, D, DOT)
        if arrives_last(arrivals_ptr + j, SPLITS):
            combine_group(j, m_ptr, l_ptr, acc_ptr, out_ptr, SPLITS, SPLITS, SPLITS_P2, GROUP, GROUP_P2, D)
            tl.store(arrivals_ptr + j, 0)

    @triton.jit
    def _attention_combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr,
                                  GROUP: tl.constexpr, GROUP_P2: tl.constexpr, D: tl.constexpr, PDL: tl.constexpr):
        """Program j: combine_group j."""
        await_inputs(PDL)
        combine_group(tl.program_id(0), m_ptr, l_ptr, acc_ptr, out_ptr, SPLITS, SPLITS, SPLITS_P2, GROUP, GROUP_P2,
                      D)


ATTENTION_CHUNK = 64  # cached positions per attention program (the batch and layer kernels' too)
GROUPED_CHUNK = 32  # where a KV head has several query heads (measured on an H200, below)
ATTENTION_WARPS = 4  # of a chunk program and of a combine program


def attention_config(group: int) -> tuple[int, int, int]:
    """(cached positions per chunk program, its warps, the combine's warps) for KV heads of `group` query heads.
    Measured on an H200 (engine-ab-attention-config-*-nvidia-h200.json, session 22): on the SmolLM2 shape (3 query
    heads a KV head) chunks of 32 took 1.3-3.1% off RaNA -44% steps and 0.2-1.8% off dense ones (contexts 1 and
    1,000; 16 won at context 1, lost at 1,000); on the Llama-2-7B shape (one query head a KV head) 32 was 2.1%
    slower at context 1,000, so it keeps 64. Fewer warps than 4 cost 10-20%, more 3-12%.
    RANA_ATTENTION_CONFIG="64-4-4" overrides them (bench/engine_ab.py's sweeps)."""
    text = os.environ.get("RANA_ATTENTION_CONFIG", "")
    if not text:
        return GROUPED_CHUNK if group > 1 else ATTENTION_CHUNK, ATTENTION_WARPS, ATTENTION_WARPS
    return launch_ints("RANA_ATTENTION_CONFIG", text, (3,), "chunk-chunk warps-combine warps, e.g. 64-4-4")


def attention_launches(heads: int, kv_heads: int) -> int:
    """How many launches a one-token attention section takes (RANA_ATTENTION_LAUNCHES = 3, 2, or "auto", the
    default): 3, rotary with the cache writes, the chunks, their combine; 2, the last chunk program of each KV head
    combines. Measured on an H200 (bench/results/engine-ab-attention-*): 2 made Llama-2-7B's shape (a query head
    per KV head) 4-5% faster at context 1000 and no slower at 1, SmolLM2's (three query heads per KV head) 4-7%
    slower, so auto takes 2 where each KV head has one query head."""
    launches = os.environ.get("RANA_ATTENTION_LAUNCHES", "auto")
    if launches == "auto":
        return 2 if heads == kv_heads else 3
    if launches not in ("2", "3"):
        raise ValueError(f"RANA_ATTENTION_LAUNCHES={launches!r}: use auto, 2 or 3")
    return int(launches)


def attention_dot(group: int) -> bool:
    """Whether the chunk programs take a group's query heads as the rows of one product (attention_chunk's DOT):
    where a KV head has several (RANA_ATTENTION_DOT=0 turns it off). Measured on an H200
    (bench/results/engine-ab-attention-dot-nvidia-h200.json): SmolLM2's shape (3 a group) 6-7% faster a step,
    Llama-2-7B's (1 a group, padded to 16 rows) 3-10% slower."""
    return group > 1 and os.environ.get("RANA_ATTENTION_DOT", "1") != "0"


def rope_attention(qkv: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor, pos: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int, kv_heads: int, out: torch.Tensor,
                   splits: int = 0) -> torch.Tensor:
    """One token's attention section: rope_into_cache (rotary and both cache writes), then decode_attention into
    out (heads, d); `qkv` and `splits` as rope_into_cache takes them."""
    q = rope_into_cache(qkv, cos_table, sin_table, pos, k_cache, v_cache, heads, kv_heads,
                        torch.empty(heads, k_cache.shape[-1], dtype=out.dtype, device=out.device), splits)
    return decode_attention(q, k_cache, v_cache, pos, out)


def _arrivals(kv_heads: int, device: torch.device) -> torch.Tensor:
    """Arrival counters of the one-launch attention, one per KV head (launch.work_buffer: zero between
    launches, and the same memory for every captured graph)."""
    return work_buffer("attention arrivals", kv_heads, torch.int32, device, zero=True)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     out: torch.Tensor) -> torch.Tensor:
    """One token's attention over cached positions 0..pos (pos read from device memory, so a captured graph
    follows it): q (heads, d), k_cache/v_cache (kv_heads, max_seq, d), out (heads, d); softmax scale 1/√d.
    Only the chunks up to pos are read, not the whole static cache. Two launches (the chunks, then their
    combine), or one where attention_launches() is 2 (the last chunk program of each KV head combines)."""
    heads, d = q.shape
    kv_heads, max_seq, _ = k_cache.shape
    if not use_triton(q):
        allowed = torch.arange(max_seq, device=q.device) <= pos
        attended = torch.nn.functional.scaled_dot_product_attention(
            q[None, :, None], k_cache[None], v_cache[None], attn_mask=allowed, enable_gqa=kv_heads != heads)
        return out.copy_(attended[0, :, 0])
    group = heads // kv_heads
    chunk, chunk_warps, combine_warps = attention_config(group)
    splits = math.ceil(max_seq / chunk)
    m = torch.empty(heads * splits, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(heads * splits * d, dtype=torch.float32, device=q.device)
    p = pdl(q)
    options = dict(GROUP=group, SPLITS=splits, D=d, PDL=p, launch_pdl=p)
    combine = dict(SPLITS_P2=triton.next_power_of_2(splits), GROUP_P2=triton.next_power_of_2(group))
    if attention_launches(heads, kv_heads) == 2:  # the last chunk program of each KV head combines
        _attention_last_combines_kernel[(kv_heads, splits)](
            q, k_cache, v_cache, pos, m, l, acc, out, _arrivals(kv_heads, q.device), max_seq, 1.0 / math.sqrt(d),
            CHUNK=chunk, DOT=attention_dot(group), num_warps=chunk_warps, **combine, **options)
        return out
    _attention_chunk_kernel[(kv_heads, splits)](q, k_cache, v_cache, pos, m, l, acc, max_seq, 1.0 / math.sqrt(d),
                                                CHUNK=chunk, DOT=attention_dot(group), num_warps=chunk_warps,
                                                **options)
    _attention_combine_kernel[(kv_heads,)](m, l, acc, out, num_warps=combine_warps, **combine, **options)
    return out
