"""RaNA's B product moved into the o_proj launch (rana_core.decode.b_ahead): the GEMV's two-buffer input and
1/rms scaling against float64, and engines with it on against the same engines with it off."""

import pytest
import torch
import torch.nn.functional as F

from rana_core.decode import engine as engine_module
from rana_core.decode.gemv import gemv
from rana_core.decode.engine import DecodeEngine
from test_decode_kernels import CPU_CASES, GPU_CASES, poisoned, tolerance
from rana_core.decode.parts import RankPart
from test_engine import TINY, TINY_MHA, decode_steps, replayed_logits
from test_kernels import relative_error, require_triton, threshold_for_density


@pytest.mark.parametrize("device, dtype", CPU_CASES + GPU_CASES)
def test_gemv_reads_its_input_from_two_buffers(device, dtype):
    """x_tail: the GEMV's input is x followed by x_tail, read from their own buffers (o_proj over [a ; r_in]), with
    x's length not a multiple of the column block; against float64."""
    require_triton(device)
    for N, head, tail in [(1096, 576, 576), (100, 300, 50)] if device == "cuda" else [(40, 24, 24), (12, 20, 45)]:
        g = torch.Generator().manual_seed(N + head)
        weight = (torch.randn(N, head + tail, generator=g) / (head + tail) ** 0.5).to(device, dtype)
        x, x_tail = torch.randn(head, generator=g).to(device, dtype), torch.randn(tail, generator=g).to(device, dtype)
        expected = weight.double().cpu() @ torch.cat([x, x_tail]).double().cpu()
        out = gemv(weight, x, poisoned(N, dtype=dtype, device=device), x_tail=x_tail)
        assert relative_error(out.float().cpu(), expected) < tolerance(dtype), (N, head, tail)


@pytest.mark.parametrize("device, dtype", CPU_CASES + GPU_CASES)
@pytest.mark.parametrize("density", [0.0, 0.4, 1.0])
def test_gemv_scales_its_masked_input_by_another_rows_rms(device, dtype, density):
    """input_rms: gate's and up's coefficients (their own halves of x) times 1/rms(r) (RMSNorm's factor of another
    row, eps included) before their masks, then silu(gate)·up: against float64, each mask decided by the test on
    the scaled coefficients; nothing kept gives exact zeros."""
    require_triton(device)
    eps = 1e-5
    for N, K, H in [(1536, 360, 576)] if device == "cuda" else [(24, 40, 30)]:
        g = torch.Generator().manual_seed(N + K)
        weight = (torch.randn(2 * N, K, generator=g) / K ** 0.5).to(device, dtype)
        x = (3 * torch.randn(2 * K, generator=g)).to(device, dtype)
        residual = (5 * torch.randn(H, generator=g)).to(device, dtype)
        r = residual.double().cpu()
        scaled = x.double().cpu().view(2, K) / torch.sqrt(r.square().mean() + eps)
        thresholds, kept = [], []
        for group in range(2):
            score = scaled[group].abs()
            threshold = threshold_for_density(score.float(), min(1.0, density * (1 + 0.5 * group)))
            thresholds.append(threshold)
            kept.append(torch.where(score.float() >= threshold, scaled[group], 0.0))
        gate_w, up_w = weight.double().cpu().chunk(2)
        expected = F.silu(gate_w @ kept[0]) * (up_w @ kept[1])
        out = gemv(weight, x, poisoned(N, dtype=dtype, device=device), swiglu=True,
                   input_mask=(torch.cat(thresholds).float().to(device), None, True), input_rms=(residual, eps))
        assert torch.isfinite(out).all()
        if density == 0.0:
            assert torch.count_nonzero(out) == 0
        else:
            assert relative_error(out.float().cpu(), expected.float()) < tolerance(dtype, 4), (N, K)


@pytest.mark.parametrize("device, dtype", CPU_CASES + GPU_CASES)
@pytest.mark.parametrize("masked", [False, True], ids=["o_proj", "down, x masked"])
def test_gemv_adds_the_tail_to_rows_made_of_a_matrix_and_the_identity(device, dtype, masked):
    """tail_rows: the first rows of [[W, I], [M, B]] over [x ; tail] are W·x + tail, made without reading the
    identity: its stored block is poisoned here (NaN), so reading it would poison them. The other rows read all
    their columns. With an input mask (down's, with its scale), x is masked and the tail read whole. Against
    float64 of the same product with a true identity, x's mask decided by the test; x longer than the tail too."""
    require_triton(device)
    block_n = 4 if device == "cuda" else 32  # the tile the GEMV takes (gemv_config; the interpreter's)
    shapes = [(576, 576, 360), (1536, 576, 300)] if device == "cuda" else [(64, 64, 40), (80, 64, 24)]
    for head, tail, others in shapes:
        assert tail % block_n == 0
        g = torch.Generator().manual_seed(head + others)
        w = torch.randn(tail, head, generator=g) / head ** 0.5
        lower = torch.randn(others, head + tail, generator=g) / (head + tail) ** 0.5
        x, x_tail = torch.randn(head, generator=g).to(dtype), torch.randn(tail, generator=g).to(dtype)
        input_mask, kept = None, x.double()
        if masked:
            scale = torch.rand(head, generator=g) + 0.5
            score = x.float().abs() * scale
            threshold = threshold_for_density(score, 0.4)
            input_mask = (threshold.float().to(device), scale.to(device), False)
            kept = torch.where(score >= threshold, x.double(), 0.0)
        expected = torch.cat([torch.cat([w, torch.eye(tail)], 1), lower]).double() @ torch.cat([kept, x_tail.double()])
        stored = torch.cat([torch.cat([w, torch.full((tail, tail), float("nan"))], 1), lower]).to(device, dtype)
        out = gemv(stored, x.to(device), poisoned(tail + others, dtype=dtype, device=device),
                   x_tail=x_tail.to(device), tail_rows=True, input_mask=input_mask)
        assert torch.isfinite(out).all()
        assert relative_error(out.float().cpu(), expected) < tolerance(dtype), (head, tail, others)


def test_gemv_refuses_a_tail_that_does_not_make_its_rows():
    with pytest.raises(ValueError, match="tail"):
        gemv(torch.zeros(4, 10), torch.zeros(6), torch.zeros(4), x_tail=torch.zeros(3))
    with pytest.raises(ValueError, match="input_rms"):
        gemv(torch.zeros(4, 10), torch.zeros(10), torch.zeros(4), input_rms=(torch.ones(3), 1e-5),
             norm=(None, torch.ones(10), 1e-5, torch.zeros(10)))


@pytest.mark.parametrize("shape", [TINY, TINY_MHA], ids=["rana-mlp", "rana-qkv-and-mlp"])
def test_b_ahead_decodes_what_b_after_the_norm_decodes(shape, monkeypatch):
    """RANA_B_AHEAD=1 on the synthetic RaNA engine (small rows: the GEMV chain): no one-token step reads an MLP's B
    any more (it is made in the o_proj launch), nor a QKV's B but layer 0's (made in the layer before's down
    launch), each through its norm's own weights; no add_rmsnorm launch either; and five steps' logits equal
    those with B after the norm to float32 rounding (the sums in another order), the tokens the same."""
    require_triton("cpu")
    engine = DecodeEngine(shape, torch.float32, "cpu", flop_reduction=0.44, gemv="triton")
    g = torch.Generator().manual_seed(5)
    for block in engine.blocks:  # norm weights other than ones: B·diag(g) must take them
        for norm in (block.attn_norm, block.mlp_norm):
            norm.weight.copy_(torch.rand(shape.hidden, generator=g) + 0.5)
    engine.calibrate(tokens=256)
    prompt = torch.randint(0, shape.vocab, (6,), generator=g)
    qkv_adapted = isinstance(engine.blocks[0].qkv, RankPart)
    b_weights = {block.gate_up_B.data_ptr() for block in engine.blocks}
    b_weights |= {block.qkv.B.data_ptr() for block in engine.blocks if qkv_adapted}
    logits, b_reads = {}, {}
    for ahead in ("0", "1"):
        monkeypatch.setenv("RANA_B_AHEAD", ahead)
        reads = []
        with monkeypatch.context() as patch:
            plain_matvec = engine_module.matvec

            def counting_matvec(weight, *args, **kwargs):
                reads.append(weight.data_ptr() in b_weights)
                return plain_matvec(weight, *args, **kwargs)

            patch.setattr(engine_module, "matvec", counting_matvec)
            logits[ahead], norm_launches = decode_steps(engine, prompt, 5, True, monkeypatch)
        b_reads[ahead] = sum(reads)
        assert norm_launches == 0
    # the prefill (6 tokens at once) reads every B the usual way in both; the steps only without B ahead, but for
    # layer 0's QKV (no launch before it)
    per_layer = 2 if qkv_adapted else 1
    assert qkv_adapted == (shape is TINY_MHA)
    assert b_reads == {"0": (1 + 5) * per_layer * shape.layers,
                       "1": per_layer * shape.layers + (5 if qkv_adapted else 0)}
    assert (logits["1"] - logits["0"]).abs().max() <= 1e-5 * logits["0"].abs().max()
    assert torch.equal(logits["1"].argmax(-1), logits["0"].argmax(-1))


@pytest.mark.parametrize("method, allocation", [("rana", "greedy"), ("hybrid", "exact-loss"), ("teal", "greedy")])
def test_b_ahead_in_a_stored_run_decodes_the_same(method, allocation, tmp_path, monkeypatch):
    """The same on the engine of a stored run: RaNA's MLPs (gate's and up's ranks padded to one slot in the stacked
    B) take B ahead, every step, and nothing else does (hybrid's other parts, TEAL's masked MLP); four steps'
    logits equal to float32 rounding with the option on and off, the tokens the same."""
    from rana_core.decode import b_ahead
    from rana_core.decode.from_model import RanaMLP, engine_from_model
    from test_engine_from_model import stored_run

    require_triton("cpu")
    loaded, adapters, _ = stored_run("tiny", method, allocation, tmp_path)
    engine = engine_from_model(loaded.model, adapters)
    rana_layers = sum(isinstance(block.mlp_part, RanaMLP) for block in engine.blocks)
    assert (rana_layers > 0) == (method == "rana")  # hybrid's tiny run picks other parts: it checks they keep out
    prompt = torch.randint(0, 256, (6,), generator=torch.Generator().manual_seed(4))
    logits, ahead_mlps = {}, {}
    for ahead in ("0", "1"):
        monkeypatch.setenv("RANA_B_AHEAD", ahead)
        calls = []
        with monkeypatch.context() as patch:
            plain_mlp = b_ahead.mlp
            patch.setattr(b_ahead, "mlp", lambda *args: calls.append(1) or plain_mlp(*args))
            logits[ahead], _ = decode_steps(engine, prompt, 4, True, monkeypatch)
        ahead_mlps[ahead] = len(calls)
    assert ahead_mlps == {"0": 0, "1": 4 * rana_layers}
    assert (logits["1"] - logits["0"]).abs().max() <= 1e-5 * logits["0"].abs().max()
    assert torch.equal(logits["1"].argmax(-1), logits["0"].argmax(-1))


def test_b_ahead_option_is_checked(monkeypatch):
    from rana_core.decode import b_ahead

    monkeypatch.setenv("RANA_B_AHEAD", "yes")
    with pytest.raises(ValueError, match="RANA_B_AHEAD"):
        b_ahead.enabled()


@pytest.mark.gpu
def test_b_ahead_in_replayed_steps_on_the_gpu(monkeypatch):
    """The SmolLM2-shape RaNA −44% engine (fp16) in replayed graphs with PDL, B ahead against B after the norm: 16
    steps' logits within fp16 rounding, masks keeping every row (a coefficient within rounding of its threshold
    could otherwise fall the other way: test_every_masked_product_design_in_replayed_steps_on_the_gpu says why)."""
    reference = replayed_logits({"RANA_B_AHEAD": "0"}, monkeypatch, 0.44, seed=3, every_row=True)
    ahead = replayed_logits({"RANA_B_AHEAD": "1"}, monkeypatch, 0.44, seed=3, every_row=True)
    assert float((ahead - reference).norm() / reference.norm()) < 1e-2
