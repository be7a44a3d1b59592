"""Each RMSNorm's weight folded into the columns of the one product that reads the normed input:

    (RMSNorm(x) · g) W ᵀ  =  RMSNorm(x) (W · diag(g))ᵀ

so the one-token GEMV that norms its input on the way in (residual.PendingNorm) loads no norm weight and does
one multiply less per input. On Llama-2-7B's fused gate/up normed from sums, ptxas gives 72 registers a thread
instead of 80 (7 programs a multiprocessor instead of 6, 3 waves instead of 4: bench/kernel_registers.py), the
one product that made the sums design's step slower (46.4 µs against 43.1 without the norm, session 23's step
timeline).

Folded where a section's normed input has one linear reader: the stacked QKV (dense) or RaNA's QKV B; the stacked
gate/up (dense SwiGLU, CATS) or RaNA's stacked gate/up B; the LM head (a copy when it is tied to the embedding).
Not where the normed input decides a mask itself (TEAL's and WINA's input masks), nor for other readers (a static
low rank, A3) or Gemma's norms. The folded norm keeps a weight of ones, so every path (prompts, batches, the layer
kernels) computes what it did. Rounding: the unfolded path rounds the normed input before and after the weight,
the folded one rounds it once and each folded weight once (W·g in the model's dtype).

Opt-in (RANA_FOLD_NORMS=1 when the engine is built) until timed on a GPU.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from rana_core.decode.parts import NeuronPart, RankPart, RMSNorm


def fold_requested() -> bool:
    """RANA_FOLD_NORMS: "1" folds each engine's norm weights when it is built, "0" (the default) does not."""
    choice = os.environ.get("RANA_FOLD_NORMS", "0")
    if choice not in ("0", "1"):
        raise ValueError(f"RANA_FOLD_NORMS={choice}: expected 0 or 1")
    return choice == "1"


def fold_norm_weights(engine) -> int:
    """Fold each foldable norm's weight into its reader (the module's docstring says which), in place; returns
    how many norms were folded. Call before the engine's graphs or layer kernels are made."""
    folded = 0
    for block in engine.blocks:
        norms = (getattr(block, "attn_norm", None), getattr(block, "mlp_norm", None))  # Gemma's blocks have none
        for norm, reader in zip(norms, (_attention_reader(block), _mlp_reader(block))):
            folded += _fold(norm, reader)
    head = engine.lm_head
    folded += _fold(engine.norm, (head, "weight", False))
    engine.graph = None
    return folded


def _attention_reader(block):
    """(module, attribute, joint) of the one product that reads the attention section's normed input, or None."""
    from rana_core.decode.from_model import Dense  # from_model builds on this package: imported when used

    qkv = block.qkv
    if isinstance(qkv, NeuronPart):  # an input mask decides on the normed input itself
        return None
    if isinstance(qkv, RankPart):
        return qkv, "B", False
    if isinstance(qkv, (nn.Linear, Dense)):
        return qkv, "weight", False
    return None


def _mlp_reader(block):
    """(module, attribute, joint) of the one product that reads the MLP section's normed input, or None. Joint
    tensors (gate and up stacked, which the parts hold views into) are folded in place; the engine made them."""
    from rana_core.decode.from_model import CatsPart, ProjectionMLP, RanaMLP

    mlp = getattr(block, "mlp_part", None)  # a block built from a model keeps its MLP as a part
    if mlp is None:  # the synthetic block: dense SwiGLU or RaNA
        return (block, "gate_up_B", True) if hasattr(block, "gate_up_B") else (block, "gate_up", True)
    if isinstance(mlp, ProjectionMLP) and mlp.fused is not None:
        return mlp, "fused", True
    if isinstance(mlp, RanaMLP):
        return mlp, "gate_up_B", True
    if isinstance(mlp, CatsPart):
        return mlp, "gate_up", True
    return None


def _fold(norm, reader) -> int:
    if reader is None or type(norm) is not RMSNorm or getattr(norm, "folded", False):
        return 0
    module, name, joint = reader
    weight = getattr(module, name)
    g = norm.weight.to(weight.dtype)
    if weight.shape[-1] != g.numel():
        return 0
    with torch.no_grad():
        if joint:  # the parts' views see the folded values
            weight.mul_(g)
        else:  # a new tensor: the original may be shared (a model's weight, a tied embedding, a run's adapter)
            setattr(module, name, nn.Parameter(weight * g, requires_grad=False))
    norm.weight = nn.Parameter(torch.ones_like(norm.weight), requires_grad=False)
    norm.folded = True
    return 1
