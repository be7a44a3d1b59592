"""Data-aware decomposition of a linear layer (RaNA's first step).

With calibration inputs X (n × T) and C = X Xᵀ, the outputs W X have covariance W C Wᵀ. Its eigenvectors U are the
output directions the data actually uses, ordered by the energy they carry. A = U (m × r) and B = Uᵀ W (r × n)
give A B x, the projection of W x on the top r directions.

Everything is computed in float64 on the device the gram lives on (where calibration ran: a GPU's float64 is fast
enough for one layer's eigenproblems, and float32 loses the tail of the spectrum that small ranks are chosen
from). C is lifted by a tiny share of its mean eigenvalue, so that directions the calibration data never visits
(fewer tokens than features, or rounding below zero) still complete the basis, ranked last. U comes from one
symmetric eigenproblem of the smaller side of M = W L, with C + εI = L Lᵀ (Cholesky): M Mᵀ = W (C + εI) Wᵀ when
the layer is wide (m ≤ n), else Mᵀ M, whose eigenvectors V give U = M V / s. Both are far cheaper than an SVD of
M, on a CPU and on a GPU alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EIGEN_FLOOR = 1e-6  # relative to the mean eigenvalue of C


@dataclass
class OutputBasis:
    U: torch.Tensor  # m × min(m, n), orthonormal columns, float64, on the gram's device
    energy: torch.Tensor  # squared singular values of W C^½: output energy per direction, decreasing


def output_basis(weight: torch.Tensor, gram: torch.Tensor) -> OutputBasis:
    C = gram.to(dtype=torch.float64)
    W = weight.detach().to(device=C.device, dtype=torch.float64)
    m, n = W.shape
    floor = EIGEN_FLOOR * max(C.diagonal().mean().item(), 1e-30)  # the trace's mean is the eigenvalues' mean
    if m <= n:
        energy, U = torch.linalg.eigh(W @ C @ W.T + floor * (W @ W.T))
        energy, U = energy.flip(0).clamp_min(0), U.flip(1)
    else:
        M = W @ _cholesky(C, floor)
        energy, V = torch.linalg.eigh(M.T @ M)
        energy, V = energy.flip(0).clamp_min(0), V.flip(1)
        U = (M @ V) / energy.sqrt().clamp_min(1e-300)
    return OutputBasis(U=U, energy=energy)


def _cholesky(C: torch.Tensor, floor: float) -> torch.Tensor:
    """L with L Lᵀ = C + εI. ε starts at `floor` and grows tenfold while rounding leaves C + εI indefinite (a
    gram summed from float32 products is semidefinite only to float32 rounding of its largest eigenvalue)."""
    eye = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    for _ in range(12):
        L, info = torch.linalg.cholesky_ex(C + floor * eye)
        if int(info) == 0:
            return L
        floor *= 10
    raise ValueError("the calibration gram is not positive semidefinite (non-finite inputs?)")


def low_rank_factors(weight: torch.Tensor, basis: OutputBasis, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) in float64 with A = U[:, :rank] and B = Aᵀ W, on the basis' device."""
    A = basis.U[:, :rank]
    B = A.T @ weight.detach().to(device=A.device, dtype=torch.float64)
    return A, B


def rank_for_budget(out_features: int, in_features: int, flop_reduction: float) -> int:
    """The static rank whose A B costs closest to (1 − p) of the dense product: 2r(m+n) ≈ (1 − p) 2mn.
    Rounded to nearest, not down, so that small layers do not all overshoot the cut together."""
    rank = round((1.0 - flop_reduction) * out_features * in_features / (out_features + in_features))
    return max(1, min(rank, min(out_features, in_features)))
