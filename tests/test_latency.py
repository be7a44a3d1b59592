"""rana_core.decode.latency: the rows the `latency` job stores. On the CPU the engine runs for real (its Triton
kernels in the interpreter) and only the GPU's clock is replaced, by fixed per-step times, so that the rows'
arithmetic can be checked against numbers worked out by hand; the `gpu` test times the real thing."""

import math

import pytest
import torch

from rana_core.decode import latency
from rana_core.decode.engine import DecodeEngine

from test_kernels import require_triton


def dense_weight_elements(hidden, intermediate, layers, heads, kv_heads, vocab):
    """Weights one dense decode step reads: per layer qkv, gate, up, down, o; then the LM head and one embedding
    row. Written out from the Llama shape, not from the engine."""
    head_dim = hidden // heads
    per_layer = (heads + 2 * kv_heads) * head_dim * hidden + 3 * intermediate * hidden + hidden * hidden
    return layers * per_layer + vocab * hidden + hidden


def kv_bytes(context, new_tokens, layers, kv_heads, head_dim, element=2):
    """K and V of the prefix, averaged over the generated tokens (the prefix grows from context + 1)."""
    return 2 * layers * kv_heads * head_dim * (context + (new_tokens + 1) / 2) * element


def test_engine_rows_on_the_cpu_with_fixed_step_times(monkeypatch):
    require_triton("cpu")
    calls = []

    def fixed_times(engine, context, new_tokens, seed=3):
        """Per-step ms whose median (the middle one) differs from their mean: dense 10 + context, RaNA 7 + context."""
        calls.append((engine.flop_reduction, context, new_tokens))
        middle = (10.0 if engine.flop_reduction == 0.0 else 7.0) + context
        return [middle + 40.0, 0.5, middle]

    monkeypatch.setattr(DecodeEngine, "time_decode", fixed_times)
    monkeypatch.setattr(latency, "device_name", lambda device: "test CPU")
    seen = []
    rows = latency.engine_rows("tiny-shape", "float16", [0.44, 0.0], [1, 8], 4, "cpu", 2e9,
                               lambda fraction, message: seen.append((fraction, message)))

    assert calls == [(0.0, 1, 4), (0.0, 8, 4), (0.44, 1, 4), (0.44, 8, 4)]
    assert [(r["flop_reduction"], r["context_tokens"]) for r in rows] == [(0.0, 1), (0.0, 8), (0.44, 1), (0.44, 8)]
    assert [r["ms_per_token"] for r in rows] == [11.0, 18.0, 8.0, 15.0]  # the median of each context's steps
    assert [r["dense_ms_per_token"] for r in rows] == [11.0, 18.0, 11.0, 18.0]  # the dense row of its context
    for row in rows:
        assert (row["model"], row["device_name"], row["dtype"], row["engine"], row["new_tokens"]) == (
            "tiny-shape", "test CPU", "float16", "graphs+triton", 4)
        shapes = row["shapes"]
        assert (shapes["hidden"], shapes["layers"], shapes["kv_heads"]) == (64, 2, 2)
        assert shapes["copy_bandwidth_gbs"] == 2.0
        assert shapes["floor_ms"] == pytest.approx(1e3 * shapes["bytes_per_token"] / 2e9, rel=1e-12)
    # tiny-shape: hidden 64, intermediate 160, 2 layers, 4 heads (head dim 16), 2 K/V heads, vocab 257, fp16
    kv = [kv_bytes(context, 4, 2, 2, 16) for context in (1, 8)]
    dense = 2 * dense_weight_elements(64, 160, 2, 4, 2, 257)
    assert dense == 205056
    assert [r["shapes"]["bytes_per_token"] for r in rows[:2]] == [dense + kv[0], dense + kv[1]]
    assert rows[0]["measured_flop_reduction"] == rows[1]["measured_flop_reduction"] == 0.0
    measured = rows[2]["measured_flop_reduction"]
    assert rows[3]["measured_flop_reduction"] == measured
    assert abs(measured - 0.44) < 0.015  # as in test_engine (measured here: 0.4394)
    # an adapter reads B and its active rows, one fp16 weight (2 bytes) per 2 FLOPs it spends: the QKV+MLP weights
    # (2 × (128·64 + 3·160·64) = 77,824) are read in the measured share 1 − reduction, the rest as dense
    for row, k in zip(rows[2:], kv):
        assert row["shapes"]["bytes_per_token"] == pytest.approx(dense - 2 * measured * 77824 + k, rel=1e-12)
    assert [f for f, _ in seen] == [0.0, 0.25, 0.5, 0.75, 1.0] and seen[-1][1] == "tiny-shape done"


def test_a_latency_measurement_without_a_gpu_is_refused():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        latency.measure_decode({"model": "tiny-shape", "dtype": "float16", "flop_reductions": [0.0],
                                "contexts": [1], "new_tokens": 4})


@pytest.mark.gpu
def test_the_latency_job_times_dense_and_rana_on_the_gpu():
    """What the worker's `latency` job runs, at SmolLM2-135M's shape: one row per budget and context, the dense
    engine's time beside each, so that dense's speedup is exactly 1."""
    payload = {"model": "smollm2-135m-shape", "dtype": "float16", "flop_reductions": [0.0, 0.44],
               "contexts": [1, 64], "new_tokens": 32}
    rows = latency.measure_decode(payload, device="cuda")
    assert [(r["flop_reduction"], r["context_tokens"]) for r in rows] == [(0.0, 1), (0.0, 64), (0.44, 1),
                                                                        (0.44, 64)]
    dense = {r["context_tokens"]: r["ms_per_token"] for r in rows if r["flop_reduction"] == 0.0}
    for row in rows:
        assert math.isfinite(row["ms_per_token"]) and row["ms_per_token"] > 0
        assert row["dense_ms_per_token"] == dense[row["context_tokens"]]
        assert row["device_name"] == torch.cuda.get_device_name() and row["engine"] == "graphs+triton"
        shapes = row["shapes"]
        assert shapes["floor_ms"] == pytest.approx(1e3 * shapes["bytes_per_token"] / (shapes["copy_bandwidth_gbs"]
                                                                                         * 1e9), rel=1e-12)
    assert [r["dense_ms_per_token"] / r["ms_per_token"] for r in rows[:2]] == [1.0, 1.0]
    # SmolLM2-135M: hidden 576, intermediate 1536, 30 layers, 9 heads (head dim 64), 3 K/V heads, vocab 49152
    weights = 2 * dense_weight_elements(576, 1536, 30, 9, 3, 49152)
    assert weights == 268960896
    assert rows[0]["shapes"]["bytes_per_token"] == weights + kv_bytes(1, 32, 30, 3, 64)
    assert rows[0]["measured_flop_reduction"] == 0.0
    measured = rows[2]["measured_flop_reduction"]
    assert abs(measured - 0.44) < 0.015
    qkv_mlp = 30 * (960 * 576 + 3 * 1536 * 576)  # weights of QKV (9 + 2·3 heads of 64) and the MLP
    assert rows[2]["shapes"]["bytes_per_token"] == pytest.approx(weights - 2 * measured * qkv_mlp
                                                                 + kv_bytes(1, 32, 30, 3, 64), rel=1e-12)


def test_a_stored_runs_report_on_the_cpu_with_fixed_step_times(monkeypatch, tmp_path):
    """rana_core.decode.run_latency.measure_run, what a `run_latency` job stores, with the GPU's clock and copy
    bandwidth replaced: the run's engine and the dense one timed per context, their floors from the bytes each
    reads, the FLOP reduction counted from the engine's masks on held-out windows, and per layer the shares kept
    and the section times."""
    require_triton("cpu")
    from rana_core.adapters.artifacts import load_adapters
    from rana_core.adapters.base import unload
    from rana_core.config import CompressConfig
    from rana_core.corpus import token_windows
    from rana_core.decode import run_latency
    from rana_core.loading import load_model
    from rana_core.pipeline import compress

    loaded = load_model("tiny")
    config = CompressConfig(model="tiny", method="rana", flop_reduction=0.3, calib_tokens=512, eval_tokens=256,
                            seq_len=128, track_layers=False)
    result = compress(config, loaded=loaded, artifact_path=tmp_path / "a.safetensors")
    unload(loaded.layers)
    adapters = load_adapters(loaded, result.artifact["path"], result.artifact["sha256"])

    def fixed_times(engine, context, new_tokens, seed=3):
        middle = (10.0 if not engine.adapters() else 7.0) + context
        return [middle + 40.0, 0.5, middle]

    monkeypatch.setattr(DecodeEngine, "time_decode", fixed_times)
    monkeypatch.setattr(run_latency, "copy_bandwidth", lambda device: 2e9)
    monkeypatch.setattr(run_latency, "device_name", lambda device: "test CPU")
    monkeypatch.setattr(run_latency, "section_times", lambda engine, context, new_tokens: {
        (layer, section): 0.1 * (layer + 1) for layer in range(2) for section in ("qkv", "attention", "mlp")})
    held_out = token_windows(loaded.tokenizer, "heldout", 256, 128)
    report = run_latency.measure_run(loaded.model, adapters, [1, 8], 4, "float16", "cpu", held_out)

    assert (report["device_name"], report["dtype"]) == ("test CPU", "float16")
    assert [(r["context_tokens"], r["ms_per_token"], r["dense_ms_per_token"]) for r in report["rows"]] == [
        (1, 8.0, 11.0), (8, 15.0, 18.0)]
    assert abs(report["measured_flop_reduction"] - result.measured_flop_reduction) <= 1e-3
    dense = 2 * dense_weight_elements(64, 160, 2, 4, 2, 257)
    for row, context in zip(report["rows"], (1, 8)):
        kv = kv_bytes(context, 4, 2, 2, 16)
        assert row["dense_floor_ms"] == pytest.approx(1e3 * (dense + kv) / 2e9, rel=1e-12)
        assert row["floor_ms"] < row["dense_floor_ms"]  # the adapted model reads fewer weights
    assert [layer["layer"] for layer in report["layers"]] == [0, 1]
    for layer in report["layers"]:
        assert layer["qkv_kept"] == 1.0  # tiny has grouped K/V heads: uniform RaNA leaves QKV dense
        assert 0.3 < layer["mlp_kept"] < 0.9
        assert layer["qkv_ms"] == layer["attention_ms"] == layer["mlp_ms"] == pytest.approx(0.1 * (layer["layer"] + 1))


def test_section_costs_split_a_masked_section_into_a_fixed_cost_and_a_cost_per_kept_share():
    """Layers whose cut MLP sections take 20 µs + 60 µs·k (k 0.2, 0.5, 0.8) and whose whole ones take 75 and 77 µs;
    QKV cut at one share only (no line to fit: their mean) and whole in the rest; attention 24 and 26 µs; and a
    layer the replay did not time, left out."""
    from rana_core.decode.run_latency import section_costs

    rows = [{"qkv_kept": 1.0, "qkv_ms": 0.031, "attention_ms": 0.024, "mlp_kept": 1.0, "mlp_ms": 0.075},
            {"qkv_kept": 1.0, "qkv_ms": 0.033, "attention_ms": 0.026, "mlp_kept": 1.0, "mlp_ms": 0.077},
            {"qkv_kept": 0.5, "qkv_ms": 0.020, "attention_ms": 0.024, "mlp_kept": 0.2, "mlp_ms": 0.032},
            {"qkv_kept": 0.5, "qkv_ms": 0.021, "attention_ms": 0.026, "mlp_kept": 0.5, "mlp_ms": 0.050},
            {"qkv_kept": 1.0, "qkv_ms": 0.032, "attention_ms": 0.024, "mlp_kept": 0.8, "mlp_ms": 0.068},
            {"qkv_kept": 0.3, "qkv_ms": None, "attention_ms": None, "mlp_kept": 0.3, "mlp_ms": None}]  # untimed
    costs = section_costs(rows)
    mlp, qkv = costs["mlp"], costs["qkv"]
    assert (mlp["whole_layers"], mlp["cut_layers"]) == (2, 3)
    assert mlp["whole_ms"] == pytest.approx(0.076, abs=1e-12)
    assert mlp["fixed_ms"] == pytest.approx(0.020, abs=1e-12)
    assert mlp["per_kept_ms"] == pytest.approx(0.060, abs=1e-12)
    assert (qkv["whole_layers"], qkv["cut_layers"]) == (3, 2)
    assert qkv["whole_ms"] == pytest.approx(0.032, abs=1e-12)
    assert qkv["fixed_ms"] is None and qkv["per_kept_ms"] is None
    assert qkv["cut_ms"] == pytest.approx(0.0205, abs=1e-12) and qkv["kept_range"] == (0.5, 0.5)
    assert costs["attention_ms"] == pytest.approx(0.0248, abs=1e-12)
