"""Gemma 3 in the decode engine: the same parts as Llama's (rana_core.decode.from_model) in Gemma's layer.

What differs from Llama, each as Hugging Face's Gemma 3 computes it:
- embeddings scaled by √hidden (in the weights' dtype);
- four norms per layer, each x·rsqrt(mean x² + ε)·(1 + w) in float32: before attention, on the attention's output
  before the residual add, before the MLP, and on the MLP's output before the residual add;
- RMS norms on each query and key head (QK-norm) before rotary;
- two rotary tables (sliding layers and full layers have their own base), and sliding layers attend only to the
  last `sliding_window` positions;
- attention scaled by query_pre_attn_scalar^-½; GeGLU (the MLP part takes the model's own activation);
- the final logits optionally soft-capped.

Attention here is PyTorch's (QK-norm comes before rotary, which the Llama path's fused rotary kernel does not do),
over the whole static cache with a mask computed on the device from the position, so a step still replays as one
CUDA graph. It is written for correctness first; the Llama path is the fast one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rana_core.architecture import shape_of
from rana_core.decode.dense_kernels import rotate_half_reference
from rana_core.decode.engine import DecodeEngine
from rana_core.decode.parts import matvec
from rana_core.decode.from_model import EngineUnsupported, ModelBlock, _linear


class GemmaNorm(nn.Module):
    def __init__(self, norm: nn.Module, device):
        super().__init__()
        self.weight = nn.Parameter(norm.weight.detach().float().to(device), requires_grad=False)
        self.eps = norm.eps

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)).to(x.dtype)


class GemmaBlock(ModelBlock):
    def __init__(self, shape, gemv: str, parts, norms: list[GemmaNorm], q_norm: GemmaNorm, k_norm: GemmaNorm,
                 window: int | None, scaling: float):
        nn.Module.__init__(self)
        self.shape, self.gemv = shape, gemv
        self.qkv, self.mlp_part = parts.qkv, parts.mlp
        self.qkv_bias = None if parts.qkv_bias is None else nn.Parameter(parts.qkv_bias, requires_grad=False)
        self.wo = _linear(parts.wo)
        self.input_norm, self.post_attention_norm, self.pre_mlp_norm, self.post_mlp_norm = norms
        self.q_norm, self.k_norm = q_norm, k_norm
        self.window, self.scaling = window, scaling
        self.marker = None

    def attention(self, normed, pos, k_cache, v_cache, cos_table, sin_table, allowed):
        s = self.shape
        T, hd = normed.shape[0], s.head_dim
        qkv, _ = self.qkv_product(normed, fuse=False)  # QK-norm needs the summed q and k
        q, k, v = qkv.split([s.heads * hd, s.kv_heads * hd, s.kv_heads * hd], dim=-1)
        cos, sin = cos_table[pos], sin_table[pos]
        q = rotate_half_reference(self.q_norm(q.reshape(T, s.heads, hd)), cos, sin).transpose(0, 1)
        k = rotate_half_reference(self.k_norm(k.reshape(T, s.kv_heads, hd)), cos, sin)
        k_cache.index_copy_(1, pos, k.transpose(0, 1))
        v_cache.index_copy_(1, pos, v.reshape(T, s.kv_heads, hd).transpose(0, 1))
        keys = torch.arange(k_cache.shape[1], device=pos.device)
        mask = keys[None, :] <= pos[:, None]
        if self.window is not None:
            mask &= keys[None, :] > pos[:, None] - self.window
        attended = F.scaled_dot_product_attention(q[None], k_cache[None], v_cache[None], attn_mask=mask[None, None],
                                                  scale=self.scaling, enable_gqa=s.kv_heads != s.heads)
        return matvec(self.wo.weight, attended[0].transpose(0, 1).reshape(T, s.heads * hd), self.gemv)


class GemmaEngine(DecodeEngine):
    def allocate(self, max_seq: int) -> None:
        """The static cache, and a rotary table per layer type (sliding and full layers have their own base)."""
        s = self.shape
        self.max_seq = max_seq
        self.k_cache = torch.zeros(s.layers, s.kv_heads, max_seq, s.head_dim, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros_like(self.k_cache)
        positions = torch.arange(max_seq, device=self.device).float()
        self.tables = {}
        for kind, (inv_freq, scale) in self.rotaries.items():
            angles = torch.outer(positions, inv_freq.to(self.device).float())
            self.tables[kind] = ((angles.cos() * scale).to(self.dtype), (angles.sin() * scale).to(self.dtype))
        self.token = torch.zeros(1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.graph = None

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = self.embed[tokens] * self.embed_scale
        mark = self.marker or (lambda layer, section: None)
        for index, block in enumerate(self.blocks):
            cos, sin = self.tables["sliding" if block.window is not None else "full"]
            mark(index, "qkv")
            attended = block.attention(block.input_norm(x), pos, self.k_cache[index], self.v_cache[index], cos, sin,
                                       None)
            x = x + block.post_attention_norm(attended)
            mark(index, "mlp")
            x = x + block.post_mlp_norm(block.mlp(block.pre_mlp_norm(x)))
        mark(len(self.blocks), "head")
        logits = matvec(self.lm_head.weight, self.norm(x), self.gemv)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        mark(len(self.blocks), "end")
        return logits


def gemma_engine(model, layers: list, dtype, device, put, gemv: str) -> GemmaEngine:
    """Gemma 3's engine from its per-layer parts (rana_core.decode.from_model.layer_parts)."""
    config = model.config
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise EngineUnsupported("the decode engine does not soft-cap attention logits yet")
    rotary = model.model.rotary_emb
    rotaries = {}
    for kind, layer_type in (("sliding", "sliding_attention"), ("full", "full_attention")):
        if rotary.rope_type.get(layer_type) not in (None, "default", "linear"):
            raise EngineUnsupported("the decode engine needs fixed rotary frequencies; "
                                    f"{rotary.rope_type[layer_type]!r} changes them with the length")
        if hasattr(rotary, f"{layer_type}_inv_freq"):
            rotaries[kind] = (getattr(rotary, f"{layer_type}_inv_freq"),
                              float(getattr(rotary, f"{layer_type}_attention_scaling")))
    shape = shape_of(config)
    scaling = config.query_pre_attn_scalar ** -0.5
    blocks = []
    for index, (layer, parts) in enumerate(zip(model.model.layers, layers)):
        attention = layer.self_attn
        norms = [GemmaNorm(getattr(layer, name), device) for name in (
            "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")]
        window = config.sliding_window if config.layer_types[index] == "sliding_attention" else None
        blocks.append(GemmaBlock(shape, gemv, parts, norms, GemmaNorm(attention.q_norm, device),
                                 GemmaNorm(attention.k_norm, device), window, scaling))
    engine = GemmaEngine.assemble(shape, dtype, device, put(model.get_input_embeddings().weight), blocks,
                                  GemmaNorm(model.model.norm, device), put(model.get_output_embeddings().weight),
                                  torch.zeros(shape.head_dim // 2), 1.0, gemv)
    engine.rotaries = rotaries
    embed = model.get_input_embeddings()
    engine.embed_scale = embed.embed_scale.to(dtype=dtype, device=device)
    engine.softcap = getattr(config, "final_logit_softcapping", None)
    return engine
