"""The rank adapter's product in one launch (rana_core.decode.rank_fused) against float64: z = B·x rounded to the
dtype, the ranks whose |z| reaches the threshold, their rows of Aᵀ summed. On the CPU in Triton's interpreter on
small shapes; the `gpu` tests at SmolLM2-135M's RaNA −44% MLP sizes in fp16 and bf16. The partial sums' buffer is
poisoned with NaN first, so a split a program forgets to write shows."""

import pytest
import torch

from rana_core.decode import rank_fused
from rana_core.decode.dense_kernels import rmsnorm_reference

from test_decode_kernels import tolerance
from test_kernels import relative_error, require_triton

CPU_CASES = [("cpu", torch.float32)]
GPU_CASES = [pytest.param("cuda", dtype, marks=pytest.mark.gpu) for dtype in (torch.float16, torch.bfloat16)]


def threshold_in_a_gap(scores: torch.Tensor, density: float) -> torch.Tensor:
    """A threshold keeping about `density` of the scores, halfway across the widest gap between neighbouring
    scores near that quantile, so that no score sits within rounding of it (a flip would change the mask)."""
    if density <= 0.0:
        return torch.tensor([float("inf")])
    if density >= 1.0:
        return torch.tensor([0.0])
    ordered = scores.double().sort(descending=True).values
    target = max(1, round(density * ordered.numel()))
    window = range(max(1, target - 8), min(ordered.numel() - 1, target + 8))
    i = max(window, key=lambda j: ordered[j - 1] - ordered[j])
    return ((ordered[i - 1] + ordered[i]) / 2).float().reshape(1)


def expected_product(B, rows, xn, threshold, groups):
    """float64: Σ over the kept ranks of z_k · row_k, per group; z rounded to the dtype as B's GEMV stores it."""
    K = B.shape[0] // groups
    z = (B.double() @ xn.double()).to(B.dtype).double()
    out = []
    for g in range(groups):
        zg = z[g * K:(g + 1) * K]
        kept = zg.abs() >= threshold[g].double()
        out.append((zg * kept) @ rows[g * K:(g + 1) * K].double())
    return torch.stack(out)


def summed(partial, splits, groups, M):
    return partial[: groups * splits * M].view(groups, splits, M).double().sum(1)


def run(B, rows, x, threshold, groups, norm=None):
    """rank_partials with its partial sums' buffer poisoned first."""
    partial, splits = rank_fused.rank_partials(B, rows, x, threshold, groups, norm)
    partial.fill_(float("nan"))
    return rank_fused.rank_partials(B, rows, x, threshold, groups, norm)


@pytest.mark.parametrize("device, dtype", CPU_CASES + GPU_CASES)
@pytest.mark.parametrize("density", [0.0, 0.35, 1.0])
@pytest.mark.parametrize("with_norm", [False, True])
def test_rank_product_in_one_launch_matches_float64(device, dtype, density, with_norm):
    """Gate's and up's rank products (two groups, each its own threshold), from a normed input or from the
    residual with the add and RMSNorm made inside (the new residual written to res_out, x left as it was)."""
    require_triton(device)
    K, H, M = (360, 576, 1536) if device == "cuda" else (40, 24, 20)  # K not a multiple of 16, H and M not of 2^k
    g = torch.Generator().manual_seed(K + int(density * 100))
    B = (torch.randn(2 * K, H, generator=g) / H ** 0.5).to(device, dtype)
    rows = (torch.randn(2 * K, M, generator=g) / K ** 0.5).to(device, dtype)
    x = torch.randn(H, generator=g).to(device, dtype)
    norm, xn = None, x
    if with_norm:
        delta = torch.randn(H, generator=g).to(device, dtype)
        weight = (torch.rand(H, generator=g) + 0.5).to(device, dtype)
        res_out = torch.full((H,), float("nan"), dtype=dtype, device=device)
        norm = (delta, weight, 1e-5, res_out)
        xn = rmsnorm_reference((x + delta)[None], weight, 1e-5)[0]
    z = (B.double() @ xn.double()).abs().view(2, K)
    threshold = torch.cat([threshold_in_a_gap(z[0].cpu(), density),
                           threshold_in_a_gap(z[1].cpu(), density / 2)]).to(device)
    x_before = x.clone()
    partial, splits = run(B, rows, x, threshold, 2, norm)
    assert splits >= 2  # several programs per group
    out = summed(partial, splits, 2, M).cpu()
    assert torch.isfinite(out).all()
    if with_norm:
        assert torch.equal(x, x_before) and torch.equal(res_out, x + delta)
    expected = expected_product(B.cpu(), rows.cpu(), xn.cpu(), threshold.cpu(), 2)
    if density == 0.0:
        assert torch.count_nonzero(out) == 0
    else:
        assert relative_error(out, expected) < tolerance(dtype, 2)


def test_rank_product_arguments_are_checked():
    B, rows, x = torch.zeros(8, 4), torch.zeros(8, 6), torch.zeros(4)
    with pytest.raises(ValueError, match="2 stacked rank adapters"):
        rank_fused.rank_partials(B, rows[:-1], x, torch.zeros(2), 2)
    with pytest.raises(ValueError, match="2 stacked rank adapters"):
        rank_fused.rank_partials(B, rows, x, torch.zeros(1), 2)


def test_the_fused_product_is_taken_on_small_adapters_only(monkeypatch):
    """auto (the default): up to FUSED_MAX_BYTES of B and rows (SmolLM2's MLP at −44%: ~3 MB), not Llama-2-7B's
    (~185 MB); 0 and 1 force it; anything else is one ValueError."""
    monkeypatch.delenv("RANA_RANK_FUSED", raising=False)
    small = (torch.empty(720, 576, dtype=torch.float16, device="meta"),
             torch.empty(720, 1536, dtype=torch.float16, device="meta"))
    large = (torch.empty(6164, 4096, dtype=torch.float16, device="meta"),
             torch.empty(6164, 11008, dtype=torch.float16, device="meta"))
    assert rank_fused.applies(*small) and not rank_fused.applies(*large)
    monkeypatch.setenv("RANA_RANK_FUSED", "1")
    assert rank_fused.applies(*large)
    monkeypatch.setenv("RANA_RANK_FUSED", "0")
    assert not rank_fused.applies(*small)
    monkeypatch.setenv("RANA_RANK_FUSED", "on")
    with pytest.raises(ValueError, match="expected auto, 0 or 1"):
        rank_fused.applies(*small)


def test_other_program_shapes_give_the_same_product(monkeypatch):
    """More ranks a program (fewer splits), narrower column steps and B's product in several steps: the same sums
    to float32 rounding (only their grouping changes)."""
    require_triton("cpu")
    K, H, M = 40, 24, 20
    g = torch.Generator().manual_seed(5)
    B, rows = torch.randn(2 * K, H, generator=g), torch.randn(2 * K, M, generator=g)
    x = torch.randn(H, generator=g)
    threshold = torch.tensor([0.5, 1.0])
    results = []
    for config in ("16,256,256,4", "32,8,8,2", "4,16,16,1"):
        monkeypatch.setenv("RANA_RANK_FUSED_CONFIG", config)
        partial, splits = run(B, rows, x, threshold, 2)
        results.append(summed(partial, splits, 2, M))
    for result in results[1:]:
        assert (result - results[0]).abs().max() <= 1e-5 * results[0].abs().max()
    expected = expected_product(B, rows, x, threshold, 2)
    assert relative_error(results[0], expected) < tolerance(torch.float32, 2)
