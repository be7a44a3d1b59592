"""RaNA's masked MLP by blocks of neurons in one launch (RANA_MLP_BLOCKS, mlp_blocks): against float64 (outputs
poisoned, down keeping 0, 50 and 100% of its neurons, ranks predicated or listed, with and without the residual,
coefficients split or shared) and against the list design's chain in the engine. On the CPU the kernel runs in
Triton's interpreter on small shapes with small tiles (several blocks, the last one short, two column splits, the
last one short); the `gpu` cases at 7B sizes in fp16 and bf16 with the default tiles."""

from types import SimpleNamespace

import pytest
import torch

from rana_core.decode.masked_kernels import reference_masked_rows
from rana_core.decode.mlp_blocks import CONFIG, blocked_swiglu_chain, blocks_config

from test_decode_kernels import CPU_CASES, GPU_CASES, poisoned, tolerance
from test_kernels import relative_error, require_triton, threshold_for_density
from test_mlp_branches import mlp_case

SMALL = "32-32-16-2-4-1"  # NB-BK-BD-splits-warps-stages: 200 neurons in 7 blocks, 24 columns in splits of 16


def config(device, rank_list: int) -> str:
    return (SMALL if device == "cpu" else "-".join(map(str, CONFIG[:6]))) + f"-{rank_list}"


@pytest.mark.parametrize("device, dtype", CPU_CASES + GPU_CASES)
@pytest.mark.parametrize("density", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("rank_list", [0, 1], ids=["predicated", "listed"])
def test_blocks_compute_the_masked_mlp(device, dtype, density, rank_list, monkeypatch):
    """Down's output against float64, every element written; exactly zero where down keeps no neuron."""
    require_triton(device)
    monkeypatch.setenv("RANA_MLP_BLOCKS", config(device, rank_list))
    gate_up_rows, z, gate_up_threshold, down, _, expected = mlp_case(device, dtype, density, 11 + rank_list)
    out = blocked_swiglu_chain(gate_up_rows, z, gate_up_threshold, down)
    assert out.shape == (1, down.rows.shape[1]) and torch.isfinite(out.float()).all()
    if density == 0.0:
        assert torch.count_nonzero(out) == 0
    else:  # one rounding of the output; the second for the few elements of h a flipped rounding moved
        assert relative_error(out.float().cpu(), expected) < tolerance(dtype, 2)


@pytest.mark.parametrize("device, dtype", CPU_CASES + GPU_CASES)
def test_blocks_add_the_residual_and_leave_its_sums_of_squares(device, dtype, monkeypatch):
    """With the residual: out = r + the MLP (rounded once more), and the reduction's sums of squares of out."""
    require_triton(device)
    monkeypatch.setenv("RANA_MLP_BLOCKS", config(device, 0))
    gate_up_rows, z, gate_up_threshold, down, _, expected = mlp_case(device, dtype, 0.5, 4)
    r = torch.randn(down.rows.shape[1], generator=torch.Generator().manual_seed(5)).to(device, dtype)
    out = poisoned(down.rows.shape[1], dtype=dtype, device=device)
    sums = blocked_swiglu_chain(gate_up_rows, z, gate_up_threshold, down, residual=(r, out))
    assert relative_error(out.float().cpu(), r.double().cpu() + expected) < tolerance(dtype, 2)
    assert abs(float(sums.double().sum()) / float(out.double().square().sum()) - 1) < 1e-5


@pytest.mark.parametrize("device, dtype", CPU_CASES + GPU_CASES)
def test_blocks_mask_shared_coefficients_with_scales(device, dtype, monkeypatch):
    """TEAL's or WINA's MLP: gate and up read the same input, each with its own threshold and per-row scales (the
    rank list asked for: shared inputs are predicated all the same)."""
    require_triton(device)
    monkeypatch.setenv("RANA_MLP_BLOCKS", config(device, 1))
    K, M, H = (4096, 11008, 4096) if device == "cuda" else (72, 100, 40)
    g = torch.Generator().manual_seed(8)
    rows = (torch.randn(2 * K, M, generator=g) / K ** 0.5).to(device, dtype)
    x = torch.randn(K, generator=g).to(device, dtype)
    scale = (torch.rand(2 * K, generator=g) + 0.5).to(device)
    scores = x.float().abs().cpu() * scale.cpu().view(2, K)
    threshold = torch.cat([threshold_for_density(scores[0], 0.4), threshold_for_density(scores[1], 0.6)]).to(device)
    gate = reference_masked_rows(rows[:K].cpu(), x.cpu(), threshold[:1].cpu(), scale[:K].cpu())
    up = reference_masked_rows(rows[K:].cpu(), x.cpu(), threshold[1:].cpu(), scale[K:].cpu())
    h = (torch.nn.functional.silu(gate.to(dtype).float()).to(dtype).float() * up.to(dtype).float()).to(dtype)
    down_rows = (torch.randn(M, H, generator=g) / M ** 0.5).to(device, dtype)
    down = SimpleNamespace(rows=down_rows, threshold=torch.zeros(1, device=device), scale=None,
                           out=poisoned(H, dtype=dtype, device=device))
    out = blocked_swiglu_chain(rows, x, threshold, down, scale=scale, shared_coeff=True)
    expected = reference_masked_rows(down_rows.cpu(), h, torch.zeros(1))
    assert relative_error(out.float().cpu(), expected) < tolerance(dtype, 2)


def test_the_configuration_reads_its_variable(monkeypatch):
    monkeypatch.delenv("RANA_MLP_BLOCKS", raising=False)
    assert blocks_config() is None  # off by default: the list design's chain
    monkeypatch.setenv("RANA_MLP_BLOCKS", "1")
    assert blocks_config() == CONFIG
    monkeypatch.setenv("RANA_MLP_BLOCKS", "32-64-256-4-8-3-1")
    assert blocks_config() == (32, 64, 256, 4, 8, 3, 1)
    for text in ("48-64-256-4-8-3-1", "32-64-256-4-8-3-2", "blocks", "32-64"):
        monkeypatch.setenv("RANA_MLP_BLOCKS", text)
        with pytest.raises(ValueError, match=f"RANA_MLP_BLOCKS={text}: "):
            blocks_config()


@pytest.mark.parametrize("rank_list", ["0", "1"], ids=["predicated", "listed"])
def test_the_engine_by_blocks_decodes_what_the_chain_decodes(rank_list, monkeypatch):
    """Five one-token steps of the tiny RaNA engine at a 0.44 cut, the list design forced (float32, Triton's
    interpreter): the same logits to float32 rounding by blocks as in one chain, the blocks' function called once
    a layer a step."""
    require_triton("cpu")
    import rana_core.decode.mlp_blocks as mlp_blocks
    from rana_core.decode.engine import DecodeEngine
    from test_engine import TINY, decode_steps

    monkeypatch.setenv("RANA_MASKED_PRODUCT", "list")
    monkeypatch.setenv("RANA_MLP_BRANCHES", "1")
    engine = DecodeEngine(TINY, torch.float32, "cpu", flop_reduction=0.44, gemv="triton")
    engine.calibrate(tokens=256)
    prompt = torch.randint(0, TINY.vocab, (6,), generator=torch.Generator().manual_seed(2))
    calls, real = [], mlp_blocks.blocked_swiglu_chain
    monkeypatch.setattr(mlp_blocks, "blocked_swiglu_chain", lambda *args: calls.append(1) or real(*args))
    logits = {}
    for blocks in ("0", f"16-16-16-2-4-1-{rank_list}"):
        monkeypatch.setenv("RANA_MLP_BLOCKS", blocks)
        logits[blocks], _ = decode_steps(engine, prompt, 5, "sums", monkeypatch)
    assert len(calls) == 5 * TINY.layers
    assert relative_error(logits[blocks], logits["0"]) < 2e-6  # a few float32 roundings (eps 1.2e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("rank_list", ["0", "1"], ids=["predicated", "listed"])
def test_blocks_in_replayed_steps_on_the_gpu(rank_list, monkeypatch):
    """A 7B-shaped RaNA -44% engine's graph replayed 16 steps (fp16, PDL): the same bits in two engines built alike,
    and the list chain's logits within the rounding of differently split sums (every row kept, every step fed the
    same token and position, so no mask or argmax can flip)."""
    from rana_core.decode.engine import SHAPES, DecodeEngine

    monkeypatch.setenv("RANA_MASKED_PRODUCT", "list")

    def replayed(blocks: str) -> torch.Tensor:
        monkeypatch.setenv("RANA_MLP_BLOCKS", blocks)
        torch.manual_seed(0)
        engine = DecodeEngine(SHAPES["llama2-7b-shape"], torch.float16, "cuda", flop_reduction=0.44, gemv="triton",
                              seed=3)
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

    blocks = "-".join(map(str, CONFIG[:6])) + f"-{rank_list}"
    by_blocks = [replayed(blocks) for _ in range(2)]
    chain = replayed("0")
    assert torch.equal(by_blocks[0], by_blocks[1])
    assert relative_error(by_blocks[0], chain) < 5e-3
