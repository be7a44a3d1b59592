"""Layer by layer: calibration carried through the decoder one layer at a time gathers what one whole-model pass
gathers, a backward pass through resting layers gives the same loss gradients, and on a GPU (marked `gpu`) a model
whose layers rest on the CPU compresses to what the resident model gives, within a memory cap it would not fit."""

import json
import os
import subprocess
import sys

import pytest
import torch

from rana_core import layer_profiles
from rana_core.architecture import family_of
from rana_core.calibration import capture_input_stats, capture_module_inputs
from rana_core.config import CompressConfig
from rana_core.corpus import token_windows
from rana_core.loading import load_model
from rana_core.pipeline import compress
from rana_core.residency import rest_layers
from rana_core.sensitivity import fisher_diagonals

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: sliding-window and full layers take other masks
def test_layer_after_layer_gathers_what_one_whole_model_pass_gathers(family):
    loaded = load_model(f"tiny-{family}")
    windows = token_windows(loaded.tokenizer, "train", 1024, 128)
    inputs = ("attention", "mlp", "down")
    layerwise = capture_module_inputs(loaded, windows, row_stride=7, inputs=inputs)
    hooks = {(i, name): layer.get_submodule(family_of(layer).input_path(name))
             for i, layer in enumerate(loaded.layers) for name in inputs}
    whole = capture_input_stats(loaded.model, windows, hooks, row_stride=7)
    assert set(layerwise) == set(whole)
    for key in whole:
        assert layerwise[key].tokens == whole[key].tokens == windows.numel()
        torch.testing.assert_close(layerwise[key].gram, whole[key].gram, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(layerwise[key].rows, whole[key].rows, rtol=1e-6, atol=1e-6)


def test_a_backward_pass_through_resting_layers_gives_the_same_loss_gradients():
    windows = token_windows(load_model("tiny").tokenizer, "train", 512, 128)
    resident = load_model("tiny")
    expected = fisher_diagonals(resident.model, resident.layers, windows)
    resting = load_model("tiny")
    rest_layers(resting.model, resting.layers, "cpu")  # each layer call a recomputed checkpoint in the backward
    got = fisher_diagonals(resting.model, resting.layers, windows)
    assert set(got) == set(expected)
    for key in expected:
        assert expected[key].abs().max() > 0
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("method, allocation", [("rana", "uniform"), ("rana", "greedy"), ("hybrid", "exact-loss")])
def test_parked_statistics_and_rebuilt_profiles_give_the_resident_answer(method, allocation, monkeypatch):
    """On the CPU the resting layers do not move, but everything kept for all layers is parked and rebuilt as on
    a GPU (rana's profiles rebuilt from parked statistics with their memos handed over, hybrid's bases parked).
    Hybrid's inputs and bases are parked too beside a resident model where every layer's would not fit (a 7B
    model on an 80 GB GPU: ~47 GB), and the run says so."""
    config = CompressConfig(model="tiny", method=method, allocation=allocation, flop_reduction=0.4,
                            calib_tokens=2048, eval_tokens=1024, seq_len=128)
    said = []
    resident = compress(config, progress=lambda f, m: said.append(m))
    assert not any("inputs and bases kept in CPU memory" in m for m in said)
    loaded = load_model("tiny")
    rest_layers(loaded.model, loaded.layers, "cpu")
    runs = {"resting": compress(config, loaded=loaded)}
    if method == "rana":  # the profiles were rebuilt, not kept
        store = next(value for key, value in loaded.cache.items() if key[0] == "rana profiles")
        assert not store.kept and len(store.parked) == len(loaded.layers)
    if method == "hybrid":
        monkeypatch.setattr(layer_profiles, "fits", lambda nbytes, device: False)
        runs["parked beside a resident model"] = compress(config, progress=lambda f, m: said.append(m))
        assert any("inputs and bases kept in CPU memory" in m for m in said)
    for run in runs.values():
        assert run.perplexity == pytest.approx(resident.perplexity, rel=1e-6)
        assert run.measured_flop_reduction == pytest.approx(resident.measured_flop_reduction, abs=1e-9)
        assert [(r.adapter, r.rank) for r in run.layers] == [(r.adapter, r.rank) for r in resident.layers]
    if allocation == "uniform":  # the first run built its adapters during profiling; a second rebuilds profiles
        again = compress(config, loaded=loaded)
        assert again.perplexity == pytest.approx(resident.perplexity, rel=1e-6)
        assert again.measured_flop_reduction == pytest.approx(resident.measured_flop_reduction, abs=1e-9)


@pytest.mark.parametrize("allocation", ["uniform", "greedy"])
def test_a_resident_model_whose_profiles_would_not_fit_parks_them_and_gets_the_same_answer(allocation, monkeypatch):
    """A 7B model fits an H200 but its kept profiles did not (out of memory at 130 GB): where they would not fit,
    a resident model's statistics are parked and its profiles rebuilt, as a resting model's are."""
    config = CompressConfig(model="tiny", method="rana", allocation=allocation, flop_reduction=0.4,
                            calib_tokens=2048, eval_tokens=1024, seq_len=128)
    said = {"kept": [], "parked": []}
    kept_loaded = load_model("tiny")
    kept = compress(config, loaded=kept_loaded, progress=lambda f, m: said["kept"].append(m))
    store = next(value for key, value in kept_loaded.cache.items() if key[0] == "rana profiles")
    assert len(store.kept) == len(kept_loaded.layers) and not store.parked  # on the CPU everything fits
    monkeypatch.setattr(layer_profiles, "fits", lambda nbytes, device: False)
    loaded = load_model("tiny")
    parked = compress(config, loaded=loaded, progress=lambda f, m: said["parked"].append(m))
    store = next(value for key, value in loaded.cache.items() if key[0] == "rana profiles")
    assert not store.kept and len(store.parked) == len(loaded.layers)
    for run, expected in (("kept", False), ("parked", True)):  # the run's progress says why it rebuilds
        assert any("every layer's would not fit" in m for m in said[run]) == expected
    assert parked.perplexity == pytest.approx(kept.perplexity, rel=1e-6)
    assert parked.measured_flop_reduction == pytest.approx(kept.measured_flop_reduction, abs=1e-9)
    assert [(r.adapter, r.rank) for r in parked.layers] == [(r.adapter, r.rank) for r in kept.layers]


def test_hybrid_counts_what_it_keeps_for_a_7b_model():
    """Llama-2-7B's shape (hidden 4096, MLP 11008, 32 layers), built on the meta device: per layer two inputs of a
    4096² float64 gram and 2,048 float32 rows, and float64 output bases of QKV (12288 × 4096), gate and up
    (11008 × 4096 each)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rana_core.methods.hybrid import kept_bytes

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    inputs = 2 * (4096 * 4096 * 8 + 2048 * 4096 * 4)
    bases = (12288 * 4096 + 2 * 11008 * 4096) * 8
    assert kept_bytes(model.model.layers) == 32 * (inputs + bases)  # 10.7 GB and 36.1 GB


@pytest.mark.gpu
@cuda
def test_what_fits_on_the_gpu_is_what_the_process_may_still_allocate():
    allowed = torch.cuda.get_device_properties(0).total_memory * torch.cuda.get_per_process_memory_fraction(0)
    room = allowed - torch.cuda.memory_allocated(0)
    assert layer_profiles.fits(room - (1 << 20), "cuda") and not layer_profiles.fits(room + (1 << 20), "cuda")
    held = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")  # the room shrinks by what is allocated
    assert not layer_profiles.fits(room - (1 << 29), "cuda") and layer_profiles.fits(room - (1 << 31), "cuda")
    del held


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("method, allocation", [("svd", "uniform"), ("cats", "uniform"), ("rana", "greedy"),
                                                ("a3", "greedy"), ("hybrid", "exact-loss")])
def test_resting_layers_compress_to_what_the_resident_model_gives(method, allocation):
    config = dict(model="tiny-llama", method=method, allocation=allocation, flop_reduction=0.3, calib_tokens=2048,
                  eval_tokens=1024, seq_len=128, device="cuda")
    resident = compress(CompressConfig(**config, layer_by_layer=False))
    resting = compress(CompressConfig(**config, layer_by_layer=True))
    assert resident.environment["layer_by_layer"] is False and resting.environment["layer_by_layer"] is True
    assert abs(resting.perplexity - resident.perplexity) <= 1e-3 * resident.perplexity
    assert abs(resting.measured_flop_reduction - resident.measured_flop_reduction) <= 1e-3


@pytest.mark.gpu
@cuda
def test_a_model_larger_than_the_memory_cap_is_built_layer_by_layer_within_it(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = LlamaConfig(vocab_size=257, hidden_size=2048, intermediate_size=5632, num_hidden_layers=28,
                        num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=512,
                        tie_word_embeddings=False)
    with torch.device("cuda"):
        model = LlamaForCausalLM(shape).to(torch.bfloat16)
    weights_gib = sum(p.numel() for p in model.parameters()) * 2 / 2**30
    model.save_pretrained(tmp_path / "model")
    del model
    torch.cuda.empty_cache()
    _byte_tokenizer().save_pretrained(tmp_path / "model")
    # One layer's weights (0.09 GiB), statistics and activations, and down's basis in float64 (its gram, the
    # Cholesky factor of it and a copy: 0.25 GiB each) fit; under a 1.0 GiB cap the first run on the H200 ran out
    # of memory at layer 4 with 0.64 GiB allocated.
    cap = 1.5
    assert weights_gib > 1.5 * cap  # the model could not be on the GPU whole
    run = subprocess.run([sys.executable, "-m", "rana_cli.main", "compress", "--model", str(tmp_path / "model"),
                          "--method", "svd", "--flop-reduction", "0.3", "--calib-tokens", "1024", "--eval-tokens",
                          "1024", "--seq-len", "256", "--dtype", "bfloat16", "--max-gpu-memory", str(cap),
                          "--json", "-"], capture_output=True, text=True,
                         env={**os.environ, "RANA_DEVICE": "cuda", "RANA_DATA_DIR": str(tmp_path)})
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout)
    assert result["environment"]["layer_by_layer"] is True
    assert result["environment"]["peak_gpu_gib"] <= cap
    assert abs(result["measured_flop_reduction"] - 0.3) <= 0.03


def _byte_tokenizer():
    """A byte-level BPE with no merges (256 byte symbols and an end-of-text token): a real tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: i for i, symbol in enumerate(sorted(ByteLevel.alphabet()))} | {"<|endoftext|>": 256}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


def test_lora_recovery_refuses_a_model_built_layer_by_layer_in_one_line(tmp_path):
    from rana_core.errors import RanaError
    from rana_core.recovery.config import RecoverConfig
    from rana_core.recovery.recover import recover

    loaded = load_model("tiny")
    rest_layers(loaded.model, loaded.layers, "cpu")  # a visit would swap LoRA's parameters away from the optimizer
    with pytest.raises(RanaError, match="layer by layer"):
        recover(loaded, tmp_path / "missing.safetensors", None, RecoverConfig(strategy="uniform"))


def test_resting_keeps_tied_embeddings_one_tensor():
    loaded = load_model("tiny-gemma3")  # Gemma 3 ties its LM head to the token embeddings
    model = loaded.model
    assert model.lm_head.weight is model.get_input_embeddings().weight
    rest_layers(model, loaded.layers, "cpu")
    assert model.lm_head.weight is model.get_input_embeddings().weight
