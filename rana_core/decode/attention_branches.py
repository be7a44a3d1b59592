"""RaNA's masked QKV product and the attention section in branches that run side by side, halves of the heads on
CUDA streams of their own (RANA_QKV_BRANCHES, read when an engine is built; opt-in until timed).

The list design runs a layer's attention as one chain: B, the rank compaction, the gather of the active rows of
Aᵀ (all of q, k and v), rotary with the cache writes, attention, then o_proj. Its hand-overs and the attention's
own latency (~8 µs a 7B layer at short contexts) move no weight bytes. Here, after the shared rank compaction,
each branch gathers the columns of its heads (its query heads, and the key and value heads they read), rotates
them into its heads' cache, and attends, while the other branch's gather streams; o_proj joins them. So that a
branch's columns are one block, the block keeps a copy of Aᵀ whose columns are laid out branch by branch, each as
a q | k | v of its own heads (branch_major): rope_into_cache and decode_attention then take a branch as a model of
fewer heads. This mirrors the MLP's branches (mlp_branches)."""

from __future__ import annotations

import os

import torch

from rana_core.decode.attention_kernels import decode_attention
from rana_core.decode.branches import run_in_branches
from rana_core.decode.dense_kernels import rope_into_cache
from rana_core.decode.masked_kernels import compact_list, gather_list


def qkv_branches() -> int:
    """How many branches a block built now gives its masked QKV and attention (RANA_QKV_BRANCHES, default 1)."""
    text = os.environ.get("RANA_QKV_BRANCHES", "1")
    if text not in ("1", "2", "3", "4"):
        raise ValueError(f"RANA_QKV_BRANCHES={text}: expected 1 to 4 branches")
    return int(text)


def head_ranges(heads: int, kv_heads: int, branches: int) -> list[tuple[int, int, int, int]]:
    """(first query head, end, first KV head, end) of each branch: near-equal ranges of KV heads, each with the
    query heads that read them."""
    group = heads // kv_heads
    cuts = [round(kv_heads * b / branches) for b in range(branches + 1)]
    return [(lo * group, hi * group, lo, hi) for lo, hi in zip(cuts, cuts[1:]) if hi > lo]


def branch_major(rows: torch.Tensor, heads: int, kv_heads: int, ranges: list) -> torch.Tensor:
    """A copy of `rows` (K, (heads + 2·kv_heads)·d: columns q | k | v) whose columns run branch by branch, each
    branch its own q | k | v of its heads."""
    d = rows.shape[1] // (heads + 2 * kv_heads)
    k_at, v_at = heads * d, (heads + kv_heads) * d
    order = torch.cat([torch.cat([torch.arange(h0 * d, h1 * d), torch.arange(k_at + kv0 * d, k_at + kv1 * d),
                                  torch.arange(v_at + kv0 * d, v_at + kv1 * d)])
                       for h0, h1, kv0, kv1 in ranges]).to(rows.device)
    return rows.index_select(1, order).contiguous()


def branched_attention(part, z: torch.Tensor, rows: torch.Tensor, ranges: list, pos: torch.Tensor,
                       k_cache: torch.Tensor, v_cache: torch.Tensor, cos_table: torch.Tensor,
                       sin_table: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """One token's attention section from RaNA's QKV coefficients z (K,): the active ranks listed once, then each
    branch gathers its columns of `rows` (branch_major's copy of part's Aᵀ), rotates its heads into the cache and
    attends, into its rows of out (heads, d); returns out once every branch is done."""
    d = k_cache.shape[-1]
    ranks = compact_list(z, part.threshold, part.scale, z.numel(), 1, tag=" qkv")
    q = torch.empty_like(out)
    widths = [(h1 - h0 + 2 * (kv1 - kv0)) * d for h0, h1, kv0, kv1 in ranges]
    columns = [sum(widths[:b]) for b in range(len(ranges))]

    def branch(b: int) -> None:
        h0, h1, kv0, kv1 = ranges[b]
        partial, splits = gather_list(rows[:, columns[b]:columns[b] + widths[b]], ranks, share=len(ranges),
                                      tag=f" qkv branch {b}")
        k, v = k_cache[kv0:kv1], v_cache[kv0:kv1]
        rope_into_cache(partial, cos_table, sin_table, pos, k, v, h1 - h0, kv1 - kv0, q[h0:h1], splits)
        decode_attention(q[h0:h1], k, v, pos, out[h0:h1], tag=f" branch {b}")

    run_in_branches(z.device, len(ranges), branch)  # o_proj after every branch
    return out
