"""The parts of a decode engine's layer: RaNA's rank adapter and neuron adapter at decode time (each token's mask
computed from its own coefficients, the masked rows read by the Triton kernels of masked_kernels), the RMSNorm,
and the one-token product `matvec`; with the helpers that build them from random weights of a shape.

block.py assembles them into Llama-shaped blocks, engine.py those into a CUDA-graphed decode step; from_model.py,
gemma.py and narrow.py build the same parts from a stored run's weights and adapters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rana_core.decode import masked_wide
from rana_core.decode.dense_kernels import rmsnorm_reference
from rana_core.decode.gemv import gemv, gemv_programs
from rana_core.decode.masked_kernels import (masked_rows_batched, masked_rows_gemv, masked_rows_partials,
                                             masked_rows_reduced, use_triton)
from rana_core.decode.mlp_branches import branched_swiglu_chain, mlp_branches
from rana_core.decode.residual import PendingNorm

def rank_plan(out_features: int, in_features: int, keep: float) -> tuple[int, float]:
    """(static rank r, active ranks k) spending `keep` of the dense FLOPs, half on B (2·n·r) and half on the
    active columns of A (2·m·k): the split RaNA's coverage search tends to land near on real layers."""
    rank = max(1, min(min(out_features, in_features), round(keep * out_features / 2)))
    active = (keep * out_features * in_features - in_features * rank) / out_features
    return rank, max(0.0, min(float(rank), active))

class RankPart(nn.Module):
    """RaNA's rank adapter at decode: z = B x, then y = Σ_{z_k² ≥ τ} z_k A[:, k] (rows of Aᵀ, one per rank)."""

    def __init__(self, out_features: int, in_features: int, keep: float, dtype, device, generator):
        super().__init__()
        self.rank, self.target_active = rank_plan(out_features, in_features, keep)
        self.out_features, self.in_features = out_features, in_features
        self.B = nn.Parameter(_random((self.rank, in_features), in_features, dtype, device, generator),
                              requires_grad=False)
        self.rows = nn.Parameter(_random((self.rank, out_features), self.rank, dtype, device, generator),
                                 requires_grad=False)  # Aᵀ: rank k is the contiguous row k
        self._mask_state(0.0)  # the threshold is on |z|, i.e. √τ

    scale = None  # per-row factors of the mask score (the neuron adapter's column norms)

    @classmethod
    def of(cls, B: torch.Tensor, rows: torch.Tensor, threshold: float, target_active: float) -> "RankPart":
        """A part from given tensors: B (r, n), rows = Aᵀ (r, m), the threshold on |z| (√τ of a rank adapter)."""
        part = cls.__new__(cls)
        nn.Module.__init__(part)
        part.rank, part.target_active = rows.shape[0], target_active
        part.out_features, part.in_features = rows.shape[1], B.shape[1]
        part.B = nn.Parameter(B.contiguous(), requires_grad=False)
        part.rows = nn.Parameter(rows.contiguous(), requires_grad=False)
        part._mask_state(threshold)
        return part

    def _mask_state(self, threshold: float) -> None:
        """The threshold buffer (a graph replay reads it), the output buffer the kernel writes, no counting yet."""
        device = self.rows.device
        self.register_buffer("threshold", torch.tensor([threshold], dtype=torch.float32, device=device))
        self.register_buffer("out", torch.zeros(self.out_features, dtype=self.rows.dtype, device=device))
        self.calibrating = self.counting = False
        self.active_sum, self.counted_tokens = 0.0, 0

    def scores(self, z: torch.Tensor) -> torch.Tensor:
        return z.float().abs() if self.scale is None else z.float().abs() * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(F.linear(x, self.B))

    def fusable(self, z: torch.Tensor) -> bool:
        """Whether this token's product may run as raw kernels whose partial sums the next kernel adds up: one
        token on Triton, and neither calibrating nor counting (those read the coefficients in PyTorch)."""
        return z.shape[0] == 1 and use_triton(z) and not (self.calibrating or self.counting)

    def expand(self, z: torch.Tensor) -> torch.Tensor:
        """The A-part: from the coefficients z = B x to the output, through the mask."""
        if self.calibrating:
            _set_threshold(self.threshold, self.scores(z), self.target_active)
        if self.counting:
            self.active_sum += (self.scores(z) >= self.threshold).sum().item()
            self.counted_tokens += z.shape[0]
        if z.shape[0] == 1:
            return masked_rows_gemv(self.rows, z[0], self.threshold, self.scale, out=self.out)[None]
        return masked_rows_batched(self.rows, z, self.threshold, self.scale).to(z.dtype)

    def flops_per_token(self) -> float:
        active = self.active_sum / max(self.counted_tokens, 1)
        return 2.0 * (self.in_features * self.rank + self.out_features * active)

    def elements_per_token(self) -> float:
        """Weights read per token: B, and the rows of the active ranks."""
        return self.B.numel() + self.active_sum / max(self.counted_tokens, 1) * self.out_features

class NeuronPart(RankPart):
    """RaNA's neuron adapter for W_down at decode: y = Σ_{|h_j|·‖W_down[:, j]‖ ≥ τ} h_j W_down[:, j]."""

    def __init__(self, out_features: int, in_features: int, keep: float, dtype, device, generator):
        nn.Module.__init__(self)
        self.rank, self.target_active = in_features, keep * in_features
        self.out_features, self.in_features = out_features, in_features
        self.rows = nn.Parameter(_random((in_features, out_features), in_features, dtype, device, generator),
                                 requires_grad=False)  # W_downᵀ: neuron j is the contiguous row j
        self.register_buffer("norms", self.rows.float().norm(dim=1))
        self._mask_state(0.0)

    @property
    def scale(self) -> torch.Tensor:
        return self.norms

    @classmethod
    def of(cls, down_weight: torch.Tensor, norms: torch.Tensor | None, threshold: float,
           target_active: float) -> "NeuronPart":
        """A part from W_down (m, n) and the column norms its mask scores use (as the PyTorch adapter has them).
        Any linear whose *inputs* are masked is this part: TEAL's (norms None: the score is |x_j|) and WINA's."""
        part = cls.__new__(cls)
        nn.Module.__init__(part)
        part.out_features, part.in_features = down_weight.shape
        part.rank, part.target_active = part.in_features, target_active
        part.rows = nn.Parameter(down_weight.t().contiguous(), requires_grad=False)
        part.register_buffer("norms", None if norms is None else norms.float().contiguous())
        part._mask_state(threshold)
        return part

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.expand(h)  # no B: the coefficients are h itself

    def flops_per_token(self) -> float:
        return 2.0 * self.out_features * self.active_sum / max(self.counted_tokens, 1)

    def elements_per_token(self) -> float:
        return self.out_features * self.active_sum / max(self.counted_tokens, 1)

def swiglu_chain(gate_up_rows: torch.Tensor, coeff: torch.Tensor, gate_up_threshold: torch.Tensor,
                 down: NeuronPart, h: torch.Tensor, scale: torch.Tensor | None = None,
                 shared_coeff: bool = False, residual: tuple | None = None) -> torch.Tensor:
    """One token's masked SwiGLU MLP in the fewest launches: (1, M).

    Large rows (masked_wide.chain_design): gate's and up's masked products as two groups of one compaction and one
    gather (rows stacked, one threshold each; `shared_coeff`: both read the same coefficients), then down's
    compaction makes h = silu(gate)·up from their partial sums (written to `h`) and lists its neurons, its gather
    and one reduction. Small rows: two GEMVs over every row of the parts' matrices (cached transposes of their
    rows), the masks applied to their inputs: h from gate/up, then down; the same sums, two launches.

    `residual` = (r, out): the down product's last launch adds the residual r, writing r + the MLP's output to
    out, and what returns is that launch's sums of squares for the next norm (residual.ResidualStream.add_by).
    RANA_MLP_BRANCHES > 1: the list design's chain in branches side by side (mlp_branches)."""
    r, out = residual if residual is not None else (None, down.out)
    if masked_wide.chain_design(gate_up_rows, down.rows) == "gemv":
        h = masked_gemv(gate_up_rows, coeff, gate_up_threshold, scale, groups=2, out=h, split=not shared_coeff)
        return masked_down(down, h, residual)
    branches = mlp_branches()
    if branches > 1 and masked_wide.design(gate_up_rows) == masked_wide.design(down.rows) == "list":
        return branched_swiglu_chain(gate_up_rows, coeff, gate_up_threshold, down, h, scale, shared_coeff,
                                     residual, branches)
    partial, splits = masked_rows_partials(gate_up_rows, coeff, gate_up_threshold, scale, groups=2,
                                           shared_coeff=shared_coeff)
    reduced = masked_rows_reduced(down.rows, h, down.threshold, down.scale, out, swiglu_of=(partial, splits),
                                  residual=r)
    return reduced if r is not None else reduced[None]


def masked_down(down: NeuronPart, h: torch.Tensor, residual: tuple | None = None) -> torch.Tensor:
    """Down's masked product of h as one GEMV over every row: (1, M) in down.out, or with `residual` = (r, out)
    r + down(h) written to out and its programs' sums of squares returned (residual.ResidualStream.add_by)."""
    if residual is None:
        return masked_gemv(down.rows, h, down.threshold, down.scale, out=down.out)
    r, out = residual
    K, M = down.rows.shape
    sums = torch.empty(gemv_programs(M, K), dtype=torch.float32, device=out.device)
    masked_gemv(down.rows, h, down.threshold, down.scale, out=out, residual=(r, sums))
    return sums


def adding_residual(residual, rows: torch.Tensor, product) -> torch.Tensor | None:
    """product(): a section's output; or, where the residual stream `residual` (None off the one-token path) can
    add a product over `rows`, product(residual=(r, out)) through its add_by: the product's last launch adds the
    residual and leaves the sums for the next norm, and None returns."""
    if residual is not None and residual.can_add(rows):
        return residual.add_by(lambda r, out: product(residual=(r, out)))
    return product()


def masked_gemv(rows: torch.Tensor, x, threshold: torch.Tensor, scale: torch.Tensor | None, groups: int = 1,
                out: torch.Tensor | None = None, split: bool = False, residual: tuple | None = None) -> torch.Tensor:
    """One token's masked product(s) over `rows` (groups·K, M) as a GEMV over every row, the mask on the input:
    (1, M), or with two groups silu(gate)·up of gate's and up's products (of the same input, or with `split` of
    x's two halves: their own coefficients). `x` holds K (2K) values, or is a norm still owed
    (residual.PendingNorm), which the GEMV then makes itself. `residual` (one group, x a tensor): gemv's."""
    columns = _columns(rows, groups)
    input_mask = (threshold, scale, split)
    if isinstance(x, PendingNorm):
        return x.gemv(columns, swiglu=groups == 2, input_mask=input_mask)
    if out is None:
        out = torch.empty(columns.shape[0] // groups, dtype=x.dtype, device=x.device)
    return gemv(columns, x.reshape(-1), out, swiglu=groups == 2, input_mask=input_mask, residual=residual)[None]


def _columns(rows: torch.Tensor, groups: int) -> torch.Tensor:
    """The matrices whose rows `rows` stacks transposed, as one row-major GEMV weight: rows (groups·K, M) → (groups·M,
    K), group by group, each row starting on 128 bytes (the row stride padded to 64 elements: Triton vectorises the
    GEMV's loads only for a stride divisible by 16, and ranks such as 360 are not; measured on an H200, session
    19). Made once per weight (first at a warm-up step, before a graph is captured) and kept while the weight
    lives: weights do not change during decoding."""
    name = f"_rana_columns_{groups}"  # kept on the weight itself: it lives and dies with it
    columns = getattr(rows, name, None)
    if columns is None:
        K = rows.shape[0] // groups
        padded = torch.zeros(groups * rows.shape[1], -(-K // 64) * 64, dtype=rows.dtype, device=rows.device)
        columns = padded[:, :K]
        columns.copy_(torch.cat([part.t() for part in rows.chunk(groups)]))
        setattr(rows, name, columns)
    return columns


def _set_threshold(threshold: torch.Tensor, scores: torch.Tensor, target_active: float) -> None:
    """The threshold that keeps `target_active` entries per token on average over these tokens."""
    flat = scores.reshape(-1)
    count = int(round(target_active * scores.shape[0]))
    if count <= 0:
        threshold.fill_(float("inf"))
    elif count >= flat.numel():
        threshold.fill_(0.0)
    else:
        threshold.copy_(torch.topk(flat, count).values[-1:])

def _random(shape, fan_in, dtype, device, generator) -> torch.Tensor:
    return (torch.randn(shape, generator=generator, device=device) / math.sqrt(fan_in)).to(dtype)

def _linear(out_features, in_features, dtype, device, generator) -> nn.Linear:
    layer = nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype)
    layer.weight.requires_grad_(False)
    layer.weight.copy_(_random((out_features, in_features), in_features, dtype, device, generator))
    return layer

class RMSNorm(nn.Module):
    def __init__(self, size: int, dtype, device, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype, device=device), requires_grad=False)
        self.eps = eps

    def forward(self, x):
        return rmsnorm_reference(x, self.weight, self.eps)

def _join(first: nn.Module, second: nn.Module, name: str) -> torch.Tensor:
    """One tensor holding both parts' `name` stacked along dim 0, each in a slot of the larger one's rows (the
    smaller padded with zeros: a run's RaNA gate and up may differ in rank); each part's attribute becomes a view
    of its own rows in it (so a threshold set on a part is the one a joint launch reads)."""
    values = (getattr(first, name), getattr(second, name))
    parameter = isinstance(values[0], nn.Parameter)  # weights stay parameters, buffers plain tensors
    size = max(value.shape[0] for value in values)
    joint = torch.zeros((2 * size, *values[0].shape[1:]), dtype=values[0].dtype, device=values[0].device)
    for index, (part, value) in enumerate(zip((first, second), values)):
        joint[index * size: index * size + value.shape[0]] = value
        delattr(part, name)
        setattr(part, name, joint[index * size: index * size + value.shape[0]])
    return nn.Parameter(joint, requires_grad=False) if parameter else joint

GEMV_BACKENDS = ("cublas", "triton")  # torch's product, or rana_core.decode_kernels.gemv; bench/latency.py compares

def matvec(weight: torch.Tensor, x: torch.Tensor, backend: str = "cublas", swiglu: bool = False) -> torch.Tensor:
    """x Wᵀ: at one token through the chosen GEMV backend, else one batched product. With `swiglu`, W is
    [gate; up] and the result silu(x gateᵀ) · (x upᵀ) (fused into the Triton GEMV). `x` may be a norm still owed
    (residual.PendingNorm): the Triton GEMV then makes it itself."""
    if isinstance(x, PendingNorm):
        if backend == "triton" and use_triton(weight):
            return x.gemv(weight, swiglu)
        x = x.materialize()
    if x.shape[0] == 1 and backend == "triton" and use_triton(weight):
        out = torch.empty(weight.shape[0] // 2 if swiglu else weight.shape[0], dtype=x.dtype, device=x.device)
        return gemv(weight, x[0], out, swiglu=swiglu)[None]
    if swiglu:
        gate, up = F.linear(x, weight).chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.linear(x, weight)
