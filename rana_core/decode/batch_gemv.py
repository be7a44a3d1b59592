"""Dense products for a small batch of tokens (1-16) decoding together: Y = X Wᵀ with each weight row read once.

At a few rows a product is still a stream through the weights (a 7B layer's are 400 MB, the activations a few KB),
so what matters is reading W at full bandwidth, as the batch-1 GEMV does (gemv.gemv). cuBLAS picks
general matrix kernels at these shapes; measured at batch 1 inside the batched step they made a 7B step 1.7×
slower than the batch-1 engine (docs/latency.md). Here each program streams BLOCK_N rows of W along K and
multiplies every chunk by all B tokens' inputs in one small tensor-core product (the batch padded to 16 rows, the
smallest such product), as batch_masked.py does for the masked rows. bench/batch_decode.py compares it with
cuBLAS inside the batched step.
"""

from __future__ import annotations

import math

import torch

from rana_core.decode.batch_masked import MAX_BATCH, check_batch  # the padded batch of both small products
from rana_core.decode.launch import triton, use_triton

CONFIG = {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3}

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _rows_product_kernel(w_ptr, x_ptr, out_ptr, B, N, K: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr):
        """Program p: out[b, p·BLOCK_N…] = Σ_k x[b, k] · W[p·BLOCK_N…, k] for every b < B, in float32."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        b = tl.arange(0, BLOCK_B)
        b_ok = b < B
        acc = tl.zeros([BLOCK_N, BLOCK_B], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :],
                        other=0.0)
            x = tl.load(x_ptr + b[None, :] * K + offs_k[:, None], mask=k_ok[:, None] & b_ok[None, :], other=0.0)
            acc = tl.dot(w, x, acc, input_precision="ieee")
        tl.store(out_ptr + b[None, :] * N + offs_n[:, None], acc.to(out_ptr.dtype.element_ty),
                 mask=n_ok[:, None] & b_ok[None, :])


def rows_product(weight: torch.Tensor, x: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """x Wᵀ for x (B, K) with B ≤ 16 and W (N, K) row-major, in x's dtype (summed in float32, rounded once)."""
    check_batch(x, weight.shape[1], f"inputs {tuple(x.shape)} for a weight {tuple(weight.shape)}")
    B, K = x.shape
    N = weight.shape[0]
    if not use_triton(weight):
        return torch.nn.functional.linear(x, weight)
    c = {**CONFIG, **(config or {})}
    out = torch.empty(B, N, dtype=x.dtype, device=x.device)
    _rows_product_kernel[(math.ceil(N / c["BLOCK_N"]),)](weight, x.contiguous(), out, B, N, K=K,
                                                          BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"],
                                                          BLOCK_B=MAX_BATCH, num_warps=c["num_warps"],
                                                          num_stages=c["num_stages"])
    return out
