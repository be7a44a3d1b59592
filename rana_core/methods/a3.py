"""A3: each layer's QK, OV and MLP cut to a narrower width in closed form
or by a score, from one calibration pass of the dense model, with no extra matrices at run time.

- QK (RoPE models; the variant implemented): per KV group, keep whole rotary pairs, the same for q and k, ranked
  by lam_j = E[q_j²]·E[k_j²] (pre-RoPE second moments, E[q_j²] summed over the group's query heads; both read off
  the input covariance R as w_jᵀ R w_j), a pair scoring lam_a + lam_b. Costs: q and k shrink to r_qk of d_h
  coordinates, the cached keys too, and the dropped frequencies are gone from the score; the softmax keeps the
  original 1/sqrt(d_h) scale. The closed-form no-RoPE QK solution is not implemented (every model here uses RoPE).
- OV (GQA): per group, SVD of [R^{1/2} W_vo,1 | … | R^{1/2} W_vo,g] = (R^{1/2} W_v)[W_o,1 … W_o,g]. With
  T any square factor of W_vᵀ R W_v = TᵀT (from its eigendecomposition), that SVD is the SVD of T [W_o,1 … W_o,g]
  = U S Vᵀ rotated into R^{1/2} W_v's column space, so the rank-r optimum is W̃_v = W_v T⁻¹ U_r (d × r) and
  W̃_o,i = U_rᵀ T W_o,i (r × d): the design's factors (which put the inverse root on the value side only) with
  no d × d root.
- MLP: keep the channels with the largest lam_i = E[h_i²]·‖W_down row i‖², sliced from gate, up and down.
  W_down is not refit (docs/results.md, "A3": a least-squares refit helped too little and too unevenly).

Budget (the project's): a reduction p of the adaptable FLOPs (stacked QKV plus gate/up/down). Per layer a width
costs 2d(H + H_kv) FLOPs per QK coordinate, 2d·H_kv per OV coordinate and 6d per MLP channel, so widths map to
FLOPs exactly. ``uniform`` keeps (1 − p) of every width (r_qk rounded to whole pairs) and absorbs the rounding
in the MLP width; ``greedy`` tabulates each layer/component's local relative error against its width
(dropped pair scores, OV tail energy, MLP output error) and cuts where the least error is added per FLOP
removed (rana_core.allocation.greedy_allocation), then hands leftover FLOPs back as MLP channels; that
allocation, the same greedy run within each part separately, and uniform are then compared on the loss of a
calibration slice and the best kept (see checked_greedy_widths).

Per-layer rows: adapter "a3"; the qkv row's rank is the kept output width of the stacked projection
((H + H_kv)·r_qk + H_kv·r_vo of (H + 2·H_kv)·d_h), the gate/up/down rows' rank the kept MLP channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rana_core.adapters.a3 import A3MLP, A3Attention, kept_coordinates, model_rotary, rotary_pairs
from rana_core.adapters.base import layer_members, unwrapped
from rana_core.allocation import Curve, greedy_allocation
from rana_core.architecture import Shape, attention_parts, layer_attention, layer_mlp
from rana_core.calibration import each_layer_inputs
from rana_core.corpus import windows_digest
from rana_core.errors import BudgetError, RanaError
from rana_core.methods.calibration_check import calibration_slices, least_loss

PARTS = ("qk", "ov", "mlp")
MLP_STEPS = 64  # greedy's MLP width grid: d_ff / 64 channels a step (leftover FLOPs go back channel by channel)
TOLERANCE = 0.01  # the widths must land this close to the budget
CHECK_TOKENS = 2048  # calibration tokens (the last windows) on which greedy's candidates compete


def full_widths(shape: Shape) -> dict[str, int]:
    return {"qk": shape.head_dim, "ov": shape.head_dim, "mlp": shape.intermediate}


def flops_per_width(shape: Shape) -> dict[str, int]:
    """Adaptable FLOPs per token of one unit of each part's width."""
    return {"qk": 2 * shape.hidden * (shape.heads + shape.kv_heads), "ov": 2 * shape.hidden * shape.kv_heads,
            "mlp": 6 * shape.hidden}


def widths_flops(shape: Shape, widths: dict[str, int]) -> int:
    unit = flops_per_width(shape)
    return sum(unit[part] * widths[part] for part in PARTS)


@dataclass
class LayerAnalysis:
    """What one layer's calibration statistics say about each part's width."""

    pair_order: torch.Tensor  # (kv_heads, pairs): pair indices by decreasing score
    pair_scores: torch.Tensor  # (kv_heads, pairs) in that order
    value_factor: torch.Tensor  # (kv_heads, d_h, d_h): W_v T⁻¹ U is W_v @ value_factor[:, :, :r]
    output_factor: torch.Tensor  # (kv_heads, d_h, d_h): Uᵀ T, its first r rows act on W_o,i
    ov_energy: torch.Tensor  # (kv_heads, d_h): squared singular values
    channel_order: torch.Tensor  # (inner,): MLP channels by decreasing lam
    mlp_error_kept: torch.Tensor  # (inner + 1,): relative MLP output error when keeping the first r channels

    def error(self, part: str, width: int) -> float:
        if part == "qk":
            pairs = width // 2
            return float(self.pair_scores[:, pairs:].sum() / self.pair_scores.sum())
        if part == "ov":
            return float(self.ov_energy[:, width:].sum() / self.ov_energy.sum())
        return float(self.mlp_error_kept[width])


def check_supported(loaded) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's rotary pairs, or one RanaError line saying why A3 cannot run on this model (the family table
    says which families it cannot run on; the rotary pairs are then checked on the model itself)."""
    loaded.family.check_method("a3")
    for layer in loaded.layers:  # a family may allow biases by configuration (Llama's attention_bias)
        if any(m.bias is not None for m in layer_members(layer, "qkv")):
            raise RanaError("a3 handles bias-free query/key/value projections only")
    base = unwrapped(layer_attention(loaded.layers[0]))
    shape = loaded.shape
    first, second = rotary_pairs(model_rotary(base), shape.head_dim)
    rotary = getattr(loaded.model.get_decoder(), "rotary_emb", None)
    if rotary is not None:  # a pair must share one frequency, or a narrow rotary could not reproduce it
        device = next(loaded.model.parameters()).device
        positions = torch.arange(64, device=device)[None]
        cos, _ = rotary(torch.zeros(1, 1, dtype=loaded.model.dtype, device=device), positions)
        if not torch.equal(cos[..., first], cos[..., second]):
            raise RanaError("a3: this model's rotary pairs do not share a frequency")
    return first, second


def analyse_layer(layer, attn_gram: torch.Tensor, mlp_gram: torch.Tensor, shape: Shape, first: torch.Tensor,
                  second: torch.Tensor) -> LayerAnalysis:
    R = attn_gram.double()
    # the statistics are float64 where calibration ran; the weights may rest elsewhere
    q, k, v = (m.weight.detach().to(R.device).double() for m in layer_members(layer, "qkv"))
    o = attention_parts(unwrapped(layer_attention(layer)))[3].weight.detach().to(R.device).double()
    d_h, group = shape.head_dim, shape.heads // shape.kv_heads
    q_moment = ((q @ R) * q).sum(1).view(shape.heads, d_h)  # E[q_j²]·tokens, pre-RoPE, per head
    k_moment = ((k @ R) * k).sum(1).view(shape.kv_heads, d_h)
    lam = q_moment.view(shape.kv_heads, group, d_h).sum(1) * k_moment
    scores = lam[:, first] + lam[:, second]
    pair_scores, pair_order = scores.sort(dim=1, descending=True)

    # every KV group at once, batched over the groups
    v_heads = v.view(shape.kv_heads, d_h, -1).transpose(1, 2)  # (kv, d, d_h)
    o_cat = o.view(o.shape[0], shape.kv_heads, group * d_h).permute(1, 2, 0)  # (kv, group·d_h, d): W_o,i stacked
    o_cat = o_cat.reshape(shape.kv_heads, group, d_h, -1).transpose(1, 2).reshape(shape.kv_heads, d_h, -1)
    evals, evecs = torch.linalg.eigh(v_heads.transpose(1, 2) @ R @ v_heads)
    evals = torch.maximum(evals, evals.amax(1, keepdim=True) * 1e-12)
    T, T_inv = evals.sqrt()[:, :, None] * evecs.transpose(1, 2), evecs / evals.sqrt()[:, None, :]
    U, S, _ = torch.linalg.svd(T @ o_cat, full_matrices=False)
    value_factor, output_factor, energy = T_inv @ U, U.transpose(1, 2) @ T, S.square()

    down = layer_members(layer, "down")[0].weight.detach().to(R.device).double().T  # inner × d: row i, channel i's output
    H = mlp_gram.to(R.device).double()
    lam_mlp = H.diagonal() * down.square().sum(1)
    channel_order = lam_mlp.argsort(descending=True)
    # ‖H_D W_D‖² for a dropped set D is 1ᵀ_D (R_h ∘ W Wᵀ) 1_D: prefix sums along the drop order
    # give the error at every width.
    cross = H * (down @ down.T)
    dropping = channel_order.flip(0)
    tail = cross[dropping][:, dropping].cumsum(0).cumsum(1).diagonal()  # error after dropping 1, 2, … channels
    error_kept = torch.cat([tail.flip(0), tail.new_zeros(1)]) / cross.sum()  # index r: keep the first r
    # the orders index CPU tensors (the rotary pairs) and resting weights: they are small, kept on the CPU
    return LayerAnalysis(pair_order.cpu(), pair_scores.cpu(), value_factor, output_factor, energy,
                         channel_order.cpu(), error_kept.float().cpu())


def analyse(loaded, calib_windows, progress) -> list[LayerAnalysis]:
    first, second = check_supported(loaded)
    shape = loaded.shape
    analyses = []
    for index, stats in each_layer_inputs(loaded, calib_windows, lambda f, m: progress(0.9 * f, f"calibration {m}"),
                                          inputs=("attention", "down")):
        analyses.append(analyse_layer(loaded.layers[index], stats["attention"].gram, stats["down"].gram, shape,
                                      first, second))
    return analyses


def uniform_widths(shape: Shape, layers: int, flop_reduction: float) -> dict[tuple[int, str], int]:
    keep = 1.0 - flop_reduction
    qk = min(shape.head_dim, max(2, 2 * round(keep * shape.head_dim / 2)))
    ov = min(shape.head_dim, max(1, round(keep * shape.head_dim)))
    target = keep * widths_flops(shape, full_widths(shape))
    attention = widths_flops(shape, {"qk": qk, "ov": ov, "mlp": 0})
    mlp = min(shape.intermediate, max(1, round((target - attention) / flops_per_width(shape)["mlp"])))
    return {(i, part): width for i in range(layers) for part, width in (("qk", qk), ("ov", ov), ("mlp", mlp))}


def greedy_widths(shape: Shape, analyses: list[LayerAnalysis], flop_reduction: float,
                  across_parts: bool = True) -> dict[tuple[int, str], int]:
    """Widths from the local error curves. `across_parts`: one greedy over every layer's QK, OV and MLP; without
    it, one greedy per part (each part cut by the budget, spread over the layers), since relative errors of a
    score, an attention output and an MLP output are not one currency."""
    full, unit = full_widths(shape), flops_per_width(shape)
    step = {"qk": 2, "ov": 1, "mlp": max(1, shape.intermediate // MLP_STEPS)}
    curves = {}
    for i, analysis in enumerate(analyses):
        for part in PARTS:
            widths = list(range(full[part], step[part] - 1, -step[part]))
            curves[(i, part)] = Curve(unit[part] * full[part], [w / full[part] for w in widths],
                                      lambda keep, a=analysis, p=part: a.error(p, round(keep * full[p])))
    if across_parts:
        keeps = greedy_allocation(curves, flop_reduction)
    else:
        keeps = {}
        for part in PARTS:
            keeps |= greedy_allocation({key: c for key, c in curves.items() if key[1] == part}, flop_reduction)
    widths = {key: round(keep * full[key[1]]) for key, keep in keeps.items()}
    # greedy stops at the first step under budget: hand the overshoot back, channel by channel, to the MLPs
    # that lose most
    slack = (1.0 - flop_reduction) * len(analyses) * widths_flops(shape, full) - sum(
        unit[part] * w for (_, part), w in widths.items())
    for i in sorted(range(len(analyses)), key=lambda i: -analyses[i].error("mlp", widths[(i, "mlp")])):
        extra = min(int(slack // unit["mlp"]), full["mlp"] - widths[(i, "mlp")])
        widths[(i, "mlp")] += extra
        slack -= extra * unit["mlp"]
    return widths


def model_adapters(loaded, analyses, widths, first, second, shape) -> list:
    """Every layer's A3 adapters at `widths` (not injected)."""
    adapters = []
    for index, (layer, analysis) in enumerate(zip(loaded.layers, analyses)):
        adapters += layer_adapters(layer, index, analysis, {part: widths[(index, part)] for part in PARTS},
                                   first, second, shape)
    return adapters


def checked_greedy_widths(loaded, analyses, flop_reduction, first, second, shape, calib_windows, progress):
    """Greedy across parts, greedy within each part, and uniform, compared on the language-model loss of a
    calibration slice: the local errors misjudge how much each part's error costs the model (measured on
    SmolLM2-135M at 0.2: greedy across parts alone 108 held-out perplexity, uniform 76), so the check keeps
    whichever candidate loses least, and greedy is never worse than uniform on calibration text."""
    _, check = calibration_slices(calib_windows, 0, CHECK_TOKENS)
    candidates = {"greedy across parts": greedy_widths(shape, analyses, flop_reduction),
                  "greedy within parts": greedy_widths(shape, analyses, flop_reduction, across_parts=False),
                  "uniform": uniform_widths(shape, len(analyses), flop_reduction)}
    chosen, _ = least_loss(loaded, {name: lambda w=widths: model_adapters(loaded, analyses, w, first, second, shape)
                                    for name, widths in candidates.items()},
                           check, lambda f, m: progress(0.9 + 0.09 * f, m), what="widths")
    return candidates[chosen]


def layer_adapters(layer, index: int, analysis: LayerAnalysis, widths: dict[str, int], first: torch.Tensor,
                   second: torch.Tensor, shape: Shape) -> list:
    attention = unwrapped(layer_attention(layer))
    d_h, group, r_qk, r_vo = shape.head_dim, shape.heads // shape.kv_heads, widths["qk"], widths["ov"]
    coords = torch.stack([kept_coordinates(first, second, analysis.pair_order[j, : r_qk // 2])
                          for j in range(shape.kv_heads)])
    # the analysis is where calibration ran; A3Attention moves what it keeps to the layer's device
    v, o = (m.weight.detach().to(analysis.value_factor.device).double() for m in attention_parts(attention)[2:])
    v_rows, o_cols = [], []
    for j in range(shape.kv_heads):
        v_rows.append(analysis.value_factor[j][:, :r_vo].T @ v[j * d_h:(j + 1) * d_h])  # r_vo × d
        for h in range(j * group, (j + 1) * group):
            o_cols.append(o[:, h * d_h:(h + 1) * d_h] @ analysis.output_factor[j][:r_vo].T)  # d × r_vo
    channels = analysis.channel_order[: widths["mlp"]].sort().values
    return [A3Attention(attention, index, coords, torch.cat(v_rows), torch.cat(o_cols, dim=1)),
            A3MLP(unwrapped(layer_mlp(layer)), index, channels)]


def build(loaded, calib_windows, config, progress, cache_dir=None):
    p = config.flop_reduction
    if p == 0:
        return []
    first, second = check_supported(loaded)
    shape = loaded.shape
    analyses = loaded.cached(("a3 analysis", windows_digest(calib_windows)),
                             lambda: analyse(loaded, calib_windows, progress))
    if config.allocation == "greedy":
        widths = checked_greedy_widths(loaded, analyses, p, first, second, shape, calib_windows, progress)
    else:
        widths = uniform_widths(shape, len(analyses), p)
    dense = len(analyses) * widths_flops(shape, full_widths(shape))
    achieved = 1.0 - sum(flops_per_width(shape)[part] * w for (_, part), w in widths.items()) / dense
    if abs(achieved - p) > TOLERANCE:
        raise BudgetError(f"a3 cannot reach a {p:.0%} FLOP reduction on this model (widths give {achieved:.1%})")
    adapters = model_adapters(loaded, analyses, widths, first, second, shape)
    progress(1.0, f"a3 widths: FLOPs −{achieved:.1%}")
    return adapters
