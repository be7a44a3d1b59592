"""One decoder layer of the decode engine (engine.DecodeEngine), read top to bottom: its attention section (the
QKV product, rotary and the KV cache, attention over the prefix, o_proj) and its MLP, dense or RaNA's adapters,
at one token through the fused kernels and at many through batched products. Blocks built from a model's weights
and a run's adapters subclass it (from_model.ModelBlock)."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from rana_core.architecture import Shape
from rana_core.decode import masked_wide
from rana_core.decode.attention_kernels import rope_attention
from rana_core.decode.dense_kernels import rotate_half_reference
from rana_core.decode.masked_kernels import masked_rows_partials
from rana_core.decode.parts import (NeuronPart, RankPart, RMSNorm, _join, _linear, adding_residual, masked_gemv, matvec,
                                    swiglu_chain)


class Block(nn.Module):
    def __init__(self, shape: Shape, keeps: tuple[float, float], dtype, device, generator, gemv: str):
        super().__init__()
        self.shape, self.gemv = shape, gemv
        self.qkv_bias = None  # q/k/v biases, stacked, where a model has them (a block built from it)
        self.marker = None
        h, i = shape.hidden, shape.intermediate
        qkv_keep, mlp_keep = keeps
        self.attn_norm, self.mlp_norm = RMSNorm(h, dtype, device), RMSNorm(h, dtype, device)
        if qkv_keep < 1.0:
            self.qkv = RankPart(shape.qkv_out, h, qkv_keep, dtype, device, generator)
        else:
            self.qkv = _linear(shape.qkv_out, h, dtype, device, generator)
        if mlp_keep < 1.0:
            self.gate = RankPart(i, h, mlp_keep, dtype, device, generator)
            self.up = RankPart(i, h, mlp_keep, dtype, device, generator)
            self.down = NeuronPart(h, i, mlp_keep, dtype, device, generator)
            # gate's and up's B in one matrix (one product reads both), their A-rows and thresholds likewise (one
            # masked launch serves both, as two groups): from now on the parts hold views into the joint tensors
            self.gate_up_B = _join(self.gate, self.up, "B")
            self.gate_up_rows = _join(self.gate, self.up, "rows")
            self.gate_up_threshold = _join(self.gate, self.up, "threshold")
        else:
            self.gate, self.up = _linear(i, h, dtype, device, generator), _linear(i, h, dtype, device, generator)
            self.gate_up = _join(self.gate, self.up, "weight")  # one product reads both, as above
            self.down = _linear(h, i, dtype, device, generator)
        self.wo = _linear(h, h, dtype, device, generator)

    def attention(self, normed, pos, k_cache, v_cache, cos_table, sin_table, allowed, residual=None):
        """o_proj(attention(normed)), this token's k and v written into the cache; or, given the residual stream
        (residual.ResidualStream) and one token, None: o_proj's GEMV has added it to the stream."""
        s = self.shape
        T, hd = normed.shape[0], s.head_dim
        qkv, splits = self.qkv_product(normed)
        if T == 1:  # rotary and both cache writes, then attention over the prefix only (1 to 3 launches)
            attended = rope_attention(qkv, cos_table, sin_table, pos, k_cache, v_cache, s.heads, s.kv_heads,
                                      torch.empty(s.heads, hd, dtype=normed.dtype, device=normed.device),
                                      splits).view(1, s.hidden)
        else:
            q, k, v = qkv.split([s.heads * hd, s.kv_heads * hd, s.kv_heads * hd], dim=-1)
            cos, sin = cos_table[pos], sin_table[pos]
            q = rotate_half_reference(q.view(T, s.heads, hd), cos, sin).transpose(0, 1)
            k_cache.index_copy_(1, pos, rotate_half_reference(k.view(T, s.kv_heads, hd), cos, sin).transpose(0, 1))
            v_cache.index_copy_(1, pos, v.view(T, s.kv_heads, hd).transpose(0, 1))
            attended = F.scaled_dot_product_attention(q[None], k_cache[None], v_cache[None],
                                                      attn_mask=allowed[None, None], enable_gqa=s.kv_heads != s.heads)
            attended = attended[0].transpose(0, 1).reshape(T, s.hidden)
        return self.last_product(self.wo.weight, attended, residual)

    def last_product(self, weight: torch.Tensor, x: torch.Tensor, residual=None) -> torch.Tensor | None:
        """A section's last product, weight @ x; with the residual stream, added to it by the GEMV where one
        GEMV can (returning None), else returned for the next norm to add."""
        if residual is not None and residual.can_add(weight):  # the engine passes it to Triton GEMVs only
            return residual.add(weight, x)
        return matvec(weight, x, self.gemv)

    def mlp(self, normed, residual=None):
        """The MLP's output, or with the residual stream None where its down product's last launch added it
        (last_product; RaNA's chain)."""
        if not isinstance(self.gate, RankPart):
            return self.last_product(self.down.weight, matvec(self.gate_up, normed, self.gemv, swiglu=True),
                                     residual)
        z = matvec(self.gate_up_B, normed, self.gemv)
        if self.gate.fusable(z) and self.down.fusable(z):
            # one token: gate's and up's masked products in one launch; their partial sums go straight into the
            # down product's compaction, which makes h = silu(gate)·up itself (no reduction launch between)
            return adding_residual(residual, self.down.rows, partial(  # down's last launch adds the residual
                swiglu_chain, self.gate_up_rows, z[0], self.gate_up_threshold, self.down,
                torch.empty_like(self.gate.out)))
        h = F.silu(self.gate.expand(z[:, : self.gate.rank])) * self.up.expand(z[:, self.gate.rank:])
        return self.down(h)

    def qkv_product(self, normed: torch.Tensor, fuse: bool = True) -> tuple[torch.Tensor, int]:
        """(qkv, splits): the stacked q/k/v of `normed`, biases added. With `fuse`, one token through a rank part
        leaves the masked product's partial sums instead (splits > 0), which the rotary kernel adds up."""
        splits = 0
        if isinstance(self.qkv, RankPart) and not isinstance(self.qkv, NeuronPart):  # B, then the masked A-part
            z = matvec(self.qkv.B, normed, self.gemv)
            if fuse and self.qkv.fusable(z) and self.qkv_bias is None:
                if masked_wide.product_design(self.qkv.rows) == "gemv":
                    qkv = masked_gemv(self.qkv.rows, z, self.qkv.threshold, self.qkv.scale)
                else:
                    qkv, splits = masked_rows_partials(self.qkv.rows, z[0], self.qkv.threshold, self.qkv.scale)
            else:
                qkv = self.qkv.expand(z)
        elif isinstance(self.qkv, nn.Linear):
            qkv = matvec(self.qkv.weight, normed, self.gemv)
        elif isinstance(self.qkv, NeuronPart) and fuse and self.qkv.fusable(normed) and self.qkv_bias is None:
            # TEAL's or WINA's input mask: the normed input is the coefficients; partial sums as above, or one GEMV
            # over every row that may make the norm itself (reads_normed_once)
            if masked_wide.product_design(self.qkv.rows) == "gemv":
                qkv = masked_gemv(self.qkv.rows, normed, self.qkv.threshold, self.qkv.scale)
            else:
                qkv, splits = masked_rows_partials(self.qkv.rows, normed[0], self.qkv.threshold, self.qkv.scale)
        else:  # another part of a block built from a model (a static low rank, masked inputs with a bias)
            qkv = self.qkv(normed)
        if self.qkv_bias is not None:
            qkv = qkv + self.qkv_bias
        self.mark("attention")
        return qkv, splits

    def mark(self, section: str) -> None:
        """Where a section of this layer begins, for a profiled replay (rana_core.decode.run_latency)."""
        if self.marker is not None:
            self.marker(section)

    def flops_per_token(self) -> float:
        """QKV and MLP FLOPs of one token, at the densities counted (rana_core.flops counts the same modules)."""
        return sum(m.flops_per_token() if isinstance(m, RankPart) else 2.0 * m.weight.numel()
                   for m in (self.qkv, self.gate, self.up, self.down))

    def dense_flops_per_token(self) -> float:
        return 2.0 * self.shape.hidden * (self.shape.qkv_out + 3 * self.shape.intermediate)

    def weight_elements_per_token(self) -> float:
        return sum(m.elements_per_token() if isinstance(m, RankPart) else m.weight.numel()
                   for m in (self.qkv, self.gate, self.up, self.down, self.wo))

    def kv_features(self) -> int:
        """Key and value features cached per token (A3's narrower heads cache fewer)."""
        return 2 * self.shape.kv_heads * self.shape.head_dim


def _no_mark(layer: int, section: str) -> None:
    pass


def reads_normed_once(block, section: str) -> bool:
    """Whether a section's normed input is read by one GEMV only, which can then make the residual add and the
    norm itself (residual.PendingNorm): the stacked QKV or RaNA's B for "attention" (TEAL's or WINA's input mask
    only as one GEMV over every row, masked_wide.product_design; not svd's or A3's parts), the stacked gate/up
    (dense SwiGLU, RaNA's B, or masked gate/up as such a GEMV) for "mlp" (not CATS or mixed MLPs)."""
    if section == "attention":
        qkv = block.qkv
        if isinstance(qkv, NeuronPart):  # an input mask: only its GEMV over every row makes the norm itself
            return (block.qkv_bias is None and not (qkv.calibrating or qkv.counting)
                    and masked_wide.product_design(qkv.rows) == "gemv")
        return isinstance(qkv, nn.Linear) or isinstance(qkv, RankPart)
    mlp = getattr(block, "mlp_part", None)  # a block built from a model keeps its MLP as a part
    if mlp is None:  # the synthetic block: dense SwiGLU or RaNA, each starting with one GEMV of stacked weights
        return True
    return (hasattr(mlp, "gate_up_B") or getattr(mlp, "fused", None) is not None
            or bool(getattr(mlp, "reads_pending", lambda: False)()))
