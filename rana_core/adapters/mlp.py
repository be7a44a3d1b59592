"""Adapters of the gated MLP, h = act(W_gate x) ⊙ (W_up x), y = W_down h (SwiGLU in Llama, GeGLU in Gemma).

- ``NeuronMaskedUnit``: RaNA's neuron adapter for W_down: neuron j is kept iff
  |h_j| · ‖W_down[:, j]‖ ≥ τ, and a token pays 2·m per kept neuron.
- ``RaNAMLP``: rank adapters on up and gate, the neuron adapter on down, h computed from the adapted up/gate.
- ``CatsMLP``: CATS: gate stays dense; neuron j is kept iff |act(W_gate x)_j| ≥ τ, and the kept
  neurons' rows of W_up and columns of W_down are the only ones computed.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import nn

from rana_core.adapters.base import AdapterUnit, Meter, MLPAdapter
from rana_core.adapters.low_rank import RankMaskedUnit
from rana_core.adapters.thresholds import InputMasking, Thresholded
from rana_core.architecture import layer_mlp, mlp_parts


class NeuronMaskedUnit(InputMasking, AdapterUnit):
    adapter_name = "neuron"

    def __init__(self, down: nn.Linear, layer: int, keep: float, tau: float = 0.0):
        super().__init__([down], layer, "down", static_rank=down.in_features, max_rank=down.in_features)
        self.register_buffer("column_norms", down.weight.detach().float().norm(dim=0))
        self.register_buffer("tau", torch.tensor(tau, dtype=torch.float32))
        self.weight, self.bias = down.weight, down.bias
        self.keep = keep
        self.target_active = keep * down.in_features

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        return h.float().abs() * self.column_norms

    def compute(self, h):
        return F.linear(self.masked_input(h), self.weight, self.bias)


class RaNAMLP(MLPAdapter):
    kind = "rana_mlp"
    lora_spots = {"gate": "gate", "up": "up", "down": "down"}

    def __init__(self, base: nn.Module, layer: int, up: RankMaskedUnit, gate: RankMaskedUnit,
                 down: NeuronMaskedUnit):
        super().__init__(base, layer)
        self.up, self.gate, self.down = up, gate, down
        self.act = mlp_parts(base)[3]

    def state(self) -> tuple[dict, dict]:
        tensors = {"down.tau": self.down.tau}
        for which in ("up", "gate"):
            tensors.update(getattr(self, which).state(prefix=f"{which}.")[1])
        return {"down_keep": self.down.keep, "up": asdict(self.up.plan), "gate": asdict(self.gate.plan)}, tensors

    @classmethod
    def rebuild(cls, layer, index: int, meta: dict, tensors: dict) -> "RaNAMLP":
        units = {which: RankMaskedUnit.rebuild(layer, index, {"module": which, "plan": meta[which]}, tensors,
                                               prefix=f"{which}.") for which in ("up", "gate")}
        mlp = layer_mlp(layer)
        down = NeuronMaskedUnit(mlp_parts(mlp)[2], index, meta["down_keep"], float(tensors["down.tau"]))
        return cls(mlp, index, units["up"], units["gate"], down)

    def forward(self, x):
        return self.down(self.act(self.gate(x)) * self.up(x))

    def meters(self) -> list[Meter]:
        return [self.gate.meter, self.up.meter, self.down.meter]

    @property
    def tracking(self) -> bool:
        return self.down.tracking

    @tracking.setter
    def tracking(self, on: bool) -> None:
        for unit in (getattr(self, "up", None), getattr(self, "gate", None), getattr(self, "down", None)):
            if unit is not None:
                unit.tracking = on


class CatsMLP(Thresholded, MLPAdapter):
    kind = "cats"
    lora_spots = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}

    def __init__(self, base: nn.Module, layer: int, keep: float, tau: float = 0.0):
        super().__init__(base, layer)
        self.gate_proj, self.up_proj, self.down_proj, self.act = mlp_parts(base)
        hidden, inner = self.gate_proj.in_features, self.gate_proj.out_features
        self.register_buffer("tau", torch.tensor(tau, dtype=torch.float32))
        self.keep = keep
        self.target_active = keep * inner
        self.histogram = None
        self._meters = {name: Meter(layer, name, out_f, in_f, static_rank=inner, max_rank=inner)
                        for name, out_f, in_f in (("gate", inner, hidden), ("up", inner, hidden),
                                                  ("down", hidden, inner))}
        for meter in self._meters.values():
            meter.adapter = "cats"

    def forward(self, x):
        g = self.act(self.gate_proj(x))
        scores = g.float().abs()
        self.observe(scores)
        kept = scores >= self.tau
        active = kept.sum().item()  # counted on the booleans: a half-precision sum stops at 65,504 (inf)
        mask = kept.to(g.dtype)
        tokens = x.numel() // x.shape[-1]
        hidden, inner = self.gate_proj.in_features, self.gate_proj.out_features
        u = self.up_proj(x)  # only the kept rows would be computed by a kernel; the FLOPs count those alone
        h = g * u * mask
        y = self.down_proj(h)
        meters = self._meters
        meters["gate"].count(tokens, 2 * hidden * inner * tokens, inner * tokens)
        meters["up"].count(tokens, 2 * hidden * active, active)
        meters["down"].count(tokens, 2 * hidden * active, active)
        if self.tracking:
            meters["gate"].track(g, g)  # the gate runs dense: zero error, recorded as measured
            meters["up"].track(u * mask, u)
            meters["down"].track(y, self.down_proj(g * u))
            meters["down"].track_sparsity(scores.square())
        return y

    def meters(self) -> list[Meter]:
        return list(self._meters.values())

    def state(self) -> tuple[dict, dict]:
        return {"keep": self.keep}, {"tau": self.tau}

    @classmethod
    def rebuild(cls, layer, index: int, meta: dict, tensors: dict) -> "CatsMLP":
        return cls(layer_mlp(layer), index, meta["keep"], float(tensors["tau"]))
