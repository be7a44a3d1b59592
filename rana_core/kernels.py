"""Triton kernels for RaNA's masked products at batch 1 (design §7), with a plain PyTorch path for batches.

Both of RaNA's masked products have the same form: y = Σ_{k active} c_k · R[k, :], a sum of the rows of a
K × M matrix R picked by a mask on the coefficients c.

- Rank adapter, A-part: c = z = B x, R = Aᵀ (rank k is row k), active iff z_k² ≥ τ, i.e. |z_k| ≥ √τ.
- Neuron adapter, W_down: c = h, R = W_downᵀ (neuron k is row k), active iff |h_k| · ‖W_down[:, k]‖ ≥ τ.

Storing R row-major makes an active rank or neuron one contiguous row, so a masked-off row is never read: the
masked load is predicated off, and a block of rows with no active entry is skipped outright. At batch 1 the
product is bound by memory, so its time follows the bytes of the active rows. The masker is fused: the kernel
reads c (and the column norms), decides, and reads only what it keeps. Work is split over M (output columns)
and over K (rows), with partial sums added atomically into a float32 output, so that even M = 4096 fills the
GPU. Batches larger than one fall back to a dense product of the masked coefficients.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU install without Triton: only the PyTorch path
    triton = None

BLOCK_M = 128
BLOCK_K = 32


def _grid_for(K: int, M: int, device: torch.device) -> tuple[int, int, int]:
    """(programs over M, programs over K, rows per K-program): about four programs per multiprocessor."""
    m_blocks = math.ceil(M / BLOCK_M)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    splits = max(1, min(math.ceil(K / BLOCK_K), math.ceil(4 * sms / m_blocks)))
    per_program = math.ceil(math.ceil(K / splits) / BLOCK_K) * BLOCK_K
    return m_blocks, math.ceil(K / per_program), per_program


if triton is not None:

    @triton.jit
    def _masked_rows_kernel(rows_ptr, coeff_ptr, scale_ptr, threshold_ptr, out_ptr, K, M, stride_k,
                            K_PER_PROGRAM: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_M: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        threshold = tl.load(threshold_ptr)
        acc = tl.zeros([BLOCK_M], dtype=tl.float32)
        k_start = pid_k * K_PER_PROGRAM
        for k0 in range(0, K_PER_PROGRAM, BLOCK_K):
            offs_k = k_start + k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            c = tl.load(coeff_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            score = tl.abs(c)
            if HAS_SCALE:
                score = score * tl.load(scale_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            active = k_ok & (score >= threshold)
            if tl.sum(active.to(tl.int32), axis=0) > 0:  # a block nobody needs costs no memory traffic
                tile = tl.load(rows_ptr + offs_k[:, None] * stride_k + offs_m[None, :],
                               mask=active[:, None] & m_ok[None, :], other=0.0)
                acc += tl.sum(tile.to(tl.float32) * c[:, None], axis=0)
        tl.atomic_add(out_ptr + offs_m, acc, mask=m_ok)


def masked_rows_gemv(rows: torch.Tensor, coeff: torch.Tensor, threshold: torch.Tensor,
                     scale: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """y = Σ_k [score_k ≥ threshold] · coeff_k · rows[k, :] in float32, for one token.

    `rows`: (K, M), row-major. `coeff`: (K,). `threshold`: a one-element float32 tensor (so a captured CUDA graph
    sees a threshold changed later). `scale`: optional (K,) factors of the score (score = |coeff| · scale).
    `out`: an optional (M,) float32 buffer, overwritten."""
    K, M = rows.shape
    if coeff.shape != (K,):
        raise ValueError(f"coefficients {tuple(coeff.shape)} do not match rows {tuple(rows.shape)}")
    if rows.stride(1) != 1:
        raise ValueError("rows must be row-major (contiguous along M)")
    if out is None:
        out = torch.empty(M, dtype=torch.float32, device=rows.device)
    out.zero_()
    if triton is None or (rows.device.type != "cuda" and not _interpreting()):
        out += reference_masked_rows(rows, coeff, threshold, scale)
        return out
    m_blocks, k_blocks, per_program = _grid_for(K, M, rows.device)
    _masked_rows_kernel[(m_blocks, k_blocks)](
        rows, coeff, scale if scale is not None else coeff, threshold, out, K, M, rows.stride(0),
        K_PER_PROGRAM=per_program, HAS_SCALE=scale is not None, BLOCK_K=BLOCK_K, BLOCK_M=BLOCK_M,
    )
    return out


def masked_rows_batched(rows: torch.Tensor, coeff: torch.Tensor, threshold: torch.Tensor,
                        scale: torch.Tensor | None = None) -> torch.Tensor:
    """The same product for a batch of tokens, (T, K) coefficients → (T, M): a dense product of the masked
    coefficients, which at T > 1 beats gathering rows token by token."""
    score = coeff.abs().float()
    if scale is not None:
        score = score * scale.float()
    return (coeff * (score >= threshold).to(coeff.dtype)) @ rows


def reference_masked_rows(rows, coeff, threshold, scale=None) -> torch.Tensor:
    """The product in float64 (the mask decided in float32, as the kernel decides it), for checks."""
    score = coeff.float().abs()
    if scale is not None:
        score = score * scale.float()
    mask = (score >= threshold.float()).double()
    return ((coeff.double() * mask) @ rows.double()).float()


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"
