"""How much each module's output error costs in language-model loss, from one backward pass.

A small error Δy at a module's output changes a token's loss by about ½ Σ_j F_j Δy_j², with F_j the diagonal
Fisher information of output coordinate j, estimated as the mean squared loss gradient E[g_j²] over calibration
tokens. ``fisher_diagonals`` returns F for every layer's stacked QKV output (q, k, v concatenated) and MLP output;
errors weighted by it are in one currency across modules (twice the expected loss increase per token), which is
what allocating one budget over modules needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rana_core.adapters.base import layer_members
from rana_core.architecture import layer_mlp
from rana_core.progress import ProgressFn, no_progress
from rana_core.residency import recomputing


def fisher_diagonals(model, layers, windows: torch.Tensor, batch_size: int = 2,
                     progress: ProgressFn = no_progress) -> dict[tuple[int, str], torch.Tensor]:
    """E[g_j²] per output coordinate, keyed (layer, "qkv" | "mlp"), on `windows` of the unadapted model."""
    sums: dict[tuple[int, str], torch.Tensor] = {}
    handles = []

    def watch(key):
        def hook(_module, _inputs, output):
            output.register_hook(lambda grad: _add(sums, key, grad))

        return hook

    for index, layer in enumerate(layers):
        for member, linear in enumerate(layer_members(layer, "qkv")):  # q, k, v in the stacked order
            handles.append(linear.register_forward_hook(watch((index, "qkv", member))))
        handles.append(layer_mlp(layer).register_forward_hook(watch((index, "mlp", "mlp"))))
    handles.append(model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True)))
    device = next(model.parameters()).device
    tokens = 0
    try:
        with torch.enable_grad(), recomputing(model):  # layers resting on the CPU revisit the GPU backwards
            n = windows.shape[0]
            for start in range(0, n, batch_size):
                batch = windows[start : start + batch_size].to(device)
                logits = model(batch, use_cache=False).logits[:, :-1]
                loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                       reduction="sum")
                loss.backward()
                tokens += batch.numel()
                progress(min(start + batch_size, n) / n, "loss gradients")
    finally:
        for handle in handles:
            handle.remove()
    result = {}
    for index in range(len(layers)):
        result[(index, "qkv")] = torch.cat([sums[(index, "qkv", member)] for member in range(3)]) / tokens
        result[(index, "mlp")] = sums[(index, "mlp", "mlp")] / tokens
    return result


def _add(sums: dict, key, grad: torch.Tensor) -> None:
    squares = grad.detach().float().square().reshape(-1, grad.shape[-1]).sum(0)  # stays on the run's device
    sums[key] = sums[key] + squares if key in sums else squares
