"""bench/gemv_tma.py's GEMV through TMA descriptors against float64, in Triton's interpreter on small shapes
whose rows and columns do not fill the last box (the descriptor must bring zeros there, the store skip them)."""

import sys
from pathlib import Path

import pytest
import torch

from test_kernels import relative_error, require_triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))


@pytest.mark.parametrize("N, K, block_n, block_k, stages", [(37, 100, 8, 64, 3), (5, 24, 16, 16, 2),
                                                           (64, 256, 2, 128, 4)])
def test_the_tma_gemv_matches_float64(N, K, block_n, block_k, stages):
    require_triton("cpu")
    from gemv_tma import gemv_tma, tma_descriptor

    g = torch.Generator().manual_seed(N * K)
    weight, x = torch.randn(N, K, generator=g), torch.randn(K, generator=g)
    out = torch.full((N,), float("nan"))
    gemv_tma(tma_descriptor(weight, block_n, block_k), weight, x, out, block_n, block_k, stages, 4)
    assert relative_error(out, weight.double() @ x.double()) < 1e-6


def test_a_weight_tma_cannot_read_is_refused():
    from gemv_tma import tma_descriptor

    with pytest.raises(ValueError, match="cannot be read by TMA"):
        tma_descriptor(torch.zeros(8, 7, dtype=torch.float16), 8, 16)  # rows of 14 bytes
    with pytest.raises(ValueError, match="cannot be read by TMA"):
        tma_descriptor(torch.zeros(8, 1024, dtype=torch.float16), 8, 512)  # boxes of at most 256
