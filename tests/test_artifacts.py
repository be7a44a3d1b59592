"""Adapter artifacts: what is saved rebuilds the same adapted model; a damaged file is refused with one line."""

from types import SimpleNamespace

import pytest
import torch

from rana_core.adapters.artifacts import ArtifactError, load_adapters, save_adapters
from rana_core.adapters.base import inject, unload
from rana_core.config import CompressConfig
from rana_core.pipeline import adapt


def logits(tiny, windows):
    with torch.no_grad():
        return tiny.model(windows[:2]).logits


@pytest.mark.parametrize("method,allocation", [("rana", "greedy"), ("cats", "uniform"), ("svd", "uniform"),
                                               ("a3", "uniform"), ("a3", "greedy"), ("teal", "greedy"),
                                               ("wina", "greedy")])
def test_saved_adapters_rebuild_the_same_model(tiny, tiny_windows, tmp_path, method, allocation):
    config = CompressConfig(model="tiny", method=method, allocation=allocation, flop_reduction=0.4,
                            calib_tokens=1024, seq_len=128)
    train = tiny_windows["train"]
    noop = lambda f, m: None  # noqa: E731
    unload(tiny.layers)
    try:
        adapters = adapt(tiny, config, train[0::2], train[1::2], noop, noop)
        expected = logits(tiny, tiny_windows["heldout"])
    finally:
        unload(tiny.layers)
    digest = save_adapters(adapters, tmp_path / "run.safetensors")
    dense = logits(tiny, tiny_windows["heldout"])
    assert not torch.allclose(dense, expected)  # the adapters do change the model

    rebuilt = load_adapters(tiny, tmp_path / "run.safetensors", digest)
    assert [type(a) for a in rebuilt] == [type(a) for a in adapters]
    inject(tiny.layers, rebuilt)
    try:
        assert torch.equal(logits(tiny, tiny_windows["heldout"]), expected)
    finally:
        unload(tiny.layers)


def test_corrupt_missing_and_mismatched_artifacts_are_refused(tiny, tiny_windows, tmp_path):
    config = CompressConfig(model="tiny", method="svd", flop_reduction=0.3, calib_tokens=1024, seq_len=128)
    noop = lambda f, m: None  # noqa: E731
    adapters = adapt(tiny, config, tiny_windows["train"], tiny_windows["train"], noop, noop)
    unload(tiny.layers)
    path = tmp_path / "run.safetensors"
    digest = save_adapters(adapters, path)

    with pytest.raises(ArtifactError, match="missing"):
        load_adapters(tiny, tmp_path / "nope.safetensors", digest)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="corrupt"):
        load_adapters(tiny, path, digest)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ArtifactError, match="cannot be read"):
        load_adapters(tiny, path)

    save_adapters(adapters, path)
    from transformers import LlamaConfig, LlamaForCausalLM

    narrower = LlamaForCausalLM(LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=80,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ArtifactError, match="does not fit"):
        load_adapters(SimpleNamespace(layers=narrower.model.layers), path)
