"""The decode engine built from a stored run (a model and its saved adapters) computes what the adapted PyTorch
model computes, on the CPU with the Triton kernels in the interpreter: the batched forward's logits equal the
adapted model's, and decoding token by token (the one-token kernel path) continues the prompt exactly as the batched
forward predicts it. Families the engine cannot run, and adapters it cannot run, are one line."""

import pytest
import torch

from rana_core.adapters.artifacts import load_adapters
from rana_core.adapters.base import inject, unload
from rana_core.config import CompressConfig
from rana_core.corpus import token_windows
from rana_core.decode.from_model import EngineUnsupported, engine_from_model
from rana_core.loading import load_model
from rana_core.pipeline import compress

from test_kernels import require_triton

SMALL = dict(flop_reduction=0.3, calib_tokens=512, eval_tokens=256, seq_len=128, track_layers=False)


def stored_run(model_name, method, allocation, tmp_path):
    """A run as the worker stores it: compressed, its adapters saved, then loaded back from the file."""
    loaded = load_model(model_name)
    config = CompressConfig(model=model_name, method=method, allocation=allocation, **SMALL)
    result = compress(config, loaded=loaded, artifact_path=tmp_path / "adapters.safetensors")
    unload(loaded.layers)
    adapters = load_adapters(loaded, result.artifact["path"], result.artifact["sha256"])
    return loaded, adapters, result


@pytest.mark.parametrize("model_name, method, allocation", [
    ("tiny", "dense", "uniform"), ("tiny", "svd", "uniform"), ("tiny", "rana", "uniform"),
    ("tiny", "rana", "greedy"), ("tiny", "cats", "uniform"), ("tiny", "hybrid", "exact-loss"),
    ("tiny", "a3", "uniform"), ("tiny", "a3", "greedy"), ("tiny", "teal", "greedy"), ("tiny", "wina", "greedy"),
    ("tiny-qwen2", "rana", "uniform"), ("tiny-qwen2", "svd", "uniform"), ("tiny-qwen2", "teal", "uniform"),
    ("tiny-gemma3", "dense", "uniform"), ("tiny-gemma3", "rana", "greedy"), ("tiny-gemma3", "cats", "uniform"),
    ("tiny-gemma3", "hybrid", "exact-loss"), ("tiny-gemma3", "wina", "greedy"),
])
def test_the_engine_of_a_stored_run_computes_what_the_adapted_model_computes(model_name, method, allocation,
                                                                           tmp_path):
    require_triton("cpu")
    loaded, adapters, result = stored_run(model_name, method, allocation, tmp_path)
    assert method == "dense" or adapters
    engine = engine_from_model(loaded.model, adapters)
    # the engine's masks on the run's own held-out windows spend what the run measured (same thresholds, same
    # FLOP accounting per adapter; a product summed in another order may flip a rank at the threshold)
    held_out = token_windows(loaded.tokenizer, "heldout", SMALL["eval_tokens"], SMALL["seq_len"])
    assert abs(engine.flop_reduction_on(held_out) - result.measured_flop_reduction) <= 1e-3
    text = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(3))
    inject(loaded.layers, adapters)
    try:
        with torch.no_grad():
            reference = loaded.model(text[None]).logits[0]
    finally:
        unload(loaded.layers)
    engine.allocate(64)
    ours = engine(text, torch.arange(text.numel()))
    assert torch.allclose(ours, reference, atol=2e-4, rtol=1e-4), (ours - reference).abs().max()

    prompt = text[:24]
    engine.allocate(64)
    engine.prefill(prompt)
    generated, stepped = [prompt], []
    for _ in range(8):
        generated.append(engine.token.clone())
        stepped.append(engine.step()[0].clone())  # the one-token kernels (chained masked MLPs, partial sums)
    sequence = torch.cat(generated)
    engine.allocate(64)
    full = engine(sequence, torch.arange(sequence.numel()))
    assert torch.equal(full.argmax(-1)[len(prompt) - 1:-1], sequence[len(prompt):])
    # the steps' logits those of the batched PyTorch forward at the same positions, to float32 rounding (a rank or
    # neuron at its threshold could flip between the two sums; none does on these runs)
    expected = full[len(prompt):]
    assert torch.allclose(torch.stack(stepped), expected, atol=1e-4 * float(expected.abs().max()))


def test_a_family_the_engine_cannot_run_is_one_line(tmp_path):
    loaded = load_model("tiny-mistral")
    with pytest.raises(EngineUnsupported, match="runs llama, qwen2, gemma3 models, not mistral yet"):
        engine_from_model(loaded.model, [])


def test_an_adapter_the_engine_cannot_run_is_one_line(tmp_path):
    class Unknown(torch.nn.Module):
        layer = 0

    loaded = load_model("tiny")
    with pytest.raises(EngineUnsupported, match="layer 0: the decode engine cannot run a Unknown adapter yet"):
        engine_from_model(loaded.model, [Unknown()])


def test_a_context_longer_than_the_models_positions_is_one_line():
    from rana_core.decode.run_latency import check_contexts
    from rana_core.errors import RanaError

    config = load_model("tiny").config  # 2,048 positions
    check_contexts(config, [1, 1784], 256)  # 1,784 + 256 + the engine's 8 spare positions fit exactly
    with pytest.raises(RanaError, match="context 1785 with 256 new tokens does not fit the model's 2048 positions"):
        check_contexts(config, [1, 1785], 256)


@pytest.mark.parametrize("model_name, method", [("tiny", "rana"), ("tiny-gemma3", "rana"), ("tiny", "a3")])
def test_a_profiled_step_marks_each_layers_qkv_attention_and_mlp_in_order(model_name, method, tmp_path):
    """The sections a profiled replay times (rana_core.decode.run_latency) are marked where they begin, in the
    order the step runs them, on every family's and adapter's path."""
    loaded, adapters, _ = stored_run(model_name, method, "uniform", tmp_path)
    engine = engine_from_model(loaded.model, adapters)
    marks = []
    engine.marker = lambda layer, section: marks.append((layer, section))
    for index, block in enumerate(engine.blocks):
        block.marker = lambda section, index=index: marks.append((index, section))
    engine.allocate(16)
    engine.prefill(torch.arange(8))
    marks.clear()
    engine.step()
    assert marks == [(0, "qkv"), (0, "attention"), (0, "mlp"), (1, "qkv"), (1, "attention"), (1, "mlp"),
                     (2, "head"), (2, "end")]


@pytest.mark.parametrize("model_name, method, allocation, masked, unfolded", [
    ("tiny", "dense", "uniform", "auto", 0), ("tiny", "rana", "greedy", "auto", 0),
    ("tiny-qwen2", "rana", "uniform", "auto", 0), ("tiny", "cats", "uniform", "auto", 2),
    ("tiny", "a3", "uniform", "auto", 2), ("tiny", "hybrid", "exact-loss", "auto", 0),
    ("tiny", "hybrid", "exact-loss", "wide", 4)])
def test_a_stored_runs_engine_with_norms_folded_decodes_the_same(model_name, method, allocation, masked, unfolded,
                                                                 tmp_path, monkeypatch):
    """RANA_FUSE_NORM=1 on the engine of a stored run: where a section's first product is one GEMV (stacked QKV
    with or without biases, RaNA's B, the stacked gate/up, the LM head, and at these small sizes TEAL's masked QKV
    and gate/up, masked_wide.product_design) it adds and norms its input itself; where another part reads the
    normed input (CATS's gate and up, A3's narrow q/k/v, the TEAL parts of hybrid's run when their masked products
    are made as products: RANA_MASKED_PRODUCT=wide) add_rmsnorm still runs: `unfolded` launches a step in these
    two-layer models. Logits of four steps equal the unfolded engine's to float32 rounding, the tokens the same."""
    from test_engine import decode_steps

    require_triton("cpu")
    monkeypatch.setenv("RANA_MASKED_PRODUCT", masked)
    loaded, adapters, _ = stored_run(model_name, method, allocation, tmp_path)
    engine = engine_from_model(loaded.model, adapters)
    prompt = torch.randint(0, 256, (6,), generator=torch.Generator().manual_seed(4))
    plain, _ = decode_steps(engine, prompt, 4, False, monkeypatch)
    folded, calls = decode_steps(engine, prompt, 4, True, monkeypatch)
    assert calls == 4 * unfolded
    assert (folded - plain).abs().max() <= 1e-5 * plain.abs().max()
    assert torch.equal(folded.argmax(-1), plain.argmax(-1))


NORM_LAUNCHES = {"first": lambda layers: 1, "every": lambda layers: 2 * layers, "after mlp": lambda layers: 1 + layers}


@pytest.mark.parametrize("method, design, option, mlp_adds, norms_left", [
    ("dense", "auto", "1", True, "first"), ("rana", "list", "1", True, "first"), ("rana", "gemv", "1", True, "first"),
    ("teal", "list", "1", True, "every"), ("teal", "gemv", "1", True, "first"),
    ("rana", "list", "auto", True, "first"), ("rana", "gemv", "auto", False, "after mlp"),
    ("teal", "gemv", "auto", False, "after mlp")])
def test_a_stored_runs_mlp_adds_the_residual_in_its_last_launch(method, design, option, mlp_adds, norms_left,
                                                                tmp_path, monkeypatch):
    """RANA_FUSE_NORM=sums (the default) where the row fold is off (as on a 7B model; here FOLD_MAX_HIDDEN 0):
    under RANA_RUN_MLP_ADDS=1 the MLP of a stored run (dense down's GEMV, RaNA's chain, TEAL's masked gate/up/down
    chain, as the list design's reduction or the GEMV over every row) adds the residual like o_proj does: two adds
    a layer a step, and of add_rmsnorm's launches only the first layer's norm is left, except where a section's
    first product masks its own normed input as a list (TEAL's list design), which still norms it in a launch:
    every section's. Under auto (the default) a masked chain that runs as GEMVs over every row (small MLPs, here
    forced by RANA_MASKED_PRODUCT=gemv) leaves its output to the next norm's launch: one add and one more norm
    launch a layer. Logits of four steps equal the unfused engine's to float32 rounding, the tokens the same."""
    from rana_core.decode import residual
    from test_engine import decode_steps

    require_triton("cpu")
    monkeypatch.setattr(residual, "FOLD_MAX_HIDDEN", 0)
    monkeypatch.setenv("RANA_MASKED_PRODUCT", design)
    if option == "auto":
        monkeypatch.delenv("RANA_RUN_MLP_ADDS", raising=False)
    else:
        monkeypatch.setenv("RANA_RUN_MLP_ADDS", option)
    loaded, adapters, _ = stored_run("tiny", method, "uniform" if method == "dense" else "greedy", tmp_path)
    engine = engine_from_model(loaded.model, adapters)
    layers = len(engine.blocks)
    prompt = torch.randint(0, 256, (6,), generator=torch.Generator().manual_seed(4))
    plain, plain_calls = decode_steps(engine, prompt, 4, "0", monkeypatch)
    adds, add_by = [], residual.ResidualStream.add_by
    monkeypatch.setattr(residual.ResidualStream, "add_by", lambda *args: adds.append(1) or add_by(*args))
    summed, summed_calls = decode_steps(engine, prompt, 4, "sums", monkeypatch)
    assert len(adds) == 4 * layers * (2 if mlp_adds else 1)
    assert plain_calls == 4 * (2 * layers + 1) and summed_calls == 4 * NORM_LAUNCHES[norms_left](layers)
    assert (summed - plain).abs().max() <= 1e-5 * plain.abs().max()
    assert torch.equal(summed.argmax(-1), plain.argmax(-1))


def test_the_run_mlp_adds_option_reads_its_variable(monkeypatch):
    from rana_core.decode.from_model import run_mlp_adds

    monkeypatch.delenv("RANA_RUN_MLP_ADDS", raising=False)
    assert run_mlp_adds() == "auto"
    for value in ("0", "1", "auto"):
        monkeypatch.setenv("RANA_RUN_MLP_ADDS", value)
        assert run_mlp_adds() == value
    monkeypatch.setenv("RANA_RUN_MLP_ADDS", "yes")
    with pytest.raises(ValueError, match="RANA_RUN_MLP_ADDS=yes: expected 0, 1 or auto"):
        run_mlp_adds()


@pytest.mark.parametrize("ranks", [(12, 7), (5, 12), (9, 9)], ids=["gate-larger", "up-larger", "equal"])
def test_rana_mlp_chain_with_unequal_ranks_computes_the_masked_mlp(ranks):
    """A stored run's RaNA MLP at one token runs gate and up as two groups of one launch, their ranks padded to the
    larger with zero rows: against float64 of the unpadded parts (each mask decided on its own coefficients, the
    neuron mask on silu(gate)·up scaled by down's column norms) within float32 rounding, and the same as the
    unchained path (two tokens, PyTorch's masked products) for the first token; the batched step's MLP
    (batch_step.BatchDecoder.mlp, both tokens) the same as the unchained path."""
    require_triton("cpu")
    from rana_core.decode.from_model import RanaMLP
    from rana_core.decode.parts import NeuronPart, RankPart

    g = torch.Generator().manual_seed(sum(ranks))
    hidden, inter = 24, 40
    parts, raw = [], []
    for rank, threshold in zip(ranks, (0.8, 0.5)):  # each group its own threshold
        B, rows = torch.randn(rank, hidden, generator=g), torch.randn(rank, inter, generator=g) / rank ** 0.5
        raw.append((B, rows, threshold))
        parts.append(RankPart.of(B.clone(), rows.clone(), threshold, target_active=rank / 2))
    down = torch.randn(hidden, inter, generator=g) / inter ** 0.5
    norms = down.norm(dim=0)
    mlp = RanaMLP(*parts, NeuronPart.of(down.clone(), norms, 0.05, inter / 2), torch.nn.SiLU(), "triton")
    x = torch.randn(2, hidden, generator=g)

    def masked(B, rows, x, threshold):
        z = B.double() @ x.double()
        return (z * (z.abs() >= threshold)) @ rows.double()

    gate, up = (masked(B, rows, x[0], threshold) for B, rows, threshold in raw)
    h = torch.nn.functional.silu(gate) * up
    expected = (h * (h.abs() * norms.double() >= 0.05)) @ down.double().T
    chained = mlp(x[:1])[0]
    assert (chained.double() - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert torch.allclose(chained, mlp(x)[0], atol=1e-5 * float(expected.abs().max()))
    # the batched step reads up's coefficients from its padded slot too
    from rana_core.decode.batch_step import BatchDecoder

    batched = BatchDecoder.__new__(BatchDecoder)
    batched.product, batched.masked = BatchDecoder.PRODUCTS["triton"], BatchDecoder.MASKED["dense"]
    assert torch.allclose(batched.mlp(mlp, x), mlp(x), atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("model_name, method, allocation, unfolded", [
    ("tiny", "wina", "greedy", 0), ("tiny", "hybrid", "exact-loss", 0), ("tiny-qwen2", "teal", "uniform", 2)])
def test_input_masks_as_gemvs_fold_the_norms_and_decode_the_same(model_name, method, allocation, unfolded,
                                                                 tmp_path, monkeypatch):
    """RANA_MASKED_PRODUCT=gemv on the engine of a stored run: TEAL's and WINA's masked QKV and gate/up (WINA's
    scores scaled, hybrid's TEAL parts among its others) run as GEMVs over every row with the mask on their input,
    so they make the residual add and the norm themselves (norms folded: `unfolded` add_rmsnorm launches a step
    remain, Qwen2's QKV biases keep theirs). Logits of four steps equal those of the wide design (masked products
    over the active rows) with unfolded norms to float32 rounding, the tokens the same."""
    from test_engine import decode_steps

    require_triton("cpu")
    loaded, adapters, _ = stored_run(model_name, method, allocation, tmp_path)
    engine = engine_from_model(loaded.model, adapters)
    prompt = torch.randint(0, 256, (6,), generator=torch.Generator().manual_seed(4))
    monkeypatch.setenv("RANA_MASKED_PRODUCT", "wide")
    plain, _ = decode_steps(engine, prompt, 4, False, monkeypatch)
    monkeypatch.setenv("RANA_MASKED_PRODUCT", "gemv")
    folded, calls = decode_steps(engine, prompt, 4, True, monkeypatch)
    assert calls == 4 * unfolded
    assert (folded - plain).abs().max() <= 1e-5 * plain.abs().max()
    assert torch.equal(folded.argmax(-1), plain.argmax(-1))
