"""Gemma needs <bos> at the start of every sequence: the bundled Gemma 3 tokenizer adds it and splits text as it
did when Gemma 3 270M's perplexity was measured, and a Gemma tokenizer that adds none is refused in one line."""

import importlib.util

import pytest

from rana_core.errors import ModelNotFound
from rana_core.loading import HFTokenizer, check_tokenizer
from rana_core.model_source import GEMMA3_PACKAGE


@pytest.mark.skipif(importlib.util.find_spec(GEMMA3_PACKAGE) is None, reason="gemma3-270m's package is optional")
def test_the_bundled_gemma_tokenizer_adds_bos_and_splits_text_as_measured():
    """The ids are those of the tokenizer (transformers 5.23, tokenizers 0.23.3) behind docs/results.md's Gemma 3
    numbers (dense perplexity 36.57); transformers 5.17 read the same file without <bos> and into other ids."""
    from transformers import AutoTokenizer

    from rana_core.loading import _assemble_gemma3

    location, gguf_file = _assemble_gemma3()
    tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(location, gguf_file=gguf_file, local_files_only=True))
    assert tokenizer.bos_ids == [2]
    assert tokenizer.encode("The cat sat on the mat.") == [818, 5866, 2838, 580, 506, 1756, 236761]
    check_tokenizer("gemma3_text", tokenizer, "gemma3-270m")  # accepted


class NoBosTokenizer:
    """The parts of a Hugging Face tokenizer HFTokenizer reads, with add_bos_token off (as 5.17 read Gemma's)."""
    eos_token_id, bos_token_id, add_bos_token = 1, 2, False

    def __len__(self):
        return 262144

    def encode(self, text, add_special_tokens=False):
        return [108, 108]


def test_a_gemma_tokenizer_without_bos_is_refused_in_one_line():
    with pytest.raises(ModelNotFound, match="adds no <bos> token, which Gemma models need") as refused:
        check_tokenizer("gemma3_text", HFTokenizer(NoBosTokenizer()), "my-gemma")
    assert "\n" not in str(refused.value) and "my-gemma" in str(refused.value)
    check_tokenizer("llama", HFTokenizer(NoBosTokenizer()), "my-llama")  # SmolLM2's adds none, rightly
