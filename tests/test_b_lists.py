"""RaNA's B GEMV listing its own coefficients (gemv's `lists`, RANA_B_LISTS=1): each program lists its rows whose
|z| reaches the group's threshold in the masked product's list format, and the gather reads the lists in ranges
of whole chunks (masked_rows_listed), so no compaction launch runs between B and the gather. Against torch's own
view of z and float64; the engine decodes what the compaction's engine decodes."""

import pytest
import torch

from rana_core.decode import gemv as gemv_module
from rana_core.decode.engine import DecodeEngine
from rana_core.decode.gemv import gemv, list_chunk, list_programs
from rana_core.decode.listed_gather import masked_rows_listed
from rana_core.decode.masked_kernels import reference_masked_rows

from test_decode_kernels import CPU_CASES, GPU_CASES, poisoned
from test_engine import TINY_MHA, decode_steps
from test_kernels import TOLERANCE, require_triton, threshold_for_density

# Small chunks and many gather ranges on the CPU's small shapes: 4-row GEMV programs (16 of them a group below),
# gather programs of 16 columns and 8 listed rows a step, 16 a multiprocessor.
SMALL_CHUNKS = {"BLOCK_N": 4, "BLOCK_K": 64, "num_warps": 4, "num_stages": 1}
MANY_RANGES = "16-8-2-1-16"


def listed(B, x, thresholds, device, dtype):
    """(z, lists) of a B GEMV that lists: every output poisoned first."""
    N, K = B.shape
    index = torch.full((N,), -1, dtype=torch.int32, device=device)
    value = torch.full((N,), float("nan"), device=device)
    count = torch.full((list_programs(N, K, thresholds.numel()),), -1, dtype=torch.int32, device=device)
    lists = (thresholds, index, value, count)
    return gemv(B, x, poisoned(N, dtype=dtype, device=device), lists=lists), lists


@pytest.mark.parametrize("device, dtype", CPU_CASES + GPU_CASES)
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("density", [0.0, 0.35, 1.0])
def test_a_b_gemv_lists_the_rows_its_programs_make(device, dtype, groups, density, monkeypatch):
    """z bit for bit the plain GEMV's; for each group and each program's chunk of list_chunk rows, count is the
    number of rows whose |z| (as stored) reaches the group's threshold, index those rows (within the group) in
    order, value their z in float32; groups of 57 rows (not a multiple of the chunk: the last chunk is short,
    and no program holds rows of two groups); on the GPU RaNA's 7B QKV B (3,440 × 4,096)."""
    require_triton(device)
    if device == "cpu":
        monkeypatch.setattr(gemv_module, "INTERPRETER_CONFIG", SMALL_CHUNKS)
    rows, K = ((3440, 4096) if groups == 1 else (3082, 4096)) if device == "cuda" else (57, 48)
    g = torch.Generator().manual_seed(rows + groups)
    B = (torch.randn(groups * rows, K, generator=g) / K ** 0.5).to(device, dtype)
    x = torch.randn(K, generator=g).to(device, dtype)
    plain = gemv(B, x, poisoned(groups * rows, dtype=dtype, device=device))
    thresholds = torch.stack([threshold_for_density(part.float().abs(), density) for part in plain.view(groups, rows)])
    z, (_, index, value, count) = listed(B, x, thresholds.to(device), device, dtype)
    assert torch.equal(z, plain)
    chunk = list_chunk(K)
    chunks = -(-rows // chunk)
    for group in range(groups):
        scores = plain.view(groups, rows)[group].float().abs().cpu()
        for c in range(chunks):
            local = torch.arange(c * chunk, min((c + 1) * chunk, rows))
            active = local[scores[local] >= thresholds[group].cpu()]
            slots = group * rows + c * chunk + torch.arange(active.numel())
            assert int(count[group * chunks + c]) == active.numel(), (group, c)
            assert torch.equal(index.cpu()[slots].long(), active)
            assert torch.equal(value.cpu()[slots], plain.view(groups, rows)[group].cpu()[active].float())


@pytest.mark.parametrize("device, dtype", CPU_CASES + GPU_CASES)
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("density", [0.0, 0.35, 1.0])
def test_the_gather_of_listed_coefficients_sums_the_active_rows(device, dtype, groups, density, monkeypatch):
    """masked_rows_listed over a listing B's lists: each group's partial sums (every one written: poisoned
    first) add up to Σ_{|z_k| ≥ threshold} z_k · rows[k] against float64, with many ranges of whole chunks (the
    last one short) on the CPU; on the GPU RaNA's 7B QKV A-part (3,440 × 12,288) and gate/up A-parts."""
    require_triton(device)
    if device == "cpu":
        monkeypatch.setattr(gemv_module, "INTERPRETER_CONFIG", SMALL_CHUNKS)
        monkeypatch.setenv("RANA_GATHER_CONFIG", MANY_RANGES)
    rows, K, M = ((3440, 4096, 12288) if groups == 1 else (3082, 4096, 11008)) if device == "cuda" else (57, 48, 40)
    g = torch.Generator().manual_seed(rows + groups + 1)
    B = (torch.randn(groups * rows, K, generator=g) / K ** 0.5).to(device, dtype)
    A_rows = torch.randn(groups * rows, M, generator=g).to(device, dtype)
    x = torch.randn(K, generator=g).to(device, dtype)
    plain = gemv(B, x, poisoned(groups * rows, dtype=dtype, device=device))
    thresholds = torch.stack([threshold_for_density(part.float().abs(), density) for part in plain.view(groups, rows)])
    z, lists = listed(B, x, thresholds.to(device), device, dtype)
    from rana_core.decode.launch import _BUFFERS

    for (name, *_), buffer in _BUFFERS.items():
        if name == "partial":
            buffer.fill_(float("nan"))
    partial, splits = masked_rows_listed(A_rows, lists, groups, list_chunk(K))
    chunks = -(-rows // list_chunk(K))
    assert device == "cuda" or (splits > 1 and chunks % -(-chunks // splits))  # the last range is short
    sums = partial[: groups * splits * M].view(groups, splits, M).sum(1)
    for group in range(groups):
        part = slice(group * rows, (group + 1) * rows)
        expected = reference_masked_rows(A_rows[part].double(), z[part].double(), thresholds[group].double())
        scale = max(1.0, float(expected.abs().max()))
        assert float((sums[group].double() - expected).abs().max()) <= 10 * TOLERANCE * scale * max(1, rows / 330)
    with pytest.raises(ValueError, match="lists of"):
        masked_rows_listed(A_rows, lists, groups, 2 * list_chunk(K))


def test_lists_are_asked_of_a_plain_triton_gemv_only():
    require_triton("cpu")
    B, x = torch.zeros(8, 16), torch.zeros(16)
    count = torch.zeros(list_programs(8, 16, 1), dtype=torch.int32)
    lists = (torch.ones(1), torch.zeros(8, dtype=torch.int32), torch.zeros(8), count)
    with pytest.raises(ValueError, match="a plain Triton GEMV of equal groups"):
        gemv(torch.zeros(16, 16), x, torch.zeros(8), swiglu=True, lists=lists)
    with pytest.raises(ValueError, match="a plain Triton GEMV of equal groups"):
        gemv(B, x, torch.zeros(8), lists=(torch.ones(1), lists[1], lists[2], count[1:]))


def test_an_engine_whose_b_gemvs_list_decodes_what_the_compactions_decode(monkeypatch):
    """RANA_B_LISTS=1 on the list design, QKV and the MLP adapted: RaNA's QKV B and gate/up B list their
    coefficients and the compaction launches left are down's alone (one a layer, against three); three steps'
    logits equal the compacting engine's to float32 rounding (the gather's shares sum in another order), the
    tokens the same."""
    require_triton("cpu")
    from rana_core.decode import masked_kernels

    shape = TINY_MHA
    monkeypatch.setattr(gemv_module, "INTERPRETER_CONFIG", SMALL_CHUNKS)
    monkeypatch.setenv("RANA_GATHER_CONFIG", MANY_RANGES)
    monkeypatch.setenv("RANA_MASKED_PRODUCT", "list")
    engine = DecodeEngine(shape, torch.float32, "cpu", flop_reduction=0.44, gemv="triton")
    engine.calibrate(tokens=256)
    prompt = torch.randint(0, shape.vocab, (6,), generator=torch.Generator().manual_seed(2))
    logits, compactions = {}, {}
    real = masked_kernels._compact_kernel
    for choice in ("0", "1"):
        monkeypatch.setenv("RANA_B_LISTS", choice)
        launched = []

        class Counted:
            def __getitem__(self, grid):
                launched.append(grid)
                return real[grid]
        with monkeypatch.context() as patch:
            patch.setattr(masked_kernels, "_compact_kernel", Counted())
            logits[choice], _ = decode_steps(engine, prompt, 3, "sums", monkeypatch)
        compactions[choice] = len(launched)
    assert compactions["0"] == 3 * shape.layers * 3
    assert compactions["1"] == 3 * shape.layers
    assert (logits["1"] - logits["0"]).abs().max() <= 1e-5 * logits["0"].abs().max()
    assert torch.equal(logits["1"].argmax(-1), logits["0"].argmax(-1))
    monkeypatch.setenv("RANA_B_LISTS", "yes")
    with pytest.raises(ValueError, match="RANA_B_LISTS=yes: expected 0 or 1"):
        decode_steps(engine, prompt, 1, "sums", monkeypatch)
