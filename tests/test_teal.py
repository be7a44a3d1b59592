"""TEAL and WINA (rana_core.adapters.input_sparse, rana_core.methods.teal): a unit keeps the inputs whose score
reaches its threshold and computes W on those alone, counting 2·out per kept input; WINA's score weighs each input
by its weight column's norm, so the two keep different inputs; TEAL's greedy allocation gives a layer's budget to
the projections where it costs the least error."""

import torch
from torch import nn

from rana_core.adapters.input_sparse import InputMaskedUnit, WeightedInputUnit
from rana_core.methods.teal import error_curve


def linear(weight):
    module = nn.Linear(weight.shape[1], weight.shape[0], bias=True)
    with torch.no_grad():
        module.weight.copy_(weight)
        module.bias.copy_(torch.arange(weight.shape[0], dtype=torch.float32))
    return module


def test_a_unit_computes_on_the_inputs_it_keeps_and_counts_them():
    #               heavy column 0 (norm 10), light columns 1-3 (norm 1)
    weight = torch.tensor([[6.0, 1.0, 0.0, 0.0], [8.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    x = torch.tensor([[0.5, 2.0, -3.0, 0.1]])
    teal = InputMaskedUnit([linear(weight)], 0, "down", keep=0.5, tau=1.0)   # keeps |x| ≥ 1: inputs 1 and 2
    wina = WeightedInputUnit([linear(weight)], 0, "down", keep=0.5, tau=4.0)  # |x|·‖W_j‖: 5, 2, 3, 0.1 → input 0
    with torch.no_grad():
        assert torch.allclose(teal.compute(x), torch.tensor([[2.0 + 0.0, -3.0 + 1.0, 0.0 + 2.0]]))
        assert torch.allclose(wina.compute(x), torch.tensor([[3.0 + 0.0, 4.0 + 1.0, 0.0 + 2.0]]))
    assert (teal.meter.active, teal.meter.flops) == (2.0, 2 * 3 * 2)
    assert (wina.meter.active, wina.meter.flops) == (1.0, 2 * 3 * 1)


def test_the_error_curve_grows_as_inputs_are_dropped_and_wina_loses_less_on_uneven_columns():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(32, 64, generator=generator) * torch.logspace(-1, 1, 64)  # column norms over 100×
    rows = torch.randn(256, 64, generator=generator)
    teal, wina = error_curve(weight, rows, weighted=False), error_curve(weight, rows, weighted=True)
    keeps = sorted(teal, reverse=True)
    assert teal[1.0] == wina[1.0] == 0.0
    assert all(teal[a] <= teal[b] for a, b in zip(keeps, keeps[1:]))  # keeping less never loses less
    assert all(wina[k] < teal[k] for k in keeps if k < 1.0)
