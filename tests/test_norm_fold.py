"""Norm weights folded into the products that read the normed input (rana_core.decode.norm_fold): the GEMV
without a norm weight is the GEMV with a weight of ones, bit for bit; an engine with its norms folded decodes what
it decoded before, to float32 rounding, on the synthetic shapes and on stored runs, with random norm weights (a
model's are rarely ones; a fold that dropped or doubled them fails)."""

import pytest
import torch

from rana_core.decode.engine import DecodeEngine
from rana_core.decode.gemv import gemv, gemv_programs
from rana_core.decode.norm_fold import fold_norm_weights, fold_requested
from rana_core.decode.parts import RMSNorm

from test_decode_kernels import CPU_CASES, GPU_CASES, poisoned
from test_engine import TINY, TINY_MHA, decode_steps
from test_kernels import require_triton


@pytest.mark.parametrize("device, dtype", CPU_CASES + [("cpu", torch.float16)] + GPU_CASES)
@pytest.mark.parametrize("swiglu", [False, True], ids=["plain", "swiglu"])
@pytest.mark.parametrize("source", ["prologue", "sums"])
def test_a_gemv_without_the_norms_weight_is_the_gemv_with_a_weight_of_ones(device, dtype, swiglu, source):
    """norm=(…, None, …): the folded norm's weight is never loaded, and the input is normed as add_rmsnorm norms it
    with a weight of ones (one rounding): the same bits as passing ones, from the norm prologue (with the residual
    add) and from a residual GEMV's sums; on the CPU in fp16 too (in float32 the rounding is no rounding), on the
    GPU at Llama-2-7B's 4,096 columns (the fused gate/up's tiles)."""
    require_triton(device)
    N, K = (4096, 4096) if device == "cuda" else (24, 72)
    g = torch.Generator().manual_seed(K + swiglu)
    weight = (torch.randn((2 if swiglu else 1) * N, K, generator=g) / K ** 0.5).to(device, dtype)
    x = torch.randn(K, generator=g).to(device, dtype)
    ones = torch.ones(K, dtype=dtype, device=device)
    outs = []
    for norm_weight in (ones, None):
        if source == "sums":
            producer = (torch.randn(K, K, generator=torch.Generator().manual_seed(1)) / K ** 0.5).to(device, dtype)
            sums = torch.empty(gemv_programs(K, K), device=device)
            residual = gemv(producer, x, torch.empty(K, dtype=dtype, device=device), residual=(x, sums))
            outs.append(gemv(weight, residual, poisoned(N, dtype=dtype, device=device), swiglu=swiglu,
                             norm=(None, norm_weight, 1e-5, None), norm_sums=sums))
        else:
            delta = torch.randn(K, generator=torch.Generator().manual_seed(2)).to(device, dtype)
            outs.append(gemv(weight, x, poisoned(N, dtype=dtype, device=device), swiglu=swiglu,
                             norm=(delta, norm_weight, 1e-5, poisoned(K, dtype=dtype, device=device))))
    assert torch.isfinite(outs[0].float()).all()
    assert torch.equal(outs[1], outs[0])


def randomize_norms(engine: DecodeEngine, seed: int = 5) -> None:
    """Norm weights in [0.5, 1.5) instead of the ones a synthetic engine (or a fresh Hugging Face model) has."""
    g = torch.Generator().manual_seed(seed)
    for module in engine.modules():
        if type(module) is RMSNorm:
            module.weight.copy_((torch.rand(module.weight.shape, generator=g) + 0.5).to(module.weight.dtype))


def decode_folded_and_not(engine: DecodeEngine, monkeypatch):
    """(logits of four one-token steps, of the prompt's batched forward) before and after folding, the folds."""
    prompt = torch.randint(0, engine.shape.vocab, (6,), generator=torch.Generator().manual_seed(2))
    monkeypatch.setenv("RANA_FUSE_NORM", "sums")  # the default: the folded GEMVs norm from sums or the row
    before = decode_steps(engine, prompt, 4, "sums", monkeypatch)[0], engine(prompt, torch.arange(6))
    folds = fold_norm_weights(engine)
    after = decode_steps(engine, prompt, 4, "sums", monkeypatch)[0], engine(prompt, torch.arange(6))
    return before, after, folds


def assert_same_decoding(before, after):
    for plain, folded in zip(before, after):
        assert (folded - plain).abs().max() <= 1e-5 * plain.abs().max()
        assert torch.equal(folded.argmax(-1), plain.argmax(-1))


@pytest.mark.parametrize("flop_reduction, shape", [(0.0, TINY), (0.44, TINY), (0.44, TINY_MHA)],
                         ids=["dense", "rana-mlp", "rana-qkv-and-mlp"])
def test_a_synthetic_engine_with_its_norms_folded_decodes_the_same(flop_reduction, shape, monkeypatch):
    """Every norm of a synthetic engine folds (QKV or RaNA's B, gate/up or RaNA's B, the LM head: 2 a layer and
    the head's), each left with a weight of ones; one-token steps (norms from sums and folded rows) and the
    prompt's batched forward equal the unfolded engine's to float32 rounding, the tokens the same."""
    require_triton("cpu")
    engine = DecodeEngine(shape, torch.float32, "cpu", flop_reduction=flop_reduction, gemv="triton")
    engine.calibrate(tokens=256)
    randomize_norms(engine)
    before, after, folds = decode_folded_and_not(engine, monkeypatch)
    assert folds == 2 * shape.layers + 1
    assert all(torch.equal(n.weight, torch.ones_like(n.weight)) for n in engine.modules() if type(n) is RMSNorm)
    assert_same_decoding(before, after)
    assert fold_norm_weights(engine) == 0  # folded once: a second call changes nothing


@pytest.mark.parametrize("method, allocation, folds", [
    ("dense", "uniform", 5), ("cats", "uniform", 5), ("teal", "greedy", 1), ("rana", "greedy", None)])
def test_a_stored_runs_engine_with_its_norms_folded_decodes_the_same(method, allocation, folds, tmp_path,
                                                                     monkeypatch):
    """The engine of a stored run on the tiny model (2 layers): dense and CATS fold all five norms (QKV, the
    stacked gate/up, the head), TEAL only the head's (its input masks decide on the normed input itself); RaNA's
    greedy run folds at least every MLP norm read by RaNA's stacked gate/up B. Steps and the batched forward decode
    as before, to float32 rounding, and the embedding (tied to the LM head or not) is untouched."""
    from test_engine_from_model import stored_run

    from rana_core.decode.from_model import RanaMLP, engine_from_model

    require_triton("cpu")
    loaded, adapters, _ = stored_run("tiny", method, allocation, tmp_path)
    engine = engine_from_model(loaded.model, adapters)
    randomize_norms(engine)
    embedding = engine.embed.clone()
    before, after, folded = decode_folded_and_not(engine, monkeypatch)
    if folds is not None:
        assert folded == folds
    else:
        rana_mlps = [block for block in engine.blocks if isinstance(block.mlp_part, RanaMLP)]
        assert rana_mlps and all(getattr(block.mlp_norm, "folded", False) for block in rana_mlps)
    assert torch.equal(engine.embed, embedding)
    assert_same_decoding(before, after)


def test_folding_is_asked_for_by_rana_fold_norms(monkeypatch):
    """RANA_FOLD_NORMS=1 folds an engine's norms as it is built (0, the default, does not); anything else is one
    ValueError naming the variable."""
    monkeypatch.delenv("RANA_FOLD_NORMS", raising=False)
    assert not fold_requested()
    assert not DecodeEngine(TINY, torch.float32, "cpu").norm.__dict__.get("folded", False)
    monkeypatch.setenv("RANA_FOLD_NORMS", "1")
    assert DecodeEngine(TINY, torch.float32, "cpu").norm.folded
    monkeypatch.setenv("RANA_FOLD_NORMS", "yes")
    with pytest.raises(ValueError, match="RANA_FOLD_NORMS=yes: expected 0 or 1"):
        fold_requested()
