"""Data-aware decomposition of a linear layer (RaNA's first step).

With calibration inputs X (n × T) and C = X Xᵀ, the outputs W X have covariance W C Wᵀ. Its eigenvectors U are the
output directions the data actually uses, ordered by the energy they carry. A = U (m × r) and B = Uᵀ W (r × n)
give A B x, the projection of W x on the top r directions. Everything is computed in float64 whatever the model's
dtype. C's eigenvalues are floored at a tiny share of their mean, so that directions the calibration data never
visits (fewer tokens than features, or rounding below zero) still complete the basis, ranked last.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EIGEN_FLOOR = 1e-6  # relative to the mean eigenvalue of C


@dataclass
class OutputBasis:
    U: torch.Tensor  # m × min(m, n), orthonormal columns, float64
    energy: torch.Tensor  # squared singular values of W C^½: output energy per direction, decreasing


def output_basis(weight: torch.Tensor, gram: torch.Tensor) -> OutputBasis:
    W = weight.detach().to(device="cpu", dtype=torch.float64)
    C = gram.to(dtype=torch.float64)
    eigvals, Q = torch.linalg.eigh(C)
    floor = EIGEN_FLOOR * max(eigvals.mean().item(), 1e-30)
    root = Q * eigvals.clamp_min(floor).sqrt()  # C ≈ root rootᵀ
    U, S, _ = torch.linalg.svd(W @ root, full_matrices=False)
    return OutputBasis(U=U, energy=S.pow(2))


def low_rank_factors(weight: torch.Tensor, basis: OutputBasis, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) in float64 with A = U[:, :rank] and B = Aᵀ W."""
    A = basis.U[:, :rank]
    B = A.T @ weight.detach().to(device="cpu", dtype=torch.float64)
    return A, B


def rank_for_budget(out_features: int, in_features: int, flop_reduction: float) -> int:
    """The static rank whose A B costs closest to (1 − p) of the dense product: 2r(m+n) ≈ (1 − p) 2mn.
    Rounded to nearest, not down, so that small layers do not all overshoot the cut together."""
    rank = round((1.0 - flop_reduction) * out_features * in_features / (out_features + in_features))
    return max(1, min(rank, min(out_features, in_features)))
