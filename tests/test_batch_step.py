"""The batched decode step (rana_core.decode.batch_step) against each sequence decoded alone by the batch-1
engine: the same logits and tokens for every sequence, with prompts of different lengths (each sequence at its
own position), dense and RaNA on the synthetic engine and every method the engine runs on a stored run; on the CPU
through Triton's interpreter (the masked products' kernels), on the GPU (`gpu`) at the SmolLM2 shape in fp16,
graph-replayed."""

import pytest
import torch

from rana_core.decode.batch_step import BatchDecoder
from rana_core.decode.from_model import engine_from_model
from rana_core.decode.engine import SHAPES, DecodeEngine, Shape

from test_engine_from_model import stored_run
from test_kernels import require_triton

TINY = SHAPES["tiny-shape"]  # grouped K/V heads: QKV stays dense in RaNA's uniform allocation
TINY_MHA = Shape(hidden=64, intermediate=160, layers=2, heads=4, kv_heads=4, vocab=257)  # QKV adapted too


def prompts(engine: DecodeEngine, lengths) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randint(0, engine.shape.vocab, (n,), generator=generator).to(engine.device) for n in lengths]


def alone(engine: DecodeEngine, prompt: torch.Tensor, steps: int, max_seq: int) -> torch.Tensor:
    """Logits of `steps` greedy steps of one sequence through the batch-1 engine (eager)."""
    engine.allocate(max_seq)
    engine.prefill(prompt)
    return torch.stack([engine.step()[0].float().clone() for _ in range(steps)])


@pytest.mark.parametrize("shape, flop_reduction, products, masked", [
    (TINY, 0.0, "cublas", "union"), (TINY, 0.0, "triton", "union"), (TINY, 0.44, "cublas", "union"),
    (TINY, 0.44, "triton", "union"), (TINY_MHA, 0.44, "cublas", "union"), (TINY_MHA, 0.44, "triton", "union"),
    (TINY_MHA, 0.44, "cublas", "dense")],
    ids=["dense-cublas", "dense-triton", "rana-mlp-cublas", "rana-mlp-triton", "rana-qkv-and-mlp-cublas",
         "rana-qkv-and-mlp-triton", "rana-qkv-and-mlp-dense-masked"])
def test_each_sequence_of_a_batch_decodes_as_it_would_alone(shape, flop_reduction, products, masked):
    """Three sequences with prompts of 3, 9 and 5 tokens, 4 steps, float32: each sequence's logits within 1e-4 of
    their scale of the batch-1 engine's (its products sum in other groupings, and the masks of one token must not
    leak into another's product), and the same greedy tokens."""
    require_triton("cpu")
    engine = DecodeEngine(shape, torch.float32, "cpu", flop_reduction=flop_reduction, gemv="triton")
    engine.calibrate(tokens=256)
    batch = BatchDecoder(engine, batch=3, max_seq=32, products=products, masked=masked)
    sequences = prompts(engine, (3, 9, 5))
    expected = torch.stack([alone(engine, p, 4, 32) for p in sequences], dim=1)  # (steps, B, vocab)
    batch.prefill(sequences)
    assert batch.pos.tolist() == [3, 9, 5]
    got = torch.stack([batch.step().float().clone() for _ in range(4)])
    assert torch.isfinite(got).all()
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    assert batch.pos.tolist() == [7, 13, 9]


def test_bad_batches_are_refused_with_one_line():
    engine = DecodeEngine(TINY, torch.float32, "cpu", flop_reduction=0.0, gemv="triton")
    with pytest.raises(ValueError, match="1 to 16"):
        BatchDecoder(engine, batch=17, max_seq=32)
    with pytest.raises(ValueError, match="unknown products 'cutlass'"):
        BatchDecoder(engine, batch=2, max_seq=32, products="cutlass")
    with pytest.raises(ValueError, match="unknown masked products 'lists'"):
        BatchDecoder(engine, batch=2, max_seq=32, masked="lists")
    batch = BatchDecoder(engine, batch=2, max_seq=8)
    with pytest.raises(ValueError, match="2 prompts for a batch of 2|1 prompts for a batch of 2"):
        batch.prefill(prompts(engine, (3,)))
    with pytest.raises(ValueError, match="no room"):
        batch.prefill(prompts(engine, (3, 8)))


@pytest.mark.parametrize("model_name, method, allocation, products, masked", [
    ("tiny", "dense", "uniform", "triton", "dense"), ("tiny", "svd", "uniform", "triton", "dense"),
    ("tiny", "rana", "greedy", "triton", "dense"),
    ("tiny", "rana", "greedy", "cublas", "union"), ("tiny", "hybrid", "exact-loss", "triton", "dense"),
    ("tiny", "cats", "uniform", "cublas", "dense"), ("tiny", "teal", "greedy", "triton", "union"),
    ("tiny", "wina", "greedy", "triton", "dense"), ("tiny-qwen2", "rana", "uniform", "triton", "dense")])
def test_each_sequence_of_a_stored_runs_batch_decodes_as_it_would_alone(model_name, method, allocation, products,
                                                                       masked, tmp_path):
    """The engine of a stored run (its model's weights, its saved adapters) in batches: three prompts of 3, 9 and
    5 tokens, 4 steps, float32, each sequence's logits within 1e-4 of their scale of the batch-1 engine's and
    the same greedy tokens. Covers each part kind (svd's static low rank, TEAL's unscaled input masks on every
    product in hybrid's run and teal's, WINA's scaled ones, CATS's gate-decided neurons, Qwen2's q/k/v biases)."""
    require_triton("cpu")
    loaded, adapters, _ = stored_run(model_name, method, allocation, tmp_path)
    engine = engine_from_model(loaded.model, adapters)
    for block in engine.blocks:  # the tiny Qwen2's biases are zeros: values, so that a bias left out shows
        if block.qkv_bias is not None:
            block.qkv_bias.copy_(torch.randn(block.qkv_bias.shape, generator=torch.Generator().manual_seed(6)))
    batch = BatchDecoder(engine, batch=3, max_seq=32, products=products, masked=masked)
    sequences = prompts(engine, (3, 9, 5))
    expected = torch.stack([alone(engine, p, 4, 32) for p in sequences], dim=1)
    batch.prefill(sequences)
    got = torch.stack([batch.step().float().clone() for _ in range(4)])
    assert torch.isfinite(got).all()
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("model_name, method, why", [
    ("tiny", "a3", "A3's narrower attention"), ("tiny-gemma3", "dense", "GemmaEngine's layers")])
def test_runs_whose_layers_cannot_decode_in_batches_are_refused_with_one_line(model_name, method, why, tmp_path):
    loaded, adapters, _ = stored_run(model_name, method, "uniform", tmp_path)
    with pytest.raises(ValueError, match=why):
        BatchDecoder(engine_from_model(loaded.model, adapters), batch=2, max_seq=32)


@pytest.mark.gpu
@pytest.mark.parametrize("products, masked", [("cublas", "union"), ("triton", "union"), ("cublas", "dense")])
@pytest.mark.parametrize("flop_reduction, threshold", [(0.0, None), (0.44, 0.0), (0.44, float("inf"))],
                         ids=["dense", "rana44-every-row", "rana44-no-row"])
def test_graph_replayed_batch_decodes_each_sequence_as_alone_on_the_gpu(flop_reduction, threshold, products, masked):
    """SmolLM2 shape, fp16, batch 4, prompts of different lengths, a graph-replayed step against the batch-1
    engine's eager step: logits within fp16 rounding of the scale, the same tokens. RaNA with masks that keep
    every row or none: with calibrated thresholds a last-bit difference between two fp16 paths flips mask entries
    at their thresholds and 30 random layers grow the flips far past rounding (measured: 1.3 at a scale of 4.5,
    docs/latency.md); which rows a mask keeps is checked in float32 on the CPU above and by the kernel tests."""
    engine = DecodeEngine(SHAPES["smollm2-135m-shape"], torch.float16, "cuda", flop_reduction=flop_reduction,
                          gemv="triton")
    engine.calibrate()
    for part in engine.adapters() if threshold is not None else ():
        part.threshold.fill_(threshold)
    sequences = prompts(engine, (5, 17, 9, 30))
    expected = torch.stack([alone(engine, p, 1, 64)[0] for p in sequences])
    batch = BatchDecoder(engine, batch=4, max_seq=64, products=products, masked=masked)
    batch.prefill(sequences)
    batch.capture()
    batch.graph.replay()
    got = batch.graph_logits.float()
    assert torch.isfinite(got).all()
    assert (got - expected).abs().max() <= 2e-2 * expected.abs().max()
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (4, 4)], ids=["grouped", "one-kv-head-each"])
def test_batched_rotary_and_attention_read_each_sequence_up_to_its_own_position(heads, kv_heads):
    """Three sequences at positions 2, 70 and 5 (chunks of 64: the second spans two): q rotated and k, v written at
    each one's own position; attention against float64 softmax over that sequence's prefix only, with every
    cached position past it poisoned with NaN (a kernel that read one would return NaN)."""
    require_triton("cpu")
    from rana_core.decode.batch_kernels import batch_decode_attention, batch_rope_into_cache
    from rana_core.decode.dense_kernels import rotate_half_reference

    g = torch.Generator().manual_seed(11)
    B, d, max_seq = 3, 16, 96
    pos = torch.tensor([2, 70, 5])
    angles = torch.outer(torch.arange(max_seq).float(), 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d))
    cos, sin = angles.cos(), angles.sin()
    k_cache = torch.randn(B, kv_heads, max_seq, d, generator=g)
    v_cache = torch.randn(B, kv_heads, max_seq, d, generator=g)
    for b in range(B):
        k_cache[b, :, pos[b]:] = float("nan")
        v_cache[b, :, pos[b]:] = float("nan")
    qkv = torch.randn(B, (heads + 2 * kv_heads) * d, generator=g)
    q = batch_rope_into_cache(qkv, cos, sin, pos, k_cache, v_cache, heads)
    out = batch_decode_attention(q, k_cache, v_cache, pos)
    group = heads // kv_heads
    for b in range(B):
        q_in, k_in, v_in = qkv[b].view(heads + 2 * kv_heads, d).split([heads, kv_heads, kv_heads])
        c, s = cos[pos[b]][None], sin[pos[b]][None]
        assert torch.allclose(q[b], rotate_half_reference(q_in[None], c, s)[0], atol=1e-6)
        assert torch.allclose(k_cache[b, :, pos[b]], rotate_half_reference(k_in[None], c, s)[0], atol=1e-6)
        assert torch.equal(v_cache[b, :, pos[b]], v_in)
        keys = k_cache[b, :, : pos[b] + 1].double().repeat_interleave(group, dim=0)
        values = v_cache[b, :, : pos[b] + 1].double().repeat_interleave(group, dim=0)
        weights = torch.softmax(torch.einsum("hd,htd->ht", q[b].double(), keys) / d ** 0.5, dim=-1)
        expected = torch.einsum("ht,htd->hd", weights, values)
        assert torch.isfinite(out[b]).all()
        assert torch.allclose(out[b].double(), expected, atol=1e-5)
