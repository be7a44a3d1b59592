"""A rank adapter's whole one-token product in one launch, for small models: z = B·x, each rank's mask, and the
kept ranks' rows of Aᵀ, with the residual add and RMSNorm owed to x made on the way in.

Why: on a SmolLM2-sized model every kernel costs about one launch (~2.5 µs on an H200) whatever it reads
(docs/latency.md, session 15), so RaNA's MLP, B's GEMV and then the masked A-parts, is one launch more than dense's
SwiGLU GEMV. Here program (s, g) owns R ranks of group g (gate's or up's): it computes their coefficients from
B's R rows (each row of B read by one program only), rounds them to the model's dtype as B's GEMV stores them,
decides their masks (|z| against the group's threshold), and streams the kept ranks' rows of Aᵀ across all M
columns, BLOCK_M at a time, into the partial sums partial[g, s, :]: the masked product's layout
(masked_kernels.masked_rows_partials), so the down product's compaction makes silu(gate)·up from them unchanged.
Two dependent memory phases in one launch, where the reference takes two launches; B's rows are loaded before the
launch waits for the one before it (weights are never written during a step).

    partial, splits = rank_partials(block.gate_up_B, block.gate_up_rows, normed, block.gate_up_threshold, groups=2)
"""

from __future__ import annotations

import math
import os

import torch

from rana_core.decode.masked_kernels import _buffer, pdl, triton

# (R ranks a program, BLOCK_M columns a step, BLOCK_H inputs a step of B's product, warps); RANA_RANK_FUSED_CONFIG
# overrides it. Not yet timed (session 15 built it on the CPU).
CONFIG = (16, 256, 256, 4)

# Up to this many bytes of B and rows together the fused product is taken by default (RANA_RANK_FUSED=auto): the
# size below which one launch was measured to beat two for the masked product (masked_wide.WIDE_MAX_BYTES).
FUSED_MAX_BYTES = 16 * 2**20

if triton is not None:
    import triton.language as tl

    from rana_core.decode.dense_kernels import _norm_prologue, _row_dots
    from rana_core.decode.masked_kernels import await_inputs

    @triton.jit
    def _rank_fused_kernel(b_ptr, rows_ptr, x_ptr, threshold_ptr, partial_ptr, delta_ptr, norm_w_ptr, res_out_ptr,
                           eps, K, M: tl.constexpr, H: tl.constexpr, H_P2: tl.constexpr, S: tl.constexpr,
                           R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, NORM: tl.constexpr,
                           HAS_DELTA: tl.constexpr, PDL: tl.constexpr):
        """Program pid = g·S + s: ranks s·R… of group g (module docstring). With NORM, x is the residual and the
        input is RMSNorm(x + delta) · norm_w, made by every program itself (dense_kernels._norm_prologue; program
        0 writes the new residual to res_out)."""
        pid = tl.program_id(0)
        g, s = pid // S, pid % S
        ranks = s * R + tl.arange(0, R)
        ok = ranks < K
        first = tl.zeros([R, BLOCK_H], dtype=b_ptr.dtype.element_ty)
        b_rows = b_ptr + g * K * H
        EARLY: tl.constexpr = H > BLOCK_H  # else _row_dots' one step is the first chunk itself
        if EARLY:
            first = tl.load(b_rows + ranks[:, None] * H + tl.arange(0, BLOCK_H)[None, :], mask=ok[:, None],
                            other=0.0)
        await_inputs(PDL)
        inv_rms = 1.0
        if NORM:
            inv_rms = _norm_prologue(x_ptr, delta_ptr, norm_w_ptr, res_out_ptr, eps, H, H_P2, HAS_DELTA)
        dtype = rows_ptr.dtype.element_ty
        z = _row_dots(b_rows, x_ptr, ranks, ok, H, first, H, R, BLOCK_H, EARLY, NORM, delta_ptr, norm_w_ptr,
                      inv_rms, HAS_DELTA)
        z = z.to(dtype).to(tl.float32)  # as B's GEMV stores the coefficients
        active = ok & (tl.abs(z) >= tl.load(threshold_ptr + g))
        z = tl.where(active, z, 0.0)
        rows = rows_ptr + (g * K + ranks)[:, None].to(tl.int64) * M
        for m0 in range(0, M, BLOCK_M):
            cols = m0 + tl.arange(0, BLOCK_M)
            c_ok = cols < M
            tile = tl.load(rows + cols[None, :], mask=active[:, None] & c_ok[None, :], other=0.0)
            tl.store(partial_ptr + (g * S + s) * M + cols, tl.sum(z[:, None] * tile.to(tl.float32), axis=0),
                     mask=c_ok)


def applies(B: torch.Tensor, rows: torch.Tensor) -> bool:
    """Whether a one-token rank product takes this one launch: RANA_RANK_FUSED = "1", "0", or "auto" (the default:
    up to FUSED_MAX_BYTES of B and rows)."""
    choice = os.environ.get("RANA_RANK_FUSED", "auto")
    if choice == "auto":
        return (B.numel() + rows.numel()) * rows.element_size() <= FUSED_MAX_BYTES
    if choice not in ("0", "1"):
        raise ValueError(f"RANA_RANK_FUSED={choice}: expected auto, 0 or 1")
    return choice == "1"


def config() -> tuple[int, int, int, int]:
    text = os.environ.get("RANA_RANK_FUSED_CONFIG")
    return tuple(int(v) for v in text.split(",")) if text else CONFIG


def rank_partials(B: torch.Tensor, rows: torch.Tensor, x: torch.Tensor, threshold: torch.Tensor, groups: int,
                  norm: tuple | None = None) -> tuple[torch.Tensor, int]:
    """(partials (groups · S, M) in float32, S) of `groups` rank adapters stacked along the rank: B (groups·K, H)
    and rows = Aᵀ (groups·K, M) row-major, one threshold on |z| each, x (H,) one token. `norm` = (delta,
    norm_weight, eps, res_out) as dense_kernels.gemv takes it: x is then the residual, and the input its
    RMSNorm (x + delta written to res_out)."""
    K_all, H = B.shape
    K, M = K_all // groups, rows.shape[1]
    if K * groups != K_all or rows.shape[0] != K_all or x.shape != (H,) or threshold.numel() != groups:
        raise ValueError(f"B {tuple(B.shape)}, rows {tuple(rows.shape)}, x {tuple(x.shape)} and "
                         f"{threshold.numel()} thresholds are not {groups} stacked rank adapters of one token")
    if not (B.is_contiguous() and rows.is_contiguous()):
        raise ValueError("B and the rows must be contiguous")
    R, block_m, block_h, warps = config()
    S = math.ceil(K / R)
    partial = _buffer("rank fused partial", groups * S * M, torch.float32, rows.device)
    delta, norm_weight, eps, res_out = norm if norm is not None else (None, x, 0.0, x)
    p = pdl(rows)
    _rank_fused_kernel[(groups * S,)](B, rows, x, threshold, partial, delta if delta is not None else x,
                                      norm_weight, res_out, eps, K, M=M, H=H, H_P2=triton.next_power_of_2(H), S=S,
                                      R=R, BLOCK_M=min(block_m, triton.next_power_of_2(M)),
                                      BLOCK_H=min(block_h, triton.next_power_of_2(H)), NORM=norm is not None,
                                      HAS_DELTA=delta is not None, PDL=p, num_warps=warps, launch_pdl=p)
    return partial, S
