"""Layer by layer on the GPU: a model's decoder layers rest in CPU memory and visit the run's device one at a time.

A 7B model is 13 GiB in bf16, its statistics and adapters more; a layer is 0.4 GiB. With ``rest_layers(model,
layers, device)`` the embeddings, the final norm and the LM head live on `device` and every decoder layer rests on
the CPU (pinned, so a visit copies at full bus speed). Calling a layer moves its parameters and buffers to
`device` for the call and back afterwards, so every full-model pass the studio makes (calibration, loss gradients,
threshold setting, evaluation, calibration checks) runs unchanged with one layer's weights on the GPU at a time.

A visit swaps each module's parameter *objects* (it does not rewrite ``.data``): a backward pass keeps the copies
it saved alive on the device, while the resting objects stay on the CPU. Buffers written during a visit (the
thresholds of masked adapters) are copied back into their resting tensors. Parameters are frozen: a visit never
writes them back. Adapters built while a layer rests are made on the CPU, like its weights (they follow
``weight.device``), and visit with it.

For a backward pass through a resting model (rana_core.sensitivity), ``recomputing(model)`` makes each layer call a
non-reentrant checkpoint: the layer's activations are recomputed in the backward pass, during a second visit, so
the device holds one layer's weights and activations at a time there too.

Code that calls a submodule of a resting layer directly (an MLP on calibration rows) wraps the call in
``visiting(module, device)``.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from rana_core.devices import cuda_index

_RESTING = "_rana_resting_device"  # attribute on a resting model: the device its layers visit


def rest_layers(model: nn.Module, layers: nn.ModuleList, device) -> None:
    """Put `layers` to rest on the CPU and everything else of `model` on `device`; calls of a layer visit `device`."""
    device = _normal(device)
    in_layers = {id(sub) for layer in layers for sub in layer.modules()}
    moved: dict[int, torch.Tensor] = {}  # tied weights (embeddings and LM head) stay one tensor
    for module in model.modules():  # everything outside the layers lives on the device
        if id(module) in in_layers:
            continue
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is not None:
                    if id(tensor) not in moved:
                        moved[id(tensor)] = _moved(tensor, device)
                    store[name] = moved[id(tensor)]
    pin = torch.cuda.is_available() and device.type == "cuda"
    for layer in layers:
        layer.to("cpu")
        if pin:
            for module in layer.modules():
                for store in (module._parameters, module._buffers):
                    for name, tensor in store.items():
                        if tensor is not None:
                            store[name] = _moved(tensor, "cpu", pin=True)
        _wrap(layer, device)
    setattr(model, _RESTING, device)
    model._rana_layers = layers


def resting_device(model: nn.Module) -> torch.device | None:
    """The device a resting model's layers visit, or None when the model is not resting."""
    return getattr(model, _RESTING, None)


@contextmanager
def visiting(module: nn.Module, device):
    """`module`'s parameters and buffers on `device` for the block (nothing moves if they are there already)."""
    device = _normal(device)
    swapped = []  # (kind, store, name, resting tensor, visiting tensor)
    copies: dict[int, torch.Tensor] = {}  # a tensor registered twice visits as one copy
    pinned: dict[int, torch.Tensor] = {}  # resting tensors replaced by a pinned copy of theirs
    for sub in module.modules():
        for kind, store in (("param", sub._parameters), ("buffer", sub._buffers)):
            for name, tensor in store.items():
                if tensor is None or tensor.device == device:
                    continue
                if id(tensor) not in copies:
                    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
                        pinned[id(tensor)] = _moved(tensor, "cpu", pin=True)  # made at rest (adapters): pin once
                    copies[id(tensor)] = _moved(pinned.get(id(tensor), tensor), device, non_blocking=True)
                swapped.append((kind, store, name, pinned.get(id(tensor), tensor), copies[id(tensor)]))
                store[name] = copies[id(tensor)]
    try:
        yield module
    finally:
        for kind, store, name, resting, visitor in swapped:
            if kind == "buffer" and store[name] is visitor:
                resting.copy_(visitor)  # a threshold set during the visit is kept
            store[name] = resting


@contextmanager
def recomputing(model: nn.Module):
    """Within the block, each resting layer's call is a checkpoint recomputed (and revisited) in the backward."""
    layers = getattr(model, "_rana_layers", None)
    if layers is None:
        yield
        return
    for layer in layers:
        layer._rana_checkpoint = True
    try:
        yield
    finally:
        for layer in layers:
            layer._rana_checkpoint = False


def _wrap(layer: nn.Module, device: torch.device) -> None:
    if getattr(layer, "_rana_visits", False):
        return
    original = layer.forward

    def visit_and_run(*args, **kwargs):
        with visiting(layer, device):
            return original(*args, **kwargs)

    def forward(*args, **kwargs):
        if getattr(layer, "_rana_checkpoint", False) and torch.is_grad_enabled():
            return checkpoint(visit_and_run, *args, use_reentrant=False, **kwargs)
        return visit_and_run(*args, **kwargs)

    layer.forward = forward
    layer._rana_visits = True


def placed_like(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`tensor` in `like`'s dtype, contiguous, where `like` lives: converted before it moves (float64 factors made
    on a GPU cross to a resting layer as bf16, a quarter of the bytes) and pinned when `like` rests pinned (so an
    adapter built while its layer rests visits the GPU at full bus speed, without pinning on its first visit)."""
    tensor = tensor.detach().to(dtype=like.dtype)
    if tensor.device == like.device:
        return tensor.contiguous()
    if like.device.type == "cpu" and like.is_pinned():
        placed = torch.empty(tensor.shape, dtype=like.dtype, pin_memory=True)
        placed.copy_(tensor)
        return placed
    return tensor.to(like.device).contiguous()


def _normal(device) -> torch.device:
    """cuda means the current CUDA device: named by its index, so that tensors there compare equal to it."""
    device = torch.device(device)
    return torch.device("cuda", cuda_index(device)) if device.type == "cuda" else device


def _moved(tensor: torch.Tensor, device, pin: bool = False, non_blocking: bool = False) -> torch.Tensor:
    moved = tensor.detach().to(device, non_blocking=non_blocking)
    if pin:
        moved = moved.pin_memory()
    if isinstance(tensor, nn.Parameter):
        return nn.Parameter(moved, requires_grad=tensor.requires_grad)
    return moved
