"""LoRA on a (possibly adapted) decoder: one rank per layer on its seven linears, added to whatever computes them.

    handle = attach_lora(loaded.layers, ranks=[8] * n_layers, seed=0)  # zero-initialised B: logits unchanged
    ... train handle.parameters() ...
    with handle.merged():  # LoRA on plain Linears folded into their weights (restored on exit)
        ... evaluate ...
    handle.detach()

Where LoRA goes. With a compression run's adapters injected, the module that computes a linear's output is often
not the original ``nn.Linear``: q/k/v (and an SVD run's MLP) are ``AdaptedSlot``s serving slices of a unit's
output, RaNA's MLP calls its own ``up``/``gate``/``down`` units, and CATS' MLP calls the Linears it holds as its
own attributes (the same objects also sit under its ``base``). ``computing_spots`` names, per layer and linear,
the (parent, attribute) that the forward pass really calls; the LoRA layer replaces that attribute, so its
low-rank correction adds to what the adapter computes.

Why not peft's injection by name (``inject_adapter_in_model`` with a custom module mapping, peft's documented
extension point, ``LoraConfig._register_custom_module``): it walks ``named_modules()``, which lists a module once
under its first name, so CATS' Linears are found under ``mlp.base`` and wrapped where the forward never looks.
We therefore place peft's own layer classes ourselves: ``peft.tuners.lora.Linear`` on plain Linears (peft's merge
applies), and ``AdapterLora``, a peft ``LoraLayer`` following peft's custom-layer conventions (its
``update_layer``, parameter names, zero-initialised B, scaling), on adapter-computed linears, which cannot merge:
their correction costs 2·r·(in + out) FLOPs per token.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from peft import LoraConfig
from peft.tuners.lora import Linear as PeftLinear
from peft.tuners.lora import LoraLayer
from torch import nn

from rana_core.adapters.base import AdaptedSlot, AdapterUnit, AttentionAdapter, MLPAdapter
from rana_core.architecture import family_of, layer_attention, layer_mlp
from rana_core.errors import RanaError

LINEARS = ("q", "k", "v", "o", "gate", "up", "down")
ADAPTER_NAME = "recover"
ALPHA_PER_RANK = 2  # lora_alpha = 2·r: the same scaling (2) at every rank, so ranks differ only in capacity
# The FLOP profile's module of each linear; o_proj is outside the adaptable FLOPs (rana_core.flops).
PROFILE_MODULE = {"q": "qkv", "k": "qkv", "v": "qkv", "o": None, "gate": "gate", "up": "up", "down": "down"}


class AdapterLora(nn.Module, LoraLayer):
    """peft LoRA around an adapter-computed linear (an AdaptedSlot or an AdapterUnit): y = adapter(x) + s·B A x."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int, lora_alpha: int,
                 **kwargs):
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        shaped = module.base if isinstance(module, AdaptedSlot) else module
        return shaped.in_features, shaped.out_features

    @property
    def meter(self):
        """RaNA's MLP reads its units' meters through the attribute this layer now occupies."""
        return self.base_layer.meter

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise RanaError("LoRA on an adapter-computed linear cannot be merged into it")

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name in self.lora_A:
                lora_A, lora_B = self.lora_A[name], self.lora_B[name]
                result = result + lora_B(lora_A(self.lora_dropout[name](x))) * self.scaling[name]
        return result


def computing_spots(layer: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """For each of LINEARS, the (parent module, attribute) that the layer's forward calls to compute it."""
    family = family_of(layer)
    attention = layer_attention(layer)
    if isinstance(attention, AttentionAdapter):
        raise RanaError(f"LoRA cannot attach to a {type(attention).__name__} attention")
    spots = {linear: (attention, getattr(family, linear)) for linear in ("q", "k", "v", "o")}
    mlp = layer_mlp(layer)
    # a plain MLP computes gate/up/down with the family's linears; a wrapper names what its forward calls
    if isinstance(mlp, MLPAdapter):
        attributes = mlp.lora_spots
    else:
        attributes = {linear: getattr(family, linear) for linear in ("gate", "up", "down")}
    if attributes is None:
        raise RanaError(f"LoRA cannot attach to a {type(mlp).__name__} MLP")
    for linear, attribute in attributes.items():
        spots[linear] = (mlp, attribute)
    return spots


def _shape(module: nn.Module) -> tuple[int, int]:
    """(in, out) of what a spot computes."""
    if isinstance(module, AdaptedSlot):
        module = module.base
    if isinstance(module, (nn.Linear, AdapterUnit, LoraLayer)):
        return module.in_features, module.out_features
    raise RanaError(f"LoRA cannot attach to a {type(module).__name__}")


def params_per_rank(layers: nn.ModuleList) -> list[int]:
    """p_l: LoRA parameters per unit of rank in layer l, the sum of in + out over its seven linears."""
    return [sum(sum(_shape(getattr(parent, attribute))) for parent, attribute in computing_spots(layer).values())
            for layer in layers]


class LoraHandle:
    """The LoRA layers placed by attach_lora: their parameters, FLOP cost, merge and removal."""

    def __init__(self, placed: list[tuple[int, str, nn.Module, str, nn.Module]]):
        self.placed = placed  # (layer, linear, parent, attribute, lora layer)

    def parameters(self) -> list[nn.Parameter]:
        return [p for *_, lora in self.placed for name, p in lora.named_parameters() if "lora_" in name]

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def ranks(self, n_layers: int) -> list[int]:
        ranks = [0] * n_layers
        for layer, _, _, _, lora in self.placed:
            ranks[layer] = lora.r[ADAPTER_NAME]
        return ranks

    def added_flops(self, merged: bool) -> dict[tuple[int, str | None], float]:
        """FLOPs per token the LoRA path adds, per (layer, profile module); with `merged`, LoRA on plain Linears
        is folded into their weights and costs nothing."""
        added: dict[tuple[int, str | None], float] = {}
        for layer, linear, _, _, lora in self.placed:
            if merged and isinstance(lora, PeftLinear):
                continue
            key = (layer, PROFILE_MODULE[linear])
            added[key] = added.get(key, 0.0) + 2 * lora.r[ADAPTER_NAME] * (lora.in_features + lora.out_features)
        return added

    @contextmanager
    def merged(self):
        """Fold LoRA into every plain Linear it sits on; the original weights are copied back on exit, so a model
        shared with later jobs is left exactly as it was."""
        mergeable = [lora for *_, lora in self.placed if isinstance(lora, PeftLinear)]
        saved = [lora.get_base_layer().weight.detach().clone() for lora in mergeable]
        try:
            for lora in mergeable:
                lora.merge(safe_merge=True)
            yield len(mergeable)
        finally:
            with torch.no_grad():
                for lora, weight in zip(mergeable, saved):
                    lora.get_base_layer().weight.copy_(weight)
                    lora.merged_adapters = []

    def detach(self) -> None:
        """Put back what each LoRA layer wrapped (idempotent)."""
        for _, _, parent, attribute, lora in reversed(self.placed):
            if getattr(parent, attribute) is lora:
                setattr(parent, attribute, lora.base_layer)
        self.placed = []


def attach_lora(layers: nn.ModuleList, ranks: list[int], seed: int = 0, dropout: float = 0.0) -> LoraHandle:
    """LoRA of rank ranks[l] on the seven linears of layer l (none where the rank is 0). B starts at zero, so the
    model computes exactly what it did; A is drawn from `seed`. Only the LoRA parameters require gradients."""
    if len(ranks) != len(layers):
        raise RanaError(f"{len(ranks)} ranks for {len(layers)} layers")
    if any(not isinstance(r, int) or r < 0 for r in ranks):
        raise RanaError(f"ranks must be non-negative integers, got {ranks}")
    config = LoraConfig(r=max(max(ranks), 1), lora_alpha=ALPHA_PER_RANK, lora_dropout=dropout,
                        init_lora_weights=True, target_modules=[])
    placed = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for index, layer in enumerate(layers):
            rank = ranks[index]
            if rank == 0:
                continue
            for linear, (parent, attribute) in computing_spots(layer).items():
                target = getattr(parent, attribute)
                if isinstance(target, LoraLayer):
                    raise RanaError(f"layer {index} {linear} already carries LoRA")
                kind = PeftLinear if type(target) is nn.Linear else AdapterLora
                lora = kind(target, ADAPTER_NAME, config=config, r=rank, lora_alpha=ALPHA_PER_RANK * rank)
                lora.to(*_device_and_dtype(target))
                setattr(parent, attribute, lora)
                placed.append((index, linear, parent, attribute, lora))
    handle = LoraHandle(placed)
    for p in handle.parameters():
        p.requires_grad_(True)
    return handle


def _device_and_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in module.parameters():
        return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32
