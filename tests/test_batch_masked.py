"""The batched masked products (the union of B tokens' masks; every row with the masks applied to the
coefficients) against a float64 reference per token, on fresh random inputs at every density, the empty mask
included; in Triton's interpreter on small shapes, compiled at model sizes on the GPU (`gpu`)."""

import pytest
import torch

from rana_core.decode.batch_masked import masked_rows_dense, masked_rows_union
from rana_core.decode.masked_kernels import reference_masked_rows

from test_kernels import DENSITIES, TOLERANCE, relative_error, require_triton, threshold_for_density


HALF_ULP = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}  # relative, at worst


def check(B, K, M, dtype, device, density, with_scale, generator, product="union"):
    rows = torch.randn(K, M, generator=generator).to(device=device, dtype=dtype)
    # the coefficients a slice of a wider row, as the batched step passes gate's and up's halves
    coeff = torch.randn(B, K + 3, generator=generator).to(device=device, dtype=dtype)[:, 2:K + 2]
    scale = torch.rand(K, generator=generator).to(device) + 0.5 if with_scale else None
    score = coeff.float().abs() * (scale if scale is not None else 1.0)
    threshold = threshold_for_density(score, density)
    if product == "dense":
        out = masked_rows_dense(rows, coeff, threshold, scale)
        assert out.dtype == dtype
        out = out.float()
    else:
        out, listed = masked_rows_union(rows, coeff.contiguous(), threshold, scale)
    assert out.shape == (B, M) and torch.isfinite(out).all()
    cpu_scale = None if scale is None else scale.cpu()
    for b in range(B):
        ref = reference_masked_rows(rows.cpu(), coeff[b].cpu(), threshold.cpu(), cpu_scale)
        if density == 0.0:
            assert torch.count_nonzero(out[b]) == 0
        elif product == "dense":  # float32 sums rounded once to the dtype: within half its ulp of the exact sum
            gap = (out[b].cpu().double() - ref.double()).abs()
            assert (gap <= HALF_ULP[dtype] * ref.double().abs() + TOLERANCE * ref.double().abs().max()).all(), b
        else:
            assert relative_error(out[b].cpu(), ref) < TOLERANCE, (b, density)
    if product == "union":
        assert int(listed) == int((score >= threshold).any(0).sum())  # the rows any token activates


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("with_scale", [False, True])
def test_interpreted_union_product_matches_float64_for_every_token(density, with_scale):
    """Each token's product equals its own masked product (a row listed for another token adds zero to it); the
    rows read are the union of the masks. Batches of 1, 3 and 8, ragged shapes."""
    require_triton("cpu")
    generator = torch.Generator().manual_seed(int(density * 100) + 7 * with_scale)
    for B, K, M in ((1, 40, 200), (3, 64, 128), (8, 7, 33)):
        check(B, K, M, torch.float32, "cpu", density, with_scale, generator)


@pytest.mark.parametrize("density", DENSITIES)
def test_interpreted_dense_masked_product_matches_float64_for_every_token(density):
    """Every row read, each token's mask applied to its own coefficients (a row another token activates adds
    zero); the result rounded once to the coefficients' dtype. Ragged shapes, rows split across programs."""
    require_triton("cpu")
    generator = torch.Generator().manual_seed(int(density * 100) + 3)
    for B, K, M, with_scale in ((1, 40, 200, False), (3, 300, 130, True), (8, 7, 33, False)):
        check(B, K, M, torch.float32, "cpu", density, with_scale, generator, "dense")


def test_a_batch_larger_than_the_padded_product_is_refused():
    with pytest.raises(ValueError, match="B ≤ 16"):
        masked_rows_union(torch.zeros(4, 4), torch.zeros(17, 4), torch.zeros(1))
    with pytest.raises(ValueError, match="B ≤ 16"):
        masked_rows_dense(torch.zeros(4, 4), torch.zeros(17, 4), torch.zeros(1))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("product", ["union", "dense"])
def test_compiled_masked_batch_products_match_float64_at_model_sizes(density, dtype, product):
    generator = torch.Generator().manual_seed(11)
    for B, K, M in ((4, 3082, 11008), (8, 11008, 4096), (3, 3441, 12288)):  # gate, down, qkv at 7B, RaNA −44%
        check(B, K, M, dtype, "cuda", density, True, generator, product)
