import torch

from rana_core.sensitivity import fisher_diagonals


def test_fisher_covers_every_output_coordinate_and_leaves_the_model_clean(tiny, tiny_windows):
    windows = tiny_windows["train"][:2]
    fisher = fisher_diagonals(tiny.model, tiny.layers, windows)
    assert set(fisher) == {(i, part) for i in range(2) for part in ("qkv", "mlp")}
    assert fisher[(0, "qkv")].shape == (128,) and fisher[(1, "mlp")].shape == (64,)
    assert all(bool((f > 0).all()) and bool(torch.isfinite(f).all()) for f in fisher.values())
    assert all(p.grad is None and not p.requires_grad for p in tiny.model.parameters())
    assert not any(m._forward_hooks for m in tiny.model.modules())
    again = fisher_diagonals(tiny.model, tiny.layers, windows)
    assert all(torch.equal(fisher[k], again[k]) for k in fisher)


def test_fisher_matches_the_gradient_it_estimates(tiny, tiny_windows):
    """On one window, E[g_j²] of layer 1's MLP output equals the squared gradient computed by hand."""
    import torch.nn.functional as F

    window = tiny_windows["train"][:1]
    fisher = fisher_diagonals(tiny.model, tiny.layers, window)[(1, "mlp")]
    captured = {}
    handle = tiny.layers[1].mlp.register_forward_hook(lambda m, i, out: captured.setdefault("y", out))
    tiny.model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
    try:
        with torch.enable_grad():
            logits = tiny.model(window, use_cache=False).logits[:, :-1]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1), reduction="sum")
            (grad,) = torch.autograd.grad(loss, captured["y"])
    finally:
        handle.remove()
        tiny.model.get_input_embeddings()._forward_hooks.clear()
    expected = grad.square().reshape(-1, 64).sum(0) / window.numel()
    assert torch.allclose(fisher, expected, rtol=1e-4, atol=1e-12)
