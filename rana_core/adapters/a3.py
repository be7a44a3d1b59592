"""A3's smaller attention and MLP: narrower matrices and a narrower KV cache,
not factors added at run time.

- ``A3Attention`` replaces a layer's ``self_attn`` (the original stays as ``base``). Per KV group it keeps
  ``r_qk`` of the d_h query/key coordinates, in whole rotary pairs and the same ones for q and k, so queries and
  keys are computed, rotated and cached at width ``r_qk``; values and the output projection run at width
  ``r_vo`` through the group's OV factors. The softmax keeps the original 1/sqrt(d_h) scale: the kept pairs'
  score is a partial sum of the original score, which is what the selection approximates.
- ``A3MLP`` replaces a layer's ``mlp`` with gate, up and down sliced to the kept channels.

Rotary pairs are read off the model's own rotary function (``rotary_pairs``): Hugging Face's rotate-half
pairs coordinate j with j + d_h/2, GPT-J-style code pairs 2i with 2i+1; a wrong pairing would silently rotate
the wrong coordinates together. Kept coordinates are laid out as [first of each pair…, second of each pair…],
so rotate-half on the narrow vector rotates exactly the kept pairs with cos/sin gathered at their coordinates.
Both wrappers own Meters, so the pipeline *measures* their FLOPs like any adapter's.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from rana_core.adapters.base import AttentionAdapter, Meter, MLPAdapter
from rana_core.architecture import attention_parts, layer_attention, layer_mlp, mlp_parts, shape_of
from rana_core.errors import RanaError
from rana_core.residency import placed_like


def rotary_pairs(apply_rotary, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, second) coordinate of every rotary pair, as the model's own `apply_rotary` pairs them.

    With cos = 0 and sin = 1 a rotary map sends e_a to +e_b and e_b to −e_a for a pair (a, b) rotated as
    a' = a·cos − b·sin, b' = b·cos + a·sin: the sign says which coordinate of the pair comes first."""
    eye = torch.eye(head_dim, dtype=torch.float64)[None, None]  # (1, 1, d_h, d_h): one unit vector per row
    zeros, ones = torch.zeros(1, head_dim, dtype=torch.float64), torch.ones(1, head_dim, dtype=torch.float64)
    moved, _ = apply_rotary(eye, eye, zeros, ones)
    moved = moved[0, 0]
    partner = moved.abs().argmax(dim=1)
    sign = moved[torch.arange(head_dim), partner]
    identity = torch.arange(head_dim)
    if (not (moved.abs().sum(1) == 1).all() or (partner == identity).any()
            or not torch.equal(partner[partner], identity)):
        raise RanaError("a3: this model's rotary embedding does not rotate coordinates in pairs")
    first = torch.nonzero(sign > 0).flatten()
    return first, partner[first]


def model_rotary(attention: nn.Module):
    """The rotary function of the model family `attention` comes from (e.g. modeling_llama.apply_rotary_pos_emb)."""
    found = getattr(sys.modules[type(attention).__module__], "apply_rotary_pos_emb", None)
    if found is None:
        raise RanaError(f"a3: no rotary embedding found beside {type(attention).__name__}")
    return found


def kept_coordinates(pair_first: torch.Tensor, pair_second: torch.Tensor, kept_pairs: torch.Tensor) -> torch.Tensor:
    """Head coordinates of the kept pairs (indices into the pair list), laid out [firsts…, seconds…]."""
    kept_pairs = kept_pairs.sort().values
    return torch.cat([pair_first[kept_pairs], pair_second[kept_pairs]])


def rotate_narrow(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary on vectors laid out [firsts…, seconds…] with cos/sin already gathered at those coordinates."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _frozen(tensor: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    """A fixed parameter on `like`'s device and dtype (A3's matrices are computed, never trained)."""
    return nn.Parameter(placed_like(tensor, like), requires_grad=False)


def _rows(weight: torch.Tensor, heads: int, head_dim: int, coords: torch.Tensor) -> torch.Tensor:
    """Rows `coords[group]` of every head of a (heads·d_h, d) projection; head h belongs to group h // per_group."""
    per_group = heads // coords.shape[0]
    index = torch.cat([h * head_dim + coords[h // per_group] for h in range(heads)])
    return weight[index]


class A3Attention(AttentionAdapter):
    """Attention at reduced widths: q/k at r_qk kept coordinates per group, v/o at r_vo per group."""

    adapter_name = "a3"
    kind = "a3_attention"

    def __init__(self, base: nn.Module, layer: int, coords: torch.Tensor, v_weight: torch.Tensor,
                 o_weight: torch.Tensor):
        """`coords`: (kv_heads, r_qk) kept head coordinates per KV group ([firsts…, seconds…]); `v_weight`:
        (kv_heads·r_vo, d); `o_weight`: (d, heads·r_vo)."""
        super().__init__(base, layer)
        shape = shape_of(base.config)
        self.heads, self.kv_heads, self.head_dim = shape.heads, shape.kv_heads, shape.head_dim
        self.layer_idx, self.scaling = base.layer_idx, base.scaling
        self.group = self.heads // self.kv_heads
        self.r_qk = coords.shape[1]
        self.r_vo = v_weight.shape[0] // self.kv_heads
        q_proj, k_proj, _, o_proj = attention_parts(base)
        hidden = q_proj.in_features
        if (coords.shape[0] != self.kv_heads or self.r_qk % 2 or not 2 <= self.r_qk <= self.head_dim
                or int(coords.min()) < 0 or int(coords.max()) >= self.head_dim):
            raise RuntimeError(f"kept coordinates {tuple(coords.shape)} do not fit {self.kv_heads} KV heads of "
                               f"{self.head_dim}")
        if (v_weight.shape[1] != hidden or v_weight.shape[0] % self.kv_heads or not 1 <= self.r_vo <= self.head_dim
                or tuple(o_weight.shape) != (o_proj.out_features, self.heads * self.r_vo)):
            raise RuntimeError(f"value/output weights {tuple(v_weight.shape)}, {tuple(o_weight.shape)} do not fit "
                               f"this attention")
        like = q_proj.weight
        self.register_buffer("coords", coords.to(device=like.device, dtype=torch.long))
        self.q_weight = _frozen(_rows(like, self.heads, self.head_dim, self.coords), like)
        self.k_weight = _frozen(_rows(k_proj.weight, self.kv_heads, self.head_dim, self.coords), like)
        self.v_weight, self.o_weight = _frozen(v_weight, like), _frozen(o_weight, like)
        self.o_bias = o_proj.bias
        self.kv_features = self.kv_heads * (self.r_qk + self.r_vo)  # cached per token, keys plus values
        dense_out = (self.heads + 2 * self.kv_heads) * self.head_dim
        kept_out = (self.heads + self.kv_heads) * self.r_qk + self.kv_heads * self.r_vo
        self.meter = Meter(layer, "qkv", dense_out, hidden, static_rank=kept_out, max_rank=dense_out)
        self.meter.adapter = self.adapter_name

    def meters(self) -> list[Meter]:
        return [self.meter]

    def state(self) -> tuple[dict, dict]:  # q/k rows are the base's at `coords`: only the new tensors are saved
        return {}, {"coords": self.coords, "v_weight": self.v_weight, "o_weight": self.o_weight}

    @classmethod
    def rebuild(cls, layer, index: int, meta: dict, tensors: dict) -> "A3Attention":
        return cls(layer_attention(layer), index, tensors["coords"], tensors["v_weight"], tensors["o_weight"])

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        batch, length, hidden = hidden_states.shape
        q = F.linear(hidden_states, self.q_weight).view(batch, length, self.heads, self.r_qk).transpose(1, 2)
        k = F.linear(hidden_states, self.k_weight).view(batch, length, self.kv_heads, self.r_qk).transpose(1, 2)
        v = F.linear(hidden_states, self.v_weight).view(batch, length, self.kv_heads, self.r_vo).transpose(1, 2)
        cos, sin = position_embeddings  # (batch, length, d_h)
        cos_k = cos[..., self.coords].permute(0, 2, 1, 3)  # (batch, kv_heads, length, r_qk)
        sin_k = sin[..., self.coords].permute(0, 2, 1, 3)
        k = rotate_narrow(k, cos_k, sin_k)
        q = rotate_narrow(q, cos_k.repeat_interleave(self.group, 1), sin_k.repeat_interleave(self.group, 1))
        past = past_key_values.get_seq_length(self.layer_idx) if past_key_values is not None else 0
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        context = k.shape[2]
        mask = attention_mask
        if mask is not None:
            mask = mask[..., :context]
        elif length > 1:  # no mask given: plain causal attention, aligned to the end when a cache precedes
            mask = torch.ones(length, context, dtype=torch.bool, device=q.device).tril(context - length)
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(self.group, 1), v.repeat_interleave(self.group, 1),
                                             attn_mask=mask, scale=self.scaling)
        out = out.transpose(1, 2).reshape(batch, length, self.heads * self.r_vo)
        y = F.linear(out, self.o_weight, self.o_bias)
        self._count(batch, length, past, hidden)
        if self.tracking and past_key_values is None:  # the dense attention on the same input, for the error
            reference = self.base(hidden_states, position_embeddings, attention_mask, None, **kwargs)[0]
            self.meter.track(y, reference)
        return y, None

    def _count(self, batch: int, length: int, past: int, hidden: int) -> None:
        tokens = batch * length
        self.meter.count(tokens, tokens * 2 * hidden * self.meter.static_rank, tokens * self.meter.static_rank)
        contexts = batch * (length * past + length * (length + 1) // 2)  # keys each query attends to, summed
        narrower = (self.head_dim - self.r_qk) + (self.head_dim - self.r_vo)
        saved = tokens * 2 * hidden * self.heads * (self.head_dim - self.r_vo) + 2 * self.heads * narrower * contexts
        self.meter.count_fixed_saving(saved)


class A3MLP(MLPAdapter):
    """The gated MLP on the kept channels: gate and up keep those rows, down those columns (optionally refit)."""

    adapter_name = "a3"
    kind = "a3_mlp"

    def __init__(self, base: nn.Module, layer: int, channels: torch.Tensor, down_weight: torch.Tensor | None = None):
        super().__init__(base, layer)
        gate, up, down, self.act = mlp_parts(base)
        hidden, inner = gate.in_features, gate.out_features
        if (channels.ndim != 1 or not 1 <= channels.numel() <= inner or int(channels.max()) >= inner
                or int(channels.min()) < 0):
            raise RuntimeError(f"{channels.numel()} kept channels do not fit an MLP of {inner}")
        self.register_buffer("channels", channels.to(device=gate.weight.device, dtype=torch.long))
        self.refit = down_weight is not None  # W_down refit by least squares on the kept channels
        self.gate_weight = _frozen(gate.weight[self.channels], gate.weight)
        self.up_weight = _frozen(up.weight[self.channels], gate.weight)
        if down_weight is None:
            down_weight = down.weight[:, self.channels]
        if tuple(down_weight.shape) != (down.out_features, channels.numel()):
            raise RuntimeError(f"down weight {tuple(down_weight.shape)} does not fit {channels.numel()} channels")
        self.down_weight = _frozen(down_weight, gate.weight)
        self.gate_bias = gate.bias[self.channels] if gate.bias is not None else None
        self.up_bias = up.bias[self.channels] if up.bias is not None else None
        self.down_bias = down.bias
        kept = channels.numel()
        self._meters = {name: Meter(layer, name, out_f, in_f, static_rank=kept, max_rank=inner)
                        for name, out_f, in_f in (("gate", inner, hidden), ("up", inner, hidden),
                                                  ("down", hidden, inner))}
        for meter in self._meters.values():
            meter.adapter = self.adapter_name

    def meters(self) -> list[Meter]:
        return list(self._meters.values())

    def state(self) -> tuple[dict, dict]:
        return {}, {"channels": self.channels} | ({"down_weight": self.down_weight} if self.refit else {})

    @classmethod
    def rebuild(cls, layer, index: int, meta: dict, tensors: dict) -> "A3MLP":
        return cls(layer_mlp(layer), index, tensors["channels"], tensors.get("down_weight"))

    def forward(self, x):
        h = self.act(F.linear(x, self.gate_weight, self.gate_bias)) * F.linear(x, self.up_weight, self.up_bias)
        y = F.linear(h, self.down_weight, self.down_bias)
        tokens, kept, hidden = x.numel() // x.shape[-1], self.channels.numel(), x.shape[-1]
        for meter in self._meters.values():
            meter.count(tokens, tokens * 2 * hidden * kept, tokens * kept)
        if self.tracking:  # gate and up: the share of their output energy in dropped channels; down: the MLP's
            gate, up, _, _ = mlp_parts(self.base)
            for name, proj in (("gate", gate), ("up", up)):
                full = proj(x)
                kept_only = torch.zeros_like(full).index_copy(-1, self.channels, full.index_select(-1, self.channels))
                self._meters[name].track(kept_only, full)
            self._meters["down"].track(y, self.base(x))
        return y
