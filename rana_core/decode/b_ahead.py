"""RaNA's B product moved ahead of the RMSNorm it reads, into the o_proj launch (small models, one token).

At one token a RaNA MLP is three dependent products: z = B·RMSNorm(r), then gate's and up's masked A-parts on z
(one GEMV over masked inputs, SwiGLU in its epilogue), then down's masked product. Dense's MLP is two (gate/up,
down). At a small model's sizes a step is bound by its launches, not its bytes (docs/latency.md, session 19: each
launch costs ~1.5-2 µs on an H200 where the bytes RaNA skips are worth ~0.5 µs a layer), so B's launch is what
keeps RaNA slower than dense there. But RMSNorm is a per-token scalar times a per-feature weight g, and the residual
it norms is r = r_in + W_o·a (a: attention's output, r_in: the residual before attention), so

    B·RMSNorm(r) = (1/rms(r)) · z̃,   z̃ = B·diag(g)·r = [B·diag(g)·W_o | B·diag(g)] · [a ; r_in]

and z̃ needs nothing the o_proj launch does not already read. That launch becomes one GEMV over [a ; r_in] whose
first rows are [W_o | I] (the new residual r: the residual add is made there too; the identity's columns are never
read, the GEMV adds r_in to those rows instead) and whose other rows make z̃. The A GEMV scales its coefficients by
1/rms(r) as it loads them (each program sums r's squares itself: 576 values on SmolLM2), then masks them. The MLP
is then two launches after o_proj, as dense's. The price is bytes: B·diag(g)·W_o (2·rank·h more elements a layer,
~0.6 MB on SmolLM2), which is why only small MLPs take it (masked_wide.chain_design's "gemv").

The sums are taken in another order than B after the norm (float32, rounded once), so logits agree with the
reference to rounding, not bit for bit; a coefficient within rounding of its threshold may fall the other way.
RANA_B_AHEAD=1 turns it on (built in session 20, not yet timed: off by default until bench/engine_ab.py says).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from rana_core.decode import masked_wide
from rana_core.decode.gemv import gemv
from rana_core.decode.masked_kernels import use_triton
from rana_core.decode.parts import NeuronPart, RankPart, masked_gemv


@dataclass
class Ahead:
    """What a launch with B ahead leaves for the next section: B's coefficients before the norm's scale (z̃) and
    the residual they were made from (r, (1, hidden)), which the stream holds from then on. It stands where the
    section's normed input would (shape, dtype, device: the residual's)."""
    coefficients: torch.Tensor
    residual: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.residual.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.residual.dtype

    @property
    def device(self) -> torch.device:
        return self.residual.device


def enabled() -> bool:
    choice = os.environ.get("RANA_B_AHEAD", "0")
    if choice not in ("0", "1"):
        raise ValueError(f"RANA_B_AHEAD={choice}: expected 0 or 1")
    return choice == "1"


def rana_mlp(block):
    """The block's RaNA MLP where its B can move into the o_proj launch (an object with gate_up_B, gate_up_rows,
    gate_up_threshold and the gate, up and down parts: the synthetic block itself, or a stored run's RanaMLP with
    SiLU), else None: the option off, another MLP, large rows, or masks being calibrated or counted (those read
    the coefficients in PyTorch)."""
    if not enabled():
        return None
    mlp = getattr(block, "mlp_part", block)
    gate = getattr(mlp, "gate", None)  # a rank part; TEAL's and WINA's input masks (neuron parts) have no B
    if not (isinstance(gate, RankPart) and not isinstance(gate, NeuronPart) and hasattr(mlp, "gate_up_B")
            and hasattr(mlp, "gate_up_rows")):
        return None
    if any(part.calibrating or part.counting for part in (mlp.gate, mlp.up, mlp.down)):
        return None
    if not use_triton(mlp.gate_up_B) or masked_wide.chain_design(mlp.gate_up_rows, mlp.down.rows) != "gemv":
        return None
    return mlp


def rana_qkv(block):
    """The block's RaNA QKV part where its B can move into the launch before it (the previous layer's down, when
    that layer's MLP runs with B ahead too), else None: the option off, another part, biases, large rows, or masks
    being calibrated or counted."""
    if block is None or not enabled():
        return None
    qkv = getattr(block, "qkv", None)
    if not isinstance(qkv, RankPart) or isinstance(qkv, NeuronPart) or block.qkv_bias is not None:
        return None
    if qkv.calibrating or qkv.counting or not use_triton(qkv.B):
        return None
    return qkv if masked_wide.product_design(qkv.rows) == "gemv" else None


def stacked(block, name: str, weight: torch.Tensor, b: torch.Tensor, norm_weight: torch.Tensor) -> torch.Tensor:
    """[[W, I], [B·diag(g)·W, B·diag(g)]] ((out + rank), in + out) for W (out, in), made in float32 once (at the
    first warm-up step, before a graph is captured) and kept on the block as `name`: weights do not change during
    decoding. Rows start on 128 bytes (row stride padded to 64 elements: Triton vectorises the GEMV's loads only for
    a stride divisible by 16)."""
    cached = getattr(block, name, None)
    if cached is None:
        w, b_scaled = weight.float(), b.float() * norm_weight.float()[None, :]
        rows = torch.cat([torch.cat([w, torch.eye(w.shape[0], device=w.device)], dim=1),
                          torch.cat([b_scaled @ w, b_scaled], dim=1)])
        padded = torch.zeros(rows.shape[0], -(-rows.shape[1] // 64) * 64, dtype=weight.dtype, device=weight.device)
        cached = padded[:, : rows.shape[1]]
        cached.copy_(rows)
        setattr(block, name, cached)
    return cached


def _launch(weight: torch.Tensor, x: torch.Tensor, stream, input_mask: tuple | None = None) -> Ahead:
    """One GEMV of a stacked weight over [x ; the stream's residual]: its first rows the new residual (the stream
    holds it from now on; the old buffer is its spare, nothing reads it after this launch), the others z̃."""
    hidden = stream.x.shape[-1]
    out = torch.empty(weight.shape[0], dtype=x.dtype, device=x.device)
    gemv(weight, x.reshape(-1), out, x_tail=stream.x.reshape(-1), tail_rows=True, input_mask=input_mask)
    stream.spare, stream.x = stream.x, out[:hidden][None]
    return Ahead(out[hidden:], stream.x)


def o_proj(block, mlp, attended: torch.Tensor, stream) -> Ahead:
    """The o_proj launch with the MLP's B ahead: r = W_o·a + r_in and z̃ in one GEMV over [a ; r_in]."""
    weight = stacked(block, "_b_ahead_o_proj", block.wo.weight, mlp.gate_up_B, block.mlp_norm.weight)
    return _launch(weight, attended, stream)


def mlp(block, mlp, ahead: Ahead, stream, next_block=None, next_qkv=None):
    """The MLP from B's coefficients made ahead: one GEMV over gate's and up's A-parts that scales z̃ by
    1/rms(r) (RMSNorm's factor, with the MLP norm's eps), masks it and makes silu(gate)·up, then down's masked
    GEMV (parts.swiglu_chain's small-row path, B's launch gone). With the next block's RaNA QKV part, down's launch
    makes that part's B ahead the same way ([W_down | I] and [B·diag(g)·W_down | B·diag(g)] over [masked h ; r],
    down's mask on h only) and returns its Ahead; else down's output (1, hidden)."""
    h = masked_gemv(mlp.gate_up_rows, ahead.coefficients, mlp.gate_up_threshold, None, groups=2,
                    out=torch.empty_like(mlp.gate.out), split=True,
                    input_rms=(ahead.residual.reshape(-1), block.mlp_norm.eps))
    down = mlp.down
    if next_qkv is None:
        return masked_gemv(down.rows, h, down.threshold, down.scale, out=down.out)
    weight = stacked(block, "_b_ahead_down", down.rows.t(), next_qkv.B, next_block.attn_norm.weight)
    return _launch(weight, h, stream, input_mask=(down.threshold, down.scale, False))


def qkv(block, part, ahead: Ahead) -> torch.Tensor:
    """The QKV product from B's coefficients made ahead: one GEMV over the A-part that scales z̃ by 1/rms(r)
    (the attention norm's eps) and masks it (1, qkv_out)."""
    return masked_gemv(part.rows, ahead.coefficients, part.threshold, part.scale,
                       input_rms=(ahead.residual.reshape(-1), block.attn_norm.eps))
