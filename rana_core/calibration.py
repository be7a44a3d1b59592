"""Capture statistics of linear layers' inputs with forward hooks on the unmodified model.

For a module with input x (n features), InputStats accumulates the second-moment matrix C = Σ x xᵀ in float64 over
all calibration tokens, on the device the inputs come from: the heavy math that reads it (rana_core.decompose,
profiles, curves) then runs there too. Data-aware decompositions need only C: the output covariance is W C Wᵀ.

    stats = capture_module_inputs(loaded, windows, progress, inputs=("attention", "mlp"))
    stats[(layer, "attention")].gram        # the input of q/k/v;  "mlp": of gate/up;  "down": of down

Every method that decomposes or profiles modules captures through ``capture_module_inputs``, so each layer's
inputs are read where the model family (rana_core.architecture) says they are.
"""

from __future__ import annotations

from typing import Hashable, Iterator

import torch
from torch import nn

from rana_core.architecture import INPUT_OF, family_of
from rana_core.layerwise import layer_after_layer
from rana_core.progress import ProgressFn, no_progress

LAYER_INPUTS = tuple(dict.fromkeys(INPUT_OF.values()))  # "attention", "mlp", "down"


class InputStats:
    """C = Σ x xᵀ over every token, and (if `row_stride`) every `row_stride`-th input row itself, in float32, both
    on the device of the first batch."""

    def __init__(self, n_features: int, row_stride: int = 0):
        self.n_features = n_features
        self.gram: torch.Tensor | None = None  # allocated where the first batch lives
        self.tokens = 0
        self.row_stride = row_stride
        self.kept: list[torch.Tensor] = []

    @property
    def rows(self) -> torch.Tensor:
        if not self.kept:
            return torch.empty(0, self.n_features)
        if len(self.kept) > 1:
            self.kept = [torch.cat(self.kept)]
        return self.kept[0]

    def add(self, x: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1]).float()
        if self.gram is None:
            self.gram = torch.zeros(self.n_features, self.n_features, dtype=torch.float64, device=rows.device)
        if self.row_stride:
            offset = (-self.tokens) % self.row_stride  # the stride runs on across batches
            self.kept.append(rows[offset :: self.row_stride].clone())
        # On a GPU the product is float64 (a millisecond for a 7B layer's batch), so C stays positive semidefinite
        # to float64 rounding, and it is added in place (no n × n temporary: 0.9 GiB for a 7B down projection);
        # a CPU keeps float32 products (accurate to ~1e-7 relative, twice as fast there) and only the running sum
        # across batches is float64.
        if rows.is_cuda:
            wide = rows.double()
            self.gram.addmm_(wide.T, wide)
        else:
            self.gram += (rows.T @ rows).double()
        self.tokens += rows.shape[0]

    def to(self, device) -> "InputStats":
        """Move the gram and the kept rows (e.g. off the GPU while other layers are built)."""
        if self.gram is not None:
            self.gram = self.gram.to(device)
        self.kept = [rows.to(device) for rows in self.kept]
        return self


@torch.no_grad()
def capture_input_stats(
    model: nn.Module,
    windows: torch.Tensor,
    modules: dict[Hashable, nn.Linear],
    batch_size: int = 4,
    progress: ProgressFn = no_progress,
    row_stride: int = 0,
) -> dict[Hashable, InputStats]:
    """Run `windows` (n, seq_len) through `model` and return InputStats for every named linear module."""
    stats = {name: InputStats(module.in_features, row_stride) for name, module in modules.items()}
    handles = []
    for name, module in modules.items():
        def hook(_module, inputs, _name=name):
            stats[_name].add(inputs[0])

        handles.append(module.register_forward_pre_hook(hook))
    device = next(model.parameters()).device
    try:
        n = windows.shape[0]
        for start in range(0, n, batch_size):
            model(windows[start : start + batch_size].to(device), use_cache=False)
            done = min(start + batch_size, n)
            progress(done / n, f"{done}/{n} sequences")
    finally:
        for handle in handles:
            handle.remove()
    return stats


def each_layer_inputs(loaded, windows: torch.Tensor, progress: ProgressFn = no_progress, row_stride: int = 0,
                      inputs=LAYER_INPUTS, batch_size: int = 4) -> Iterator[tuple[int, dict[str, InputStats]]]:
    """(layer index, {input: InputStats}) for each layer in order, from one pass of the dense model that carries
    the calibration hidden states from layer to layer (rana_core.layerwise): a layer's statistics exist only
    until the caller asks for the next layer's, so one layer's grams are on the device at a time."""
    layers = loaded.layers
    for index, layer, run in layer_after_layer(loaded.model, layers, windows, batch_size):
        family = family_of(layer)
        modules = {name: layer.get_submodule(family.input_path(name)) for name in inputs}
        stats = {name: InputStats(module.in_features, row_stride) for name, module in modules.items()}
        handles = [module.register_forward_pre_hook(lambda _m, args, _name=name: stats[_name].add(args[0]))
                   for name, module in modules.items()]
        try:
            run()
        finally:
            for handle in handles:
                handle.remove()
        progress((index + 1) / len(layers), f"layer {index + 1}/{len(layers)}")
        yield index, stats


def capture_module_inputs(loaded, windows: torch.Tensor, progress: ProgressFn = no_progress, row_stride: int = 0,
                          inputs=LAYER_INPUTS, keep_on=None) -> dict[tuple[int, str], InputStats]:
    """InputStats of each of `inputs` of every layer (one calibration pass of the dense model), keyed
    (layer, input). `row_stride` also keeps every row_stride-th input row (profiles and curves need rows);
    `keep_on` moves each layer's statistics there once the layer is done (e.g. the CPU, for a big model)."""
    stats = {}
    for index, by_input in each_layer_inputs(loaded, windows, progress, row_stride, inputs):
        for name, layer_stats in by_input.items():
            stats[(index, name)] = layer_stats.to(keep_on) if keep_on is not None else layer_stats
    return stats
