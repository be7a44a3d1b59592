"""Model families come from one table (rana_core.architecture): Qwen2 (QKV biases), Mistral (sliding window) and
Gemma 3 (GeGLU, QK-norm, four norms) compress through every method that supports them, their adapters survive
an artifact round trip, and no other file of the product knows their names."""

import re
from pathlib import Path

import pytest

from rana_core.architecture import FAMILIES, family_of, layer_attention
from rana_core.config import CompressConfig
from rana_core.errors import RanaError
from rana_core.loading import load_model
from rana_core.pipeline import compress, evaluate_saved

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(flop_reduction=0.4, calib_tokens=1024, eval_tokens=512, seq_len=128)
NEW_FAMILIES = ("qwen2", "mistral", "gemma3")


@pytest.fixture(scope="module", params=NEW_FAMILIES)
def family_model(request):
    return load_model(f"tiny-{request.param}")


def test_each_tiny_model_is_the_family_it_claims(family_model):
    family = family_of(family_model.model)
    assert family_model.name == f"tiny-{family.name}"
    layer = family_model.layers[0]
    q = layer_attention(layer).get_submodule(family.q)
    assert (q.bias is not None) == family.qkv_bias  # Qwen2 carries QKV biases, the others do not
    assert hasattr(layer_attention(layer), "q_norm") == family.qk_norm
    assert all(hasattr(layer, norm) for norm in family.norms)
    if family.sliding_window != "none":
        assert family_model.config.sliding_window == 32  # shorter than the windows compressed below


@pytest.mark.parametrize("method, allocation", [("svd", "uniform"), ("cats", "uniform"), ("rana", "uniform"),
                                                ("hybrid", "exact-loss")])
def test_every_method_compresses_each_family_and_its_artifact_round_trips(family_model, method, allocation,
                                                                          tmp_path):
    config = CompressConfig(model=family_model.name, method=method, allocation=allocation, **SMALL)
    artifact = tmp_path / "adapters.safetensors"
    result = compress(config, loaded=family_model, artifact_path=artifact)
    assert result.measured_flop_reduction == pytest.approx(0.4, abs=0.03)
    assert result.perplexity != result.dense_perplexity  # the adapters did change the model (random weights)
    fresh = load_model(family_model.name)  # the artifact rebuilds the same model on a new load
    again = evaluate_saved(fresh, artifact, result.artifact["sha256"], "heldout", SMALL["eval_tokens"],
                           SMALL["seq_len"])
    assert again["perplexity"] == pytest.approx(result.perplexity, rel=1e-6)
    assert again["measured_flop_reduction"] == pytest.approx(result.measured_flop_reduction, abs=1e-9)
    assert not any(type(m).__module__.startswith("rana_core") for m in fresh.model.modules())  # unloaded


def test_a_method_the_table_rules_out_is_one_clear_line(family_model):
    family = family_of(family_model.model)
    for method, reason in family.unsupported.items():
        with pytest.raises(RanaError, match=f"{method} does not run on {family.name}"):
            compress(CompressConfig(model=family_model.name, method=method, **SMALL), loaded=family_model)


def test_an_unknown_family_is_refused_with_one_line():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(RanaError, match="model family 'gpt2' is not supported"):
        family_of(model)


def test_no_product_file_but_the_table_names_the_families_added_with_it():
    """Qwen2 and Mistral were added as one entry each in rana_core/architecture.py: no other product file spells
    their names (model types, modeling modules, classes)."""
    names = {n for f in (FAMILIES["qwen2"], FAMILIES["mistral"])
             for n in (f.name, f.modeling, f.causal_lm, f.config_class, *f.model_types)}
    pattern = re.compile("|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)), re.IGNORECASE)
    found = {}
    for package in ("rana_core", "jobs", "db", "app"):
        for path in (ROOT / package).rglob("*.py"):
            if path.name == "architecture.py":
                continue
            code = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
            hits = {m.group(0) for line in code for m in pattern.finditer(line)}
            if hits:
                found[str(path.relative_to(ROOT))] = hits
    assert found == {}
