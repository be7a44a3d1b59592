"""The one-token GEMV of the decode engine: y = W x for a row-major W at batch 1, in Triton, with its PyTorch form.

Every product of a step that reads all of its rows runs here: the dense projections, the LM head, RaNA's B, and
at small models' sizes the masked products as GEMVs over masked inputs. Options fold the launches around a product
into it (each a constexpr flag: a variant compiles only where it is used):

- `swiglu`: W is [gate; up], the output silu(gate x)·(up x); with `tau`, CATS's neuron mask on silu(gate x);
- `norm`: the input is RMSNorm(x + delta) of the residual x, made by every program (residual.py says when), or
  RMSNorm(x) from the sums of squares a `residual` GEMV left (`norm_sums`: 4 bytes a program, not the whole row);
- `residual`: the output is the residual's next value x + W a, each program leaving its rows' sum of squares;
- `input_mask`: the input masked by a threshold (and per-input scale) first, a masked product over every row;
- early weights: each program's first weight chunk loaded before its wait for the launch before (PDL).

Rounding follows the unfused PyTorch code, as in dense_kernels. On a CPU without TRITON_INTERPRET=1 the PyTorch
form runs. Faster than cuBLAS at batch 1 at every shape measured (bench/gemv_configs.py, bench/results/).
"""

from __future__ import annotations

import math
import os

import torch

from rana_core.decode.dense_kernels import rmsnorm_reference
from rana_core.decode.launch import interpreting, launch_ints, pdl, triton, use_triton

if triton is not None:
    import triton.language as tl

    from rana_core.decode.launch import await_inputs
    from rana_core.decode.masked_kernels import active_of, swiglu

    @triton.jit
    def _weight_chunk(w_ptr, offs_n, n_ok, stride_n, k0, K: tl.constexpr, BLOCK_K: tl.constexpr):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        return tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_n + offs_k[None, :],
                       mask=n_ok[:, None] & (offs_k < K)[None, :], other=0.0)

    @triton.jit
    def _input_loads(x_ptr, offs_k, K: tl.constexpr, NORM: tl.constexpr, delta_ptr, norm_w_ptr,
                     HAS_DELTA: tl.constexpr):
        """The loads of _input_chunk: x[offs_k] in float32 (with NORM and HAS_DELTA, x + delta rounded to x's
        dtype) and the norm's weights there (1 without NORM)."""
        ok = offs_k < K
        x = tl.load(x_ptr + offs_k, mask=ok, other=0.0).to(tl.float32)
        weight = 1.0
        if NORM:
            if HAS_DELTA:
                x = (x + tl.load(delta_ptr + offs_k, mask=ok, other=0.0).to(tl.float32)).to(x_ptr.dtype.element_ty)
                x = x.to(tl.float32)
            weight = tl.load(norm_w_ptr + offs_k, mask=ok, other=0.0).to(tl.float32)
        return x, weight

    @triton.jit
    def _input_value(x, weight, offs_k, K: tl.constexpr, NORM: tl.constexpr, inv_rms, dtype, MASK_IN: tl.constexpr,
                     g, tau_ptr, scale_ptr, HAS_SCALE: tl.constexpr):
        """The arithmetic of _input_chunk on its loads."""
        if NORM:
            x = ((x * inv_rms).to(dtype).to(tl.float32) * weight).to(dtype).to(tl.float32)
        if MASK_IN:
            ok = offs_k < K
            x = tl.where(active_of(x, offs_k, ok, g, scale_ptr, tl.load(tau_ptr + g), K, HAS_SCALE), x, 0.0)
        return x

    @triton.jit
    def _input_chunk(x_ptr, offs_k, K: tl.constexpr, NORM: tl.constexpr, delta_ptr, norm_w_ptr, inv_rms,
                     HAS_DELTA: tl.constexpr, MASK_IN: tl.constexpr, g, tau_ptr, scale_ptr, HAS_SCALE: tl.constexpr):
        """x[offs_k] in float32; with NORM, x is the residual and the chunk is RMSNorm(x + delta)[offs_k] as
        add_rmsnorm stores it (the sum rounded to x's dtype, the normed value rounded before and after the
        weight), from the factor inv_rms of the whole row. With MASK_IN, 0 where group g's mask drops the input
        (|x| · scale below its threshold, decided as the masked products decide it: active_of)."""
        x, weight = _input_loads(x_ptr, offs_k, K, NORM, delta_ptr, norm_w_ptr, HAS_DELTA)
        return _input_value(x, weight, offs_k, K, NORM, inv_rms, x_ptr.dtype.element_ty, MASK_IN, g, tau_ptr,
                            scale_ptr, HAS_SCALE)

    @triton.jit
    def _rms_from_sums(sums, K: tl.constexpr, eps):
        """1/rms of a row whose sums of squares by blocks are `sums` (as a residual GEMV or reduction left them)."""
        return 1.0 / tl.sqrt(tl.sum(sums, axis=0) / K + eps)

    @triton.jit
    def _row_dots(w_ptr, x_ptr, offs_n, n_ok, stride_n, first, K: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, EARLY: tl.constexpr, NORM: tl.constexpr, delta_ptr, norm_w_ptr, inv_rms,
                  sums, eps, FROM_SUMS: tl.constexpr, HAS_DELTA: tl.constexpr, MASK_IN: tl.constexpr, g, tau_ptr,
                  scale_ptr, HAS_SCALE: tl.constexpr):
        """Σ_k W[n, k] x[k] for the rows offs_n; with EARLY, `first` is the rows' first chunk, already loaded;
        with NORM, x is normed on the way in, with MASK_IN masked by group g's threshold (_input_chunk). With
        FROM_SUMS, 1/rms comes from `sums` (loaded, not yet added), added up after the first chunk's loads are
        issued, so that the two round trips overlap."""
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        start: tl.constexpr = BLOCK_K if EARLY else 0
        if FROM_SUMS and not EARLY:
            inv_rms = _rms_from_sums(sums, K, eps)
        if EARLY:
            offs_k = tl.arange(0, BLOCK_K)
            x, weight = _input_loads(x_ptr, offs_k, K, NORM, delta_ptr, norm_w_ptr, HAS_DELTA)
            if FROM_SUMS:
                inv_rms = _rms_from_sums(sums, K, eps)
            x = _input_value(x, weight, offs_k, K, NORM, inv_rms, x_ptr.dtype.element_ty, MASK_IN, g, tau_ptr,
                             scale_ptr, HAS_SCALE)
            acc += first.to(tl.float32) * x[None, :]
        for k0 in range(start, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            w = _weight_chunk(w_ptr, offs_n, n_ok, stride_n, k0, K, BLOCK_K)
            x = _input_chunk(x_ptr, offs_k, K, NORM, delta_ptr, norm_w_ptr, inv_rms, HAS_DELTA, MASK_IN, g, tau_ptr,
                             scale_ptr, HAS_SCALE)
            acc += w.to(tl.float32) * x[None, :]
        return tl.sum(acc, axis=1)

    @triton.jit
    def _norm_prologue(x_ptr, delta_ptr, norm_w_ptr, res_out_ptr, eps, K: tl.constexpr, K_P2: tl.constexpr,
                       HAS_DELTA: tl.constexpr):
        """1/rms of the residual x (+ delta), the whole row in one program, summed as add_rmsnorm sums it;
        program 0 also stores x + delta, rounded, as the new residual (to res_out: the other programs still
        read x)."""
        offs = tl.arange(0, K_P2)
        ok = offs < K
        dtype = x_ptr.dtype.element_ty
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        if HAS_DELTA:
            x = (x + tl.load(delta_ptr + offs, mask=ok, other=0.0).to(tl.float32)).to(dtype).to(tl.float32)
            if tl.program_id(0) == 0:
                tl.store(res_out_ptr + offs, x.to(dtype), mask=ok)
        return 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / K + eps)

    @triton.jit
    def _gemv_kernel(w_ptr, x_ptr, out_ptr, N, stride_n, delta_ptr, norm_w_ptr, res_out_ptr, eps, tau,
                     in_tau_ptr, in_scale_ptr, res_in_ptr, sums_ptr, n_sums,
                     K: tl.constexpr, K_P2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     SWIGLU: tl.constexpr, MASKED: tl.constexpr, EARLY: tl.constexpr, NORM: tl.constexpr,
                     HAS_DELTA: tl.constexpr, MASK_IN: tl.constexpr, HAS_SCALE: tl.constexpr,
                     UP_X_OFFSET: tl.constexpr, ADD_RESIDUAL: tl.constexpr, NORM_SUMS: tl.constexpr,
                     SUMS_P2: tl.constexpr, PDL: tl.constexpr):
        """Rows pid·BLOCK_N… of W x, each program streaming its rows along K, BLOCK_K columns per step. With
        SWIGLU, W is [gate; up] (2N rows) and the program writes silu(gate row) · (up row) instead, rounded as
        the unfused ops round; with MASKED too, 0 where |silu(gate row)| < tau (CATS's kept neurons). With EARLY,
        the rows' first chunk is loaded before waiting for the launch before
        (weights are never written during a step): under PDL its memory latency overlaps that launch's tail.
        With NORM, x is the residual stream and the product's input is RMSNorm(x + delta) · norm_w, made by
        every program for itself (_norm_prologue): the add and the norm need no launch of their own. With
        MASK_IN, the input is masked first (a masked product run over every row: gemv's `input_mask`); the up
        rows of SWIGLU take group 1's threshold and scale, and x from UP_X_OFFSET on. With NORM_SUMS, x is the
        whole new residual and 1/rms comes from the n_sums sums of squares at sums_ptr. With ADD_RESIDUAL, the
        output is the residual res_in + W x, rounded as add_rmsnorm rounds the add, and the program stores its
        rows' sum of squares at sums_ptr + pid (for the next norm's NORM_SUMS)."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        first = tl.zeros([BLOCK_N, BLOCK_K], dtype=w_ptr.dtype.element_ty)
        first_up = first
        if EARLY:
            first = _weight_chunk(w_ptr, offs_n, n_ok, stride_n, 0, K, BLOCK_K)
            if SWIGLU:
                first_up = _weight_chunk(w_ptr + N * stride_n, offs_n, n_ok, stride_n, 0, K, BLOCK_K)
        await_inputs(PDL)
        dtype = out_ptr.dtype.element_ty
        residual = tl.zeros([BLOCK_N], dtype=tl.float32)
        if ADD_RESIDUAL:  # issued before the rows' loads, so its latency hides behind theirs
            residual = tl.load(res_in_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        inv_rms = 1.0
        sums = tl.zeros([SUMS_P2], dtype=tl.float32)
        if NORM:
            if NORM_SUMS:  # added up in _row_dots once the first input chunk's loads are in flight
                sums = tl.load(sums_ptr + tl.arange(0, SUMS_P2), mask=tl.arange(0, SUMS_P2) < n_sums, other=0.0)
            else:
                inv_rms = _norm_prologue(x_ptr, delta_ptr, norm_w_ptr, res_out_ptr, eps, K, K_P2, HAS_DELTA)
        y = _row_dots(w_ptr, x_ptr, offs_n, n_ok, stride_n, first, K, BLOCK_N, BLOCK_K, EARLY, NORM, delta_ptr,
                      norm_w_ptr, inv_rms, sums, eps, NORM_SUMS, HAS_DELTA, MASK_IN, 0, in_tau_ptr, in_scale_ptr,
                      HAS_SCALE)
        if SWIGLU:
            up = _row_dots(w_ptr + N * stride_n, x_ptr + UP_X_OFFSET, offs_n, n_ok, stride_n, first_up, K, BLOCK_N,
                           BLOCK_K, EARLY, NORM, delta_ptr, norm_w_ptr, inv_rms, sums, eps, NORM_SUMS, HAS_DELTA,
                           MASK_IN, 1, in_tau_ptr, in_scale_ptr, HAS_SCALE)
            if MASKED:  # CATS: silu(gate) as the unfused ops round it decides the neuron
                gate = y.to(dtype).to(tl.float32)
                kept = tl.abs((gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)) >= tau
            y = swiglu(y, up, dtype)
            if MASKED:
                y = tl.where(kept, y, 0.0)
        if ADD_RESIDUAL:  # the product as stored, added to the residual as add_rmsnorm adds it
            y = (residual + y.to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
            tl.store(sums_ptr + tl.program_id(0), tl.sum(tl.where(n_ok, y * y, 0.0), axis=0))
        tl.store(out_ptr + offs_n, y.to(dtype), mask=n_ok)


# Each program loads its first weight chunk before waiting for the launch before (RANA_EARLY_WEIGHTS=all, the
# default; =long: only rows of at least EARLY_MIN_K columns, session 11's choice; =0: never). On an H200
# (bench/engine_ab.py --env RANA_EARLY_WEIGHTS) early loads took 3% off a 7B-shape dense step and 1% off RaNA −44%
# (session 11); on SmolLM2's rows (576, 1,536 columns) they were 3-4% slower in session 11's tiles, and are 1.5% / 3%
# faster (dense / RaNA −44%) in session 16's (engine-ab-early-weights-all-nvidia-h200.json, session 20).
EARLY_MIN_K = 2048

# Launch configurations by row length, chosen in whole graph-replayed steps on an H200 (bench/engine_ab.py --env
# RANA_GEMV_CONFIG / RANA_GEMV_SMALL_CONFIG; engine-ab-gemv-*-nvidia-h200.json). Against session 4's one
# configuration for every shape (8 rows, 512 columns, 4 warps, 2 stages, tuned on an H100): Llama-2-7B's rows of
# 4,096 and 11,008 columns in 1,024-column steps with 4 stages, dense step 0.95× (o_proj 12.8 → 8.5 µs, down 29.1 →
# 21.4 µs alone: bench/gemv_tma.py), and its fused gate/up in 4 rows of 512 columns, another 0.99×; SmolLM2's
# rows of 576 and 1,536 columns as 4 rows of 1,024 columns in one stage (twice the programs), dense step 0.87×,
# RaNA −44% 0.96×. Since early weights on every row (session 20), a short plain row is one chunk whatever its
# length (WHOLE_ROW_MAX_K): every weight a program reads is loaded before its wait, none after; SmolLM2's down
# (1,536 columns, 2,048-column tiles) took dense steps to 0.92× and RaNA −44% to 0.955× (session 21,
# engine-ab-gemv-whole-row-nvidia-h200.json). The fused gate/up keeps 1,024 (two tiles of registers; untimed).
GEMV_CONFIG = {"BLOCK_N": 8, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 4}  # rows of ≥ EARLY_MIN_K columns
GEMV_SWIGLU_CONFIG = {"BLOCK_N": 4, "BLOCK_K": 512, "num_warps": 4, "num_stages": 2}  # the fused gate/up of those
GEMV_SHORT_CONFIG = {"BLOCK_N": 4, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 1}  # shorter rows
WHOLE_ROW_MAX_K = EARLY_MIN_K  # plain short rows up to this length are one chunk (BLOCK_K the next power of two)
# Triton's interpreter (CI's CPU path) runs a launch's programs one after another in Python: the fewer, the
# faster (an engine test 29 → 23 s against GEMV_SHORT_CONFIG). A program computes the same rows whatever its
# tile; tests/test_decode_kernels.py runs the tables above in the interpreter too.
INTERPRETER_CONFIG = {"BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4, "num_stages": 1}


def gemv_config(K: int, swiglu: bool = False) -> dict:
    """The GEMV's launch configuration for rows of K columns (the tables above), unless overridden for
    bench/engine_ab.py's sweeps by RANA_GEMV_CONFIG (rows of at least EARLY_MIN_K columns) or
    RANA_GEMV_SMALL_CONFIG (shorter rows): "BLOCK_N-BLOCK_K-warps-stages", or two of them "PLAIN/SWIGLU" for the
    plain and the fused gate/up products; BLOCK_K may be "row", the row's length rounded up to a power of two (a
    program's rows in one chunk, loaded before its wait)."""
    long_rows = K >= EARLY_MIN_K
    name = "RANA_GEMV_CONFIG" if long_rows else "RANA_GEMV_SMALL_CONFIG"
    text = os.environ.get(name, "")
    if not text:
        if long_rows:
            return {**(GEMV_SWIGLU_CONFIG if swiglu else GEMV_CONFIG), "EARLY_MIN_K": EARLY_MIN_K}
        whole_row = 1 << max(K - 1, 1).bit_length() if not swiglu and K <= WHOLE_ROW_MAX_K else 0
        return {**GEMV_SHORT_CONFIG, "BLOCK_K": max(GEMV_SHORT_CONFIG["BLOCK_K"], whole_row),
                "EARLY_MIN_K": EARLY_MIN_K}
    expected = ("BLOCK_N-BLOCK_K-warps-stages (e.g. 8-1024-4-4; BLOCK_K may be row), or two of them joined by / "
                "(plain/gate-up)")
    sides = text.split("/")
    if len(sides) > 2:
        raise ValueError(f"{name}={text}: expected {expected}")
    side = sides[1] if swiglu and len(sides) == 2 else sides[0]
    fields = side.split("-")
    if len(fields) == 4 and fields[1] == "row":
        fields[1] = str(max(16, triton.next_power_of_2(K)) if triton is not None else K)
    block_n, block_k, warps, stages = launch_ints(name, "-".join(fields), (4,), expected)
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": warps, "num_stages": stages,
            "EARLY_MIN_K": EARLY_MIN_K}


def _launch_config(K: int, swiglu: bool, config: dict | None) -> dict:
    """The configuration a launch over rows of K columns takes (gemv_config, the interpreter's, an override)."""
    base = gemv_config(K, swiglu)
    if config is None and interpreting():
        base = {**base, **INTERPRETER_CONFIG}
    return {**base, **(config or {})}


def gemv_programs(N: int, K: int, config: dict | None = None) -> int:
    """The programs of a plain GEMV of N rows of K columns: the length of a `residual` launch's sums."""
    return math.ceil(N / _launch_config(K, False, config)["BLOCK_N"]) if triton is not None else 1


def gemv(weight: torch.Tensor, x: torch.Tensor, out: torch.Tensor, config: dict | None = None,
         swiglu: bool = False, norm: tuple | None = None, tau: float | None = None,
         input_mask: tuple | None = None, residual: tuple | None = None,
         norm_sums: torch.Tensor | None = None) -> torch.Tensor:
    """out ← weight @ x for one token: weight (N, K) row-major, x (K,), out (N,). With `swiglu`, weight is
    [gate; up] (2N, K) and out ← silu(gate @ x) · (up @ x), (N,); with `tau` too, 0 where |silu(gate @ x)| < tau
    (CATS's mask, decided on silu rounded to the dtype).

    `norm` = (delta, norm_weight, eps, res_out): x is then the residual stream and the product's input is
    RMSNorm(x + delta) · norm_weight, made inside the GEMV (delta None: RMSNorm(x)); x + delta is written to
    res_out (K,), which must not be x. What add_rmsnorm followed by this GEMV computes, in one launch.

    `input_mask` = (threshold, scale, split): a masked product over every row, input k kept where |x_k| ·
    scale_k ≥ threshold[0] (scale None: |x_k|), as the masked products decide it. With `swiglu` the up rows use
    threshold[1] and scale[K:], and with `split` x is (2K,) and the up rows read x[K:] (gate's and up's own
    coefficients); without, both read the same x.

    `residual` = (r, sums): out ← r + weight @ x, the residual's next value (the add rounded as add_rmsnorm
    rounds it), and sums[p] ← the sum of squares of program p's rows of it in float32 (gemv_programs(N, K) of
    them; the PyTorch form puts the whole sum in sums[0]). `norm_sums` = such sums, with norm = (None,
    norm_weight, eps, None): x is that new residual and 1/rms comes from the sums, not from x (which every
    program would otherwise read whole)."""
    if residual is not None:
        programs = gemv_programs(weight.shape[0], weight.shape[1], config)
        if swiglu or norm is not None or residual[1].numel() != programs:
            raise ValueError(f"a residual GEMV is a plain product with one sum of squares per program ({programs} "
                             f"here), got {residual[1].numel()}")
    if norm_sums is not None and (norm is None or norm[0] is not None):
        raise ValueError("norm_sums: the residual is already added, so norm = (None, weight, eps, None)")
    if norm is not None:
        delta, norm_weight, eps, res_out = norm
        if delta is not None and res_out.data_ptr() == x.data_ptr():
            raise ValueError("the residual's new value must go to another buffer: the GEMV's programs read x")
    N, K = weight.shape
    split = input_mask is not None and swiglu and input_mask[2]
    if input_mask is not None:
        threshold, scale, _ = input_mask
        groups = 2 if swiglu else 1
        if threshold.numel() != groups or x.numel() != (2 * K if split else K) or (
                scale is not None and scale.numel() != groups * K):
            raise ValueError(f"input mask: {groups} threshold(s), x of {2 * K if split else K} and a scale of "
                             f"{groups * K} for rows of {K}; got {threshold.numel()}, {x.numel()} and "
                             f"{None if scale is None else scale.numel()}")
    if not use_triton(weight):
        if norm is not None:
            stream = x if delta is None else res_out.copy_(x + delta)
            x = rmsnorm_reference(stream[None], norm_weight, eps)[0]
        if swiglu:
            gate_w, up_w = weight.chunk(2)
            gate_x, up_x = (x[:K], x[K:]) if split else (x, x)
            if input_mask is not None:
                gate_x, up_x = _masked_input(gate_x, input_mask, 0), _masked_input(up_x, input_mask, 1)
            gate = torch.nn.functional.silu(torch.mv(gate_w, gate_x))
            up = torch.mv(up_w, up_x)
            kept = gate.float().abs() >= tau if tau is not None else True
            return out.copy_(gate * up * kept)
        if input_mask is not None:
            x = _masked_input(x, input_mask, 0)
        if residual is not None:
            out.copy_(residual[0] + torch.mv(weight, x))
            residual[1].zero_()[0] = out.float().square().sum()
            return out
        return torch.mv(weight, x, out=out)
    c = _launch_config(K, swiglu, config)
    N = N // 2 if swiglu else N
    p = pdl(weight)
    early = _early_weights(K, c["EARLY_MIN_K"])
    delta, norm_weight, eps, res_out = norm if norm is not None else (None, x, 0.0, x)
    in_tau, in_scale = (input_mask[0], input_mask[1]) if input_mask is not None else (None, None)
    res_in, sums = residual if residual is not None else (x, norm_sums if norm_sums is not None else x)
    _gemv_kernel[(math.ceil(N / c["BLOCK_N"]),)](weight, x, out, N, weight.stride(0),
                                                   delta if delta is not None else x, norm_weight,
                                                   res_out if res_out is not None else x, eps,
                                                   0.0 if tau is None else float(tau),
                                                   in_tau if in_tau is not None else x,
                                                   in_scale if in_scale is not None else x, res_in, sums,
                                                   sums.numel(), K=K,
                                                   K_P2=triton.next_power_of_2(K), BLOCK_N=c["BLOCK_N"],
                                                   BLOCK_K=c["BLOCK_K"], SWIGLU=swiglu,
                                                   MASKED=swiglu and tau is not None, EARLY=early,
                                                   NORM=norm is not None, HAS_DELTA=delta is not None,
                                                   MASK_IN=input_mask is not None, HAS_SCALE=in_scale is not None,
                                                   UP_X_OFFSET=K if split else 0,
                                                   ADD_RESIDUAL=residual is not None,
                                                   NORM_SUMS=norm_sums is not None,
                                                   SUMS_P2=triton.next_power_of_2(sums.numel()),
                                                   num_warps=c["num_warps"], num_stages=c["num_stages"], PDL=p,
                                                   launch_pdl=p)
    return out


def _early_weights(K: int, min_k: int) -> bool:
    """Whether a GEMV over rows of K columns loads its first weight chunk before its PDL wait (RANA_EARLY_WEIGHTS)."""
    choice = os.environ.get("RANA_EARLY_WEIGHTS", "all")
    if choice not in ("all", "long", "0"):
        raise ValueError(f"RANA_EARLY_WEIGHTS={choice}: expected all, long or 0")
    return choice == "all" or (choice == "long" and K >= min_k)


def _masked_input(x: torch.Tensor, input_mask: tuple, group: int) -> torch.Tensor:
    """x with group `group`'s dropped inputs zeroed (the PyTorch form of the GEMV's MASK_IN)."""
    threshold, scale, _ = input_mask
    score = x.float().abs()
    if scale is not None:
        score = score * scale.float().reshape(-1, x.numel())[group]
    return torch.where(score >= threshold.reshape(-1)[group], x, torch.zeros_like(x))
