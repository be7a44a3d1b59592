"""Triton kernels for RaNA's masked products at batch 1 (design §7), with a plain PyTorch path for batches.

Both of RaNA's masked products have the same form: y = Σ_{k active} c_k · R[k, :], a sum of the rows of a
K × M matrix R picked by a mask on the coefficients c.

- Rank adapter, A-part: c = z = B x, R = Aᵀ (rank k is row k), active iff z_k² ≥ τ, i.e. |z_k| ≥ √τ.
- Neuron adapter, W_down: c = h, R = W_downᵀ (neuron k is row k), active iff |h_k| · ‖W_down[:, k]‖ ≥ τ.

Storing R row-major makes an active rank or neuron one contiguous row, so a masked-off row is never read: the
masker is fused into the kernel: each program scans c (and the column norms), compacts the indices of the active
rows into a short list, and then reads only those rows, so at batch 1, where the product is bound by memory,
its time follows the bytes of the active rows. Work is split over output columns and over K (so that even
M = 4096 fills the GPU); each K-split stores its partial sums and a second small kernel adds them in a fixed
order, so the same input always gives the same output. Batches larger than one fall back to a dense product
of the masked coefficients.
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

BLOCK_M = 128  # output columns per program: a row segment of 256 bytes in fp16
BLOCK_K = 64  # active rows gathered per step
PROGRAMS_PER_SM = 16  # K is split until about this many programs per multiprocessor
NUM_WARPS, NUM_STAGES = 4, 1


def _split(K: int, M: int, device: torch.device) -> tuple[int, int, int]:
    """(programs over M, programs over K, rows per K-program, a power of two for the in-program scan)."""
    m_blocks = math.ceil(M / BLOCK_M)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    splits = max(1, min(math.ceil(K / BLOCK_K), math.ceil(PROGRAMS_PER_SM * sms / m_blocks)))
    per_program = triton.next_power_of_2(math.ceil(K / splits))
    return m_blocks, math.ceil(K / per_program), per_program


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
    def _masked_rows_kernel(rows_ptr, coeff_ptr, scale_ptr, threshold_ptr, partial_ptr, scratch_ptr, K, M,
                            stride_k, HAS_SCALE: tl.constexpr, K_PER: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_M: tl.constexpr, INTERPRET: tl.constexpr):
        """Program (m, k) owns BLOCK_M output columns and K_PER rows. It compacts the indices of its active rows
        (the masker: |c|·scale ≥ threshold) into a scratch list, then reads only those rows, BLOCK_K at a time,
        and stores its partial sums in row k of `partial` (no atomics: the result is deterministic)."""
        pid_m = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        offs_k = pid_k * K_PER + tl.arange(0, K_PER)
        k_ok = offs_k < K
        score = tl.abs(tl.load(coeff_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32))
        if HAS_SCALE:
            score = score * tl.load(scale_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        active = k_ok & (score >= tl.load(threshold_ptr))
        count = tl.sum(active.to(tl.int32), axis=0)
        base = scratch_ptr + (pid_k * tl.num_programs(0) + pid_m) * K_PER
        tl.store(base + tl.cumsum(active.to(tl.int32), axis=0) - 1, offs_k, mask=active)
        tl.debug_barrier()  # the list is written by some threads of this program and read by others
        acc = tl.zeros([BLOCK_M], dtype=tl.float32)
        if INTERPRET:  # Triton's interpreter cannot take a computed value as a range bound; a while loop it can
            j0 = 0
            while j0 < count:
                acc = _gather_rows(acc, j0, count, base, coeff_ptr, rows_ptr, stride_k, offs_m, m_ok, BLOCK_K)
                j0 += BLOCK_K
        else:
            for j0 in range(0, count, BLOCK_K):
                acc = _gather_rows(acc, j0, count, base, coeff_ptr, rows_ptr, stride_k, offs_m, m_ok, BLOCK_K)
        tl.store(partial_ptr + pid_k * M + offs_m, acc, mask=m_ok)

    @triton.jit
    def _sum_splits_kernel(partial_ptr, out_ptr, M, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
        """out = Σ_k partial[k, :], in the output's dtype."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < M
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for k in range(SPLITS):
            acc += tl.load(partial_ptr + k * M + offs, mask=ok, other=0.0)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


_BUFFERS: dict = {}


def _buffer(name: str, size: int, dtype, device: torch.device) -> torch.Tensor:
    """A reusable work buffer (allocated once per size and device, so that a captured CUDA graph keeps pointing
    at live memory)."""
    key = (name, size, str(device))
    if key not in _BUFFERS:
        _BUFFERS[key] = torch.empty(size, dtype=dtype, device=device)
    return _BUFFERS[key]


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
    m_blocks, k_blocks, per_program = _split(K, M, rows.device)
    partial = _buffer("partial", k_blocks * M, torch.float32, rows.device)
    scratch = _buffer("scratch", m_blocks * k_blocks * per_program, torch.int32, rows.device)
    _masked_rows_kernel[(m_blocks, k_blocks)](
        rows, coeff, scale if scale is not None else coeff, threshold, partial, scratch, K, M, rows.stride(0),
        HAS_SCALE=scale is not None, K_PER=per_program, BLOCK_K=BLOCK_K, BLOCK_M=BLOCK_M,
        INTERPRET=_interpreting(), num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    _sum_splits_kernel[(math.ceil(M / 1024),)](partial, out, M, SPLITS=k_blocks, BLOCK=1024)
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
