"""The decode engine of a real model and its adapters: the model's own weights, norms and rotary frequencies, and
each adapter's factors, thresholds and masks, so that the engine computes what the adapted PyTorch model computes.

    adapters = load_adapters(loaded, artifact_path, sha256)     # a stored run's adapters (not injected)
    engine = engine_from_model(loaded.model, adapters)           # on the model's device, in its dtype
    engine.time_decode(context=512, new_tokens=256)

What each adapter becomes (rana_core.decode.engine's parts run at batch 1 through its Triton kernels):

- dense q/k/v, gate/up, down, o: the model's weights (gate and up stacked, one product reads both);
- `svd` (static low rank, on stacked QKV or one MLP projection): two products, B then A;
- `rank` (RaNA's rank adapter): B, then the masked product over the rows of Aᵀ with the threshold √τ on |z|;
- `rana_mlp`: rank parts for gate and up (their B stacked), the neuron part for down (rows of W_downᵀ, scored by
  |h|·‖W_down[:, j]‖ against τ); at one token the synthetic engine's chain (parts.swiglu_chain), ranks padded;
- `a3_attention`, `a3_mlp`: A3's narrower q/k/v/o and KV cache (rana_core.decode.narrow), and its MLP on the
  kept channels;
- `teal`, `wina` (on stacked QKV or one projection): the masked product over the kept inputs' rows of Wᵀ (the
  neuron part's kernel, scored by |x_j|, or |x_j|·‖W[:, j]‖); gate, up and down all masked take the same chain;
- `cats`: the dense gate; neurons with |act(gate)| ≥ τ kept; up computed dense and masked (a kernel computing only
  the kept rows of W_up is the next issue's), down as a masked product over the kept rows of W_downᵀ.

Families: each family's `engine` in rana_core/architecture.py names its layer: Llama-shaped decoders (with q/k/v
biases where the family has them) or Gemma 3's (rana_core.decode.gemma). A family or adapter the engine cannot
run raises a RanaError that says so in one line, never a wrong number.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from rana_core.adapters.a3 import A3MLP, A3Attention
from rana_core.adapters.input_sparse import InputMaskedUnit, WeightedInputUnit
from rana_core.adapters.low_rank import LowRankUnit, RankMaskedUnit
from rana_core.adapters.mlp import CatsMLP, RaNAMLP
from rana_core.architecture import (FAMILIES, attention_parts, family_of, layer_attention, layer_mlp, mlp_parts,
                                   shape_of)
from rana_core.decode import masked_wide
from rana_core.decode.block import Block
from rana_core.decode.engine import DecodeEngine
from rana_core.decode.gemv import gemv
from rana_core.decode.launch import use_triton
from rana_core.decode.masked_kernels import masked_rows_batched, masked_rows_gemv
from rana_core.decode.narrow import A3AttentionPart
from rana_core.decode.parts import (NeuronPart, RankPart, RMSNorm, _join, adding_residual, masked_down, masked_gemv,
                                    matvec, swiglu_chain)
from rana_core.decode.residual import PendingNorm
from rana_core.errors import RanaError

STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # rotary frequencies that do not change with the length
# |h| > 0 marks CATS' kept neurons (h is zero off the mask); the smallest positive float32 lets the masked product
# read exactly those rows
NONZERO = torch.finfo(torch.float32).tiny


def run_mlp_adds() -> str:
    """Which of a stored run's MLP parts add the residual in their last launch, as the synthetic engine's do
    (RANA_RUN_MLP_ADDS): "auto" (the default) dense down's GEMV and the masked chains that run as products over
    lists of rows (large MLPs), "1" every part that can, "0" none, the reference path, where the MLP's output goes to
    the next norm's add_rmsnorm launch (o_proj adds its own either way). Timed in session 26 on an H200 under "1": a
    7B-shaped real run's dense and RaNA steps 2.1% and 1.4% faster; SmolLM2's dense 1.3% faster, its greedy RaNA 1.3%
    slower, where the masked chain runs as GEMVs over every row and its adding down GEMV took ~0.4 µs a layer more
    than the norm launch it saved (docs/latency.md)."""
    text = os.environ.get("RANA_RUN_MLP_ADDS", "auto")
    if text not in ("0", "1", "auto"):
        raise ValueError(f"RANA_RUN_MLP_ADDS={text}: expected 0, 1 or auto")
    return text


def _chain_residual(residual, every: bool, x, *rows: torch.Tensor):
    """The residual stream a masked MLP chain over `rows` adds to, or None where the next norm's launch adds its
    output: it adds under RANA_RUN_MLP_ADDS=1 (`every`), or under auto where it runs as products over lists of rows
    (masked_wide.chain_design), not as GEMVs over every row (as it always does on an input whose norm is owed)."""
    if every or not (isinstance(x, PendingNorm) or masked_wide.chain_design(*rows) == "gemv"):
        return residual
    return None


class EngineUnsupported(RanaError):
    """The decode engine cannot run this model or one of its adapters."""


class Dense(nn.Module):
    """y = W x through the engine's GEMV (q/k/v biases are the block's; MLP projections have none here)."""

    def __init__(self, weight: torch.Tensor, gemv: str):
        super().__init__()
        self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        self.gemv = gemv

    def forward(self, x):
        return matvec(self.weight, x, self.gemv)

    def flops_per_token(self) -> float:
        return 2.0 * self.weight.numel()

    def elements_per_token(self) -> float:
        return self.weight.numel()


def _last_adding(part: nn.Module, h: torch.Tensor, residual=None) -> torch.Tensor | None:
    """part(h), or with the residual stream None where `part` is dense and its GEMV added its product to it."""
    if residual is not None and isinstance(part, Dense) and residual.can_add(part.weight):
        return residual.add(part.weight, h)
    return part(h)


class StaticLowRank(nn.Module):
    """svd's y = A (B x): every token pays for every rank."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, gemv: str):
        super().__init__()
        self.A = nn.Parameter(A.contiguous(), requires_grad=False)
        self.B = nn.Parameter(B.contiguous(), requires_grad=False)
        self.gemv = gemv

    def forward(self, x):
        return matvec(self.A, matvec(self.B, x, self.gemv), self.gemv)

    def flops_per_token(self) -> float:
        return 2.0 * (self.A.numel() + self.B.numel())

    def elements_per_token(self) -> float:
        return self.A.numel() + self.B.numel()


class ProjectionMLP(nn.Module):
    """An MLP whose gate, up and down are each a part of their own: dense, a static low rank, or masked on their
    inputs (TEAL, WINA), as the method or hybrid's mix chose. Dense gate and up under SwiGLU are one product;
    gate, up and down all masked on their inputs (and SiLU) run at one token as RaNA's MLP does (swiglu_chain:
    gate and up both list the kept inputs of x, each against its own threshold)."""

    def __init__(self, gate: nn.Module, up: nn.Module, down: nn.Module, act, gemv: str):
        super().__init__()
        self.gate, self.up, self.down, self.act, self.gemv = gate, up, down, act, gemv
        self.fused = None
        if all(isinstance(p, Dense) for p in (gate, up)) and _is_silu(act):
            # SwiGLU with dense gate and up: one product reads both (fused into the Triton GEMV)
            self.fused = nn.Parameter(torch.cat([gate.weight, up.weight]), requires_grad=False)
        self.chained = (all(isinstance(p, NeuronPart) for p in (gate, up, down)) and _is_silu(act)
                        and (gate.scale is None) == (up.scale is None))
        if self.chained:
            self.gate_up_rows = _join(gate, up, "rows")
            self.gate_up_threshold = _join(gate, up, "threshold")
            self.gate_up_scale = None if gate.scale is None else _join(gate, up, "norms")

    def reads_pending(self) -> bool:
        """Whether one token's input may come as a norm still owed (block.reads_normed_once): gate and up masked
        on it as one GEMV over every row (masked_wide.product_design), which makes the norm itself."""
        return (self.chained and masked_wide.product_design(self.gate_up_rows) == "gemv"
                and not any(p.calibrating or p.counting for p in (self.gate, self.up, self.down)))

    adds_residual = True  # forward's last launch may add the residual (ModelBlock.mlp)

    def forward(self, x, residual=None, every_adds: bool = True):
        """The MLP's output, or with the residual stream (one token) None where its last launch added it (a masked
        chain only where _chain_residual keeps it)."""
        if self.fused is not None:
            return _last_adding(self.down, matvec(self.fused, x, self.gemv, swiglu=True), residual)
        if self.chained and all(part.fusable(x) for part in (self.gate, self.up, self.down)):
            residual = _chain_residual(residual, every_adds, x, self.gate_up_rows, self.down.rows)
            if isinstance(x, PendingNorm):  # reads_pending: h from the normed, masked input in one GEMV
                h = masked_gemv(self.gate_up_rows, x, self.gate_up_threshold, self.gate_up_scale, groups=2)
                return adding_residual(residual, self.down.rows, partial(masked_down, self.down, h))
            return adding_residual(residual, self.down.rows, partial(
                swiglu_chain, self.gate_up_rows, x[0], self.gate_up_threshold, self.down,
                torch.empty_like(self.gate.out), self.gate_up_scale, shared_coeff=True))
        return _last_adding(self.down, self.act(self.gate(x)) * self.up(x), residual)

    def flops_per_token(self) -> float:
        return sum(p.flops_per_token() for p in (self.gate, self.up, self.down))

    def elements_per_token(self) -> float:
        return sum(p.elements_per_token() for p in (self.gate, self.up, self.down))


class RanaMLP(nn.Module):
    """RaNA's MLP: rank parts on gate and up (one product for both B), the neuron part on down.

    With SiLU, one token runs the synthetic engine's chain (block.Block.mlp): gate's and up's masked A-parts as two
    groups of one compaction and one gather, and down's compaction makes silu(gate)·up from their partial sums, so
    the MLP takes 6 launches, not 12. Groups need equal ranks: the smaller part is padded with zero rows in B and
    Aᵀ, whose coefficient is exactly 0 (no mask keeps it above a positive threshold, and a kept zero adds 0)."""

    def __init__(self, gate: RankPart, up: RankPart, down: NeuronPart, act, gemv: str):
        super().__init__()
        self.gate, self.up, self.down, self.act, self.gemv = gate, up, down, act, gemv
        self.rank = max(gate.rank, up.rank)  # each part's slot in the stacked tensors
        self.gate_up_B = _join(gate, up, "B")
        self.chained = _is_silu(act)
        if self.chained:
            self.gate_up_rows = _join(gate, up, "rows")
            self.gate_up_threshold = _join(gate, up, "threshold")

    adds_residual = True  # forward's last launch may add the residual (ModelBlock.mlp)

    def forward(self, x, residual=None, every_adds: bool = True):
        """The MLP's output, or with the residual stream (one token) None where its chain's last launch added it
        (where _chain_residual keeps it)."""
        z = matvec(self.gate_up_B, x, self.gemv)
        if self.chained and all(part.fusable(z) for part in (self.gate, self.up, self.down)):
            residual = _chain_residual(residual, every_adds, z, self.gate_up_rows, self.down.rows)
            return adding_residual(residual, self.down.rows, partial(
                swiglu_chain, self.gate_up_rows, z[0], self.gate_up_threshold, self.down,
                torch.empty_like(self.gate.out)))
        gate = self.gate.expand(z[:, : self.gate.rank])
        return self.down(self.act(gate) * self.up.expand(z[:, self.rank: self.rank + self.up.rank]))

    def flops_per_token(self) -> float:
        return self.gate.flops_per_token() + self.up.flops_per_token() + self.down.flops_per_token()

    def elements_per_token(self) -> float:
        return self.gate.elements_per_token() + self.up.elements_per_token() + self.down.elements_per_token()


class CatsPart(nn.Module):
    """CATS: the dense gate; neuron j kept iff |act(gate x)_j| ≥ τ; only kept neurons reach down. With SiLU, one
    token takes two steps: one GEMV over gate and up stacked whose epilogue makes silu(gate)·up and zeroes the
    neurons under τ, then down's masked product over the kept ones."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, tau: float, act, gemv: str):
        super().__init__()
        self.gate_up = nn.Parameter(torch.cat([gate, up]).contiguous(), requires_grad=False)
        self.gate, self.up = self.gate_up[: gate.shape[0]], self.gate_up[gate.shape[0]:]  # views, one copy
        self.rows = nn.Parameter(down.t().contiguous(), requires_grad=False)  # W_downᵀ: neuron j is row j
        self.register_buffer("threshold", torch.tensor([NONZERO], device=down.device))
        self.register_buffer("out", torch.zeros(down.shape[0], dtype=down.dtype, device=down.device))
        self.tau, self.act, self.gemv, self.silu = tau, act, gemv, _is_silu(act)
        self.counting, self.active_sum, self.counted_tokens = False, 0.0, 0

    def forward(self, x):
        if self.silu and x.shape[0] == 1 and self.gemv == "triton" and use_triton(x) and not self.counting:
            h = gemv(self.gate_up, x[0], torch.empty(self.gate.shape[0], dtype=x.dtype, device=x.device),
                     swiglu=True, tau=self.tau)
            return masked_rows_gemv(self.rows, h, self.threshold, out=self.out)[None]
        g = self.act(matvec(self.gate, x, self.gemv))
        mask = g.float().abs() >= self.tau
        if self.counting:
            self.active_sum += mask.sum().item()
            self.counted_tokens += x.shape[0]
        h = g * matvec(self.up, x, self.gemv) * mask.to(g.dtype)
        if h.shape[0] == 1 and use_triton(h):
            return masked_rows_gemv(self.rows, h[0], self.threshold, out=self.out)[None]
        return masked_rows_batched(self.rows, h, self.threshold).to(h.dtype)

    def flops_per_token(self) -> float:
        hidden, inner = self.gate.shape[1], self.gate.shape[0]
        active = self.active_sum / max(self.counted_tokens, 1)
        return 2.0 * hidden * inner + 4.0 * hidden * active

    def elements_per_token(self) -> float:
        """Gate and up are read whole (up is computed dense here), down's kept rows only."""
        return self.gate.numel() + self.up.numel() + self.rows.shape[1] * self.active_sum / max(self.counted_tokens, 1)


class ModelBlock(Block):
    """A decoder layer of a real model: Block's attention (rotary into the static cache, one-token kernels) with
    the layer's own norms, biases and QKV part, and any MLP part above."""

    def __init__(self, shape, gemv: str, norms: tuple[RMSNorm, RMSNorm], qkv: nn.Module,
                 qkv_bias: torch.Tensor | None, wo: torch.Tensor, mlp: nn.Module):
        nn.Module.__init__(self)
        self.shape, self.gemv = shape, gemv
        self.attn_norm, self.mlp_norm = norms
        self.qkv, self.mlp_part = qkv, mlp
        self.qkv_bias = None if qkv_bias is None else nn.Parameter(qkv_bias, requires_grad=False)
        self.wo = _linear(wo)
        self.marker = None

    def mlp(self, normed, residual=None):
        """The MLP part's output, or with the residual stream None where the part's last launch added it (parts
        that can: `adds_residual`, as run_mlp_adds() chooses; the others' outputs go to the next norm, which adds
        them)."""
        mode = run_mlp_adds() if residual is not None else "0"
        if mode != "0" and getattr(self.mlp_part, "adds_residual", False):
            return self.mlp_part(normed, residual, every_adds=mode == "1")
        return self.mlp_part(normed)

    def flops_per_token(self) -> float:
        return self.qkv_flops_per_token() + self.mlp_part.flops_per_token()

    def qkv_flops_per_token(self) -> float:
        return self.qkv.flops_per_token() if hasattr(self.qkv, "flops_per_token") else 2.0 * self.qkv.weight.numel()

    def weight_elements_per_token(self) -> float:
        qkv = self.qkv.elements_per_token() if hasattr(self.qkv, "elements_per_token") else self.qkv.weight.numel()
        return qkv + self.mlp_part.elements_per_token() + self.wo.weight.numel()

    def attention(self, normed, pos, k_cache, v_cache, cos_table, sin_table, allowed, residual=None):
        if isinstance(self.qkv, A3AttentionPart):  # A3's narrower q/k/v/o and cache
            return self.qkv.attention(self.shape, normed, pos, k_cache, v_cache, cos_table, sin_table, self.mark)
        return super().attention(normed, pos, k_cache, v_cache, cos_table, sin_table, allowed, residual)

    def kv_features(self) -> int:
        if isinstance(self.qkv, A3AttentionPart):
            return self.shape.kv_heads * (self.qkv.r_qk + self.qkv.r_vo)
        return super().kv_features()


def engine_from_model(model, adapters: list, dtype: torch.dtype | None = None, device=None,
                      gemv: str = "triton") -> DecodeEngine:
    """The engine of `model` (a Hugging Face causal LM) with `adapters` (as load_adapters returns them, not
    injected), in `dtype` on `device` (default: the model's)."""
    family = family_of(model)
    if not family.engine:
        runs = ", ".join(name for name, f in FAMILIES.items() if f.engine)
        raise EngineUnsupported(f"the decode engine runs {runs} models, not {family.name} yet")
    config = model.config
    if getattr(config, "use_sliding_window", False):
        raise EngineUnsupported("the decode engine has no sliding-window attention for this family yet")
    first = next(model.parameters())
    dtype, device = dtype or first.dtype, torch.device(device or first.device)
    put = lambda t: t.detach().to(device=device, dtype=dtype)  # noqa: E731
    by_layer: dict[int, list] = {}
    for adapter in adapters:
        by_layer.setdefault(adapter.layer, []).append(adapter)
    layers = [layer_parts(index, layer, by_layer.get(index, []), put, device, gemv)
              for index, layer in enumerate(model.model.layers)]
    if family.engine == "gemma":
        from rana_core.decode.gemma import gemma_engine

        return gemma_engine(model, layers, dtype, device, put, gemv)
    rotary = model.model.rotary_emb
    if rotary.rope_type not in STATIC_ROPE:
        raise EngineUnsupported(f"the decode engine needs fixed rotary frequencies; {rotary.rope_type!r} rotary "
                                "scaling changes them with the length")
    shape = shape_of(config)
    blocks = [ModelBlock(shape, gemv, tuple(_norm(getattr(layer, name), dtype, device) for name in family.norms),
                         parts.qkv, parts.qkv_bias, parts.wo, parts.mlp)
              for layer, parts in zip(model.model.layers, layers)]
    return DecodeEngine.assemble(shape, dtype, device, put(model.get_input_embeddings().weight), blocks,
                                 _norm(model.model.norm, dtype, device), put(model.get_output_embeddings().weight),
                                 rotary.inv_freq, float(rotary.attention_scaling), gemv)


@dataclass
class LayerParts:
    """One decoder layer's products as engine parts: stacked QKV (dense, static low rank or RaNA's rank part),
    its stacked biases, the attention output weight and the MLP part."""

    qkv: nn.Module
    qkv_bias: torch.Tensor | None
    wo: torch.Tensor
    mlp: nn.Module


def layer_parts(index: int, layer, adapters: list, put, device, gemv: str) -> LayerParts:
    attention, mlp = layer_attention(layer), layer_mlp(layer)
    q, k, v, o = attention_parts(attention)
    if o.bias is not None:
        raise EngineUnsupported(f"layer {index}: the decode engine has no bias on the attention output")
    if any(m.bias is not None for m in mlp_parts(mlp)[:3]):  # every MLP adapter wraps these projections
        raise EngineUnsupported(f"layer {index}: the decode engine has no bias on an MLP projection")
    qkv, wo, mlp_part, members = None, o.weight, None, {}
    for adapter in adapters:
        if isinstance(adapter, A3Attention):
            qkv, wo = A3AttentionPart(adapter, put, device, gemv), adapter.o_weight
            continue
        if isinstance(adapter, A3MLP):
            mlp_part = ProjectionMLP(*(Dense(put(w), gemv) for w in (
                adapter.gate_weight, adapter.up_weight, adapter.down_weight)), adapter.act, gemv)
            continue
        if isinstance(adapter, InputMaskedUnit):  # TEAL, WINA: the kept inputs' rows of Wᵀ
            weight = torch.cat([put(m.weight) for m in adapter._members])
            norms = adapter.column_norms.to(device) if isinstance(adapter, WeightedInputUnit) else None
            part = NeuronPart.of(weight, norms, float(adapter.tau), adapter.target_active)
        elif isinstance(adapter, RankMaskedUnit):
            part = _rank_part(adapter, put)
        elif isinstance(adapter, LowRankUnit):
            part = StaticLowRank(put(adapter.A), put(adapter.B), gemv)
        elif isinstance(adapter, RaNAMLP):
            mlp_part = RanaMLP(_rank_part(adapter.gate, put), _rank_part(adapter.up, put),
                               NeuronPart.of(put(adapter.down.weight), adapter.down.column_norms.to(device),
                                             float(adapter.down.tau), adapter.down.target_active),
                               adapter.act, gemv)
            continue
        elif isinstance(adapter, CatsMLP):
            mlp_part = CatsPart(put(adapter.gate_proj.weight), put(adapter.up_proj.weight),
                                put(adapter.down_proj.weight), float(adapter.tau), adapter.act, gemv)
            continue
        else:
            raise EngineUnsupported(f"layer {index}: the decode engine cannot run a {_kind(adapter)} adapter yet")
        if adapter.module == "qkv":
            qkv = part
        else:
            members[adapter.module] = part
    if qkv is None:
        qkv = _linear(torch.cat([put(m.weight) for m in (q, k, v)]))
    if mlp_part is None:
        gate, up, down, act = mlp_parts(mlp)
        parts = {name: members.get(name) or Dense(put(m.weight), gemv)
                 for name, m in (("gate", gate), ("up", up), ("down", down))}
        mlp_part = ProjectionMLP(parts["gate"], parts["up"], parts["down"], act, gemv)
    return LayerParts(qkv, _stacked_bias((q, k, v), put), put(wo), mlp_part)


def _rank_part(unit: RankMaskedUnit, put) -> RankPart:
    """RaNA keeps rank i iff z_i² ≥ τ; the engine's kernels compare |z_i| with √τ."""
    return RankPart.of(put(unit.B), put(unit.A).t(), math.sqrt(max(float(unit.tau), 0.0)), unit.target_active)


def _stacked_bias(members, put) -> torch.Tensor | None:
    if all(m.bias is None for m in members):
        return None
    return torch.cat([put(m.bias) if m.bias is not None else put(torch.zeros(m.out_features)) for m in members])


def _linear(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    return linear


def _norm(norm: nn.Module, dtype, device) -> RMSNorm:
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None)
    if eps is None:
        raise EngineUnsupported(f"the decode engine cannot read the norm {type(norm).__name__}")
    ours = RMSNorm(norm.weight.shape[0], dtype, device, eps)
    ours.weight.copy_(norm.weight.detach())
    return ours


def _is_silu(act) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _kind(adapter) -> str:
    return getattr(type(adapter), "kind", None) or type(adapter).__name__
