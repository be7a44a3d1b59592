"""A3 on `tiny` (GQA + rotate-half RoPE): exactness at full width, the narrow rotary, each component's objective
against plain alternatives, budgets, sizes, and bad input."""

import pytest
import torch

from rana_core.adapters.a3 import A3Attention, kept_coordinates, model_rotary, rotary_pairs, rotate_narrow
from rana_core.adapters.base import inject, unload
from rana_core.calibration import capture_input_stats
from rana_core.config import CompressConfig
from rana_core.errors import RanaError
from rana_core.methods import a3
from rana_core.pipeline import compress

SMALL = dict(model="tiny", calib_tokens=2048, eval_tokens=1024, seq_len=128)
noop = lambda f, m: None  # noqa: E731


@pytest.fixture(scope="module")
def analysed(tiny, tiny_windows):
    unload(tiny.layers)
    first, second = a3.check_supported(tiny)
    return tiny.shape, first, second, a3.analyse(tiny, tiny_windows["train"], noop)


def adapters_at(tiny, analysed, widths):
    shape, first, second, analyses = analysed
    return [adapter for index, (layer, analysis) in enumerate(zip(tiny.layers, analyses))
            for adapter in a3.layer_adapters(layer, index, analysis, widths, first, second, shape)]


def test_full_width_reproduces_the_dense_model_and_unload_restores_it(tiny, tiny_windows, analysed):
    batch = tiny_windows["heldout"][:2]
    with torch.no_grad():
        dense = tiny.model(batch).logits
    inject(tiny.layers, adapters_at(tiny, analysed, a3.full_widths(analysed[0])))
    try:
        assert {type(layer.self_attn).__name__ for layer in tiny.layers} == {"A3Attention"}
        with torch.no_grad():
            adapted = tiny.model(batch).logits
    finally:
        assert unload(tiny.layers) == 4
    assert torch.allclose(adapted, dense, atol=1e-5, rtol=0)
    with torch.no_grad():
        assert torch.equal(tiny.model(batch).logits, dense)


def test_narrow_model_caches_narrow_keys_and_decodes_like_a_full_recompute(tiny, analysed):
    inject(tiny.layers, adapters_at(tiny, analysed, {"qk": 6, "ov": 5, "mlp": 90}))
    try:
        prompt = torch.tensor([tiny.tokenizer.encode("The jury said")])
        with torch.no_grad():
            cache = tiny.model(prompt, use_cache=True).past_key_values
        keys, values = cache.layers[0].keys, cache.layers[0].values
        assert keys.shape[1:] == (2, prompt.shape[1], 6) and values.shape[1:] == (2, prompt.shape[1], 5)
        cached = tiny.model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True)
        uncached = tiny.model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=False)
        assert torch.equal(cached, uncached)
    finally:
        unload(tiny.layers)


def test_rotary_on_kept_coordinates_equals_full_rotary_then_masking(tiny):
    attention = tiny.layers[0].self_attn
    rotary = model_rotary(attention)
    first, second = rotary_pairs(rotary, 16)
    assert first.tolist() == list(range(8)) and second.tolist() == list(range(8, 16))  # rotate-half
    torch.manual_seed(0)
    q = torch.randn(2, 4, 10, 16)
    cos, sin = tiny.model.model.rotary_emb(q, torch.arange(10)[None].expand(2, -1))
    kept_pairs = torch.tensor([6, 1, 3])
    coords = kept_coordinates(first, second, kept_pairs)
    full, _ = rotary(q, q, cos, sin)
    mask = torch.zeros(16)
    mask[coords] = 1.0
    masked_then_full, _ = rotary(q * mask, q * mask, cos, sin)
    narrow = rotate_narrow(q[..., coords], cos[:, None][..., coords], sin[:, None][..., coords])
    assert torch.allclose(narrow, full[..., coords], atol=1e-6)  # kept pairs rotate among themselves only
    assert torch.allclose(narrow, masked_then_full[..., coords], atol=1e-6)
    assert torch.equal(masked_then_full * (1 - mask), torch.zeros_like(q))


def test_pairs_follow_the_rotary_code_in_use():
    def interleaved(q, k, cos, sin):  # GPT-J style: pairs (2i, 2i + 1)
        def turn(x):
            return torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)
        return q * cos + turn(q) * sin, k * cos + turn(k) * sin

    first, second = rotary_pairs(interleaved, 8)
    assert first.tolist() == [0, 2, 4, 6] and second.tolist() == [1, 3, 5, 7]
    with pytest.raises(RanaError, match="pairs"):
        rotary_pairs(lambda q, k, cos, sin: (q * cos + q * sin, k), 8)


def attention_inputs(tiny, windows, layer):
    rows = capture_input_stats(tiny.model, windows, {"x": tiny.layers[layer].self_attn.q_proj}, row_stride=1)["x"]
    return rows.rows.double().view(windows.shape[0], windows.shape[1], -1)


def test_qk_selection_beats_truncation_on_attention_score_error(tiny, tiny_windows, analysed):
    shape, first, second, analyses = analysed
    windows = tiny_windows["train"][:4]
    attention = tiny.layers[1].self_attn
    rotary = model_rotary(attention)
    X = attention_inputs(tiny, windows, 1)
    n, length = windows.shape
    q = (X @ attention.q_proj.weight.double().T).view(n, length, 4, 16).transpose(1, 2)
    k = (X @ attention.k_proj.weight.double().T).view(n, length, 2, 16).transpose(1, 2)
    cos, sin = (t.double() for t in tiny.model.model.rotary_emb(X.float(), torch.arange(length)[None]))
    causal = torch.ones(length, length).tril().bool()

    def scores(keep):  # keep: (kv_heads, 16) 0/1 per group; pre-RoPE masking = keeping whole pairs
        parts = []
        for j in range(2):
            qr, kr = rotary(q[:, 2 * j:2 * j + 2] * keep[j], k[:, j:j + 1] * keep[j], cos, sin)
            parts.append(qr @ kr.transpose(-1, -2))
        return torch.cat(parts, 1)[..., causal]

    def keep_pairs(pairs_per_group):
        keep = torch.zeros(2, 16, dtype=torch.float64)
        for j, pairs in enumerate(pairs_per_group):
            keep[j, kept_coordinates(first, second, torch.as_tensor(pairs))] = 1.0
        return keep

    full = scores(torch.ones(2, 16, dtype=torch.float64))
    error = lambda keep: ((scores(keep) - full) ** 2).sum() / (full ** 2).sum()  # noqa: E731
    q_norms = attention.q_proj.weight.double().view(2, 2, 16, -1).square().sum((1, 3))
    k_norms = attention.k_proj.weight.double().view(2, 16, -1).square().sum(-1)
    weight_scores = (q_norms * k_norms)[:, first] + (q_norms * k_norms)[:, second]
    for width in (4, 8, 12):
        pairs = width // 2
        chosen = error(keep_pairs([analyses[1].pair_order[j, :pairs] for j in range(2)]))
        first_pairs = error(keep_pairs([range(pairs)] * 2))  # truncation: the first (fastest) frequencies
        by_weights = error(keep_pairs([weight_scores[j].argsort(descending=True)[:pairs] for j in range(2)]))
        assert chosen < first_pairs and chosen < by_weights, (width, chosen, first_pairs, by_weights)


def test_ov_solution_beats_plain_svd_on_head_output_error(tiny, tiny_windows, analysed):
    shape, first, second, analyses = analysed
    layer = tiny.layers[0]
    R = capture_input_stats(tiny.model, tiny_windows["train"], {"x": layer.self_attn.q_proj})["x"].gram
    adapters = a3.layer_adapters(layer, 0, analyses[0], {"qk": 16, "ov": 6, "mlp": 160}, first, second, shape)
    attention = adapters[0]
    assert isinstance(attention, A3Attention) and attention.r_vo == 6
    v, o = layer.self_attn.v_proj.weight.double(), layer.self_attn.o_proj.weight.double()
    v_new, o_new = attention.v_weight.double(), attention.o_weight.double()
    for j in range(2):  # each KV group: heads 2j and 2j + 1 share one value head
        dense = torch.cat([v[16 * j:16 * (j + 1)].T @ o[:, 16 * h:16 * (h + 1)].T for h in (2 * j, 2 * j + 1)], 1)
        a3_vo = torch.cat([v_new[6 * j:6 * (j + 1)].T @ o_new[:, 6 * h:6 * (h + 1)].T for h in (2 * j, 2 * j + 1)], 1)
        U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
        plain = U[:, :6] @ torch.diag(S[:6]) @ Vh[:6]
        output_error = lambda approx: torch.trace((dense - approx).T @ R @ (dense - approx))  # noqa: E731
        assert output_error(a3_vo) < output_error(plain)
        tail = analyses[0].ov_energy[j, 6:].sum()  # the analysis predicts exactly the error it reaches
        assert torch.isclose(output_error(a3_vo), tail, rtol=1e-6)


@pytest.mark.parametrize("allocation", ["uniform", "greedy"])
@pytest.mark.parametrize("budget", [0.2, 0.45, 0.7])
def test_measured_flop_reduction_hits_the_target(tiny, allocation, budget):
    result = compress(CompressConfig(method="a3", allocation=allocation, flop_reduction=budget, **SMALL),
                      loaded=tiny)
    assert abs(result.measured_flop_reduction - budget) <= 0.01, result.measured_flop_reduction
    assert {row.adapter for row in result.layers} == {"a3"}
    assert all(row.density == 1.0 and 0 < row.rank <= row.max_rank for row in result.layers)
    assert result.perplexity != result.dense_perplexity


def test_parameters_and_kv_cache_shrink_as_claimed(tiny):
    result = compress(CompressConfig(method="a3", flop_reduction=0.5, **SMALL), loaded=tiny)
    widths = a3.uniform_widths(tiny.shape, 2, 0.5)
    r_qk, r_vo, r_ff = widths[(0, "qk")], widths[(0, "ov")], widths[(0, "mlp")]
    assert (r_qk, r_vo) == (8, 8)
    stats, dense = result.model_stats, result.model_stats["dense"]
    hidden, heads, kv_heads = 64, 4, 2
    per_layer = hidden * ((heads + kv_heads) * r_qk + kv_heads * r_vo + heads * r_vo + 3 * r_ff)
    assert stats["decoder_linear_params"] == 2 * per_layer
    assert dense["decoder_linear_params"] == 2 * hidden * (4 * 16 + 2 * 2 * 16 + 4 * 16 + 3 * 160)
    assert dense["params"] - stats["params"] == dense["decoder_linear_params"] - stats["decoder_linear_params"]
    assert stats["kv_bytes_per_token"] == 2 * 2 * kv_heads * (r_qk + r_vo)  # fp16, 2 layers
    assert dense["kv_bytes_per_token"] == 2 * 2 * kv_heads * 2 * 16
    # o_proj and the score products shrink too, so the whole model saves more than the adaptable part alone
    assert stats["flops_per_token"] < dense["flops_per_token"]
    svd = compress(CompressConfig(method="svd", flop_reduction=0.5, **SMALL), loaded=tiny).model_stats
    assert svd["kv_bytes_per_token"] == dense["kv_bytes_per_token"]


def test_bad_input_is_one_line(tiny):
    with pytest.raises(RanaError, match="no allocation 'knapsack'") as caught:
        CompressConfig(method="a3", allocation="knapsack", **SMALL).validate()
    assert "\n" not in str(caught.value)
    from transformers import LlamaConfig, LlamaForCausalLM

    from rana_core.loading import LoadedModel

    biased = LlamaForCausalLM(LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1, attention_bias=True))
    loaded = LoadedModel("biased", biased, tiny.tokenizer, tiny.source)
    with pytest.raises(RanaError, match="bias-free") as caught:
        a3.build(loaded, None, CompressConfig(method="a3", flop_reduction=0.3, **SMALL), noop)
    assert "\n" not in str(caught.value)


def test_saved_run_evaluates_to_the_same_numbers(tiny, tmp_path):
    """What an `evaluate` job does with a stored a3 run: rebuild it from the artifact and measure it again."""
    from rana_core.pipeline import evaluate_saved

    config = CompressConfig(method="a3", allocation="greedy", flop_reduction=0.4, **SMALL)
    result = compress(config, loaded=tiny, artifact_path=tmp_path / "run.safetensors")
    again = evaluate_saved(tiny, tmp_path / "run.safetensors", result.artifact["sha256"], "heldout",
                           SMALL["eval_tokens"], SMALL["seq_len"])
    assert again["perplexity"] == pytest.approx(result.perplexity, rel=1e-6)
    assert again["measured_flop_reduction"] == pytest.approx(result.measured_flop_reduction, abs=1e-12)
    assert again["measured_flop_reduction_whole_model"] == pytest.approx(result.measured_flop_reduction_whole_model,
                                                                         abs=1e-12)


@pytest.mark.parametrize("winner", [0, 2])  # greedy across parts, uniform
def test_greedy_keeps_the_candidate_with_the_least_calibration_loss(tiny, monkeypatch, winner):
    calls = []

    def rigged(loaded, candidates, windows, progress, what):
        calls.extend(candidates)
        assert all(build() for build in candidates.values())  # each candidate builds adapters
        return list(candidates)[winner], {}

    monkeypatch.setattr(a3, "least_loss", rigged)
    config = dict(method="a3", flop_reduction=0.4, **SMALL)
    greedy = compress(CompressConfig(allocation="greedy", **config), loaded=tiny)
    uniform = compress(CompressConfig(allocation="uniform", **config), loaded=tiny)
    assert calls == ["greedy across parts", "greedy within parts", "uniform"]
    same = [r.rank for r in greedy.layers] == [r.rank for r in uniform.layers]
    assert same == (winner == 2)
