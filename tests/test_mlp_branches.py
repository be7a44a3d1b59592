"""RaNA's masked MLP of the list design in branches side by side (RANA_MLP_BRANCHES, mlp_branches): the shared
rank compaction, then per range of neurons a gate/up gather, down's compaction and down's gather on streams of
their own, one reduction. Against float64 (outputs poisoned, densities 0 to 100%, with and without the residual)
and against the single chain in the engine. On the CPU the kernels run in Triton's interpreter (small shapes,
the branches one after another); the `gpu` cases at 7B sizes in fp16 and bf16, the branches on two streams."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from rana_core.decode.mlp_branches import branched_swiglu_chain, mlp_branches, neuron_ranges
from rana_core.decode.masked_kernels import reference_masked_rows

from test_decode_kernels import CPU_CASES, GPU_CASES, poisoned, tolerance
from test_kernels import relative_error, require_triton, threshold_for_density


def mlp_case(device, dtype, density, seed):
    """A gate/up rank product's rows, coefficients and thresholds (about a third of the ranks active) and a
    neuron part for down keeping about `density` of its neurons, with the float64 reference of h and of down."""
    K, M, H = (3082, 11008, 4096) if device == "cuda" else (300, 200, 24)
    g = torch.Generator().manual_seed(seed)
    gate_up_rows = (torch.randn(2 * K, M, generator=g) / K ** 0.5).to(device, dtype)
    z = torch.randn(2 * K, generator=g).to(device, dtype)
    gate_up_threshold = threshold_for_density(z.float().abs(), 0.35).repeat(2).contiguous()
    gate = reference_masked_rows(gate_up_rows[:K].cpu(), z[:K].cpu(), gate_up_threshold[:1].cpu())
    up = reference_masked_rows(gate_up_rows[K:].cpu(), z[K:].cpu(), gate_up_threshold[1:].cpu())
    h = (F.silu(gate.to(dtype).float()).to(dtype).float() * up.to(dtype).float()).to(dtype)
    rows = (torch.randn(M, H, generator=g) / M ** 0.5).to(device, dtype)
    scale = (torch.rand(M, generator=g) + 0.5).to(device)
    threshold = threshold_for_density(h.float().abs() * scale.cpu(), density).to(device)
    down = SimpleNamespace(rows=rows, threshold=threshold, scale=scale, out=poisoned(H, dtype=dtype, device=device))
    expected = reference_masked_rows(rows.cpu(), h, threshold.cpu(), scale.cpu())
    return gate_up_rows, z, gate_up_threshold, down, h, expected


@pytest.mark.parametrize("device, dtype", CPU_CASES + GPU_CASES)
@pytest.mark.parametrize("density", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("branches", [2, 3])
def test_branches_compute_the_masked_mlp(device, dtype, density, branches, monkeypatch):
    """h (written by each branch's down compaction) and down's output against float64, every element written;
    nothing at all where down keeps no neuron."""
    require_triton(device)
    monkeypatch.setenv("RANA_MASKED_PRODUCT", "list")
    gate_up_rows, z, gate_up_threshold, down, h_expected, expected = mlp_case(device, dtype, density, 7 + branches)
    h = poisoned(gate_up_rows.shape[1], dtype=dtype, device=device)
    out = branched_swiglu_chain(gate_up_rows, z, gate_up_threshold, down, h, branches=branches)
    assert out.shape == (1, down.rows.shape[1]) and torch.isfinite(out.float()).all()
    assert relative_error(h.float().cpu(), h_expected.float()) < tolerance(dtype)
    if density == 0.0:
        assert torch.count_nonzero(out) == 0
    else:  # one rounding of the output; the second for the few elements of h a flipped rounding moved
        assert relative_error(out.float().cpu(), expected) < tolerance(dtype, 2)


@pytest.mark.parametrize("device, dtype", CPU_CASES + GPU_CASES)
def test_branches_add_the_residual_and_leave_its_sums_of_squares(device, dtype, monkeypatch):
    """With the residual: out = r + the MLP (rounded once more), and one sum of squares of out per reduction
    program, covering every column once."""
    require_triton(device)
    monkeypatch.setenv("RANA_MASKED_PRODUCT", "list")
    gate_up_rows, z, gate_up_threshold, down, h_expected, expected = mlp_case(device, dtype, 0.5, 3)
    r = torch.randn(down.rows.shape[1], generator=torch.Generator().manual_seed(5)).to(device, dtype)
    out = poisoned(down.rows.shape[1], dtype=dtype, device=device)
    h = poisoned(gate_up_rows.shape[1], dtype=dtype, device=device)
    sums = branched_swiglu_chain(gate_up_rows, z, gate_up_threshold, down, h, residual=(r, out))
    assert relative_error(out.float().cpu(), r.double().cpu() + expected) < tolerance(dtype, 2)
    assert abs(float(sums.double().sum()) / float(out.double().square().sum()) - 1) < 1e-5


def test_neuron_ranges_are_whole_column_blocks_covering_every_neuron():
    assert neuron_ranges(11008, 2) == [(0, 5504), (5504, 11008)]
    assert neuron_ranges(160, 2) == [(0, 128), (128, 160)]  # 3 blocks of 64: the last range the short one
    assert neuron_ranges(100, 3) == [(0, 64), (64, 100)]  # fewer blocks than branches: no empty range


def test_the_branch_count_reads_its_variable(monkeypatch):
    monkeypatch.delenv("RANA_MLP_BRANCHES", raising=False)
    assert mlp_branches() == 2  # the default: two branches (timed faster on an H200)
    monkeypatch.setenv("RANA_MLP_BRANCHES", "1")
    assert mlp_branches() == 1
    monkeypatch.setenv("RANA_MLP_BRANCHES", "two")
    with pytest.raises(ValueError, match="RANA_MLP_BRANCHES=two: expected 1 to 4 branches"):
        mlp_branches()


@pytest.mark.parametrize("shape", ["tiny", "tiny-mha"], ids=["rana-mlp", "rana-qkv-and-mlp"])
def test_the_engine_in_branches_decodes_what_the_chain_decodes(shape, monkeypatch):
    """Five one-token steps of the tiny RaNA engine at a 0.44 cut, the list design forced (float32, Triton's
    interpreter): the same logits to float32 rounding with the MLP in two branches as in one chain, and the
    branched function called once a layer a step."""
    require_triton("cpu")
    import rana_core.decode.parts as parts
    from rana_core.decode.engine import DecodeEngine
    from test_engine import TINY, TINY_MHA, decode_steps

    monkeypatch.setenv("RANA_MASKED_PRODUCT", "list")
    shape = TINY if shape == "tiny" else TINY_MHA
    engine = DecodeEngine(shape, torch.float32, "cpu", flop_reduction=0.44, gemv="triton")
    engine.calibrate(tokens=256)
    prompt = torch.randint(0, shape.vocab, (6,), generator=torch.Generator().manual_seed(2))
    calls, real = [], parts.branched_swiglu_chain
    monkeypatch.setattr(parts, "branched_swiglu_chain", lambda *args: calls.append(1) or real(*args))
    logits = {}
    for branches in ("1", "2"):
        monkeypatch.setenv("RANA_MLP_BRANCHES", branches)
        logits[branches], _ = decode_steps(engine, prompt, 5, "sums", monkeypatch)
    assert len(calls) == 5 * shape.layers
    assert relative_error(logits["2"], logits["1"]) < 2e-6  # a few float32 roundings (eps 1.2e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", ["llama2-7b-shape", "smollm2-135m-shape"])
def test_branches_in_replayed_steps_on_the_gpu(shape, monkeypatch):
    """A RaNA -44% engine's graph replayed 16 steps (fp16, PDL, the branches on two streams): the same bits in two
    engines built alike (the graph forks and joins the same way each replay), and the single chain's logits within
    the rounding of the split sums (every row kept and every step fed the same token and position, so no mask or
    argmax can flip)."""
    from rana_core.decode.engine import SHAPES, DecodeEngine

    monkeypatch.setenv("RANA_MASKED_PRODUCT", "list")

    def replayed(branches: str) -> torch.Tensor:
        monkeypatch.setenv("RANA_MLP_BRANCHES", branches)
        torch.manual_seed(0)
        engine = DecodeEngine(SHAPES[shape], torch.float16, "cuda", flop_reduction=0.44, gemv="triton", seed=3)
        for part in engine.adapters():
            part.threshold.fill_(0.0)
        engine.allocate(64)
        engine.prefill(torch.arange(20, device="cuda") * 37 % engine.shape.vocab)
        engine.capture()
        steps = []
        for step in range(16):
            engine.token.fill_(step * 101 % engine.shape.vocab)
            engine.pos.fill_(20 + step)
            engine.graph.replay()
            steps.append(engine.graph_logits.float().clone())
        return torch.stack(steps)

    branched = [replayed("2") for _ in range(2)]
    chain = replayed("1")
    assert torch.equal(branched[0], branched[1])
    assert relative_error(branched[0], chain) < 5e-3
