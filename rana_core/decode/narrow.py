"""A3's narrower attention in the decode engine: queries and keys at r_qk kept coordinates per KV group (whole
rotary pairs, laid out [firsts…, seconds…] as rana_core.adapters.a3 lays them out), values and the output
projection at r_vo, and a KV cache that holds only those widths' worth of each head.

The cache keeps the engine's full-width tensors and fills the first r_qk (keys) and r_vo (values) coordinates of
each head; attention reads those slices. The bytes a step reads count the narrow widths (``kv_features``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rana_core.adapters.a3 import rotate_narrow
from rana_core.decode.parts import matvec


class A3AttentionPart(nn.Module):
    """A3's q, k, v and o weights, and the kept coordinates of each KV group."""

    def __init__(self, adapter, put, device, gemv: str):
        super().__init__()
        self.q = nn.Parameter(put(adapter.q_weight), requires_grad=False)
        self.k = nn.Parameter(put(adapter.k_weight), requires_grad=False)
        self.v = nn.Parameter(put(adapter.v_weight), requires_grad=False)
        self.o = put(adapter.o_weight)
        self.register_buffer("coords", adapter.coords.to(device))
        self.r_qk, self.r_vo, self.scaling, self.gemv = adapter.r_qk, adapter.r_vo, adapter.scaling, gemv

    def flops_per_token(self) -> float:  # what the adapter's meter counts for its QKV
        return 2.0 * (self.q.numel() + self.k.numel() + self.v.numel())

    def elements_per_token(self) -> float:
        return self.q.numel() + self.k.numel() + self.v.numel()

    def attention(self, shape, normed, pos, k_cache, v_cache, cos_table, sin_table, mark) -> torch.Tensor:
        """o_proj(attention) of `normed` at positions `pos`, this step's narrow k and v written into the cache."""
        T, group = normed.shape[0], shape.heads // shape.kv_heads
        q = matvec(self.q, normed, self.gemv).view(T, shape.heads, self.r_qk)
        k = matvec(self.k, normed, self.gemv).view(T, shape.kv_heads, self.r_qk)
        v = matvec(self.v, normed, self.gemv).view(T, shape.kv_heads, self.r_vo)
        mark("attention")
        cos = torch.cat([cos_table[pos], cos_table[pos]], dim=-1)[:, self.coords]  # (T, kv_heads, r_qk)
        sin = torch.cat([sin_table[pos], sin_table[pos]], dim=-1)[:, self.coords]
        k = rotate_narrow(k, cos, sin)
        q = rotate_narrow(q, cos.repeat_interleave(group, 1), sin.repeat_interleave(group, 1))
        keys, values = k_cache[..., : self.r_qk], v_cache[..., : self.r_vo]
        keys.index_copy_(1, pos, k.transpose(0, 1))
        values.index_copy_(1, pos, v.transpose(0, 1))
        mask = torch.arange(k_cache.shape[1], device=pos.device)[None, :] <= pos[:, None]
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys[None], values[None],
                                             attn_mask=mask[None, None], scale=self.scaling,
                                             enable_gqa=shape.kv_heads != shape.heads)
        return matvec(self.o, out[0].transpose(0, 1).reshape(T, shape.heads * self.r_vo), self.gemv)
