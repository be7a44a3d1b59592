"""One token's residual stream, with the residual add and RMSNorm owed to the next product folded into that
product's GEMV (gemv.gemv's norm prologue) instead of a launch of their own.

A decoder layer adds each section's output to the residual and norms the sum for the next section: add_rmsnorm,
one launch, twice a layer, whose only reader is the next section's first GEMV (the stacked QKV, RaNA's B, the
stacked gate/up, the LM head). `PendingNorm` stands for that normed input: `matvec` hands it to the GEMV, whose
programs each norm the row themselves while program 0 writes the new residual to the stream's other buffer
(the programs still read the old one), and the stream flips. A reader that cannot take it asks for the normed
tensor (`materialize`: add_rmsnorm, in place). Either way a pending norm is used once.

By default (RANA_FUSE_NORM=sums) the launch that ends a section adds the residual itself where it can: o_proj's or
dense down's GEMV (`ResidualStream.add`: gemv's `residual`), or the reduction of RaNA's masked down product
(`add_by`), each of its programs leaving the sum of squares of its rows, so the next GEMV's programs read those sums
(4 bytes a program) instead of the whole row for 1/rms. Measured on an H200 (bench/engine_ab.py,
bench/results/engine-ab-norm-sums-*): Llama-2-7B shape dense and RaNA −44/−50% 3.0-3.6% faster per step than
add_rmsnorm's launches, SmolLM2-135M shape 2.0-4.2% faster than the row fold alone.

    stream = ResidualStream(x)
    normed = PendingNorm(stream, delta, norm)        # x + delta, normed: owed
    qkv = matvec(weight, normed, "triton")           # one launch: add, norm and product
"""

from __future__ import annotations

import os

import torch

from rana_core.decode.dense_kernels import add_rmsnorm
from rana_core.decode.gemv import gemv, gemv_programs
from rana_core.decode.launch import use_triton


# Up to this hidden size one-token steps fold the norms by default. Measured on an H200 (bench/engine_ab.py,
# bench/results/engine-ab-*fuse-norm*): SmolLM2-135M's shape (576) RaNA −44% 4-5% faster, dense unchanged;
# Llama-2-7B's (4096) dense 1% faster, RaNA 2% slower (each GEMV program norms the whole row itself, 16 KB there).
FOLD_MAX_HIDDEN = 1024


def fuse_norms(hidden: int) -> bool:
    """Whether one-token steps of a model of this hidden size fold the residual add and RMSNorm into the next
    GEMV: RANA_FUSE_NORM = "1", "0", "auto" (up to FOLD_MAX_HIDDEN), or "sums" (the default: as auto, and the
    sections' last GEMVs add the residual: sums_from_producers)."""
    choice = _fold_choice()
    if choice in ("auto", "sums"):
        return hidden <= FOLD_MAX_HIDDEN
    return choice == "1"


def sums_from_producers() -> bool:
    """RANA_FUSE_NORM=sums (the default): a section's last launch adds the residual and leaves its rows' sums of
    squares for the next norm, folded into the next GEMV (ResidualStream.add, add_by); "auto" is session 15's
    default (the row fold up to FOLD_MAX_HIDDEN, add_rmsnorm's launches above it)."""
    return _fold_choice() == "sums"


def _fold_choice() -> str:
    choice = os.environ.get("RANA_FUSE_NORM", "sums")
    if choice not in ("auto", "0", "1", "sums"):
        raise ValueError(f"RANA_FUSE_NORM={choice}: expected auto, 0, 1 or sums")
    return choice


class ResidualStream:
    """The residual x (1, hidden) of one token in one of two buffers; the other receives its next value."""

    def __init__(self, x: torch.Tensor):
        self.x, self.spare = x, torch.empty_like(x)
        self.normed = torch.empty_like(x)
        self.sums = None  # the sums of squares of x that the GEMV which made it left (add), until a norm takes them

    def can_add(self, weight: torch.Tensor) -> bool:
        """Whether `add` can make this product (one token, on the Triton GEMV)."""
        return self.x.shape[0] == 1 and use_triton(weight)

    def add(self, weight: torch.Tensor, a: torch.Tensor) -> None:
        """x ← x + weight @ a by one GEMV (gemv's `residual`): add_by."""

        def product(r: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            sums = torch.empty(gemv_programs(*weight.shape), dtype=torch.float32, device=weight.device)
            gemv(weight, a.reshape(-1), out, residual=(r, sums))
            return sums
        self.add_by(product)

    def add_by(self, product) -> None:
        """x ← product(x, out): a product whose last launch adds the residual x to its result, writes the sum to
        out (the other buffer) and returns its programs' sums of squares, kept for the next norm (owed); the
        stream flips."""
        sums = product(self.x[0], self.spare[0])
        self.x, self.spare, self.sums = self.spare, self.x, sums

    def owed(self, delta: torch.Tensor | None, norm) -> "PendingNorm":
        """The next norm, owed: of x + delta, or (delta None after add) of x from the sums add left."""
        sums, self.sums = self.sums, None
        if sums is not None and delta is not None:
            raise RuntimeError("the residual was added by its product's GEMV: no delta is owed")
        return PendingNorm(self, delta, norm, sums)


class PendingNorm:
    """RMSNorm(stream.x + delta) · norm.weight, not made yet (delta None: the norm alone; with `sums`, of x whose
    sums of squares the GEMV that made it left)."""

    def __init__(self, stream: ResidualStream, delta: torch.Tensor | None, norm, sums: torch.Tensor | None = None):
        self.stream, self.delta, self.norm, self.sums = stream, delta, norm, sums
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
        if self.sums is not None:
            gemv(weight, stream.x[0], out, swiglu=swiglu, input_mask=input_mask,
                 norm=(None, self.norm.weight, self.norm.eps, None), norm_sums=self.sums)
            return out[None]
        gemv(weight, stream.x[0], out, swiglu=swiglu, input_mask=input_mask,
             norm=(None if self.delta is None else self.delta.reshape(-1), self.norm.weight, self.norm.eps,
                   stream.spare[0]))
        if self.delta is not None:
            stream.x, stream.spare = stream.spare, stream.x
        return out[None]
