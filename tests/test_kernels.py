"""The masked row-sum kernel against a float64 reference, on fresh random inputs and masks of every density,
the all-zero mask included. On the CPU the Triton kernel runs in its interpreter (TRITON_INTERPRET=1, set by
conftest) on small shapes; the `gpu` tests run the compiled kernel at model sizes in fp16 and bf16."""

import pytest
import torch

from rana_core.decode.masked_kernels import masked_rows_batched, masked_rows_gemv, reference_masked_rows

DENSITIES = [0.0, 0.1, 0.5, 0.9, 1.0]

# The masked product's designs (launch options). "wide, small tiles": 4-row tiles, about 8 programs per
# multiprocessor, so that programs of 2 tiles (unrolled) and of many (masked_wide's loop kernel) run on the CPU's
# small shapes too, where the default shape gives every program one tile.
DESIGNS = {
    "list": {"RANA_MASKED_PRODUCT": "list"},
    "wide": {"RANA_MASKED_PRODUCT": "wide"},
    "wide, small tiles": {"RANA_MASKED_PRODUCT": "wide", "RANA_WIDE_CONFIG": "16,4,1,1,8"},
}


def use_design(design: str, monkeypatch) -> None:
    monkeypatch.delenv("RANA_WIDE_CONFIG", raising=False)
    for variable, value in DESIGNS[design].items():
        monkeypatch.setenv(variable, value)

# The kernel multiplies and adds in float32 and `out` is float32. fp16 and bf16 operands (11 and 8 significant
# bits) multiply exactly in float32's 24, so what it can get wrong by rounding is only the float32 sums: rounding
# errors of u = 2^-24 over a program's list share (at most ~330 rows at the GPU sizes below) and then its partial
# sums grow like u·sqrt(n/6) in norm, ≤ 4.5e-7 even for one sequential chain of 330 (float32 operands add one
# rounding of u per product, far less). Measured in the interpreter at the GPU sizes, fp16 and bf16: 0.5-2.1e-7.
# One fp16 rounding anywhere on the way (a partial sum or a coefficient stored in fp16) would show as ~2^-11/√3 ≈
# 3e-4 and fail this.
TOLERANCE = 1e-6


def require_triton(device: str) -> None:
    """The Triton kernels must be what runs: compiled on a GPU, in the interpreter on the CPU. Without either, the
    kernels' entry points fall back to their PyTorch forms, and a check against the PyTorch reference would compare
    the reference with itself. On a machine with a GPU, conftest leaves the interpreter off (the `gpu` tests run the
    compiled kernels), so the CPU variants skip there; on a machine without one the interpreter must be on."""
    from rana_core.decode import masked_kernels as kernels

    assert kernels.triton is not None, "Triton is not installed (requirements.txt pins it): only the fallback runs"
    if device == "cuda":
        return
    from triton.runtime.interpreter import InterpretedFunction

    if kernels.interpreting() and isinstance(kernels._gather_kernel, InterpretedFunction):
        return
    if torch.cuda.is_available():
        pytest.skip("the Triton interpreter is off on this GPU machine: the CPU variant would run only the PyTorch "
                    "fallback (the gpu tests run the compiled kernels)")
    pytest.fail("no GPU and the Triton interpreter is off (TRITON_INTERPRET=1 must be set before triton is "
                "imported, as conftest does): only the PyTorch fallback would run")


def threshold_for_density(score: torch.Tensor, density: float) -> torch.Tensor:
    """A threshold keeping about `density` of the entries (all of them at 1.0, none at 0.0)."""
    if density <= 0.0:
        return torch.tensor([float("inf")], device=score.device)
    if density >= 1.0:
        return torch.tensor([0.0], device=score.device)
    return torch.quantile(score.float().cpu(), 1.0 - density).reshape(1).to(score.device)


def relative_error(out, ref) -> float:
    norm = ref.double().norm()
    return float((out.double() - ref.double()).norm() / norm) if norm > 0 else float(out.double().norm())


def check(K, M, dtype, device, density, with_scale, generator):
    require_triton(device)
    rows = torch.randn(K, M, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
    coeff = torch.randn(K, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
    scale = torch.rand(K, generator=generator).to(device) + 0.5 if with_scale else None
    score = coeff.float().abs() * (scale if scale is not None else 1.0)
    threshold = threshold_for_density(score, density)
    out = torch.full((M,), float("nan"), device=device)  # poisoned: every element must be written
    masked_rows_gemv(rows, coeff, threshold, scale, out=out)
    ref = reference_masked_rows(rows.cpu(), coeff.cpu(), threshold.cpu(), None if scale is None else scale.cpu())
    assert torch.isfinite(out).all()
    if density == 0.0:
        assert torch.count_nonzero(out) == 0
    else:
        assert relative_error(out.cpu(), ref) < TOLERANCE
    return out


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("design", DESIGNS)
def test_interpreted_kernel_matches_float64_on_small_shapes(density, with_scale, design, monkeypatch):
    """The list design (compaction, gather, the reduction launch) and the one-launch wide design (masked_wide),
    whose row tiles are dealt to more programs than some shapes have tiles (those programs must still write their
    zero partial sums)."""
    require_triton("cpu")  # the kernel itself runs, not a fallback
    use_design(design, monkeypatch)
    generator = torch.Generator().manual_seed(int(density * 100) + 7 * with_scale)
    from rana_core.decode import masked_wide
    from rana_core.decode.launch import _BUFFERS

    launched = set()
    for name in ("_wide_kernel", "_wide_loop_kernel"):
        monkeypatch.setattr(masked_wide, name, Launches(getattr(masked_wide, name), name, launched))
    for K, M in ((40, 200), (64, 128), (7, 33), (24, 200)):  # ragged shapes exercise every mask edge
        check(K, M, torch.float32, "cpu", density, with_scale, generator)
        if design != "list":  # a partial sum left unwritten shows as NaN in the next call
            for (name, *_), buffer in _BUFFERS.items():
                if name == "wide partial":
                    buffer.fill_(float("nan"))
            check(K, M, torch.float32, "cpu", density, with_scale, generator)
    # which kernels ran: small tiles give programs of 1-2 tiles (unrolled) and of 5-8 (the loop kernel)
    assert launched == {"list": set(), "wide": {"_wide_kernel"},
                        "wide, small tiles": {"_wide_kernel", "_wide_loop_kernel"}}[design]


class Launches:
    """A Triton kernel that notes its name in `launched` when it is launched."""

    def __init__(self, kernel, name: str, launched: set):
        self.kernel, self.name, self.launched = kernel, name, launched

    def __getitem__(self, grid):
        self.launched.add(self.name)
        return self.kernel[grid]


def test_batches_use_the_dense_product_of_masked_coefficients():
    generator = torch.Generator().manual_seed(3)
    rows, coeff = torch.randn(50, 30, generator=generator), torch.randn(6, 50, generator=generator)
    threshold = torch.tensor([0.8])
    batched = masked_rows_batched(rows, coeff, threshold)
    one_by_one = torch.stack([reference_masked_rows(rows, c, threshold) for c in coeff])
    assert torch.allclose(batched, one_by_one, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("K, M, with_scale", [(4096, 11008, False), (11008, 4096, True), (3440, 12288, False),
                                              (1536, 576, True)])
@pytest.mark.parametrize("design", ["list", "wide"])
def test_gpu_kernel_matches_float64_at_model_sizes(dtype, density, K, M, with_scale, design, monkeypatch):
    use_design(design, monkeypatch)
    generator = torch.Generator().manual_seed(K + M)
    check(K, M, dtype, "cuda", density, with_scale, generator)
    torch.cuda.synchronize()


@pytest.mark.parametrize("density", [0.0, 0.2, 0.7, 1.0])
@pytest.mark.parametrize("via", ["constants", "RANA_GATHER_CONFIG"])
def test_lists_compacted_in_several_chunks_read_as_one(monkeypatch, density, via):
    """With chunks of 16 coefficients, a list of 100 rows is written by 7 compaction programs and read back
    across chunk boundaries by gather programs whose shares straddle them (set by the module's constants, or by
    the bench's override with narrower column blocks and one warp), in steps of 8 rows: a share takes several
    steps, each loading the next step's entries."""
    from rana_core.decode import masked_kernels as kernels

    monkeypatch.setenv("RANA_MASKED_PRODUCT", "list")  # small products take the wide design by default
    if via == "constants":
        monkeypatch.setattr(kernels, "COMPACT_CHUNK", 16)
        monkeypatch.setattr(kernels, "BLOCK_K", 8)
    else:
        monkeypatch.setenv("RANA_GATHER_CONFIG", "16-8-1-1-8-16")
    check(100, 48, torch.float32, "cpu", density, True, torch.Generator().manual_seed(int(density * 10)))


def test_gather_config_override_is_checked(monkeypatch):
    from rana_core.decode.masked_kernels import COMPACT_CHUNK, gather_config

    monkeypatch.setenv("RANA_GATHER_CONFIG", "32-64-1-2-8")
    assert gather_config() == (32, 64, 1, 2, 8, COMPACT_CHUNK)
    for bad in ("64-128-2-3", "64-128-2-3-16-2048-1", "64,128,2,3,16"):
        monkeypatch.setenv("RANA_GATHER_CONFIG", bad)
        with pytest.raises(ValueError, match="RANA_GATHER_CONFIG"):
            gather_config()


def test_small_products_take_the_one_launch_design_by_default(monkeypatch):
    """RANA_MASKED_PRODUCT=auto (the default): the wide design for rows of at most WIDE_MAX_BYTES, the list above
    them; either named explicitly wins."""
    from rana_core.decode import masked_wide

    monkeypatch.delenv("RANA_MASKED_PRODUCT", raising=False)
    monkeypatch.setattr(masked_wide, "WIDE_MAX_BYTES", 1000)
    small, large = torch.zeros(10, 25), torch.zeros(10, 26)  # 1,000 and 1,040 bytes of float32
    assert (masked_wide.design(small), masked_wide.design(large)) == ("wide", "list")
    monkeypatch.setenv("RANA_MASKED_PRODUCT", "list")
    assert masked_wide.design(small) == "list"
    monkeypatch.setenv("RANA_MASKED_PRODUCT", "wide")
    assert masked_wide.design(large) == "wide"
    monkeypatch.setenv("RANA_MASKED_PRODUCT", "wider")
    with pytest.raises(ValueError, match="expected auto, list, wide or gemv"):
        masked_wide.design(small)


def test_small_mlps_take_the_two_gemvs_by_default(monkeypatch):
    """A masked SwiGLU MLP whose rows (gate/up's and down's together) take at most GEMV_MAX_BYTES runs as two
    GEMVs over masked inputs under RANA_MASKED_PRODUCT=auto; "gemv" asks for it at any size, "list" and "wide" for
    the masked products; a product alone under "gemv" takes auto's design."""
    from rana_core.decode import masked_wide

    monkeypatch.delenv("RANA_MASKED_PRODUCT", raising=False)
    monkeypatch.setattr(masked_wide, "GEMV_MAX_BYTES", 1000)
    monkeypatch.setattr(masked_wide, "WIDE_MAX_BYTES", 1000)
    gate_up, down, more = torch.zeros(10, 15), torch.zeros(10, 10), torch.zeros(10, 11)  # 600, 400, 440 bytes
    assert masked_wide.chain_design(gate_up, down) == "gemv"
    assert masked_wide.chain_design(gate_up, more) == "products"
    monkeypatch.setenv("RANA_MASKED_PRODUCT", "gemv")
    assert masked_wide.chain_design(gate_up, more) == "gemv"
    assert (masked_wide.design(down), masked_wide.design(torch.zeros(10, 26))) == ("wide", "list")
    for other in ("list", "wide"):
        monkeypatch.setenv("RANA_MASKED_PRODUCT", other)
        assert masked_wide.chain_design(gate_up, down) == "products"


def test_small_masked_products_take_the_gemv_by_default(monkeypatch):
    """One masked product (QKV's) whose rows take at most GEMV_MAX_BYTES runs as a GEMV over the masked input under
    auto; larger ones take design()'s choice; "gemv" asks for the GEMV at any size, "list" and "wide" never."""
    from rana_core.decode import masked_wide

    monkeypatch.delenv("RANA_MASKED_PRODUCT", raising=False)
    monkeypatch.setattr(masked_wide, "GEMV_MAX_BYTES", 1000)
    monkeypatch.setattr(masked_wide, "WIDE_MAX_BYTES", 2000)
    small, middle, large = torch.zeros(10, 25), torch.zeros(10, 26), torch.zeros(10, 51)  # 1000, 1040, 2040 bytes
    assert [masked_wide.product_design(r) for r in (small, middle, large)] == ["gemv", "wide", "list"]
    monkeypatch.setenv("RANA_MASKED_PRODUCT", "gemv")
    assert masked_wide.product_design(large) == "gemv"
    for other in ("list", "wide"):
        monkeypatch.setenv("RANA_MASKED_PRODUCT", other)
        assert masked_wide.product_design(small) == other
