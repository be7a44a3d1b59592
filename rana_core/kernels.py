"""Triton kernels for RaNA's masked products at batch 1 (design §7), with a plain PyTorch path for batches.

Both of RaNA's masked products have the same form: y = Σ_{k active} c_k · R[k, :], a sum of the rows of a
K × M matrix R picked by a mask on the coefficients c.

- Rank adapter, A-part: c = z = B x, R = Aᵀ (rank k is row k), active iff z_k² ≥ τ, i.e. |z_k| ≥ √τ.
- Neuron adapter, W_down: c = h, R = W_downᵀ (neuron k is row k), active iff |h_k| · ‖W_down[:, k]‖ ≥ τ.

Storing R row-major makes an active rank or neuron one contiguous row, so a masked-off row is never read: the
masker is fused into the kernel: each program scans c (and the column norms), compacts the indices of the active
rows into a short list, and then reads only those rows, so at batch 1, where the product is bound by memory,
its time follows the bytes of the active rows. Each program owns a block of output columns over all of K, so
the result is written once, in the output's dtype, with no atomics (the same input always gives the same
output). Batches larger than one fall back to a dense product of the masked coefficients.
(bench/kernel_variants.py compares this with predicated loads and with split-K variants.)
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU install without Triton: only the PyTorch path
    triton = None

BLOCK_M = 64  # output columns per program: a row segment of 128 bytes in fp16
BLOCK_K = 64  # active rows gathered per step
SCAN = 1024  # coefficients scanned per step while compacting
NUM_WARPS, NUM_STAGES = 4, 3


if triton is not None:

    @triton.jit
    def _gather_rows(acc, j0, count, base, coeff_ptr, rows_ptr, stride_k, offs_m, m_ok, BLOCK_K: tl.constexpr):
        """acc + Σ coeff[i] · rows[i, offs_m] over the next BLOCK_K indices i of the active list."""
        j = j0 + tl.arange(0, BLOCK_K)
        j_ok = j < count
        index = tl.load(base + j, mask=j_ok, other=0)
        c = tl.load(coeff_ptr + index, mask=j_ok, other=0.0).to(tl.float32)
        tile = tl.load(rows_ptr + index[:, None] * stride_k + offs_m[None, :], mask=j_ok[:, None] & m_ok[None, :],
                       other=0.0)
        return acc + tl.sum(tile.to(tl.float32) * c[:, None], axis=0)

    @triton.jit
    def _masked_rows_kernel(rows_ptr, coeff_ptr, scale_ptr, threshold_ptr, out_ptr, scratch_ptr, K, M, stride_k,
                            HAS_SCALE: tl.constexpr, SCAN: tl.constexpr, SCAN_STEPS: tl.constexpr,
                            BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, INTERPRET: tl.constexpr):
        """One program per BLOCK_M output columns. Phase 1 compacts the indices of the active rows (the masker:
        |c|·scale ≥ threshold) into this program's scratch list; phase 2 reads only those rows, BLOCK_K at a
        time, and writes the finished columns in the output's dtype: one launch, no atomics, deterministic."""
        pid = tl.program_id(0)
        offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        threshold = tl.load(threshold_ptr)
        base = scratch_ptr + pid * K
        count = 0
        for step in range(SCAN_STEPS):
            offs_k = step * SCAN + tl.arange(0, SCAN)
            k_ok = offs_k < K
            score = tl.abs(tl.load(coeff_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32))
            if HAS_SCALE:
                score = score * tl.load(scale_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            active = k_ok & (score >= threshold)
            slot = count + tl.cumsum(active.to(tl.int32), axis=0) - 1
            tl.store(base + slot, offs_k, mask=active)
            count += tl.sum(active.to(tl.int32), axis=0)
        tl.debug_barrier()  # the list is written by some threads of this program and read by others
        acc = tl.zeros([BLOCK_M], dtype=tl.float32)
        if INTERPRET:  # Triton's interpreter cannot take a loaded value as a range bound; a while loop it can
            j0 = 0
            while j0 < count:
                acc = _gather_rows(acc, j0, count, base, coeff_ptr, rows_ptr, stride_k, offs_m, m_ok, BLOCK_K)
                j0 += BLOCK_K
        else:
            for j0 in range(0, count, BLOCK_K):  # a for loop, so that the compiler pipelines the loads
                acc = _gather_rows(acc, j0, count, base, coeff_ptr, rows_ptr, stride_k, offs_m, m_ok, BLOCK_K)
        tl.store(out_ptr + offs_m, acc.to(out_ptr.dtype.element_ty), mask=m_ok)


_SCRATCH: dict = {}


def _scratch(programs: int, K: int, device: torch.device) -> torch.Tensor:
    """A reusable int32 buffer for the programs' index lists (allocated once per size and device, so that a
    captured CUDA graph keeps pointing at live memory)."""
    key = (programs * K, str(device))
    if key not in _SCRATCH:
        _SCRATCH[key] = torch.empty(programs * K, dtype=torch.int32, device=device)
    return _SCRATCH[key]


def masked_rows_gemv(rows: torch.Tensor, coeff: torch.Tensor, threshold: torch.Tensor,
                     scale: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """y = Σ_k [score_k ≥ threshold] · coeff_k · rows[k, :] for one token (score_k = |coeff_k|, times scale_k).

    `rows`: (K, M), row-major. `coeff`: (K,). `threshold`: a one-element float32 tensor (so a captured CUDA graph
    sees a threshold changed later). `out`: an optional (M,) buffer (float32 or the rows' dtype), overwritten;
    by default float32."""
    K, M = rows.shape
    if coeff.shape != (K,):
        raise ValueError(f"coefficients {tuple(coeff.shape)} do not match rows {tuple(rows.shape)}")
    if rows.stride(1) != 1:
        raise ValueError("rows must be row-major (contiguous along M)")
    if out is None:
        out = torch.empty(M, dtype=torch.float32, device=rows.device)
    if triton is None or (rows.device.type != "cuda" and not _interpreting()):
        out.copy_(reference_masked_rows(rows, coeff, threshold, scale))
        return out
    programs = math.ceil(M / BLOCK_M)
    _masked_rows_kernel[(programs,)](
        rows, coeff, scale if scale is not None else coeff, threshold, out, _scratch(programs, K, rows.device), K, M,
        rows.stride(0), HAS_SCALE=scale is not None, SCAN=SCAN, SCAN_STEPS=math.ceil(K / SCAN), BLOCK_K=BLOCK_K,
        BLOCK_M=BLOCK_M, INTERPRET=_interpreting(),
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
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
