"""The model-level paths on a GPU (run on the device machine: pytest -m gpu): every method compresses the tiny
model on CUDA to what it gives on the CPU, its adapters save and reload there, and a LoRA recovery runs there.
These catch tensors left on the wrong device, which no CPU test can."""

import pytest
import torch

from rana_core.config import CompressConfig
from rana_core.loading import load_model
from rana_core.pipeline import compress, evaluate_saved

pytestmark = pytest.mark.gpu

SMALL = dict(model="tiny", flop_reduction=0.3, calib_tokens=2048, eval_tokens=1024, seq_len=128)
METHODS = [("dense", "uniform"), ("svd", "uniform"), ("cats", "uniform"), ("rana", "uniform"), ("rana", "greedy"),
           ("a3", "uniform"), ("a3", "greedy"), ("hybrid", "exact-loss"), ("hybrid", "greedy-output"),
           ("teal", "greedy"), ("wina", "greedy")]


@pytest.mark.parametrize("method, allocation", METHODS)
def test_every_method_compresses_on_cuda_as_on_the_cpu(method, allocation, tmp_path):
    config = dict(SMALL, method=method, allocation=allocation)
    on_cpu = compress(CompressConfig(**config))
    artifact = tmp_path / "adapters.safetensors"
    on_gpu = compress(CompressConfig(**config, device="cuda"), artifact_path=artifact)
    assert on_gpu.environment["device"].startswith("cuda")
    assert abs(on_gpu.perplexity - on_cpu.perplexity) <= 0.02 * on_cpu.perplexity
    assert abs(on_gpu.measured_flop_reduction - on_cpu.measured_flop_reduction) <= 0.02
    again = evaluate_saved(load_model("tiny", device="cuda"), artifact, on_gpu.artifact["sha256"], "heldout",
                           1024, 128)
    assert abs(again["perplexity"] - on_gpu.perplexity) <= 1e-3 * on_gpu.perplexity


def test_recovery_runs_on_cuda(tmp_path):
    from rana_core.recovery.recover import recover
    from rana_core.recovery.config import RecoverConfig

    loaded = load_model("tiny", device="cuda")
    artifact = tmp_path / "rana.safetensors"
    result = compress(CompressConfig(**dict(SMALL, method="rana"), device="cuda"), loaded=loaded,
                      artifact_path=artifact)
    config = RecoverConfig(strategy="rankadaptor", train_tokens=1024, seq_len=64, batch_size=4, lr=1e-2,
                           eval_tokens=512, eval_seq_len=128, val_tokens=256, probe_tokens=256, initial_configs=3,
                           rounds=1, per_round=2)
    recovered = recover(loaded, artifact, result.artifact["sha256"], config)
    assert recovered.perplexity_after < recovered.perplexity_before
    assert all(p.device.type == "cuda" for p in loaded.model.parameters())
    torch.cuda.synchronize()
