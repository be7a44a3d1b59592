"""The bundled SmolLM2-135M as it ships: offline loading, a sane perplexity, generation, and folder loading."""

import pytest
import torch

from rana_core.corpus import token_windows
from rana_core.evaluate import perplexity
from rana_core.loading import load_model

pytestmark = pytest.mark.bundled


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2-135m")


def test_loads_offline_with_the_documented_shape(smol):
    config = smol.config
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (576, 1536, 30)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert 134e6 < smol.info["parameters"] < 135e6
    text = "The Fulton County Grand Jury said Friday"
    assert smol.tokenizer.decode(smol.tokenizer.encode(text)) == text


def test_held_out_perplexity_is_the_measured_one(smol):
    """Pinned to the value measured once on exactly this evaluation (2,048 held-out tokens in windows of 512, float32
    on the CPU): 43.4593. The README's 41.86 is the quality protocol's, on 32,768 tokens. The same model in float64
    gives 43.4596, 8e-6 away: float32 rounding, on this CPU or another one's kernels, moves the value by about that
    much, and ±1e-4 allows twelve times it. A loading fault (a tensor dequantised wrongly, a wrong tokenizer, a
    shifted window) moves it by far more."""
    windows = token_windows(smol.tokenizer, "heldout", 2048, 512)
    result = perplexity(smol.model, windows)
    assert result.predicted_tokens == 4 * 511
    assert result.perplexity == pytest.approx(43.4593, rel=1e-4)


def test_greedy_answer_to_a_factual_question(smol):
    assert "Paris" in _ask(smol, "What is the capital of France?")


def test_the_default_method_at_a_30_percent_cut_still_answers(smol):
    """The studio's default method (TEAL, uniform) at a 0.3 cut through the shipped pipeline: the instruct model
    still answers in the run's stored probes. Measured in session 9: with 4,096 calibration tokens (as here) 6 of
    the 6 questions, with the default 8,192 5 of 6, Paris included both times. Uniform and greedy RaNA at the same
    cut keep held-out perplexity close to dense, yet answer with blank lines: perplexity alone does not see it."""
    from rana_core.config import CompressConfig
    from rana_core.pipeline import compress

    config = CompressConfig(model="smollm2-135m", flop_reduction=0.3, calib_tokens=4096, eval_tokens=2048,
                            track_layers=False)
    assert (config.method, config.allocation) == ("teal", "uniform")
    result = compress(config, loaded=smol)
    replies = {r["prompt"]: r["reply"] for r in result.probes["adapted"]["replies"]}
    assert "Paris" in replies["What is the capital of France?"], replies
    assert result.probes["adapted"]["chat_accuracy"] >= 0.5, replies
    assert abs(result.measured_flop_reduction - 0.3) <= 0.02  # the masks ran and spent the budget


def _ask(loaded, question: str, new_tokens: int = 16) -> str:
    hf = loaded.tokenizer.hf
    prompt = hf.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                    return_tensors="pt", return_dict=True)
    out = loaded.model.generate(**prompt, max_new_tokens=new_tokens, do_sample=False)
    return hf.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)


def test_a_saved_folder_loads_to_the_same_model(smol, tmp_path):
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(smol.config)
    del config.quantization_config  # GGUF-loaded models refuse to save; a plain copy of the weights does not
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(smol.model.state_dict())
    plain.save_pretrained(tmp_path)
    smol.tokenizer.hf.save_pretrained(tmp_path)
    again = load_model(str(tmp_path))
    assert again.source.kind == "folder"
    ids = torch.tensor([smol.tokenizer.encode("The jury further said in term-end presentments")])
    with torch.no_grad():
        assert torch.allclose(again.model(ids).logits, smol.model(ids).logits, atol=1e-4)


def test_a_hub_id_without_a_hub_is_one_clear_error(monkeypatch, tmp_path):
    from rana_core.errors import ModelNotFound

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelNotFound, match="could not load model 'someone/some-model'"):
        load_model("someone/some-model")


def test_a_folder_holding_one_gguf_file_loads_that_file(smol, tmp_path):
    """A folder with exactly one .gguf file (no config.json) resolves to that file and loads it, tokenizer included
    from the GGUF itself: here the bundled SmolLM2 file under another name, which must give the same model."""
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "weights.gguf").symlink_to(smol.weights_file)
    (folder / "notes.txt").write_text("not a weights file")
    loaded = load_model(str(folder))
    assert (loaded.source.kind, loaded.source.gguf_file) == ("gguf", "weights.gguf")
    assert loaded.weights_file == str(folder / "weights.gguf")
    text = "The jury further said in term-end presentments"
    assert loaded.tokenizer.encode(text) == smol.tokenizer.encode(text)
    ids = torch.tensor([smol.tokenizer.encode(text)])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, smol.model(ids).logits)  # same file, same dequantisation
