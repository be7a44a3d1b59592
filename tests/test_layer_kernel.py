"""The one-launch-per-layer kernel (rana_core.decode.layer_kernel) against the reference engine it replaces.

On the CPU the kernel runs staged (a launch per stage) in Triton's interpreter, at tiny shapes: every buffer it
writes is poisoned with NaN first, so an element a stage forgets to write shows. The `gpu` tests run it
persistent (one launch, grid barriers) at model shapes: it must give the staged twin's logits bit for bit (the
stages compute the same sums in the same order, so only a barrier that lets a program read too early can make a
difference), replay bit-identically, and stay within rounding of the reference engine in fp16 and bf16."""

import pytest
import torch

from rana_core.decode.engine import SHAPES, DecodeEngine, Shape
from rana_core.decode.layer_kernel import STAGE_NAMES, supports

from test_kernels import require_triton

TINY = SHAPES["tiny-shape"]  # grouped K/V heads: QKV stays dense in RaNA's uniform allocation
TINY_MHA = Shape(hidden=64, intermediate=160, layers=2, heads=4, kv_heads=4, vocab=257)  # QKV adapted too


def decode(engine: DecodeEngine, mode: str, prompt: torch.Tensor, steps: int, poison: bool = False,
           config: dict | None = None) -> torch.Tensor:
    engine.use_layer_kernels(mode, config)
    engine.allocate(48)
    if poison and engine.kernels is not None:
        for kernel in filter(None, engine.kernels):
            for buffer in kernel.buffers.values():  # list slots past a chunk's count are never read: far indices
                buffer.fill_(float("nan") if buffer.is_floating_point() else 2**30)
        engine.residuals.fill_(float("nan"))
    engine.prefill(prompt)
    return torch.stack([engine.step().float().clone() for _ in range(steps)])


def prompt_for(engine: DecodeEngine, length: int = 9) -> torch.Tensor:
    return torch.randint(0, engine.shape.vocab, (length,), generator=torch.Generator().manual_seed(1)).to(engine.device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape, flop_reduction", [(TINY, 0.0), (TINY, 0.44), (TINY_MHA, 0.44)])
def test_staged_layer_kernel_computes_what_the_reference_engine_computes(shape, flop_reduction, dtype):
    """Dense, and RaNA with the MLP (and, with every head its own K/V head, QKV) adapted. The stages add the
    masked products' rows in other groupings than the reference's list split, so float32 may differ in its last
    bits: 1e-5 of the logits' scale is 80 float32 roundings (~2^-24 each) of a sum of a few hundred terms; fp16
    rounds every stored activation at 2^-11, and the stages store what the reference stores, so it must agree
    exactly unless a float32 sum lands on the other side of an fp16 rounding boundary (5e-3 of the scale)."""
    require_triton("cpu")
    engine = DecodeEngine(shape, dtype, "cpu", flop_reduction=flop_reduction, gemv="triton")
    engine.calibrate(tokens=256)
    assert all(supports(block) is None for block in engine.blocks)
    prompt = prompt_for(engine)
    reference = decode(engine, "reference", prompt, 5)
    staged = decode(engine, "staged", prompt, 5, poison=True)
    assert torch.isfinite(staged).all()
    scale = reference.abs().max()
    assert (staged - reference).abs().max() <= (1e-5 if dtype == torch.float32 else 5e-3) * scale


@pytest.mark.parametrize("config", [{"GATHER_K": 256, "BLOCK_M": 128}, {"GATHER_K": 16, "BLOCK_M": 16}],
                         ids=["wide-steps", "narrow-steps"])
def test_other_gather_tiles_give_the_reference_logits(config):
    """Gather stages that stream more (or fewer) listed rows per step over wider (or narrower) column blocks: the
    list's shares change, and with them only the grouping of the sums (fp16: within the rounding bound above)."""
    require_triton("cpu")
    engine = DecodeEngine(TINY_MHA, torch.float16, "cpu", flop_reduction=0.44, gemv="triton")
    engine.calibrate(tokens=256)
    prompt = prompt_for(engine)
    reference = decode(engine, "reference", prompt, 3)
    staged = decode(engine, "staged", prompt, 3, poison=True, config=config)
    assert torch.isfinite(staged).all()
    assert (staged - reference).abs().max() <= 5e-3 * reference.abs().max()


def test_lists_compacted_in_many_chunks_give_the_reference_logits():
    """At tiny shapes every list fits one compaction chunk; at model shapes they take several (7B's down: 6), and
    a list position then has to be found across chunks. Chunks of 16 coefficients make 3-10 of them here."""
    require_triton("cpu")
    engine = DecodeEngine(TINY_MHA, torch.float16, "cpu", flop_reduction=0.44, gemv="triton")
    engine.calibrate(tokens=256)
    prompt = prompt_for(engine)
    reference = decode(engine, "reference", prompt, 3)
    staged = decode(engine, "staged", prompt, 3, poison=True, config={"LIST_CHUNK": 16})
    assert engine.kernels[0].lists["down"]["chunk"] == 16
    assert (staged - reference).abs().max() <= 5e-3 * reference.abs().max()


@pytest.mark.parametrize("shape, flop_reduction", [(TINY, 0.0), (TINY, 0.44), (TINY_MHA, 0.44)],
                         ids=["dense", "rana-mlp", "rana-qkv-and-mlp"])
def test_flat_gemv_stages_give_the_tile_by_tile_stages_logits_bit_for_bit(shape, flop_reduction):
    """A program's GEMV tiles as one loop of (tile, chunk) steps add the same chunks in the same order as a loop
    per tile: every bit of the logits must agree, with 4 programs over tile counts they do not divide (dense: the
    SwiGLU and residual epilogues too)."""
    require_triton("cpu")
    engine = DecodeEngine(shape, torch.float16, "cpu", flop_reduction=flop_reduction, gemv="triton")
    engine.calibrate(tokens=256)
    prompt = prompt_for(engine)
    by_tile = decode(engine, "staged", prompt, 3, poison=True, config={"GEMV_FLAT": 0, "BLOCK_K": 32})
    flat = decode(engine, "staged", prompt, 3, poison=True, config={"GEMV_FLAT": 1, "BLOCK_K": 32})
    assert torch.isfinite(flat).all()
    assert torch.equal(flat, by_tile)


@pytest.mark.parametrize("method, allocation, runs_in_kernel", [
    ("dense", "uniform", True), ("rana", "uniform", True), ("rana", "greedy", True), ("teal", "uniform", True),
    ("wina", "uniform", True), ("teal", "greedy", None), ("hybrid", "exact-loss", None), ("cats", "uniform", False),
    ("svd", "uniform", False)])
def test_the_engine_of_a_stored_run_decodes_alike_through_layer_kernels(method, allocation, runs_in_kernel,
                                                                          tmp_path):
    """A run's own engine (tiny Llama, its stored adapters): layers the kernel runs (dense; RaNA's rank and neuron
    adapters, gate and up of different ranks; TEAL's and WINA's input masks on every linear) and layers it leaves
    to the reference path (CATS, static SVD) decode what the reference engine decodes. TEAL's greedy and hybrid
    may leave a linear dense or mix adapters, which the kernel leaves to the reference (None: either)."""
    from rana_core.decode.from_model import engine_from_model
    from test_engine_from_model import stored_run

    require_triton("cpu")
    loaded, adapters, _ = stored_run("tiny", method, allocation, tmp_path)
    engine = engine_from_model(loaded.model, adapters)
    prompt = torch.randint(0, 256, (12,), generator=torch.Generator().manual_seed(3))
    reference = decode(engine, "reference", prompt, 4)
    staged = decode(engine, "staged", prompt, 4, poison=True)
    ran = [kernel is not None for kernel in engine.kernels]
    if runs_in_kernel is not None:
        assert all(ran) if runs_in_kernel else not any(ran)
    assert (staged - reference).abs().max() <= 1e-5 * reference.abs().max()


@pytest.mark.parametrize("threshold", [0.0, float("inf")], ids=["every-row", "no-row"])
def test_masks_that_keep_every_row_or_none_give_the_reference_logits(threshold):
    """Densities 100% and 0%: with every threshold at 0 each masked product reads all its rows, at infinity none
    (the empty mask: the A-parts and down add nothing)."""
    require_triton("cpu")
    engine = DecodeEngine(TINY_MHA, torch.float32, "cpu", flop_reduction=0.44, gemv="triton")
    for part in engine.adapters():
        part.threshold.fill_(threshold)
    prompt = prompt_for(engine)
    reference = decode(engine, "reference", prompt, 3)
    staged = decode(engine, "staged", prompt, 3, poison=True)
    assert (staged - reference).abs().max() <= 1e-5 * reference.abs().max()


def test_a_layer_the_kernel_cannot_run_keeps_the_reference_path():
    """A block with q/k/v biases is not supported: it runs the reference path between layer-kernel layers, and the
    step still computes the reference engine's logits."""
    require_triton("cpu")
    engine = DecodeEngine(TINY, torch.float32, "cpu", flop_reduction=0.44, gemv="triton")
    engine.calibrate(tokens=256)
    block = engine.blocks[0]
    block.qkv_bias = torch.randn(block.shape.qkv_out, generator=torch.Generator().manual_seed(2)) * 0.1
    assert supports(block) == "q/k/v biases" and supports(engine.blocks[1]) is None
    prompt = prompt_for(engine)
    reference = decode(engine, "reference", prompt, 3)
    staged = decode(engine, "staged", prompt, 3)
    assert engine.kernels[0] is None and engine.kernels[1] is not None
    assert (staged - reference).abs().max() <= 1e-5 * reference.abs().max()


def test_an_unknown_layer_mode_is_refused():
    with pytest.raises(ValueError, match="unknown layer mode"):
        DecodeEngine(TINY, torch.float32, "cpu").use_layer_kernels("megakernel")


GPU_CASES = [("smollm2-135m-shape", 0.0), ("smollm2-135m-shape", 0.44), ("llama2-7b-shape", 0.0),
             ("llama2-7b-shape", 0.44)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape_name, flop_reduction", GPU_CASES,
                         ids=["smollm2_dense", "smollm2_rana44", "llama7b_dense", "llama7b_rana44"])
def test_persistent_layer_kernel_equals_its_staged_twin_and_the_reference(shape_name, flop_reduction, dtype,
                                                                          monkeypatch):
    """Persistent against staged, 12 steps: bit for bit (a barrier that let a program read a stage's output before
    every program had written it would differ). Against the reference engine, layer by layer from the same input:
    each layer's update (its output minus its input) within 2% in norm, and the same K and V written to the
    cache. Not end to end: sums grouped differently round differently, a mask entry at its threshold flips with
    the last bit, and over 30 random layers such flips grow past any rounding bound (docs/latency.md). So the
    reference's GEMVs here sum each row in the layer kernel's pieces (its BLOCK_N × BLOCK_K tiles): with its own
    default tiles (1,024 columns on 7B rows) a bf16 coefficient at its threshold flipped in one layer of the 7B
    RaNA case and moved that layer's update by 2.8% (H200, session 16)."""
    from rana_core.decode.layer_kernel import CONFIG

    tiles = f"{CONFIG['BLOCK_N']}-{CONFIG['BLOCK_K']}-4-2"
    monkeypatch.setenv("RANA_GEMV_CONFIG", tiles)
    monkeypatch.setenv("RANA_GEMV_SMALL_CONFIG", tiles)
    engine = DecodeEngine(SHAPES[shape_name], dtype, "cuda", flop_reduction=flop_reduction, gemv="triton")
    engine.calibrate()
    prompt = prompt_for(engine, 20)
    staged = decode(engine, "staged", prompt, 12, poison=True)
    persistent = decode(engine, "persistent", prompt, 12, poison=True)
    assert torch.isfinite(persistent).all()
    assert torch.equal(persistent, staged)

    engine.allocate(48)
    engine.prefill(prompt)
    x = engine.embed[engine.token][0].clone()
    errors = []
    for index, (block, kernel) in enumerate(zip(engine.blocks, engine.kernels)):
        caches = engine.k_cache[index].clone(), engine.v_cache[index].clone()
        expected = engine._reference_layer(block, index, x.clone(), engine.pos).clone()
        expected_caches = engine.k_cache[index].clone(), engine.v_cache[index].clone()
        engine.k_cache[index].copy_(caches[0]), engine.v_cache[index].copy_(caches[1])
        engine.barriers.zero_()
        got = kernel(x.clone(), torch.full_like(x, float("nan")), engine.pos, engine.k_cache[index],
                     engine.v_cache[index], engine.cos, engine.sin, engine.barriers[index:index + 1])
        update, reference_update = (got - x).float(), (expected - x).float()
        errors.append(float((update - reference_update).norm() / reference_update.norm()))
        assert torch.allclose(engine.k_cache[index].float(), expected_caches[0].float(), rtol=1e-2, atol=1e-2), index
        assert torch.allclose(engine.v_cache[index].float(), expected_caches[1].float(), rtol=1e-2, atol=1e-2), index
        x = expected
    assert max(errors) < 2e-2, errors


@pytest.mark.gpu
@pytest.mark.parametrize("flop_reduction", [0.0, 0.44], ids=["dense", "rana44"])
def test_persistent_graph_replay_is_bit_identical_between_runs(flop_reduction):
    """Two captures of the same engine from the same state replay the same logits bit for bit, step after step."""
    engine = DecodeEngine(SHAPES["llama2-7b-shape"], torch.float16, "cuda", flop_reduction=flop_reduction,
                          gemv="triton")
    engine.calibrate()
    engine.use_layer_kernels("persistent")
    runs = []
    for _ in range(2):
        engine.allocate(64)
        engine.prefill(prompt_for(engine, 20))
        engine.capture()
        steps = []
        for _ in range(16):
            engine.graph.replay()
            steps.append(engine.graph_logits.clone())
        runs.append(torch.stack(steps))
    assert torch.equal(runs[0], runs[1])


@pytest.mark.gpu
def test_flat_gemv_stages_replay_the_tile_by_tile_logits_on_the_gpu():
    """The compiled form of the flat GEMV loop (the interpreter runs its while-loop twin): persistent, 7B shape,
    RaNA −44%, bit for bit against tile by tile."""
    engine = DecodeEngine(SHAPES["llama2-7b-shape"], torch.float16, "cuda", flop_reduction=0.44, gemv="triton")
    engine.calibrate()
    prompt = prompt_for(engine, 20)
    by_tile = decode(engine, "persistent", prompt, 8, config={"GEMV_FLAT": 0})
    flat = decode(engine, "persistent", prompt, 8, config={"GEMV_FLAT": 1})
    assert torch.equal(flat, by_tile)


@pytest.mark.gpu
@pytest.mark.parametrize("config", [{"LOAD_POLL": 1}, {"LOAD_POLL": 1, "maxnreg": 64, "PROGRAMS_PER_SM": 8},
                                    {"LOAD_POLL": 1, "CLOCK": 1}, {"LIST_CHUNK": 512, "num_warps": 8},
                                    {"GATHER_K": 256, "BLOCK_M": 128, "num_warps": 8}],
                         ids=["load-poll", "load-poll-64-registers", "load-poll-clock", "list-512",
                              "wide-gather-steps"])
def test_barrier_variants_give_the_staged_logits_bit_for_bit(config):
    """The barrier that waits by acquire loads, with a register cap that doubles the programs, with the stage
    clock on; lists compacted in chunks of 512 at 8 warps; wide gather steps: persistent
    against staged, 7B shape, RaNA −44%, 12 steps, bit for bit (a barrier that released a program early would let
    it read a stage's output half written)."""
    engine = DecodeEngine(SHAPES["llama2-7b-shape"], torch.float16, "cuda", flop_reduction=0.44, gemv="triton")
    engine.calibrate()
    prompt = prompt_for(engine, 20)
    # the same launch shape staged (the program count sets how a list is split, hence the order of its sums)
    staged = decode(engine, "staged", prompt, 12, poison=True, config={**config, "CLOCK": 0})
    persistent = decode(engine, "persistent", prompt, 12, poison=True, config=config)
    assert torch.equal(persistent, staged)
    if config.get("CLOCK"):
        for kernel in engine.kernels:
            times = kernel.buffers["clock"][:2 * len(kernel.stages())].tolist()
            assert times == sorted(times) and times[0] > 0, times  # start, then each arrival before its leaving
            assert [name for name, _, _ in kernel.stage_clock()] == [STAGE_NAMES[s] for s in kernel.stages()]
