"""RaNA's masked QKV product and the attention section in branches side by side (RANA_QKV_BRANCHES, read when a
block is built; attention_branches): the rank compaction shared, then per half of the heads a gather of its columns
(Aᵀ laid out branch by branch), rotary into its heads' cache and attention. Against the chain (the whole gather,
rope_attention) and in the engine. On the CPU in Triton's interpreter (the branches one after another); the `gpu`
case replays a 7B-wide engine's graph with the branches on two streams."""

import pytest
import torch

from rana_core.decode.attention_branches import branch_major, branched_attention, head_ranges, qkv_branches
from rana_core.decode.attention_kernels import _arrivals, rope_attention
from rana_core.decode.masked_kernels import masked_rows_partials

from test_decode_kernels import CPU_CASES, GPU_CASES, poisoned, tolerance
from test_kernels import relative_error, require_triton, threshold_for_density


def test_head_ranges_split_the_kv_heads_with_their_query_heads():
    assert head_ranges(32, 32, 2) == [(0, 16, 0, 16), (16, 32, 16, 32)]
    assert head_ranges(9, 3, 2) == [(0, 6, 0, 2), (6, 9, 2, 3)]  # three query heads a KV head
    assert head_ranges(4, 1, 2) == [(0, 4, 0, 1)]  # one KV head: one branch


def test_branch_major_lays_each_branchs_q_k_v_side_by_side():
    heads, kv_heads = 4, 2  # heads of 3 columns: q 0-11, k 12-17, v 18-23
    rows = torch.arange(24.0).repeat(2, 1)
    laid = branch_major(rows, heads, kv_heads, head_ranges(heads, kv_heads, 2))
    expected = [0, 1, 2, 3, 4, 5, 12, 13, 14, 18, 19, 20, 6, 7, 8, 9, 10, 11, 15, 16, 17, 21, 22, 23]
    assert laid[0].tolist() == expected and laid[1].tolist() == expected


class Part:
    def __init__(self, threshold):
        self.threshold, self.scale = threshold, None


@pytest.mark.parametrize("device, dtype", CPU_CASES + GPU_CASES)
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (6, 2)], ids=["mha", "grouped"])
def test_branches_compute_the_attention_section_of_the_chain(device, dtype, heads, kv_heads, monkeypatch):
    """From the same coefficients, at a position in the first chunk and one past it: the cache bits at pos and
    the attention output as the chain's (the whole masked product, then rope_attention) to the rounding of the
    split sums; nothing else in the cache touched; every arrival counter back at zero."""
    require_triton(device)
    monkeypatch.setenv("RANA_MASKED_PRODUCT", "list")
    K, d, max_seq = (3441, 128, 300) if device == "cuda" else (60, 16, 130)
    N = (heads + 2 * kv_heads) * d
    g = torch.Generator().manual_seed(heads)
    rows = (torch.randn(K, N, generator=g) / K ** 0.5).to(device, dtype)
    z = torch.randn(K, generator=g).to(device, dtype)
    part = Part(threshold_for_density(z.float().abs(), 0.4).to(device))
    angles = torch.rand(max_seq, d // 2, generator=g) * 6
    cos, sin = angles.cos().to(device, dtype), angles.sin().to(device, dtype)
    caches = [torch.randn(kv_heads, max_seq, d, generator=g).to(device, dtype) for _ in range(2)]
    ranges = head_ranges(heads, kv_heads, 2)
    laid = branch_major(rows, heads, kv_heads, ranges)
    for pos in (5, 70):
        at = torch.tensor([pos], device=device)
        k, v = (c.clone() for c in caches)
        out = branched_attention(part, z, laid, ranges, at, k, v, cos, sin, poisoned(heads, d, dtype=dtype,
                                                                                     device=device))
        k_chain, v_chain = (c.clone() for c in caches)
        partial, splits = masked_rows_partials(rows, z, part.threshold)
        chain = rope_attention(partial, cos, sin, at, k_chain, v_chain, heads, kv_heads,
                               poisoned(heads, d, dtype=dtype, device=device), splits)
        assert torch.isfinite(out.float()).all()
        assert relative_error(out.float().cpu(), chain.float().cpu()) < tolerance(dtype, 2), pos
        assert relative_error(k[:, pos].float().cpu(), k_chain[:, pos].float().cpu()) < tolerance(dtype), pos
        assert relative_error(v[:, pos].float().cpu(), v_chain[:, pos].float().cpu()) < tolerance(dtype), pos
        others = [t for t in range(max_seq) if t != pos]
        assert torch.equal(k[:, others], caches[0][:, others]) and torch.equal(v[:, others], caches[1][:, others])
        for b in range(len(ranges)):
            assert not _arrivals(ranges[b][3] - ranges[b][2], out.device, f" branch {b}").any()


def test_the_branch_count_reads_its_variable(monkeypatch):
    monkeypatch.delenv("RANA_QKV_BRANCHES", raising=False)
    assert qkv_branches() == 1
    monkeypatch.setenv("RANA_QKV_BRANCHES", "0")
    with pytest.raises(ValueError, match="RANA_QKV_BRANCHES=0: expected 1 to 4 branches"):
        qkv_branches()


def engines(shape, dtype, device, monkeypatch, choices=("1", "2")) -> dict:
    """RaNA -44% engines of `shape` built alike (same seed, same calibration), one per RANA_QKV_BRANCHES value."""
    from rana_core.decode.engine import DecodeEngine

    built = {}
    for choice in choices:
        monkeypatch.setenv("RANA_QKV_BRANCHES", choice)
        built[choice] = DecodeEngine(shape, dtype, device, flop_reduction=0.44, gemv="triton", seed=4)
        built[choice].calibrate(tokens=256)
    monkeypatch.delenv("RANA_QKV_BRANCHES")
    return built


def test_the_engine_in_branches_decodes_what_the_chain_decodes(monkeypatch):
    """Five one-token steps of the tiny RaNA engine with QKV adapted (float32, the list design forced): the same
    logits to float32 rounding with QKV and attention in two branches as in the chain, the branches taken at
    every layer of every step."""
    require_triton("cpu")
    import rana_core.decode.block as block
    from test_engine import TINY_MHA, decode_steps

    monkeypatch.setenv("RANA_MASKED_PRODUCT", "list")
    built = engines(TINY_MHA, torch.float32, "cpu", monkeypatch)
    prompt = torch.randint(0, TINY_MHA.vocab, (20,), generator=torch.Generator().manual_seed(6))
    calls, real = [], block.branched_attention
    monkeypatch.setattr(block, "branched_attention", lambda *args: calls.append(1) or real(*args))
    logits = {choice: decode_steps(engine, prompt, 5, "sums", monkeypatch)[0] for choice, engine in built.items()}
    assert len(calls) == 5 * TINY_MHA.layers
    assert relative_error(logits["2"], logits["1"]) < 2e-6  # a few float32 roundings (eps 1.2e-7)


@pytest.mark.gpu
def test_branches_in_replayed_steps_on_the_gpu(monkeypatch):
    """A 7B-wide, four-layer RaNA -44% engine's graph replayed 16 steps (fp16, PDL, branches on two streams, every
    row kept and every step fed the same token and position): the same bits in two engines built alike, and the
    chain's logits within the rounding of the split sums."""
    from rana_core.architecture import Shape

    monkeypatch.setenv("RANA_MASKED_PRODUCT", "list")
    shape = Shape(hidden=4096, intermediate=11008, layers=4, heads=32, kv_heads=32, vocab=32000)
    built = engines(shape, torch.float16, "cuda", monkeypatch)
    second = engines(shape, torch.float16, "cuda", monkeypatch, ("2",))["2"]

    def replayed(engine) -> torch.Tensor:
        for part in engine.adapters():
            part.threshold.fill_(0.0)
        engine.allocate(64)
        engine.prefill(torch.arange(20, device="cuda") * 37 % shape.vocab)
        engine.capture()
        steps = []
        for step in range(16):
            engine.token.fill_(step * 101 % shape.vocab)
            engine.pos.fill_(20 + step)
            engine.graph.replay()
            steps.append(engine.graph_logits.float().clone())
        return torch.stack(steps)

    branched, again, chain = replayed(built["2"]), replayed(second), replayed(built["1"])
    assert torch.equal(branched, again)
    assert relative_error(branched, chain) < 5e-3
