"""The fused decode kernels against their PyTorch forms, and the grouped masked product against float64. On the
CPU the Triton kernels run in the interpreter (TRITON_INTERPRET=1, set by conftest) on small shapes; the `gpu`
tests run them compiled, at model sizes, in fp16 and bf16. Outputs start poisoned (NaN), so every element must
be written."""

import pytest
import torch
import torch.nn.functional as F

from rana_core.decode.dense_kernels import add_rmsnorm, rmsnorm_reference, rope_into_cache, rotate_half_reference
from rana_core.decode.gemv import gemv, gemv_config
from rana_core.decode.masked_kernels import masked_rows_partials, reduce_partials, reference_masked_rows

from test_kernels import (DESIGNS, TOLERANCE as SUMS, relative_error, require_triton, threshold_for_density,
                          use_design)

CPU_CASES = [("cpu", torch.float32)]
GPU_CASES = [pytest.param("cuda", dtype, marks=pytest.mark.gpu) for dtype in (torch.float16, torch.bfloat16)]


def tolerance(dtype, roundings: int = 1) -> float:
    """Relative error allowed in a result that went through `roundings` roundings to `dtype` after float32 sums.
    One rounding to nearest errs by at most u = 2^-11 (fp16), 2^-8 (bf16), 2^-24 (float32) of each element, so by
    at most u in norm; the float32 sums before it by ~1e-6 at most (test_kernels.TOLERANCE). Checks against the
    PyTorch form in the same dtype allow one rounding: both round the same values at the same steps, and differ
    only where a float32 difference in a sum flips a rounding, on a few elements."""
    return roundings * torch.finfo(dtype).eps / 2 + SUMS


def poisoned(*shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.mark.parametrize("device, dtype", CPU_CASES + GPU_CASES)
@pytest.mark.parametrize("with_delta", [False, True])
def test_add_rmsnorm_is_the_residual_add_then_rmsnorm(device, dtype, with_delta):
    require_triton(device)  # the kernel runs, not its PyTorch form
    N = 4096 if device == "cuda" else 72  # 72: not a power of two, so the row mask matters
    g = torch.Generator().manual_seed(N)
    x = torch.randn(3, N, generator=g).to(device, dtype)
    delta = torch.randn(3, N, generator=g).to(device, dtype) if with_delta else None
    weight = (torch.rand(N, generator=g) + 0.5).to(device, dtype)
    expected_x = x + delta if with_delta else x.clone()
    expected = rmsnorm_reference(expected_x, weight, 1e-5)
    normed = poisoned(3, N, dtype=dtype, device=device)
    add_rmsnorm(x, delta, weight, 1e-5, normed)
    assert torch.equal(x, expected_x)  # the residual stream is updated in place, rounded as PyTorch rounds it
    assert relative_error(normed.float(), expected.float()) < tolerance(dtype)


@pytest.mark.parametrize("device, dtype", CPU_CASES + GPU_CASES)
def test_rope_into_cache_rotates_q_and_k_and_fills_the_cache_at_pos(device, dtype):
    require_triton(device)
    heads, kv_heads, d, max_seq = (32, 32, 128, 64) if device == "cuda" else (4, 2, 16, 8)
    g = torch.Generator().manual_seed(d)
    qkv = torch.randn(1, (heads + 2 * kv_heads) * d, generator=g).to(device, dtype)
    angles = torch.rand(max_seq, d // 2, generator=g) * 6
    cos, sin = angles.cos().to(device, dtype), angles.sin().to(device, dtype)
    pos = torch.tensor([5], device=device)
    k_cache = poisoned(kv_heads, max_seq, d, dtype=dtype, device=device)
    v_cache = poisoned(kv_heads, max_seq, d, dtype=dtype, device=device)
    q = rope_into_cache(qkv, cos, sin, pos, k_cache, v_cache, heads, kv_heads, poisoned(heads, d, dtype=dtype,
                                                                                      device=device))
    q_in, k_in, v_in = qkv.view(heads + 2 * kv_heads, d).split([heads, kv_heads, kv_heads])
    c, s = cos[pos], sin[pos]
    assert relative_error(q.float(), rotate_half_reference(q_in[None], c, s)[0].float()) < tolerance(dtype)
    assert relative_error(k_cache[:, 5].float(), rotate_half_reference(k_in[None], c, s)[0].float()) < tolerance(dtype)
    assert torch.equal(v_cache[:, 5], v_in)
    others = torch.ones(max_seq, dtype=torch.bool)
    others[5] = False
    assert torch.isnan(k_cache[:, others].float()).all() and torch.isnan(v_cache[:, others].float()).all()


@pytest.mark.parametrize("device, dtype", CPU_CASES + GPU_CASES)
def test_gemv_matches_float64(device, dtype):
    require_triton(device)
    # rows shorter and longer than EARLY_MIN_K take different launch configurations (gemv_config)
    shapes = ([(12288, 4096), (4096, 11008), (3441, 4096), (576, 576), (576, 1536)] if device == "cuda"
              else [(40, 70), (9, 512), (10, 1100), (12, 2100)])  # 1,100: one 2,048-column chunk
    for N, K in shapes:
        g = torch.Generator().manual_seed(N + K)
        weight = torch.randn(N, K, generator=g).to(device, dtype)
        x = torch.randn(K, generator=g).to(device, dtype)
        for config in gpu_and_default_tiles(device, K):
            out = gemv(weight, x, poisoned(N, dtype=dtype, device=device), config)
            assert relative_error(out.float().cpu(), weight.double().cpu() @ x.double().cpu()) < tolerance(dtype)


def gpu_and_default_tiles(device: str, K: int, swiglu: bool = False) -> list:
    """The GPU's tiles for rows of K columns (gemv_config), and on the CPU also the interpreter's default (None)."""
    return [gemv_config(K, swiglu)] + ([None] if device == "cpu" else [])


@pytest.mark.parametrize("device, dtype", CPU_CASES + GPU_CASES)
@pytest.mark.parametrize("design", DESIGNS)
def test_a_reduction_adding_the_residual_leaves_each_programs_sum_of_squares(device, dtype, design, monkeypatch):
    """reduce_partials(residual=(r, sums)): out is r + the reduced product, the add rounded as add_rmsnorm rounds
    it (bit for bit against the plain reduction then that add), and each program's entry of sums (NaN before) is
    its columns' sum of squares, float32 against float64; Llama-2-7B's down (11,008 neurons, 4,096 wide) on the
    GPU, at 30% density."""
    require_triton(device)
    from rana_core.decode.masked_kernels import reduce_block, reduce_programs

    use_design(design, monkeypatch)
    K, M = (11008, 4096) if device == "cuda" else (24, 40)
    g = torch.Generator().manual_seed(K + M)
    rows = torch.randn(K, M, generator=g).to(device, dtype) / K ** 0.5
    coeff = torch.randn(K, generator=g).to(device, dtype)
    r = torch.randn(M, generator=g).to(device, dtype)
    partial, splits = masked_rows_partials(rows, coeff, threshold_for_density(coeff.float().abs(), 0.3))
    plain = reduce_partials(partial, splits, poisoned(M, dtype=dtype, device=device))
    sums = torch.full((reduce_programs(M, splits),), float("nan"), device=device)
    out = reduce_partials(partial, splits, poisoned(M, dtype=dtype, device=device), residual=(r, sums))
    assert torch.equal(out, (r.float() + plain.float()).to(dtype))
    for total, block in zip(sums.cpu(), out.double().cpu().square().split(reduce_block(splits)), strict=True):
        assert abs(float(total) - float(block.sum())) <= 1e-5 * float(block.sum())
    with pytest.raises(ValueError, match="a residual reduction sums one group"):
        reduce_partials(partial, splits, out, residual=(r, sums[1:]))


def test_the_reductions_programs_follow_rana_reduce_partials(monkeypatch):
    """RANA_REDUCE_PARTIALS (bench/engine_ab.py's sweeps) sets how many partial sums a reduction program adds: 33
    splits (Llama-2-7B's down) pad to 64, so 4,096 (the default) gives 64 columns a program and 1,024 gives 16; a
    value that is not a power of two is one ValueError naming the variable."""
    require_triton("cpu")
    from rana_core.decode.masked_kernels import reduce_block, reduce_programs

    monkeypatch.delenv("RANA_REDUCE_PARTIALS", raising=False)
    assert reduce_block(33) == 64 and reduce_programs(4096, 33) == 64
    monkeypatch.setenv("RANA_REDUCE_PARTIALS", "1024")
    assert reduce_block(33) == 16 and reduce_programs(4096, 33) == 256
    for bad in ("3000", "lots"):
        monkeypatch.setenv("RANA_REDUCE_PARTIALS", bad)
        with pytest.raises(ValueError, match=f"RANA_REDUCE_PARTIALS={bad}: expected a power of two"):
            reduce_block(33)


@pytest.mark.parametrize("device, dtype", CPU_CASES + GPU_CASES)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("design", DESIGNS)
def test_two_groups_in_one_launch_with_the_swiglu_epilogue(device, dtype, density, design, monkeypatch):
    """gate's and up's masked products as two groups of one launch, reduced into silu(gate) · up: each group is
    masked by its own threshold, exactly as two separate products would be."""
    require_triton(device)
    use_design(design, monkeypatch)
    K, M = (3082, 11008) if device == "cuda" else (24, 40)
    g = torch.Generator().manual_seed(K)
    rows = torch.randn(2 * K, M, generator=g).to(device, dtype) / K ** 0.5
    coeff = torch.randn(2 * K, generator=g).to(device, dtype)
    gate_t = threshold_for_density(coeff[:K].float().abs(), density)
    up_t = threshold_for_density(coeff[K:].float().abs(), min(1.0, density * 1.5))
    threshold = torch.cat([gate_t, up_t]).float()
    partial, splits = masked_rows_partials(rows, coeff, threshold, groups=2)
    out = reduce_partials(partial, splits, poisoned(M, dtype=dtype, device=device), epilogue="swiglu")
    gate = reference_masked_rows(rows[:K].cpu(), coeff[:K].cpu(), gate_t.cpu())
    up = reference_masked_rows(rows[K:].cpu(), coeff[K:].cpu(), up_t.cpu())
    expected = (F.silu(gate.double()) * up.double()).float()
    assert torch.isfinite(out).all()
    if density == 0.0:
        assert torch.count_nonzero(out) == 0
    else:
        # gate and up rounded to dtype, silu(gate) rounded, the product rounded: four roundings
        assert relative_error(out.float().cpu(), expected) < tolerance(dtype, 4)


@pytest.mark.parametrize("device, dtype", CPU_CASES + GPU_CASES)
@pytest.mark.parametrize("design", DESIGNS)
def test_rope_adds_up_the_partial_sums_of_the_masked_qkv_product(device, dtype, design, monkeypatch):
    """The qkv product's reduction fused into the rotary kernel: fed the partial sums, it writes what it writes
    when fed the reduced qkv (reduce_partials), bit for bit up to the order of the float32 additions."""
    require_triton(device)
    use_design(design, monkeypatch)
    heads, kv_heads, d, max_seq = (32, 32, 128, 64) if device == "cuda" else (4, 2, 16, 8)
    K = 3441 if device == "cuda" else 400  # 400 at 90%: 360 listed rows, several steps, several partial rows
    M = (heads + 2 * kv_heads) * d
    g = torch.Generator().manual_seed(K)
    rows = (torch.randn(K, M, generator=g) / K ** 0.5).to(device, dtype)
    coeff = torch.randn(K, generator=g).to(device, dtype)
    threshold = threshold_for_density(coeff.float().abs(), 0.9)
    angles = torch.rand(max_seq, d // 2, generator=g) * 6
    cos, sin = angles.cos().to(device, dtype), angles.sin().to(device, dtype)
    pos = torch.tensor([3], device=device)
    results = []
    for fused in (False, True):
        partial, splits = masked_rows_partials(rows, coeff, threshold)
        if fused:
            qkv = partial
        else:
            qkv, splits = reduce_partials(partial, splits, poisoned(M, dtype=dtype, device=device))[None], 0
        if fused:  # several non-zero partial rows, or nothing is added up
            assert (partial.view(splits, M).abs().sum(1) > 0).sum() >= 2
        k_cache = poisoned(kv_heads, max_seq, d, dtype=dtype, device=device)
        v_cache = poisoned(kv_heads, max_seq, d, dtype=dtype, device=device)
        q = rope_into_cache(qkv, cos, sin, pos, k_cache, v_cache, heads, kv_heads,
                            poisoned(heads, d, dtype=dtype, device=device), splits)
        results.append((q.float(), k_cache[:, 3].float(), v_cache[:, 3].float()))
    for unfused, fused in zip(*results):
        assert torch.isfinite(fused).all()
        assert relative_error(fused, unfused) < tolerance(dtype)


@pytest.mark.parametrize("device, dtype", CPU_CASES + GPU_CASES)
@pytest.mark.parametrize("density", [0.0, 0.5])
@pytest.mark.parametrize("design", DESIGNS)
def test_down_compaction_makes_swiglu_from_the_gate_up_partials(device, dtype, density, design, monkeypatch):
    """gate/up's reduction fused into the down product's compaction: the compaction makes h = silu(gate) · up
    from the partial sums (and writes it), and the down product equals the one computed from the reduced h."""
    require_triton(device)
    use_design(design, monkeypatch)
    K, M, H = (3082, 11008, 4096) if device == "cuda" else (400, 40, 16)
    g = torch.Generator().manual_seed(M)
    up_rows = (torch.randn(2 * K, M, generator=g) / K ** 0.5).to(device, dtype)
    z = torch.randn(2 * K, generator=g).to(device, dtype)
    gate_up_threshold = threshold_for_density(z.float().abs(), 0.9).repeat(2).contiguous()
    down_rows = (torch.randn(M, H, generator=g) / M ** 0.5).to(device, dtype)
    scale = (torch.rand(M, generator=g) + 0.5).to(device)
    partial, splits = masked_rows_partials(up_rows, z, gate_up_threshold, groups=2)
    if design != "wide, small tiles" or device == "cpu":  # at 7B sizes its 1,376 column blocks fill the GPU: 1 split
        assert (partial.view(2, splits, M)[0].abs().sum(1) > 0).sum() >= 2  # several partial rows to add up
    h = reduce_partials(partial, splits, poisoned(M, dtype=dtype, device=device), epilogue="swiglu")
    down_threshold = threshold_for_density(h.float().abs() * scale, density)
    expected = reference_masked_rows(down_rows.cpu(), h.cpu(), down_threshold.cpu(), scale.cpu())
    made = poisoned(M, dtype=dtype, device=device)
    down_partial, down_splits = masked_rows_partials(down_rows, made, down_threshold, scale,
                                                     swiglu_of=(partial, splits))
    out = reduce_partials(down_partial, down_splits, poisoned(H, dtype=dtype, device=device))
    assert relative_error(made.float(), h.float()) < tolerance(dtype)
    assert torch.isfinite(out).all()
    if density == 0.0:
        assert torch.count_nonzero(out) == 0
    else:
        # one rounding of the output; the second allows for the few elements of `made` a flipped rounding moved
        assert relative_error(out.float().cpu(), expected) < tolerance(dtype, 2)
    with pytest.raises(ValueError, match="swiglu_of"):
        masked_rows_partials(down_rows[:-1], made[:-1], down_threshold, scale[:-1], swiglu_of=(partial, splits))


def test_group_arguments_are_checked():
    rows, coeff = torch.zeros(10, 4), torch.zeros(10)
    with pytest.raises(ValueError, match="one threshold per group"):
        masked_rows_partials(rows, coeff, torch.zeros(1), groups=2)
    with pytest.raises(ValueError, match="do not match"):
        masked_rows_partials(rows, torch.zeros(9), torch.zeros(1))


@pytest.mark.parametrize("device, dtype", CPU_CASES + GPU_CASES)
@pytest.mark.parametrize("pos", [0, 70, 129])
@pytest.mark.parametrize("launches", ["3", "2"], ids=["combine-launch", "last-combines"])
@pytest.mark.parametrize("dot, group", [("1", 4), ("0", 4), ("1", 1)], ids=["dot", "head-by-head", "mha"])
def test_decode_attention_reads_the_prefix_up_to_pos(device, dtype, pos, launches, dot, group, monkeypatch):
    """Flash-decoding over chunks equals softmax attention over positions 0..pos; what lies past pos (here
    NaN) is never read, and grouped query heads share their K/V head. The chunks are combined by a launch of
    their own, or (RANA_ATTENTION_LAUNCHES=2) by the last chunk program of each KV head; a chunk program takes
    its group's query heads as one product (RANA_ATTENTION_DOT), or head by head (always, with one query head a
    KV head: the "mha" case, Llama-2-7B's path)."""
    require_triton(device)
    monkeypatch.setenv("RANA_ATTENTION_LAUNCHES", launches)
    monkeypatch.setenv("RANA_ATTENTION_DOT", dot)
    kv_heads, d, max_seq = (8, 128, 160) if device == "cuda" else (2, 16, 130)
    heads = kv_heads * group
    from rana_core.decode.attention_kernels import decode_attention

    g = torch.Generator().manual_seed(pos)
    q = torch.randn(heads, d, generator=g).to(device, dtype)
    k_cache = torch.randn(kv_heads, max_seq, d, generator=g).to(device, dtype)
    v_cache = torch.randn(kv_heads, max_seq, d, generator=g).to(device, dtype)
    k_cache[:, pos + 1:] = float("nan")
    v_cache[:, pos + 1:] = float("nan")
    out = decode_attention(q, k_cache, v_cache, torch.tensor([pos], device=device),
                           poisoned(heads, d, dtype=dtype, device=device))
    group = heads // kv_heads
    keys = k_cache[:, : pos + 1].double().cpu().repeat_interleave(group, dim=0)
    values = v_cache[:, : pos + 1].double().cpu().repeat_interleave(group, dim=0)
    weights = torch.softmax(torch.einsum("hd,htd->ht", q.double().cpu(), keys) / d ** 0.5, dim=-1)
    expected = torch.einsum("ht,htd->hd", weights, values)
    assert torch.isfinite(out.float()).all()
    assert relative_error(out.float().cpu(), expected.float()) < tolerance(dtype)


@pytest.mark.parametrize("device, dtype", CPU_CASES + GPU_CASES)
@pytest.mark.parametrize("config", ["32-2-1", "128-1-2"])
@pytest.mark.parametrize("launches", ["3", "2"], ids=["combine-launch", "last-combines"])
def test_decode_attention_in_other_chunks_and_warps_reads_the_prefix(device, dtype, config, launches, monkeypatch):
    """RANA_ATTENTION_CONFIG (bench sweeps: positions per chunk program, its warps, the combine's warps): at a
    position inside the second chunk and one in the last, the output is softmax attention over 0..pos and never
    reads past it (NaN there)."""
    require_triton(device)
    from rana_core.decode.attention_kernels import decode_attention

    monkeypatch.setenv("RANA_ATTENTION_CONFIG", config)
    monkeypatch.setenv("RANA_ATTENTION_LAUNCHES", launches)
    kv_heads, group, d, max_seq = (3, 3, 64, 300) if device == "cuda" else (2, 3, 16, 260)
    for pos in (40, max_seq - 1):
        g = torch.Generator().manual_seed(pos)
        q = torch.randn(kv_heads * group, d, generator=g).to(device, dtype)
        caches = [torch.randn(kv_heads, max_seq, d, generator=g).to(device, dtype) for _ in range(2)]
        for cache in caches:
            cache[:, pos + 1:] = float("nan")
        out = decode_attention(q, *caches, torch.tensor([pos], device=device),
                               poisoned(kv_heads * group, d, dtype=dtype, device=device))
        keys, values = (c[:, : pos + 1].double().cpu().repeat_interleave(group, dim=0) for c in caches)
        weights = torch.softmax(torch.einsum("hd,htd->ht", q.double().cpu(), keys) / d ** 0.5, dim=-1)
        expected = torch.einsum("ht,htd->hd", weights, values)
        assert relative_error(out.float().cpu(), expected.float()) < tolerance(dtype), (config, pos)


def test_a_bad_attention_config_names_the_variable(monkeypatch):
    from rana_core.decode.attention_kernels import attention_config

    monkeypatch.setenv("RANA_ATTENTION_CONFIG", "64-4")
    with pytest.raises(ValueError, match="RANA_ATTENTION_CONFIG=64-4: expected chunk-chunk warps-combine warps"):
        attention_config(1)


@pytest.mark.parametrize("device, dtype", CPU_CASES + GPU_CASES)
@pytest.mark.parametrize("splits", [0, 3], ids=["qkv", "qkv-partial-sums"])
def test_attention_in_two_launches_equals_three_bit_for_bit(device, dtype, splits, monkeypatch):
    """rope_attention in 2 launches (the last chunk program of each KV head combines) against 3 (rotary, chunks,
    combine): the same output and the same cache bits (this step's key and value written at pos, nothing else
    touched), from qkv or from a masked product's partial sums, at positions in the first, a middle and the last
    chunk, one call after another (the arrival counters must be back at zero for the next call)."""
    require_triton(device)
    from rana_core.decode.attention_kernels import _arrivals, rope_attention

    heads, kv_heads, d, max_seq = (32, 8, 128, 700) if device == "cuda" else (4, 2, 16, 200)
    g = torch.Generator().manual_seed(8 + splits)
    rows = max(splits, 1)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * d, generator=g)
    qkv = (qkv.to(device) if splits else qkv.to(device, dtype))
    angles = torch.rand(max_seq, d // 2, generator=g) * 6
    cos, sin = angles.cos().to(device, dtype), angles.sin().to(device, dtype)
    k_cache = torch.randn(kv_heads, max_seq, d, generator=g).to(device, dtype)
    v_cache = torch.randn(kv_heads, max_seq, d, generator=g).to(device, dtype)
    for pos in (3, max_seq - 1, 64):
        results = {}
        for launches in ("3", "2"):
            monkeypatch.setenv("RANA_ATTENTION_LAUNCHES", launches)
            k, v = k_cache.clone(), v_cache.clone()
            out = rope_attention(qkv, cos, sin, torch.tensor([pos], device=device), k, v, heads, kv_heads,
                                 poisoned(heads, d, dtype=dtype, device=device), splits)
            results[launches] = (out, k, v)
            assert _arrivals(kv_heads, out.device).tolist() == [0] * kv_heads
        out, k, v = results["3"]
        assert torch.isfinite(out.float()).all() and not torch.equal(k[:, pos], k_cache[:, pos])
        assert all(torch.equal(a, b) for a, b in zip(results["2"], results["3"])), pos


def test_attention_launches_follow_the_heads_per_kv_head(monkeypatch):
    """auto (the default): the last chunk program combines where each KV head has one query head (measured
    faster on Llama-2-7B's shape), a combine launch where it has several (SmolLM2's); 2 and 3 force it; anything
    else is one ValueError."""
    from rana_core.decode.attention_kernels import attention_launches

    monkeypatch.delenv("RANA_ATTENTION_LAUNCHES", raising=False)
    assert attention_launches(32, 32) == 2 and attention_launches(9, 3) == 3
    monkeypatch.setenv("RANA_ATTENTION_LAUNCHES", "2")
    assert attention_launches(9, 3) == 2
    monkeypatch.setenv("RANA_ATTENTION_LAUNCHES", "1")
    with pytest.raises(ValueError, match="use auto, 2 or 3"):
        attention_launches(32, 32)


@pytest.mark.parametrize("device, dtype", CPU_CASES + GPU_CASES)
def test_gemv_with_the_swiglu_epilogue(device, dtype):
    require_triton(device)
    for N, K in [(11008, 4096), (1536, 576)] if device == "cuda" else [(24, 72), (6, 2100)]:
        g = torch.Generator().manual_seed(N)
        weight = (torch.randn(2 * N, K, generator=g) / K ** 0.5).to(device, dtype)
        x = torch.randn(K, generator=g).to(device, dtype)
        gate, up = (weight.double().cpu() @ x.double().cpu()).chunk(2)
        for config in gpu_and_default_tiles(device, K, swiglu=True):
            out = gemv(weight, x, poisoned(N, dtype=dtype, device=device), config, swiglu=True)
            # gate and up rounded to dtype, silu(gate) rounded, the product rounded: four roundings
            assert relative_error(out.float().cpu(), (F.silu(gate) * up).float()) < tolerance(dtype, 4), (N, K)


def test_gemv_config_by_row_length_and_its_overrides(monkeypatch):
    """Long rows, their fused gate/up and short rows each take their own table; the bench's overrides replace
    only the side they name, and a malformed one is refused with the variable's name."""
    monkeypatch.delenv("RANA_GEMV_CONFIG", raising=False)
    monkeypatch.delenv("RANA_GEMV_SMALL_CONFIG", raising=False)
    shape = lambda c: (c["BLOCK_N"], c["BLOCK_K"], c["num_warps"], c["num_stages"])  # noqa: E731
    assert shape(gemv_config(4096)) == (8, 1024, 4, 4)
    assert shape(gemv_config(4096, swiglu=True)) == (4, 512, 4, 2)
    assert shape(gemv_config(576)) == shape(gemv_config(576, swiglu=True)) == (4, 1024, 4, 1)
    # a plain short row in one chunk (SmolLM2's down: 1,536 columns in a 2,048-column tile); gate/up keep 1,024
    assert shape(gemv_config(1536)) == shape(gemv_config(1025)) == (4, 2048, 4, 1)
    assert shape(gemv_config(1024)) == shape(gemv_config(1536, swiglu=True)) == (4, 1024, 4, 1)
    monkeypatch.setenv("RANA_GEMV_CONFIG", "2-64-4-1/16-32-2-3")
    assert shape(gemv_config(2048)) == (2, 64, 4, 1)
    assert shape(gemv_config(2048, swiglu=True)) == (16, 32, 2, 3)
    assert shape(gemv_config(2047)) == (4, 2048, 4, 1)  # short rows keep theirs (one chunk)
    monkeypatch.setenv("RANA_GEMV_SMALL_CONFIG", "2-128-2-2")
    assert shape(gemv_config(576, swiglu=True)) == (2, 128, 2, 2)  # one configuration serves both
    monkeypatch.setenv("RANA_GEMV_SMALL_CONFIG", "4-row-4-1")  # a program's rows in one chunk
    assert shape(gemv_config(1536)) == (4, 2048, 4, 1) and shape(gemv_config(576)) == (4, 1024, 4, 1)
    for bad in ("8-1024", "8-1024-4-4/4-512-4-2/1-1-1-1", "a-b-c-d", "row-1024-4-4"):
        monkeypatch.setenv("RANA_GEMV_CONFIG", bad)
        with pytest.raises(ValueError, match="RANA_GEMV_CONFIG"):
            gemv_config(4096)


@pytest.mark.parametrize("device, dtype", CPU_CASES + GPU_CASES)
def test_gemv_with_cats_mask_zeroes_the_neurons_under_tau(device, dtype):
    """gemv(swiglu=True, tau=τ): silu(gate)·up where |silu(gate)| ≥ τ, exactly 0 elsewhere (CATS's kept
    neurons). The kernel decides on silu rounded to the dtype from gate rounded to the dtype, as the unfused ops
    do; τ sits in the middle of the widest gap between those values near their median, so no neuron lies within
    rounding of it. The kept values against float64 as the plain SwiGLU epilogue is checked."""
    require_triton(device)
    N, K = (11008, 4096) if device == "cuda" else (24, 72)
    g = torch.Generator().manual_seed(N + 1)
    weight = (torch.randn(2 * N, K, generator=g) / K ** 0.5).to(device, dtype)
    x = torch.randn(K, generator=g).to(device, dtype)
    gate, up = (weight.double().cpu() @ x.double().cpu()).chunk(2)
    rounded = gate.to(dtype).float()
    silu = (rounded / (1.0 + torch.exp(-rounded))).to(dtype).float().abs()
    ordered = silu.unique().sort().values  # distinct values: any gap between them is at least one ulp
    ordered = ordered[len(ordered) // 4: 3 * len(ordered) // 4]
    widest = int((ordered[1:] - ordered[:-1]).argmax())
    tau = float(ordered[widest] + ordered[widest + 1]) / 2
    out = gemv(weight, x, poisoned(N, dtype=dtype, device=device), swiglu=True, tau=tau).float().cpu()
    kept = silu >= tau
    assert 0 < int(kept.sum()) < N
    assert torch.equal(out[~kept], torch.zeros(int((~kept).sum())))
    expected = (F.silu(gate) * up)[kept].float()
    assert relative_error(out[kept], expected) < tolerance(dtype, 4)


@pytest.mark.parametrize("device, dtype", CPU_CASES + GPU_CASES)
@pytest.mark.parametrize("swiglu", [False, True], ids=["plain", "swiglu"])
@pytest.mark.parametrize("with_delta", [False, True], ids=["first-norm", "residual-add"])
def test_gemv_with_the_norm_prologue_is_add_rmsnorm_then_the_gemv(device, dtype, swiglu, with_delta):
    """gemv(norm=...): the residual add and the RMSNorm made inside the GEMV. The new residual x + delta goes to
    res_out rounded exactly as PyTorch rounds the add (x itself untouched, res_out untouched without a delta);
    the output against float64 of the PyTorch-normed input: the normed input may differ from PyTorch's by one
    rounding where a float32 sum differs, then the GEMV's own roundings (one, or four with SwiGLU). K is not a
    multiple of the weight chunk, and with EARLY on the GPU the first chunk is normed on its own."""
    require_triton(device)
    N, K = (4096, 4096) if device == "cuda" else (24, 72)
    g = torch.Generator().manual_seed(K + swiglu)
    weight = (torch.randn((2 if swiglu else 1) * N, K, generator=g) / K ** 0.5).to(device, dtype)
    x = torch.randn(K, generator=g).to(device, dtype)
    delta = torch.randn(K, generator=g).to(device, dtype) if with_delta else None
    norm_weight = (torch.rand(K, generator=g) + 0.5).to(device, dtype)
    before = x.clone()
    res_out = poisoned(K, dtype=dtype, device=device)
    out = gemv(weight, x, poisoned(N, dtype=dtype, device=device), {"BLOCK_K": 32} if device == "cpu" else None,
               swiglu=swiglu, norm=(delta, norm_weight, 1e-5, res_out))
    assert torch.equal(x, before)
    residual = x + delta if with_delta else x
    if with_delta:
        assert torch.equal(res_out, residual)
    else:
        assert torch.isnan(res_out.float()).all()
    assert_is_the_normed_product(out, weight, residual, norm_weight, swiglu, dtype)


def assert_is_the_normed_product(out, weight, residual, norm_weight, swiglu: bool, dtype):
    """out against float64 of weight @ RMSNorm(residual)·norm_weight (eps 1e-5; with `swiglu`, silu(gate)·up):
    the normed input may differ from PyTorch's by one rounding where a float32 sum differs, then the GEMV's own
    roundings (one, or four with SwiGLU)."""
    normed = rmsnorm_reference(residual[None], norm_weight, 1e-5)[0]
    product = weight.double().cpu() @ normed.double().cpu()
    if swiglu:
        gate, up = product.chunk(2)
        product = F.silu(gate) * up
    assert torch.isfinite(out.float()).all()
    assert relative_error(out.float().cpu(), product.float()) < tolerance(dtype, 5 if swiglu else 2)


@pytest.mark.parametrize("device, dtype", CPU_CASES + GPU_CASES)
def test_gemv_adding_the_residual_leaves_each_programs_sum_of_squares(device, dtype):
    """gemv(residual=(r, sums)): out is r + W a with the product rounded as stored and the add rounded as
    add_rmsnorm rounds it (bit for bit against the plain GEMV then that add; r untouched), and each program's
    entry of sums (NaN before) is its rows' sum of squares of out, float32 against float64. The last program's
    rows run past N (masked), and on the GPU the shapes are Llama-2-7B's o_proj and down."""
    require_triton(device)
    from rana_core.decode.gemv import INTERPRETER_CONFIG, gemv_programs

    for N, K in ([(4096, 4096), (4096, 11008)] if device == "cuda" else [(72, 48)]):
        g = torch.Generator().manual_seed(N + K)
        weight = (torch.randn(N, K, generator=g) / K ** 0.5).to(device, dtype)
        a, r = torch.randn(K, generator=g).to(device, dtype), torch.randn(N, generator=g).to(device, dtype)
        before = r.clone()
        programs = gemv_programs(N, K)
        sums = torch.full((programs,), float("nan"), device=device)
        out = gemv(weight, a, poisoned(N, dtype=dtype, device=device), residual=(r, sums))
        assert torch.equal(r, before)
        product = gemv(weight, a, poisoned(N, dtype=dtype, device=device))
        assert torch.equal(out, (r.float() + product.float()).to(dtype))
        expected = r.double().cpu() + weight.double().cpu() @ a.double().cpu()
        assert relative_error(out.float().cpu(), expected.float()) < tolerance(dtype, 2)
        rows = (INTERPRETER_CONFIG if device == "cpu" else gemv_config(K))["BLOCK_N"]  # each program's rows
        by_program = out.double().cpu().square().split(rows)
        assert len(by_program) == programs
        for total, block in zip(sums.cpu(), by_program):
            assert abs(float(total) - float(block.sum())) <= 1e-5 * float(block.sum()), (N, K)


@pytest.mark.parametrize("device, dtype", CPU_CASES + GPU_CASES)
@pytest.mark.parametrize("swiglu", [False, True], ids=["plain", "swiglu"])
def test_gemv_normed_from_the_sums_is_rmsnorm_then_the_gemv(device, dtype, swiglu):
    """gemv(norm=(None, w, eps, None), norm_sums=sums): the input is RMSNorm(x)·w with 1/rms from the sums a
    residual GEMV left (not from x), against float64 of the PyTorch-normed x; a residual GEMV over the 7B shape
    (4,096 rows: 512 programs' sums) makes x and its sums on the GPU. Without the sums' last entry (a program's
    rows left out of the rms) it fails: the sums are all read."""
    require_triton(device)
    from rana_core.decode.gemv import gemv_programs

    N, K = (4096, 4096) if device == "cuda" else (24, 72)
    g = torch.Generator().manual_seed(K + swiglu)
    producer = (torch.randn(K, K, generator=g) / K ** 0.5).to(device, dtype)
    a, r = torch.randn(K, generator=g).to(device, dtype), torch.randn(K, generator=g).to(device, dtype)
    sums = torch.empty(gemv_programs(K, K), device=device)
    x = gemv(producer, a, torch.empty(K, dtype=dtype, device=device), residual=(r, sums))
    weight = (torch.randn((2 if swiglu else 1) * N, K, generator=g) / K ** 0.5).to(device, dtype)
    norm_weight = (torch.rand(K, generator=g) + 0.5).to(device, dtype)
    out = gemv(weight, x, poisoned(N, dtype=dtype, device=device), swiglu=swiglu,
               norm=(None, norm_weight, 1e-5, None), norm_sums=sums)
    assert_is_the_normed_product(out, weight, x, norm_weight, swiglu, dtype)


def test_the_residual_and_sums_options_refuse_what_they_cannot_make():
    from rana_core.decode.gemv import gemv_programs

    weight, x = torch.zeros(4, 8), torch.zeros(8)
    with pytest.raises(ValueError, match="one sum of squares per program"):
        gemv(weight, x, torch.zeros(4), residual=(torch.zeros(4), torch.zeros(gemv_programs(4, 8) + 1)))
    with pytest.raises(ValueError, match="norm_sums: the residual is already added"):
        gemv(weight, x, torch.zeros(4), norm=(torch.ones(8), torch.ones(8), 1e-5, torch.zeros(8)),
             norm_sums=torch.zeros(1))


def test_the_norm_prologue_refuses_to_write_the_residual_over_itself():
    x = torch.zeros(8)
    with pytest.raises(ValueError, match="another buffer"):
        gemv(torch.zeros(4, 8), x, torch.zeros(4), norm=(torch.ones(8), torch.ones(8), 1e-5, x))


def test_early_weights_follow_their_option(monkeypatch):
    """RANA_EARLY_WEIGHTS: every row length by default, rows of EARLY_MIN_K columns or more under "long", none under
    "0"; anything else is refused with the values it takes."""
    from rana_core.decode.gemv import _early_weights

    monkeypatch.delenv("RANA_EARLY_WEIGHTS", raising=False)
    assert (_early_weights(576, 2048), _early_weights(4096, 2048)) == (True, True)
    monkeypatch.setenv("RANA_EARLY_WEIGHTS", "long")
    assert (_early_weights(576, 2048), _early_weights(2048, 2048)) == (False, True)
    monkeypatch.setenv("RANA_EARLY_WEIGHTS", "0")
    assert _early_weights(4096, 2048) is False
    monkeypatch.setenv("RANA_EARLY_WEIGHTS", "1")
    with pytest.raises(ValueError, match="all, long or 0"):
        _early_weights(4096, 2048)


@pytest.mark.parametrize("device, dtype", CPU_CASES + GPU_CASES)
@pytest.mark.parametrize("swiglu", [False, True], ids=["plain", "swiglu"])
def test_gemv_with_its_first_weight_chunk_loaded_early_gives_the_same_bits(device, dtype, swiglu, monkeypatch):
    """The first chunk of each program's rows loaded before the wait for the launch before (RANA_EARLY_WEIGHTS) enters
    the sum exactly where the loop would have put it: the same output bit for bit, with K under one chunk, a whole
    number of chunks and a ragged last chunk."""
    require_triton(device)
    block_k = 512 if device == "cuda" else 32
    for N, K in [(40, 20), (40, 64), (24, 70)] if device == "cpu" else [(4096, 4096), (11008, 4100), (96, 300)]:
        g = torch.Generator().manual_seed(N * K)
        weight = (torch.randn((2 if swiglu else 1) * N, K, generator=g) / K ** 0.5).to(device, dtype)
        x = torch.randn(K, generator=g).to(device, dtype)
        outs = []
        for early in ("0", "all"):  # after the wait, then early
            monkeypatch.setenv("RANA_EARLY_WEIGHTS", early)
            outs.append(gemv(weight, x, poisoned(N, dtype=dtype, device=device), {"BLOCK_K": block_k}, swiglu=swiglu))
        assert torch.isfinite(outs[1].float()).all()
        assert torch.equal(outs[0], outs[1]), (N, K)


@pytest.mark.parametrize("device, dtype", CPU_CASES + GPU_CASES)
@pytest.mark.parametrize("density", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("form", ["plain", "swiglu, own coefficients", "swiglu, shared input"])
@pytest.mark.parametrize("with_scale", [False, True], ids=["scores |x|", "scores |x|·scale"])
def test_gemv_with_an_input_mask_is_the_masked_product_over_every_row(device, dtype, density, form, with_scale):
    """gemv's input_mask: the product of every row with the dropped inputs zeroed, i.e. the masked product
    Σ_{kept k} x_k W[:, k] (small models' MLP chain, parts.swiglu_chain); swiglu's up rows masked by their own
    threshold (and scale), on their own coefficients or on the same input; nothing kept gives exact zeros."""
    require_triton(device)
    swiglu, split = form != "plain", form == "swiglu, own coefficients"
    groups = 2 if swiglu else 1
    for N, K in [(1536, 360), (576, 1536)] if device == "cuda" else [(24, 40), (6, 2100)]:
        g = torch.Generator().manual_seed(N + K)
        weight = (torch.randn(groups * N, K, generator=g) / K ** 0.5).to(device, dtype)
        x = torch.randn((2 if split else 1) * K, generator=g).to(device, dtype)
        scale = (torch.rand(groups * K, generator=g) + 0.5).to(device) if with_scale else None
        inputs = x.double().cpu().view(-1, K)  # each group's own coefficients, or one row both read
        kept_inputs, thresholds = [], []
        for group in range(groups):
            coefficients = inputs[group if split else 0]
            score = coefficients.abs() * (scale.double().cpu().view(groups, K)[group] if with_scale else 1.0)
            threshold = threshold_for_density(score.float(), min(1.0, density * (1 + 0.5 * group)))
            thresholds.append(threshold)
            kept_inputs.append(torch.where(score.float() >= threshold, coefficients, 0.0))
        threshold = torch.cat(thresholds).float().to(device)
        products = [w @ kept for w, kept in zip(weight.double().cpu().chunk(groups), kept_inputs)]
        expected = (F.silu(products[0]) * products[1]) if swiglu else products[0]
        out = gemv(weight, x, poisoned(N, dtype=dtype, device=device), swiglu=swiglu,
                   input_mask=(threshold, scale, split))
        assert torch.isfinite(out).all()
        if density == 0.0:
            assert torch.count_nonzero(out) == 0
        else:  # plain: one rounding; swiglu: gate and up, silu(gate) and the product rounded
            assert relative_error(out.float().cpu(), expected.float()) < tolerance(dtype, 4 if swiglu else 1), (N, K)


def test_gemv_input_mask_arguments_are_checked():
    weight, x = torch.zeros(8, 4), torch.zeros(4)
    with pytest.raises(ValueError, match="input mask"):
        gemv(weight, x, torch.zeros(4), swiglu=True, input_mask=(torch.zeros(1), None, False))
    with pytest.raises(ValueError, match="input mask"):
        gemv(weight, x, torch.zeros(4), swiglu=True, input_mask=(torch.zeros(2), None, True))
    with pytest.raises(ValueError, match="input mask"):
        gemv(weight, x, torch.zeros(8), input_mask=(torch.zeros(1), torch.ones(3), False))
