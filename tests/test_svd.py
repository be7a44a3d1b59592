import torch

from rana_core.adapters.base import MODULES, inject, installed_adapters, layer_members, unload
from rana_core.adapters.low_rank import LowRankUnit
from rana_core.architecture import INPUT_OF
from rana_core.calibration import capture_module_inputs
from rana_core.decompose import low_rank_factors, output_basis, rank_for_budget


def _grams(tiny, windows):
    return capture_module_inputs(tiny, windows)


def test_full_rank_reproduces_every_layer(tiny, tiny_windows):
    stats = _grams(tiny, tiny_windows["train"])
    for index, layer in enumerate(tiny.layers):
        for module in MODULES:
            weight = torch.cat([m.weight for m in layer_members(layer, module)]).double()
            basis = output_basis(weight, stats[(index, INPUT_OF[module])].gram)
            A, B = low_rank_factors(weight, basis, min(weight.shape))
            assert torch.allclose(A @ B, weight, atol=1e-10), (index, module)
            assert torch.allclose(A.T @ A, torch.eye(A.shape[1], dtype=A.dtype), atol=1e-10)


def test_data_aware_basis_beats_plain_svd_on_the_data(tiny, tiny_windows):
    stats = _grams(tiny, tiny_windows["train"])
    layer, module = tiny.layers[1], "up"
    weight = layer_members(layer, module)[0].weight.double()
    gram = stats[(1, INPUT_OF[module])].gram
    rank = 16
    A, B = low_rank_factors(weight, output_basis(weight, gram), rank)
    U = torch.linalg.svd(weight, full_matrices=False).U[:, :rank]
    err = lambda approx: torch.trace((weight - approx) @ gram @ (weight - approx).T)  # noqa: E731
    assert err(A @ B) < err(U @ U.T @ weight)


def test_unit_at_full_rank_keeps_the_model_and_unload_restores_it(tiny, tiny_windows):
    batch = tiny_windows["heldout"][:2]
    with torch.no_grad():
        before = tiny.model(batch).logits
    stats = _grams(tiny, tiny_windows["train"])
    units = []
    for index, layer in enumerate(tiny.layers):
        for module in MODULES:
            members = layer_members(layer, module)
            weight = torch.cat([m.weight for m in members])
            A, B = low_rank_factors(weight, output_basis(weight, stats[(index, INPUT_OF[module])].gram),
                                    min(weight.shape))
            units.append(LowRankUnit(members, index, module, A, B))
    inject(tiny.layers, units)
    try:
        assert len(installed_adapters(tiny.layers)) == len(units) == 8
        with torch.no_grad():
            adapted = tiny.model(batch).logits
        assert torch.allclose(adapted, before, atol=1e-4)
        qkv = next(u for u in units if u.module == "qkv")
        tokens = batch.numel()
        assert qkv.meter.tokens == tokens  # q, k and v shared one computation
        assert qkv.meter.flops == tokens * 2 * qkv.meter.static_rank * (qkv.in_features + qkv.out_features)
    finally:
        assert unload(tiny.layers) == 2 * (3 + 1 + 1 + 1)
    with torch.no_grad():
        assert torch.equal(tiny.model(batch).logits, before)


def test_rank_for_budget():
    assert rank_for_budget(1536, 576, 0.3) == round(0.7 * 1536 * 576 / (1536 + 576))  # 293.2 -> 293
    assert rank_for_budget(160, 64, 0.5) == 23  # 22.86: rounded to nearest, not down
    cost = 2 * rank_for_budget(960, 576, 0.5) * (960 + 576)
    assert abs(cost - 0.5 * 2 * 960 * 576) <= (960 + 576)  # within half a rank of the budget
    assert rank_for_budget(64, 64, 0.94) >= 1
