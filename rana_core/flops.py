"""FLOP accounting per token: a multiply-add counts 2 FLOPs, biases and norms are ignored.

"Adaptable" FLOPs are those of the modules a method may replace: each layer's stacked QKV projection and its
MLP's gate, up and down projections. Every method's target and measured reduction refer to these. The "whole
model" column adds what stays dense: the attention output projection, the attention scores (QKᵀ and AV, averaged
over the causal positions of a window) and the LM head; embeddings are a lookup and count nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rana_core.architecture import shape_of


def linear_flops(out_features: int, in_features: int) -> int:
    return 2 * out_features * in_features


def low_rank_flops(out_features: int, in_features: int, rank: int) -> int:
    """Cost of x -> A (B x) with A: out × rank and B: rank × in."""
    return 2 * rank * (out_features + in_features)


def attention_score_flops(n_heads: int, head_dim: int, seq_len: int) -> float:
    """QKᵀ and AV for one query, averaged over the positions 1..seq_len of a causal window."""
    mean_context = (seq_len + 1) / 2
    return 2 * 2 * n_heads * head_dim * mean_context


@dataclass
class FlopProfile:
    """Dense per-token FLOPs of one model at one window length."""

    adaptable: dict[tuple[int, str], int] = field(default_factory=dict)  # (layer, module) -> FLOPs
    fixed: float = 0.0  # o_proj + attention scores + LM head, never adapted here

    @property
    def adaptable_total(self) -> int:
        return sum(self.adaptable.values())

    @property
    def whole_model_total(self) -> float:
        return self.adaptable_total + self.fixed

    def reductions(self, spent: dict[tuple[int, str], float], fixed_saved: float = 0.0) -> tuple[float, float]:
        """(reduction of the adaptable FLOPs, reduction of the whole model) given FLOPs spent per module;
        modules missing from `spent` ran dense. `fixed_saved`: FLOPs per token an adapter saved in the fixed
        part (A3's narrower o_proj and attention scores), counted in the whole-model reduction only."""
        adapted = sum(spent.get(key, dense) for key, dense in self.adaptable.items())
        saved = self.adaptable_total - adapted
        return saved / self.adaptable_total, (saved + fixed_saved) / self.whole_model_total


def dense_profile(config, module_shapes: dict[tuple[int, str], tuple[int, int]], seq_len: int) -> FlopProfile:
    """Profile from a HF config and the (out, in) shape of every adaptable module."""
    shape = shape_of(config)
    per_layer_fixed = (linear_flops(shape.hidden, shape.heads * shape.head_dim)
                       + attention_score_flops(shape.heads, shape.head_dim, seq_len))
    lm_head = linear_flops(shape.vocab, shape.hidden)
    adaptable = {key: linear_flops(*shape) for key, shape in module_shapes.items()}
    return FlopProfile(adaptable=adaptable, fixed=shape.layers * per_layer_fixed + lm_head)
