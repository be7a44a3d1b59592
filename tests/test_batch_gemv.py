"""The dense product for a small batch (rana_core.decode.batch_gemv) against float64, every token's row: batches
1, 3 and 16, ragged shapes (rows and columns that no tile divides); in Triton's interpreter on small shapes,
compiled at 7B sizes on the GPU (`gpu`)."""

import pytest
import torch

from rana_core.decode.batch_gemv import rows_product

from test_kernels import relative_error, require_triton

# Inputs are rounded before the float64 reference sees them, so what is left is the float32 sum (√K roundings of
# 2^-24: under 1e-6 here) and one rounding of each output to its dtype (at most half an ulp: fp16 2^-12, bf16
# 2^-9); the bounds are twice those.
TOLERANCE = {torch.float32: 1e-6, torch.float16: 5e-4, torch.bfloat16: 4e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_interpreted_rows_product_matches_float64_for_every_token(dtype):
    require_triton("cpu")
    generator = torch.Generator().manual_seed(3)
    for B, N, K in ((1, 40, 70), (3, 17, 300), (16, 33, 64)):
        weight = torch.randn(N, K, generator=generator).to(dtype)
        x = torch.randn(B, K, generator=generator).to(dtype)
        out = rows_product(weight, x, {"BLOCK_K": 32})
        assert out.shape == (B, N) and out.dtype == dtype
        expected = x.double() @ weight.double().T
        for b in range(B):
            assert relative_error(out[b].double(), expected[b]) < TOLERANCE[dtype], (B, b)


def test_a_batch_over_16_is_refused():
    with pytest.raises(ValueError, match="B ≤ 16"):
        rows_product(torch.zeros(4, 8), torch.zeros(17, 8))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("B", [1, 4, 8])
def test_rows_product_matches_float64_at_7b_sizes(dtype, B):
    generator = torch.Generator(device="cuda").manual_seed(B)
    for N, K in ((12288, 4096), (4096, 11008), (3441, 4096)):
        weight = (torch.randn(N, K, device="cuda", generator=generator) / K ** 0.5).to(dtype)
        x = torch.randn(B, K, device="cuda", generator=generator).to(dtype)
        out = rows_product(weight, x)
        expected = x.double() @ weight.double().T
        for b in range(B):
            assert relative_error(out[b].double().cpu(), expected[b].cpu()) < TOLERANCE[dtype], (N, K, b)
