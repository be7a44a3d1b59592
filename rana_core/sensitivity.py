"""How much each module's output error costs in language-model loss, from one backward pass.

A small error Δy at a module's output y changes a token's loss by about ½ Σ_j F_jj Δy_j², with F the Fisher
information of that output, approximated by the squared loss gradient g_j². Taking the error as spread evenly
over the output's d coordinates, a relative error r costs

    Δloss ≈ ½ · E[‖g‖²] / d · r · E[‖y‖²]

per token, so ``weight = E[‖g‖²] · E[‖y‖²] / d`` turns relative errors of different modules into one currency.
For ``qkv`` the gradient and the output are those of the stacked q, k and v; for ``mlp`` those of the MLP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rana_core.progress import ProgressFn, no_progress


class _OutputStats:
    def __init__(self):
        self.grad_sq = 0.0
        self.out_sq = 0.0
        self.tokens = 0
        self.dim = 0

    @property
    def weight(self) -> float:
        return (self.grad_sq / self.tokens) * (self.out_sq / self.tokens) / self.dim


def loss_weights(model, layers, windows: torch.Tensor, batch_size: int = 2,
                 progress: ProgressFn = no_progress) -> dict[tuple[int, str], float]:
    """Weight per (layer, "qkv" | "mlp") on `windows` of the unadapted model."""
    stats: dict[tuple[int, str], _OutputStats] = {}
    handles = []

    def watch(key, counts_tokens: bool):
        entry = stats.setdefault(key, _OutputStats())

        def hook(_module, _inputs, output):
            entry.out_sq += output.detach().float().square().sum().item()
            if counts_tokens:  # q, k and v see the same tokens: count them once
                entry.tokens += output.numel() // output.shape[-1]
            output.register_hook(lambda grad: _add_grad(entry, grad))

        return hook

    for index, layer in enumerate(layers):
        attention = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj"):
            handles.append(getattr(attention, name).register_forward_hook(watch((index, "qkv"), name == "q_proj")))
        handles.append(layer.mlp.register_forward_hook(watch((index, "mlp"), True)))
        stats[(index, "qkv")].dim = sum(getattr(attention, p).out_features for p in ("q_proj", "k_proj", "v_proj"))
        stats[(index, "mlp")].dim = layer.mlp.down_proj.out_features
    embed = model.get_input_embeddings()
    handles.append(embed.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True)))
    device = next(model.parameters()).device
    try:
        with torch.enable_grad():
            n = windows.shape[0]
            for start in range(0, n, batch_size):
                batch = windows[start : start + batch_size].to(device)
                logits = model(batch, use_cache=False).logits[:, :-1]
                loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                       reduction="sum")
                loss.backward()
                progress(min(start + batch_size, n) / n, "loss gradients")
    finally:
        for handle in handles:
            handle.remove()
    return {key: entry.weight for key, entry in stats.items()}


def _add_grad(entry: _OutputStats, grad: torch.Tensor) -> None:
    entry.grad_sq += grad.detach().float().square().sum().item()
