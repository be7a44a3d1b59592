"""Every layer's RaNA profiles (rana_core.profiles) for one calibration sample, within the GPU memory of one layer.

A 7B layer's QKV and MLP profiles hold about 1.6 GB on the device (output bases, factors, calibration rows and
outputs): 51 GB for 32 layers, and parking them in CPU memory between uses took longer than building them (94 of
113 s on an H200, through pageable copies). So while the model's layers rest in CPU memory (rana_core.residency)
only each layer's calibration statistics are parked (a gram and rows: 0.27 GB), and ``layer(index)`` rebuilds the
layer's profiles on the device for the block, handing over everything already measured on it (plans, splits,
curve points), so that a rebuild never changes an answer and never repeats a search. While the model is resident
the profiles are built once and kept, where they fit: a 7B model fits an H200 (13 GB of weights) but its kept
profiles and greedy RaNA's curve points did not (out of memory at 130 GB, session 25), so the first layer's profiles
measure what a layer holds once first used, and where every layer's twice over would not fit in what the device
has left, a resident model's statistics are parked as a resting model's are.

    store = LayerProfiles(loaded, windows, progress)
    with store.layer(3) as (qkv, mlp):
        plan = qkv.plan(0.6)
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch

from rana_core.adapters.base import layer_members
from rana_core.architecture import layer_mlp, mlp_parts
from rana_core.calibration import InputStats, each_layer_inputs
from rana_core.devices import cuda_index, process_memory_limit
from rana_core.flops import linear_flops
from rana_core.profiles import MLPProfile, QKVProfile
from rana_core.progress import ProgressFn
from rana_core.residency import resting_device

KEEP_HEADROOM = 2.0  # what one layer's profiles hold after their first use, times this, per layer: room for the
# curve points an allocation measures on them later


def fits(nbytes: float, device: torch.device) -> bool:
    """Whether this process may still allocate `nbytes` on `device` (always on the CPU)."""
    if torch.device(device).type != "cuda":
        return True
    return nbytes <= process_memory_limit(device) - torch.cuda.memory_allocated(cuda_index(device))


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if torch.device(device).type == "cuda" else 0


class LayerProfiles:
    def __init__(self, loaded, windows: torch.Tensor, progress: ProgressFn, rows: int,
                 on_layer: Callable[[int, QKVProfile, MLPProfile, bool], None] | None = None):
        """`on_layer(index, qkv, mlp, parks)` is called with each layer's profiles as soon as they are built (a
        uniform allocation builds its adapters there, sparing a rebuild of every layer); `parks`: whether they will
        be rebuilt for each later use (so what is measured on them is best measured now)."""
        self.layers = loaded.layers
        self.device = loaded.device
        self.parks = resting_device(loaded.model) is not None
        self.kept: dict[int, tuple[QKVProfile, MLPProfile]] = {}
        self.parked: dict[int, tuple[InputStats, InputStats]] = {}
        self.memos: dict[int, tuple[dict, dict]] = {}
        stride = max(1, windows.numel() // rows)
        # Down's neuron adapter needs no decomposition, so its (wide) input is not captured.
        for index, stats in each_layer_inputs(loaded, windows, lambda f, m: progress(0.5 * f, f"calibration {m}"),
                                              row_stride=stride, inputs=("attention", "mlp")):
            before = allocated(self.device)
            profiles = self._build(index, stats["attention"], stats["mlp"])
            if on_layer is not None:
                on_layer(index, *profiles, self.parks)
            if index == 0 and not self.parks:  # keep every layer's profiles only where they fit
                self.parks = not fits(KEEP_HEADROOM * (allocated(self.device) - before) * len(self.layers),
                                      self.device)
                if self.parks:
                    progress(0.5 / len(self.layers), "profiles rebuilt for each use: every layer's would not fit")
            if self.parks:
                self.parked[index] = (stats["attention"].to("cpu"), stats["mlp"].to("cpu"))
                self._keep_memos(index, profiles)
            else:
                self.kept[index] = profiles

    def __len__(self) -> int:
        return len(self.layers)

    @contextmanager
    def layer(self, index: int):
        """(QKVProfile, MLPProfile) of layer `index` on the device, for the block."""
        if index in self.kept:
            yield self.kept[index]
            return
        attention, mlp = self.parked[index]
        profiles = self._build(index, _on(attention, self.device), _on(mlp, self.device))
        for profile, memo in zip(profiles, self.memos[index]):
            for name, values in memo.items():
                setattr(profile, name, values)
        try:
            yield profiles
        finally:
            self._keep_memos(index, profiles)

    def dense_flops(self, index: int) -> tuple[float, float]:
        return layer_dense_flops(self.layers[index])

    def release(self) -> None:
        for _, mlp in self.kept.values():
            mlp.release()

    def _build(self, index: int, attention: InputStats, mlp: InputStats) -> tuple[QKVProfile, MLPProfile]:
        layer = self.layers[index]
        weight = torch.cat([m.weight for m in layer_members(layer, "qkv")])
        return (QKVProfile(weight, attention.gram, attention.rows),
                MLPProfile(layer_mlp(layer), mlp.gram, mlp.rows))

    def _keep_memos(self, index: int, profiles) -> None:
        self.memos[index] = tuple({name: getattr(profile, name) for name in profile.memos} for profile in profiles)


def layer_dense_flops(layer) -> tuple[float, float]:
    """Dense FLOPs per token of the layer's stacked QKV and of its MLP (gate, up, down)."""
    qkv = layer_members(layer, "qkv")
    qkv_flops = linear_flops(sum(m.out_features for m in qkv), qkv[0].in_features)
    mlp_flops = sum(linear_flops(*p.weight.shape) for p in mlp_parts(layer_mlp(layer))[:3])
    return float(qkv_flops), float(mlp_flops)


def _on(stats: InputStats, device) -> InputStats:
    """A copy of parked statistics on `device` (the parked ones stay parked)."""
    moved = InputStats(stats.n_features, stats.row_stride)
    moved.gram, moved.tokens, moved.kept = stats.gram.to(device), stats.tokens, [stats.rows.to(device)]
    return moved
