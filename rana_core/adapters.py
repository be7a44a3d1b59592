"""Adapters as wrappers around a layer's original linear modules, injected by name the way PEFT does.

An *adaptable module* of a decoder layer is one function of one input: ``qkv`` (the query, key and value
projections stacked into one matrix, so one decomposition and one mask serve all three), ``gate``, ``up`` and
``down`` (the MLP's projections). An ``AdapterUnit`` computes the stacked output of its module's members; each
member linear is replaced by an ``AdaptedSlot`` that keeps the original as ``base`` and returns its slice of the
unit's output. The unit computes once per input (the attention calls q, k and v with the same tensor) and counts
the tokens and FLOPs it spent, so FLOPs are measured, not assumed. With ``tracking`` on it also accumulates its
reconstruction error against the dense stacked output on the same input.

``unload`` puts every original module back; the model is then exactly what it was.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rana_core.errors import RanaError
from rana_core.flops import linear_flops

# Member module paths of each adaptable module, relative to a decoder layer (Llama and Gemma 3 alike).
MODULE_MEMBERS: dict[str, tuple[str, ...]] = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "gate": ("mlp.gate_proj",),
    "up": ("mlp.up_proj",),
    "down": ("mlp.down_proj",),
}
MODULES = tuple(MODULE_MEMBERS)


def layer_members(layer: nn.Module, module: str) -> list[nn.Linear]:
    members = []
    for path in MODULE_MEMBERS[module]:
        found = layer.get_submodule(path)
        if isinstance(found, AdaptedSlot):
            found = found.base
        if not isinstance(found, nn.Linear):
            raise RanaError(f"{path} is a {type(found).__name__}, not a Linear: this architecture is not supported")
        members.append(found)
    return members


def module_shapes(layers: nn.ModuleList) -> dict[tuple[int, str], tuple[int, int]]:
    """(out, in) of every adaptable module, stacked members summed on the output side."""
    shapes = {}
    for index, layer in enumerate(layers):
        for module in MODULES:
            members = layer_members(layer, module)
            shapes[(index, module)] = (sum(m.out_features for m in members), members[0].in_features)
    return shapes


class AdapterUnit(nn.Module):
    """Base of every adapter: stacked output of the members, computed once per input, with FLOP counting."""

    def __init__(self, members: list[nn.Linear], layer: int, module: str):
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
        self.reset_stats()

    # --- what a concrete adapter defines -------------------------------------------------------------------
    def compute(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(stacked output, FLOPs spent on these tokens)."""
        raise NotImplementedError

    def static_rank(self) -> int:
        raise NotImplementedError

    def mean_active_rank(self) -> float:
        """Mean number of ranks (or neurons) used per token; the static rank for a static adapter."""
        return float(self.static_rank())

    # --- shared machinery ----------------------------------------------------------------------------------
    @property
    def max_rank(self) -> int:
        return min(self.in_features, self.out_features)

    @property
    def dense_flops_per_token(self) -> int:
        return linear_flops(self.out_features, self.in_features)

    def reset_stats(self) -> None:
        self.tokens = 0
        self.flops = 0.0
        self.err_sq = 0.0
        self.ref_sq = 0.0

    def dense_output(self, x: torch.Tensor) -> torch.Tensor:
        weight = torch.cat([m.weight for m in self._members])
        biases = [m.bias for m in self._members]
        bias = torch.cat(biases) if all(b is not None for b in biases) else None
        return F.linear(x, weight, bias)

    def member_output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if self._cached_input is not x:
            self._cached_input, self._cached_output, self._served = x, self._run(x), 0
        out = self._cached_output[..., self.offsets[index] : self.offsets[index + 1]]
        self._served += 1
        if self._served == len(self._members):  # every member has its slice: free the cache
            self._cached_input = self._cached_output = None
        return out

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        y, flops = self.compute(x)
        self.tokens += x.numel() // x.shape[-1]
        self.flops += float(flops)
        if self.tracking:
            ref = self.dense_output(x).double()
            self.err_sq += (y.double() - ref).pow(2).sum().item()
            self.ref_sq += ref.pow(2).sum().item()
        return y

    @property
    def flops_per_token(self) -> float:
        return self.flops / self.tokens if self.tokens else float("nan")

    @property
    def recon_error(self) -> float:
        """‖f(X) − f̂(X)‖² / ‖f(X)‖² over the tokens seen while tracking."""
        return self.err_sq / self.ref_sq if self.ref_sq else float("nan")


class AdaptedSlot(nn.Module):
    """Stands where an original linear stood; returns its slice of the unit's stacked output."""

    def __init__(self, unit: AdapterUnit, index: int, base: nn.Linear):
        super().__init__()
        self.unit, self.index, self.base = unit, index, base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unit.member_output(x, self.index)


class LowRankUnit(AdapterUnit):
    """Static low rank: y = A (B x) + b, A: out × r, B: r × in. Mergeable, but kept factored to save FLOPs."""

    def __init__(self, members, layer, module, A: torch.Tensor, B: torch.Tensor):
        super().__init__(members, layer, module)
        dtype, device = members[0].weight.dtype, members[0].weight.device
        self.A = nn.Parameter(A.to(device=device, dtype=dtype).contiguous(), requires_grad=False)
        self.B = nn.Parameter(B.to(device=device, dtype=dtype).contiguous(), requires_grad=False)
        biases = [m.bias for m in members]
        self.bias = torch.cat(biases).detach() if all(b is not None for b in biases) else None

    def static_rank(self) -> int:
        return self.A.shape[1]

    def compute(self, x):
        y = F.linear(F.linear(x, self.B), self.A, self.bias)
        tokens = x.numel() // x.shape[-1]
        return y, tokens * 2 * self.static_rank() * (self.in_features + self.out_features)


def inject(layers: nn.ModuleList, units: list[AdapterUnit]) -> None:
    """Put each unit's slots in place of its members. Fails loudly when a target is missing or already adapted."""
    if not units:
        return
    for unit in units:
        layer = layers[unit.layer]
        for index, path in enumerate(MODULE_MEMBERS[unit.module]):
            parent_path, _, child = path.rpartition(".")
            parent = layer.get_submodule(parent_path)
            current = getattr(parent, child)
            if isinstance(current, AdaptedSlot):
                raise RanaError(f"layer {unit.layer} {path} is already adapted")
            setattr(parent, child, AdaptedSlot(unit, index, current))


def unload(layers: nn.ModuleList) -> int:
    """Restore every original module; returns how many slots were removed."""
    removed = 0
    for layer in layers:
        for path in [p for members in MODULE_MEMBERS.values() for p in members]:
            parent_path, _, child = path.rpartition(".")
            parent = layer.get_submodule(parent_path)
            current = getattr(parent, child)
            if isinstance(current, AdaptedSlot):
                setattr(parent, child, current.base)
                removed += 1
    return removed


def installed_units(layers: nn.ModuleList) -> list[AdapterUnit]:
    seen: dict[int, AdapterUnit] = {}
    for layer in layers:
        for module in layer.modules():
            if isinstance(module, AdaptedSlot):
                seen.setdefault(id(module.unit), module.unit)
    return list(seen.values())
