"""Adapters as wrappers around a layer's original modules, injected by name the way PEFT does.

An *adaptable module* of a decoder layer is one function of one input: ``qkv`` (the query, key and value
projections stacked into one matrix, so one decomposition and one mask serve all three), ``gate``, ``up`` and
``down`` (the MLP's projections). Two kinds of wrapper replace them:

- an ``AdapterUnit`` computes the stacked output of one module's member linears; each member is replaced by an
  ``AdaptedSlot`` that keeps the original as ``base`` and returns its slice. The unit computes once per input (the
  attention calls q, k and v with the same tensor).
- an ``MLPAdapter`` replaces a whole MLP (keeping it as ``base``) when its projections must share a mask or an
  activation (CATS, RaNA's MLP), and runs its own units in plain Python.
- an ``AttentionAdapter`` replaces a whole ``self_attn`` (keeping it as ``base``) when the attention itself
  changes shape (A3's reduced head dimensions and KV cache).

Every adapted module owns a ``Meter``: tokens seen, FLOPs spent (counted from the masks), active ranks, and, with
``tracking`` on, its reconstruction error and rank-importance sparsity. ``unload`` puts the originals back.

Where the modules live in a layer comes from the model family's entry in rana_core.architecture. Each concrete
adapter describes itself for the artifact file: a ``kind`` (registered here when its class is defined), ``state()``
(JSON scalars and tensors) and ``rebuild(layer, index, meta, tensors)``; so a new adapter is one new file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rana_core.adapters.thresholds import ScoreHistogram
from rana_core.architecture import (MODULES, family_of, layer_attention, layer_mlp, set_layer_attention,
                                    set_layer_mlp)
from rana_core.errors import RanaError
from rana_core.flops import linear_flops

SPARSITY_SHARE = 0.9  # rank-importance sparsity: share of ranks needed for this share of ‖z‖²
ADAPTER_KINDS: dict[str, type] = {}  # artifact kind -> adapter class, filled as adapter classes are defined


class SelfDescribing:
    """What both kinds of wrapper owe the artifact file: a class that sets ``kind`` is registered under it when it
    is defined (a kind defined twice is refused), and saves itself with ``state()`` -> (JSON scalars, tensors)
    and comes back with ``rebuild(layer, index, meta, tensors)``."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("kind")
        if kind is None:
            return
        known = ADAPTER_KINDS.get(kind)
        if known is not None and known.__qualname__ != cls.__qualname__:
            raise ValueError(f"adapter kind {kind!r} is defined by {known.__qualname__} and {cls.__qualname__}")
        ADAPTER_KINDS[kind] = cls

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        raise NotImplementedError


def layer_members(layer: nn.Module, module: str) -> list[nn.Linear]:
    """The original linears of an adaptable module of `layer`, in the family's order (q, k, v for "qkv")."""
    members = []
    for path in family_of(layer).member_paths(module):
        found = layer.get_submodule(_base_path(layer, path))
        if isinstance(found, AdaptedSlot):
            found = found.base
        if not isinstance(found, nn.Linear):
            raise RanaError(f"{path} is a {type(found).__name__}, not a Linear: this architecture is not supported")
        members.append(found)
    return members


def unwrapped(module: nn.Module) -> nn.Module:
    """The original module behind a whole-module wrapper (or the module itself)."""
    return module.base if isinstance(module, (MLPAdapter, AttentionAdapter)) else module


def _base_path(layer: nn.Module, path: str) -> str:
    """The path of `path` inside `layer`, through a wrapper's `base` when the MLP or the attention is wrapped."""
    head, _, tail = path.partition(".")
    return f"{head}.base.{tail}" if isinstance(getattr(layer, head), (MLPAdapter, AttentionAdapter)) else path


def module_shapes(layers: nn.ModuleList) -> dict[tuple[int, str], tuple[int, int]]:
    """(out, in) of every adaptable module, stacked members summed on the output side."""
    shapes = {}
    for index, layer in enumerate(layers):
        for module in MODULES:
            members = layer_members(layer, module)
            shapes[(index, module)] = (sum(m.out_features for m in members), members[0].in_features)
    return shapes


SPARSITY_CURVE_SHARES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)  # energy shares at which the sparsity curve is read


def top_share_counts(scores: torch.Tensor, shares=SPARSITY_CURVE_SHARES) -> torch.Tensor:
    """Per row of non-negative `scores`, for each share, how many of the largest entries reach it: (rows, shares)."""
    ordered = scores.sort(dim=-1, descending=True).values.double()
    cumulative = ordered.cumsum(-1)
    fraction = cumulative / cumulative[..., -1:].clamp_min(1e-300)
    targets = torch.tensor(shares, dtype=torch.float64, device=scores.device)
    targets = targets.expand(fraction.shape[0], len(shares)).contiguous()
    return (torch.searchsorted(fraction.contiguous(), targets) + 1).clamp_max(scores.shape[-1])


def top_share_count(scores: torch.Tensor, share: float = SPARSITY_SHARE) -> torch.Tensor:
    """Per row of non-negative `scores`, how many of the largest entries reach `share` of the row's sum."""
    ordered = scores.sort(dim=-1, descending=True).values
    cumulative = ordered.cumsum(-1)
    return (cumulative < share * cumulative[..., -1:]).sum(-1) + 1


def stacked_bias(members: list[nn.Linear]) -> torch.Tensor | None:
    biases = [m.bias for m in members]
    return torch.cat(biases).detach() if all(b is not None for b in biases) else None


class Meter:
    """What one adapted module spent, used and lost on the tokens it saw."""

    def __init__(self, layer: int, module: str, out_features: int, in_features: int, static_rank: int,
                 max_rank: int | None = None):
        self.layer, self.module = layer, module
        self.out_features, self.in_features = out_features, in_features
        self.static_rank = static_rank  # ranks (or neurons) a token may use
        self.max_rank = max_rank if max_rank is not None else min(out_features, in_features)
        self.adapter = "dense"  # which adapter runs this module: svd | rank | neuron | cats
        self.planned_keep: float | None = None  # set by methods that choose a keep per module (hybrid)
        self.reset()

    def reset(self) -> None:
        self.tokens = 0
        self.flops = 0.0
        self.fixed_saved = 0.0  # FLOPs saved outside the adaptable modules (o_proj, attention scores)
        self.active = 0.0
        self.err_sq = self.ref_sq = 0.0
        self.sparsity_sum, self.sparsity_tokens = 0.0, 0
        self.curve_sum = torch.zeros(len(SPARSITY_CURVE_SHARES), dtype=torch.float64)

    @property
    def dense_flops_per_token(self) -> int:
        return linear_flops(self.out_features, self.in_features)

    def count(self, tokens: int, flops: float, active: float) -> None:
        self.tokens += tokens
        self.flops += float(flops)
        self.active += float(active)

    def count_fixed_saving(self, flops: float) -> None:
        """FLOPs this adapter saved in work that the profile counts as fixed (A3's o_proj and score products)."""
        self.fixed_saved += float(flops)

    @property
    def fixed_saved_per_token(self) -> float:
        return self.fixed_saved / self.tokens if self.tokens else 0.0

    def track(self, output: torch.Tensor, reference: torch.Tensor) -> None:
        self.err_sq += (output.double() - reference.double()).pow(2).sum().item()
        self.ref_sq += reference.double().pow(2).sum().item()

    def track_sparsity(self, scores: torch.Tensor) -> None:
        rows = scores.reshape(-1, scores.shape[-1]).float()
        self.sparsity_sum += (top_share_count(rows).double() / rows.shape[-1]).sum().item()
        self.sparsity_tokens += rows.shape[0]
        self.curve_sum += (top_share_counts(rows).double() / rows.shape[-1]).sum(0).cpu()  # rows may be on a GPU

    @property
    def flops_per_token(self) -> float:
        return self.flops / self.tokens if self.tokens else float("nan")

    @property
    def mean_active(self) -> float:
        return self.active / self.tokens if self.tokens else float("nan")

    @property
    def recon_error(self) -> float:
        """‖f(X) − f̂(X)‖² / ‖f(X)‖² over the tokens seen while tracking."""
        return self.err_sq / self.ref_sq if self.ref_sq else float("nan")

    @property
    def sparsity(self) -> float:
        return self.sparsity_sum / self.sparsity_tokens if self.sparsity_tokens else float("nan")

    @property
    def sparsity_curve(self) -> list[float] | None:
        """Share of ranks (neurons) needed for each of SPARSITY_CURVE_SHARES of a token's energy, averaged over
        tokens: the whole curve behind `sparsity` (its 0.9 point), for rank and neuron importances alike."""
        if not self.sparsity_tokens:
            return None
        return [round(v, 6) for v in (self.curve_sum / self.sparsity_tokens).tolist()]


class AdapterUnit(SelfDescribing, nn.Module):
    """Base of the linear adapters: stacked output of the members, computed once per input, metered.
    Concrete units set ``kind`` and define ``state`` and ``rebuild`` (SelfDescribing)."""

    adapter_name = "unit"

    def __init__(self, members: list[nn.Linear], layer: int, module: str, static_rank: int,
                 max_rank: int | None = None):
        super().__init__()
        self.layer, self.module = layer, module
        self.in_features = members[0].in_features
        sizes = [m.out_features for m in members]
        self.out_features = sum(sizes)
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        # The originals are reached through the slots; a plain list keeps them out of this unit's parameters.
        self._members = list(members)
        self._cached_input = None
        self._cached_output = None
        self._served = 0
        self.tracking = False
        self.histogram: ScoreHistogram | None = None  # collects mask scores while thresholds are calibrated
        self.meter = Meter(layer, module, self.out_features, self.in_features, static_rank, max_rank)
        self.meter.adapter = self.adapter_name

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        """The stacked output; concrete adapters also call self.meter.count and, if tracking, track_sparsity."""
        raise NotImplementedError

    def meters(self) -> list[Meter]:
        return [self.meter]

    def dense_output(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, torch.cat([m.weight for m in self._members]), stacked_bias(self._members))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.compute(x)
        if self.tracking:
            self.meter.track(y, self.dense_output(x))
        return y

    def member_output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if self._cached_input is not x:
            self._cached_input, self._cached_output, self._served = x, self(x), 0
        out = self._cached_output[..., self.offsets[index] : self.offsets[index + 1]]
        self._served += 1
        if self._served == len(self._members):  # every member has its slice: free the cache
            self._cached_input = self._cached_output = None
        return out


class AdaptedSlot(nn.Module):
    """Stands where an original linear stood; returns its slice of the unit's stacked output."""

    def __init__(self, unit: AdapterUnit, index: int, base: nn.Linear):
        super().__init__()
        self.unit, self.index, self.base = unit, index, base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unit.member_output(x, self.index)


class WholeModuleAdapter(SelfDescribing, nn.Module):
    """Base of the wrappers that replace a whole sub-module of a layer, keeping it as ``base`` (so unload can
    put it back); subclasses define forward and meters, and concrete ones ``kind``, ``state`` and ``rebuild``."""

    def __init__(self, base: nn.Module, layer: int):
        super().__init__()
        self.base, self.layer = base, layer
        self.tracking = False

    def meters(self) -> list[Meter]:
        raise NotImplementedError


class MLPAdapter(WholeModuleAdapter):
    """Replaces a whole MLP. ``lora_spots`` names the attributes its forward calls for gate, up and down (where a
    LoRA correction can sit), or None when LoRA cannot attach to it."""

    lora_spots: dict[str, str] | None = None


class AttentionAdapter(WholeModuleAdapter):
    """Replaces a whole attention module; subclasses also define ``kv_features`` (cached key plus value features
    per token)."""


def inject(layers: nn.ModuleList, adapters: list[nn.Module]) -> None:
    """Put each adapter in place. Fails loudly when a target is already adapted."""
    for adapter in adapters:
        layer = layers[adapter.layer]
        if isinstance(adapter, AttentionAdapter):
            if isinstance(layer_attention(layer), AttentionAdapter):
                raise RanaError(f"layer {adapter.layer} attention is already adapted")
            set_layer_attention(layer, adapter)
            continue
        if isinstance(adapter, MLPAdapter):
            if isinstance(layer_mlp(layer), MLPAdapter):
                raise RanaError(f"layer {adapter.layer} MLP is already adapted")
            set_layer_mlp(layer, adapter)
            continue
        for index, path in enumerate(family_of(layer).member_paths(adapter.module)):
            parent_path, _, child = _base_path(layer, path).rpartition(".")
            parent = layer.get_submodule(parent_path)
            current = getattr(parent, child)
            if isinstance(current, AdaptedSlot):
                raise RanaError(f"layer {adapter.layer} {path} is already adapted")
            setattr(parent, child, AdaptedSlot(adapter, index, current))


def unload(layers: nn.ModuleList) -> int:
    """Restore every original module; returns how many wrappers were removed."""
    removed = 0
    for layer in layers:
        if isinstance(layer_mlp(layer), MLPAdapter):
            set_layer_mlp(layer, layer_mlp(layer).base)
            removed += 1
        if isinstance(layer_attention(layer), AttentionAdapter):
            set_layer_attention(layer, layer_attention(layer).base)
            removed += 1
        family = family_of(layer)
        for path in [p for module in MODULES for p in family.member_paths(module)]:
            parent_path, _, child = path.rpartition(".")
            parent = layer.get_submodule(parent_path)
            current = getattr(parent, child)
            if isinstance(current, AdaptedSlot):
                setattr(parent, child, current.base)
                removed += 1
    return removed


def installed_adapters(layers: nn.ModuleList) -> list[nn.Module]:
    """Every AdapterUnit and MLPAdapter in the layers, each once (a unit is reached through several slots)."""
    seen: dict[int, nn.Module] = {}
    for layer in layers:
        for module in layer.modules():
            if isinstance(module, (MLPAdapter, AttentionAdapter)):
                seen.setdefault(id(module), module)
            elif isinstance(module, AdapterUnit):
                seen.setdefault(id(module), module)
    return list(seen.values())


def installed_meters(layers: nn.ModuleList) -> dict[tuple[int, str], Meter]:
    meters = {}
    for adapter in installed_adapters(layers):
        for meter in adapter.meters():  # a unit inside an MLP adapter shares its meter with it
            meters[(meter.layer, meter.module)] = meter
    return meters


def set_tracking(layers: nn.ModuleList, on: bool) -> None:
    for adapter in installed_adapters(layers):
        adapter.tracking = on
