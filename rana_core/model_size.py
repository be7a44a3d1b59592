"""What a (possibly adapted) model costs: parameters, KV-cache bytes and FLOPs per token.

Parameters are counted as the adapted model would be shipped: each wrapper's own tensors replace the original
module it keeps as ``base`` (an SVD unit counts its factors, A3 its narrower matrices, CATS and RaNA's neuron
adapter the dense weights they still read), shared tensors (tied embeddings) once. The KV cache is what one
token adds to the cache in float16: keys plus values of every layer, at the width an attention adapter caches.
"""

from __future__ import annotations

from torch import nn

from rana_core.adapters.base import AdaptedSlot, AttentionAdapter, MLPAdapter
from rana_core.architecture import layer_attention

FP16_BYTES = 2


def _parameters(module: nn.Module, seen: dict[int, nn.Parameter]) -> None:
    """Collect the parameters `module` runs on, skipping the originals that wrappers keep as `base`."""
    for parameter in module.parameters(recurse=False):
        seen.setdefault(id(parameter), parameter)
    wrapper = isinstance(module, (AdaptedSlot, MLPAdapter, AttentionAdapter))
    for name, child in module.named_children():
        if not (wrapper and name == "base"):
            _parameters(child, seen)


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(all parameters, those of matrices: weights of linear maps and embeddings) that `module` runs on."""
    seen: dict[int, nn.Parameter] = {}
    _parameters(module, seen)
    return sum(p.numel() for p in seen.values()), sum(p.numel() for p in seen.values() if p.ndim == 2)


def kv_bytes_per_token(loaded) -> int:
    shape = loaded.shape
    dense = 2 * shape.kv_heads * shape.head_dim  # keys plus values of one layer
    features = 0
    for layer in loaded.layers:
        attention = layer_attention(layer)
        features += attention.kv_features if isinstance(attention, AttentionAdapter) else dense
    return features * FP16_BYTES


def size_stats(loaded) -> dict:
    """Parameters and KV-cache bytes of the model as it stands (adapters installed or not)."""
    params, _ = count_parameters(loaded.model)
    _, decoder_linear = count_parameters(loaded.layers)
    return {"params": params, "decoder_linear_params": decoder_linear,
            "kv_bytes_per_token": kv_bytes_per_token(loaded)}


def model_stats(adapted_size: dict, dense_size: dict, whole_model_flops: float, whole_model_reduction: float) -> dict:
    """The run's `model_stats`: adapted values, and the dense model's beside them for comparison."""
    return {**adapted_size, "flops_per_token": whole_model_flops * (1.0 - whole_model_reduction),
            "dense": {**dense_size, "flops_per_token": whole_model_flops}}
