"""One token's residual stream, with the residual add and RMSNorm owed to the next product folded into that
product's GEMV (gemv.gemv's norm prologue) instead of a launch of their own.

A decoder layer adds each section's output to the residual and norms the sum for the next section: add_rmsnorm,
one launch, twice a layer, whose only reader is the next section's first GEMV (the stacked QKV, RaNA's B, the
stacked gate/up, the LM head). `PendingNorm` stands for that normed input: `matvec` hands it to the GEMV, whose
programs each norm the row themselves while program 0 writes the new residual to the stream's other buffer
(the programs still read the old one), and the stream flips. A reader that cannot take it asks for the normed
tensor (`materialize`: add_rmsnorm, in place). Either way a pending norm is used once.

    stream = ResidualStream(x)
    normed = PendingNorm(stream, delta, norm)        # x + delta, normed: owed
    qkv = matvec(weight, normed, "triton")           # one launch: add, norm and product
"""

from __future__ import annotations

import os

import torch

from rana_core.decode.dense_kernels import add_rmsnorm
from rana_core.decode.gemv import gemv


# Up to this hidden size one-token steps fold the norms by default. Measured on an H200 (bench/engine_ab.py,
# bench/results/engine-ab-*fuse-norm*): SmolLM2-135M's shape (576) RaNA −44% 4-5% faster, dense unchanged;
# Llama-2-7B's (4096) dense 1% faster, RaNA 2% slower (each GEMV program norms the whole row itself, 16 KB there).
FOLD_MAX_HIDDEN = 1024


def fuse_norms(hidden: int) -> bool:
    """Whether one-token steps of a model of this hidden size fold the residual add and RMSNorm into the next
    GEMV: RANA_FUSE_NORM = "1", "0", or "auto" (the default: up to FOLD_MAX_HIDDEN)."""
    choice = os.environ.get("RANA_FUSE_NORM", "auto")
    if choice == "auto":
        return hidden <= FOLD_MAX_HIDDEN
    if choice not in ("0", "1"):
        raise ValueError(f"RANA_FUSE_NORM={choice}: expected auto, 0 or 1")
    return choice == "1"


class ResidualStream:
    """The residual x (1, hidden) of one token in one of two buffers; the other receives its next value."""

    def __init__(self, x: torch.Tensor):
        self.x, self.spare = x, torch.empty_like(x)
        self.normed = torch.empty_like(x)


class PendingNorm:
    """RMSNorm(stream.x + delta) · norm.weight, not made yet (delta None: the norm alone)."""

    def __init__(self, stream: ResidualStream, delta: torch.Tensor | None, norm):
        self.stream, self.delta, self.norm = stream, delta, norm
        self.used = False

    @property
    def shape(self) -> torch.Size:
        return self.stream.x.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.stream.x.dtype

    @property
    def device(self) -> torch.device:
        return self.stream.x.device

    def _use(self) -> ResidualStream:
        if self.used:  # a second reader would add delta twice
            raise RuntimeError("a pending norm is used once: materialize it for a product that reads it twice")
        self.used = True
        return self.stream

    def materialize(self) -> torch.Tensor:
        """The normed input as a tensor (the residual updated in place), for readers other than one GEMV."""
        stream = self._use()
        return add_rmsnorm(stream.x, self.delta, self.norm.weight, self.norm.eps, stream.normed)

    def gemv(self, weight: torch.Tensor, swiglu: bool = False, input_mask: tuple | None = None) -> torch.Tensor:
        """weight @ the normed input, the add and the norm made inside the GEMV (1, N); with `input_mask`, the
        normed input masked as gemv's input_mask says (a masked product over every row: TEAL's, WINA's)."""
        stream = self._use()
        out = torch.empty(weight.shape[0] // 2 if swiglu else weight.shape[0], dtype=self.dtype, device=self.device)
        gemv(weight, stream.x[0], out, swiglu=swiglu, input_mask=input_mask,
             norm=(None if self.delta is None else self.delta.reshape(-1), self.norm.weight, self.norm.eps,
                   stream.spare[0]))
        if self.delta is not None:
            stream.x, stream.spare = stream.spare, stream.x
        return out[None]
