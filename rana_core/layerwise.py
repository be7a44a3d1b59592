"""Calibration data carried through the decoder one layer at a time, as sequential compressors do.

A whole-model pass per calibration batch visits every layer per batch; statistics of every layer then pile up on
the device until the pass ends (a 7B model's input grams alone are 8.6 GiB in float64). ``layer_after_layer``
turns the loops around: the hidden states of all calibration windows enter layer 0, and each layer runs on all
of them in one visit before the next, so a layer's statistics can be used and freed before the next layer's
exist.

The arguments each layer receives besides its hidden states (rotary embeddings, the causal or sliding-window
mask, positions) are what the model's own forward passes it: they are recorded once per batch by running the
decoder with every layer replaced by a recorder that hands its input on, which costs no layer's compute and reads
no family's internals.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from rana_core.residency import resting_device, visiting


class _Recorded(Exception):
    pass


@torch.no_grad()
def layer_after_layer(model: nn.Module, layers: nn.ModuleList, windows: torch.Tensor, batch_size: int = 4
                      ) -> Iterator[tuple[int, nn.Module, "LayerPass"]]:
    """Yield (index, layer, run) for each layer in order; ``run()`` runs the layer once over every calibration
    batch (dense) and keeps its outputs, which become the next layer's inputs (it runs when the caller moves on,
    if the caller did not call it). The caller attaches hooks to the layer's modules before calling run and reads
    what they gathered after."""
    device = resting_device(model) or next(model.parameters()).device
    batches = [windows[start:start + batch_size].to(device) for start in range(0, windows.shape[0], batch_size)]
    hidden, calls = _record_calls(model, layers, batches)
    for index, layer in enumerate(layers):
        step = LayerPass(layer, hidden, [call[index] for call in calls], device)
        yield index, layer, step
        if not step.ran:
            step()
        hidden = step.outputs


class LayerPass:
    """One layer over every calibration batch; its outputs become the next layer's inputs."""

    def __init__(self, layer: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict], device):
        self.layer, self.hidden, self.kwargs, self.device = layer, hidden, kwargs, device
        self.outputs: list[torch.Tensor] = []
        self.ran = False

    @torch.no_grad()
    def __call__(self) -> None:
        if self.ran:
            return
        with visiting(self.layer, self.device):  # one visit for all batches
            for states, kwargs in zip(self.hidden, self.kwargs):
                out = self.layer(states, **kwargs)
                self.outputs.append(out[0] if isinstance(out, tuple) else out)
        self.ran = True


def _record_calls(model: nn.Module, layers: nn.ModuleList, batches: list[torch.Tensor]
                  ) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """(first layer's input per batch, per batch the keyword arguments of every layer's call)."""
    hidden, calls = [], []
    saved = [layer.__dict__.get("forward") for layer in layers]
    try:
        for batch in batches:
            seen: list[dict] = []

            def recorder(index):
                def forward(hidden_states, *args, **kwargs):
                    if args:
                        raise RuntimeError("decoder layers are expected to take their arguments by keyword")
                    if index == 0:
                        hidden.append(hidden_states)
                    seen.append({k: v for k, v in kwargs.items() if k not in ("past_key_values", "use_cache")})
                    if index == len(layers) - 1:
                        raise _Recorded  # the norm and the head after the last layer are not needed
                    return hidden_states
                return forward

            for index, layer in enumerate(layers):
                layer.forward = recorder(index)
            try:
                model.get_decoder()(batch, use_cache=False)
            except _Recorded:
                pass
            calls.append(seen)
    finally:
        for layer, forward in zip(layers, saved):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward
    return hidden, calls
