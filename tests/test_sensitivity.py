import math

import torch

from rana_core.sensitivity import loss_weights


def test_loss_weights_cover_every_module_and_leave_the_model_clean(tiny, tiny_windows):
    windows = tiny_windows["train"][:2]
    weights = loss_weights(tiny.model, tiny.layers, windows)
    assert set(weights) == {(i, part) for i in range(2) for part in ("qkv", "mlp")}
    assert all(math.isfinite(w) and w > 0 for w in weights.values())
    assert all(p.grad is None and not p.requires_grad for p in tiny.model.parameters())
    assert not any(m._forward_hooks for m in tiny.model.modules())
    assert weights == loss_weights(tiny.model, tiny.layers, windows)  # deterministic


def test_a_module_that_matters_more_weighs_more(tiny, tiny_windows):
    """Scaling the LM head up sharpens the predictions, and with them every gradient; the weights follow."""
    windows = tiny_windows["train"][:2]
    before = loss_weights(tiny.model, tiny.layers, windows)
    head = tiny.model.lm_head.weight
    original = head.detach().clone()
    with torch.no_grad():
        head.mul_(4.0)
    try:
        after = loss_weights(tiny.model, tiny.layers, windows)
    finally:
        with torch.no_grad():
            head.copy_(original)
    assert all(after[key] > before[key] for key in before)
