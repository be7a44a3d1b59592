"""The decode engine on the CPU at a tiny shape (its Triton kernel in the interpreter): the dense engine computes
what Hugging Face's Llama computes on the same weights; cached decoding equals a full forward; RaNA's masks hit
their budget and differ token by token; the batch-1 kernel path equals the batched path. The `gpu` test checks
that CUDA-graph replay decodes the same tokens as eager steps."""

import pytest
import torch

from rana_core.decode.engine import SHAPES, DecodeEngine, Shape, uniform_keeps
from rana_core.decode.parts import NeuronPart, RankPart

from test_kernels import DESIGNS, require_triton, use_design

TINY = SHAPES["tiny-shape"]


def hf_llama_with(engine: DecodeEngine):
    from transformers import LlamaConfig, LlamaForCausalLM

    s = engine.shape
    config = LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                         num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                         max_position_embeddings=512)
    model = LlamaForCausalLM(config).eval()
    hd = s.head_dim
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(engine.embed)
        model.lm_head.weight.copy_(engine.lm_head.weight)
        for ours, theirs in zip(engine.blocks, model.model.layers):
            q, k, v = ours.qkv.weight.split([s.heads * hd, s.kv_heads * hd, s.kv_heads * hd])
            attn = theirs.self_attn
            attn.q_proj.weight.copy_(q), attn.k_proj.weight.copy_(k), attn.v_proj.weight.copy_(v)
            attn.o_proj.weight.copy_(ours.wo.weight)
            theirs.mlp.gate_proj.weight.copy_(ours.gate.weight)
            theirs.mlp.up_proj.weight.copy_(ours.up.weight)
            theirs.mlp.down_proj.weight.copy_(ours.down.weight)
    return model


def test_dense_engine_computes_what_hugging_face_llama_computes():
    engine = DecodeEngine(TINY, torch.float32, "cpu")
    tokens = torch.randint(0, TINY.vocab, (24,), generator=torch.Generator().manual_seed(0))
    engine.allocate(32)
    ours = engine(tokens, torch.arange(24))
    with torch.no_grad():
        theirs = hf_llama_with(engine)(tokens[None]).logits[0]
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4)


TINY_MHA = Shape(hidden=64, intermediate=160, layers=2, heads=4, kv_heads=4, vocab=257)  # QKV adapted too


@pytest.mark.parametrize("flop_reduction, gemv, shape", [(0.0, "cublas", TINY), (0.44, "cublas", TINY),
                                                         (0.0, "triton", TINY), (0.44, "triton", TINY),
                                                         (0.44, "triton", TINY_MHA)])
def test_cached_decoding_equals_a_full_forward(flop_reduction, gemv, shape):
    """Steps take the one-token path (fused norm and rotary kernels, grouped masked products whose partial sums
    the rotary kernel and the down compaction add up, the chosen GEMV); the full forward takes the batched
    PyTorch path. With every head its own K/V head, QKV is adapted too."""
    require_triton("cpu")  # without Triton the steps would take the batched path's PyTorch forms too
    engine = DecodeEngine(shape, torch.float32, "cpu", flop_reduction=flop_reduction, gemv=gemv)
    assert isinstance(engine.blocks[0].qkv, RankPart) == (shape is TINY_MHA and flop_reduction > 0)
    engine.calibrate(tokens=256)
    prompt = torch.randint(0, shape.vocab, (9,), generator=torch.Generator().manual_seed(1))
    engine.allocate(32)
    engine.prefill(prompt)
    generated = [prompt]
    for _ in range(6):  # batch-1 steps: the Triton kernel path for every adapter
        generated.append(engine.token.clone())
        engine.step()
    assert int(engine.pos) == len(prompt) + 6
    sequence = torch.cat(generated)
    engine.allocate(32)
    full = engine(sequence, torch.arange(sequence.numel())).argmax(-1)  # batched path, one pass
    assert torch.equal(full[len(prompt) - 1:-1], sequence[len(prompt):])


def test_rana_engine_hits_its_budget_with_input_dependent_masks():
    # the GEMVs in PyTorch (the masks and their counting do not depend on the GEMV backend): half the CPU time
    engine = DecodeEngine(TINY, torch.float32, "cpu", flop_reduction=0.44, gemv="cublas")
    assert uniform_keeps(TINY, 0.44)[0] == 1.0  # tiny has grouped K/V heads: QKV stays dense, as in uniform RaNA
    assert isinstance(engine.blocks[0].up, RankPart) and isinstance(engine.blocks[0].down, NeuronPart)
    engine.calibrate(tokens=512)
    measured = engine.measure_flop_reduction(context=16, steps=48)
    # calibrate() sets each threshold so that its adapter keeps its target number of ranks (neurons) per token on
    # average over the 512 calibration tokens, to within one entry in 512 tokens; the reduction is then measured on
    # 48 other tokens (greedy decode steps), so it misses by those 48 tokens' sampling error only. The pipeline's
    # window, ±0.015, holds: this engine (seed 0) measured 0.4438; engine seeds 0-7 measured 0.435-0.453.
    assert abs(measured - 0.44) < 0.015
    up = engine.blocks[1].up
    z = torch.nn.functional.linear(torch.randn(40, TINY.hidden, generator=torch.Generator().manual_seed(4)), up.B)
    active = (up.scores(z) >= up.threshold).sum(-1)
    assert active.unique().numel() > 3  # tokens keep different numbers of ranks


def test_unknown_gemv_backend_is_refused():
    with pytest.raises(ValueError, match="unknown GEMV backend"):
        DecodeEngine(TINY, torch.float32, "cpu", gemv="cutlass")


@pytest.mark.gpu
@pytest.mark.parametrize("gemv", ["cublas", "triton"])
@pytest.mark.parametrize("flop_reduction", [0.0, 0.44])
def test_graph_replay_computes_what_eager_steps_compute(flop_reduction, gemv):
    """Same state in, same logits out, step after step (tokens are compared through logits: with random
    weights the top two logits can tie within the rounding of atomic float adds)."""
    engine = DecodeEngine(SHAPES["smollm2-135m-shape"], torch.float16, "cuda", flop_reduction=flop_reduction,
                          gemv=gemv)
    engine.calibrate()
    generator = torch.Generator("cuda").manual_seed(5)
    prompt = torch.randint(0, engine.shape.vocab, (20,), device="cuda", generator=generator)
    engine.allocate(64)
    engine.prefill(prompt)
    engine.capture()
    for step in range(16):
        token, pos = engine.token.clone(), engine.pos.clone()
        engine.graph.replay()
        replayed = engine.graph_logits.float().clone()
        engine.token.copy_(token), engine.pos.copy_(pos)
        eager = engine.step().float()
        error = float((replayed - eager).norm() / eager.norm())
        assert error < 1e-2, (step, error)
        assert int(engine.pos) == int(pos) + 1


def replayed_logits(env: dict, monkeypatch, flop_reduction: float, seed: int = 0, context: int = 20,
                    max_seq: int = 64, every_row: bool = False) -> torch.Tensor:
    """Float32 logits of 16 graph-replayed steps of the SmolLM2-shape engine (fp16, Triton GEMV) built and captured
    with the launch options `env`, after a fixed prompt of `context` tokens. Thresholds calibrated; or with
    `every_row`, masks that keep every row and each step fed the same token and position whatever the last one
    chose (so a flipped argmax cannot make two engines diverge)."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    torch.manual_seed(0)
    engine = DecodeEngine(SHAPES["smollm2-135m-shape"], torch.float16, "cuda", flop_reduction=flop_reduction,
                          gemv="triton", seed=seed)
    if every_row:
        for part in engine.adapters():
            part.threshold.fill_(0.0)
    else:
        engine.calibrate()
    engine.allocate(max_seq)
    engine.prefill(torch.arange(context, device="cuda") * 37 % engine.shape.vocab)
    engine.capture()
    steps = []
    for step in range(16):
        if every_row:
            engine.token.fill_(step * 101 % engine.shape.vocab)
            engine.pos.fill_(context + step)
        engine.graph.replay()
        steps.append(engine.graph_logits.float().clone())
    return torch.stack(steps)


@pytest.mark.gpu
@pytest.mark.parametrize("flop_reduction", [0.0, 0.44])
def test_programmatic_dependent_launch_changes_no_bit(flop_reduction, monkeypatch):
    """With PDL a kernel's programs start before the previous kernel is done; every kernel must still read what
    the one before wrote. The kernels are deterministic (no atomics), so replayed graphs with and without PDL
    must give the same logits bit for bit, step after step: a missing wait would show as a difference."""
    from rana_core.decode.launch import pdl

    if not pdl(torch.empty(1, device="cuda")):
        pytest.fail("this GPU cannot launch with PDL (needs compute capability 9.0, e.g. an H100)")
    logits = {enabled: replayed_logits({"RANA_PDL": enabled}, monkeypatch, flop_reduction) for enabled in ("1", "0")}
    assert torch.equal(logits["1"], logits["0"])


@pytest.mark.gpu
@pytest.mark.parametrize("flop_reduction", [0.0, 0.44])
def test_attention_in_fewer_launches_changes_no_bit_in_replayed_steps(flop_reduction, monkeypatch):
    """RANA_ATTENTION_LAUNCHES=2 (the last chunk program combines) in a graph replayed step after step with PDL:
    arrival counters back at zero before each replay, the combine seeing every chunk's stores: the logits of 16
    replayed steps equal the three-launch engine's bit for bit."""
    logits = {launches: replayed_logits({"RANA_ATTENTION_LAUNCHES": launches}, monkeypatch, flop_reduction, seed=3,
                                        context=200, max_seq=300)  # five chunks of 64: the combine waits for several
              for launches in ("3", "2")}
    assert torch.equal(logits["2"], logits["3"])


def count_norm_launches(monkeypatch) -> list:
    """Calls of add_rmsnorm made for the engine's sections from now on (residual.PendingNorm.materialize)."""
    import rana_core.decode.residual as residual

    calls, real = [], residual.add_rmsnorm
    monkeypatch.setattr(residual, "add_rmsnorm", lambda *args: calls.append(1) or real(*args))
    return calls


def decode_steps(engine: DecodeEngine, prompt: torch.Tensor, steps: int, fold: bool | str, monkeypatch):
    """(logits of `steps` eager one-token steps after the prompt, add_rmsnorm calls during them); `fold` is
    RANA_FUSE_NORM's value, or True / False for 1 / 0."""
    monkeypatch.setenv("RANA_FUSE_NORM", fold if isinstance(fold, str) else "1" if fold else "0")
    engine.allocate(32)
    engine.prefill(prompt)
    with monkeypatch.context() as patch:
        calls = count_norm_launches(patch)
        logits = torch.stack([engine.step()[0].clone() for _ in range(steps)])
    return logits, len(calls)


@pytest.mark.parametrize("flop_reduction, shape", [(0.0, TINY), (0.44, TINY_MHA)], ids=["dense", "rana-qkv-and-mlp"])
def test_attention_in_two_launches_decodes_the_same_bits(flop_reduction, shape, monkeypatch):
    """The engine's one-token steps with the attention section in 2 launches against 3 (rotary, chunks, combine):
    the same logits bit for bit over five steps, from QKV's product or RaNA's partial sums."""
    require_triton("cpu")
    engine = DecodeEngine(shape, torch.float32, "cpu", flop_reduction=flop_reduction, gemv="triton")
    engine.calibrate(tokens=256)
    prompt = torch.randint(0, shape.vocab, (6,), generator=torch.Generator().manual_seed(2))
    logits = {}
    for launches in ("3", "2"):
        monkeypatch.setenv("RANA_ATTENTION_LAUNCHES", launches)
        logits[launches], _ = decode_steps(engine, prompt, 5, False, monkeypatch)
    assert torch.equal(logits["2"], logits["3"])


@pytest.mark.parametrize("flop_reduction, shape", [(0.0, TINY), (0.44, TINY), (0.44, TINY_MHA)],
                         ids=["dense", "rana-mlp", "rana-qkv-and-mlp"])
def test_norms_folded_into_the_next_gemv_decode_what_add_rmsnorm_decodes(flop_reduction, shape, monkeypatch):
    """RANA_FUSE_NORM=1: each residual add and RMSNorm made inside the GEMV that reads it (QKV or RaNA's B,
    gate/up or RaNA's B, the LM head): no add_rmsnorm launch is left in a step, and the logits of five steps equal
    the unfolded engine's to float32 rounding (the norm's sum is taken in another order), the tokens the same."""
    require_triton("cpu")
    engine = DecodeEngine(shape, torch.float32, "cpu", flop_reduction=flop_reduction, gemv="triton")
    engine.calibrate(tokens=256)
    prompt = torch.randint(0, shape.vocab, (6,), generator=torch.Generator().manual_seed(2))
    plain, plain_calls = decode_steps(engine, prompt, 5, False, monkeypatch)
    folded, folded_calls = decode_steps(engine, prompt, 5, True, monkeypatch)
    assert plain_calls == 5 * (2 * shape.layers + 1) and folded_calls == 0
    assert (folded - plain).abs().max() <= 1e-5 * plain.abs().max()
    assert torch.equal(folded.argmax(-1), plain.argmax(-1))


@pytest.mark.parametrize("flop_reduction, shape, design", [
    (0.0, TINY, "auto"), (0.44, TINY, "gemv"), (0.44, TINY, "list"), (0.44, TINY, "wide"),
    (0.44, TINY_MHA, "auto")], ids=["dense", "rana-mlp-gemv", "rana-mlp-list", "rana-mlp-wide", "rana-qkv-and-mlp"])
def test_last_products_adding_the_residual_decode_what_add_rmsnorm_decodes(flop_reduction, shape, design,
                                                                          monkeypatch):
    """RANA_FUSE_NORM=sums where the row fold is off (as on a 7B model; here FOLD_MAX_HIDDEN 0): each section's
    last launch (o_proj's GEMV; down's GEMV, or the reduction of RaNA's masked down product, in each
    RANA_MASKED_PRODUCT design) adds the residual and leaves its programs' sums of squares, from which the next
    GEMV norms its input: two adds a layer, and of add_rmsnorm's launches only the first layer's norm is left
    (the unfused engine makes 2 a layer and the head's). The logits of five steps equal the unfused engine's to
    float32 rounding, the tokens the same."""
    require_triton("cpu")
    from rana_core.decode import residual

    monkeypatch.setattr(residual, "FOLD_MAX_HIDDEN", 0)
    monkeypatch.setenv("RANA_MASKED_PRODUCT", design)
    engine = DecodeEngine(shape, torch.float32, "cpu", flop_reduction=flop_reduction, gemv="triton")
    engine.calibrate(tokens=256)
    prompt = torch.randint(0, shape.vocab, (6,), generator=torch.Generator().manual_seed(2))
    plain, plain_calls = decode_steps(engine, prompt, 5, "0", monkeypatch)
    adds, add_by = [], residual.ResidualStream.add_by
    monkeypatch.setattr(residual.ResidualStream, "add_by", lambda *args: adds.append(1) or add_by(*args))
    summed, summed_calls = decode_steps(engine, prompt, 5, "sums", monkeypatch)
    assert len(adds) == 5 * 2 * shape.layers  # one-token steps only: the prompt's are batched
    assert plain_calls == 5 * (2 * shape.layers + 1) and summed_calls == 5
    assert (summed - plain).abs().max() <= 1e-5 * plain.abs().max()
    assert torch.equal(summed.argmax(-1), plain.argmax(-1))


@pytest.mark.gpu
@pytest.mark.parametrize("flop_reduction", [0.0, 0.44])
@pytest.mark.parametrize("fold", ["1", "sums"])
def test_norms_folded_into_the_gemv_in_replayed_steps_on_the_gpu(flop_reduction, fold, monkeypatch):
    """RANA_FUSE_NORM=1 or sums in a replayed graph (PDL, EARLY weights, the residual flipping between two
    buffers; with sums, the sections' last launches adding it and the next GEMVs norming from their sums): 16
    steps' logits within fp16 rounding of the unfolded engine's (relative error of the logits under 1e-2, as
    graph replay against eager steps). RaNA with masks that keep every row: with calibrated thresholds a last-bit
    difference flips mask entries and 30 random layers grow the flips (test_batch_step says so)."""
    logits = {option: replayed_logits({"RANA_FUSE_NORM": option}, monkeypatch, flop_reduction, seed=3,
                                      every_row=True) for option in ("0", fold)}
    error = float((logits[fold] - logits["0"]).norm() / logits["0"].norm())
    assert error < 1e-2, error


def test_norms_fold_by_default_on_every_model_size(monkeypatch):
    """RANA_FUSE_NORM=sums (the default): the row fold where it was measured to pay (SmolLM2's 576-wide rows,
    FOLD_MAX_HIDDEN = 1024), and on wider models the sections' last launches adding the residual; "auto" is the
    row fold alone, 0 and 1 force it; anything else is one ValueError. The engine asks with its own hidden size:
    a SmolLM2-shape step makes no add_rmsnorm launch, a wide one only its first layer's (two a layer and one for
    the head under auto)."""
    from rana_core.decode.residual import fuse_norms, sums_from_producers

    monkeypatch.delenv("RANA_FUSE_NORM", raising=False)
    assert fuse_norms(576) and fuse_norms(1024) and not fuse_norms(4096) and sums_from_producers()
    monkeypatch.setenv("RANA_FUSE_NORM", "auto")
    assert fuse_norms(576) and not fuse_norms(4096) and not sums_from_producers()
    monkeypatch.setenv("RANA_FUSE_NORM", "0")
    assert not fuse_norms(576)
    monkeypatch.setenv("RANA_FUSE_NORM", "1")
    assert fuse_norms(4096)
    monkeypatch.setenv("RANA_FUSE_NORM", "yes")
    with pytest.raises(ValueError, match="expected auto, 0, 1 or sums"):
        fuse_norms(576)
    require_triton("cpu")
    wide = Shape(hidden=1152, intermediate=64, layers=2, heads=18, kv_heads=6, vocab=64)
    for choice, shape, launches in ((None, TINY, 0), (None, wide, 1), ("auto", wide, 2 * wide.layers + 1)):
        if choice is None:
            monkeypatch.delenv("RANA_FUSE_NORM", raising=False)
        else:
            monkeypatch.setenv("RANA_FUSE_NORM", choice)
        engine = DecodeEngine(shape, torch.float32, "cpu", gemv="triton")
        engine.allocate(16)
        engine.prefill(torch.arange(4))
        with monkeypatch.context() as patch:
            calls = count_norm_launches(patch)
            engine.step()
        assert len(calls) == launches, (choice, shape)


# The masked products' designs, and small models' MLP as two GEMVs over every row with masked inputs
# (parts.swiglu_chain; "auto" takes it below masked_wide.GEMV_MAX_BYTES).
MLP_DESIGNS = {**DESIGNS, "gemv": {"RANA_MASKED_PRODUCT": "gemv"}}


def test_every_masked_product_design_decodes_the_same(monkeypatch):
    """Every masked product made in one launch (masked_wide; with small tiles, programs of many tiles take its loop
    kernel), and the MLP as two GEMVs over masked inputs: three steps' logits equal the list design's to float32
    rounding (the sums are taken in another order), the tokens the same. The shape with every head its own K/V head: QKV's product is masked too, and
    its partial sums go to the rotary kernel; the MLP's through SwiGLU into down's product."""
    require_triton("cpu")
    shape = TINY_MHA
    engine = DecodeEngine(shape, torch.float32, "cpu", flop_reduction=0.44, gemv="triton")
    engine.calibrate(tokens=256)
    prompt = torch.randint(0, shape.vocab, (6,), generator=torch.Generator().manual_seed(2))
    logits = {}
    for name, env in MLP_DESIGNS.items():
        monkeypatch.delenv("RANA_WIDE_CONFIG", raising=False)
        for variable, value in env.items():
            monkeypatch.setenv(variable, value)
        logits[name], _ = decode_steps(engine, prompt, 3, False, monkeypatch)
    reference = logits["list"]
    for name in MLP_DESIGNS:
        assert (logits[name] - reference).abs().max() <= 1e-5 * reference.abs().max(), name
        assert torch.equal(logits[name].argmax(-1), reference.argmax(-1)), name


@pytest.mark.gpu
def test_every_masked_product_design_in_replayed_steps_on_the_gpu(monkeypatch):
    """Each design of test_every_masked_product_design_decodes_the_same in a replayed graph with PDL (the wide
    design's coefficients and rows read after the PDL wait): 16 steps' logits within fp16 rounding of the list
    design's, RaNA with masks that keep every row (test_norms_folded_… says why)."""
    logits = {name: replayed_logits(env, monkeypatch, 0.44, seed=3, every_row=True)
              for name, env in MLP_DESIGNS.items()}
    reference = logits["list"]
    for name in MLP_DESIGNS:
        error = float((logits[name] - reference).norm() / reference.norm())
        assert error < 1e-2, (name, error)
