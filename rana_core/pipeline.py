"""One compression run end to end: load, sample data, measure dense, build adapters, measure adapted.

    result = compress(CompressConfig(model="tiny", method="svd", flop_reduction=0.3))

The model is restored (adapters unloaded) before returning, so a caller may reuse a preloaded model.
"""

from __future__ import annotations

import math
import platform
import time
from dataclasses import asdict, dataclass, field

import torch

from rana_core.adapters import MODULES, inject, installed_units, module_shapes, unload
from rana_core.config import CompressConfig
from rana_core.corpus import token_windows
from rana_core.evaluate import perplexity
from rana_core.flops import dense_profile
from rana_core.methods import METHODS
from rana_core.models import LoadedModel, load_model
from rana_core.progress import ProgressFn, StagedProgress

STAGES = {"load": 1.0, "data": 0.5, "dense eval": 3.0, "build": 3.0, "adapted eval": 4.0}


@dataclass
class LayerResult:
    layer: int
    module: str
    rank: int  # static rank kept (max rank when dense)
    max_rank: int
    density: float  # mean active ranks / static rank on the evaluation tokens (1 for static adapters)
    recon_error: float  # ‖f(X) − f̂(X)‖² / ‖f(X)‖² on the evaluation tokens
    flops_per_token: float
    dense_flops_per_token: int


@dataclass
class CompressionResult:
    model: str
    method: str
    allocation: str
    target_flop_reduction: float
    measured_flop_reduction: float  # of the adaptable FLOPs (QKV + MLP), from what the adapters spent
    measured_flop_reduction_whole_model: float  # adds o_proj, attention scores and the LM head, all dense
    dense_perplexity: float
    perplexity: float
    calib_tokens: int
    eval_tokens: int
    seq_len: int
    seconds: float
    layers: list[LayerResult] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    environment: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        data = asdict(self)
        for key, value in data.items():  # JSON has no NaN
            if isinstance(value, float) and math.isnan(value):
                data[key] = None
        for row in data["layers"]:
            for key, value in row.items():
                if isinstance(value, float) and math.isnan(value):
                    row[key] = None
        return data


def compress(
    config: CompressConfig, progress: ProgressFn | None = None, loaded: LoadedModel | None = None
) -> CompressionResult:
    config.validate()
    started = time.perf_counter()
    plan = StagedProgress(progress, STAGES)
    spec = METHODS[config.method]
    target = 0.0 if config.method == "dense" else config.flop_reduction

    report = plan.stage("load")
    if loaded is None:
        report(0.0, f"loading {config.model}")
        loaded = load_model(config.model, device=config.device, dtype=config.dtype)
    report(1.0, f"{config.model}: {loaded.info['parameters'] / 1e6:.1f} M parameters")

    report = plan.stage("data")
    calib = token_windows(loaded.tokenizer, "train", config.calib_tokens, config.seq_len)
    report(0.5, "calibration windows")
    held_out = token_windows(loaded.tokenizer, "heldout", config.eval_tokens, config.seq_len)
    report(1.0, f"{calib.numel()} calibration and {held_out.numel()} held-out tokens")

    dense = perplexity(loaded.model, held_out, progress=plan.stage("dense eval"))

    layers = loaded.layers
    shapes = module_shapes(layers)
    profile = dense_profile(loaded.config, shapes, config.seq_len)
    unload(layers)  # a reused model must start clean
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            units = spec.load_builder()(loaded, calib, config, plan.stage("build"))
        inject(layers, units)
        for unit in units:
            unit.reset_stats()
            unit.tracking = True
        adapted = perplexity(loaded.model, held_out, progress=plan.stage("adapted eval"))
        layer_rows = _layer_results(shapes, {(u.layer, u.module): u for u in installed_units(layers)})
    finally:
        unload(layers)

    spent = {(row.layer, row.module): row.flops_per_token for row in layer_rows}
    measured, measured_whole = profile.reductions(spent)
    plan.done(f"perplexity {adapted.perplexity:.2f} (dense {dense.perplexity:.2f}), FLOPs -{measured:.1%}")
    return CompressionResult(
        model=config.model,
        method=config.method,
        allocation=config.allocation,
        target_flop_reduction=target,
        measured_flop_reduction=measured,
        measured_flop_reduction_whole_model=measured_whole,
        dense_perplexity=dense.perplexity,
        perplexity=adapted.perplexity,
        calib_tokens=calib.numel(),
        eval_tokens=held_out.numel(),
        seq_len=config.seq_len,
        seconds=time.perf_counter() - started,
        layers=layer_rows,
        config=config.to_dict(),
        environment=_environment(loaded),
    )


def _layer_results(shapes, units) -> list[LayerResult]:
    rows = []
    for (layer, module), (out_f, in_f) in sorted(shapes.items(), key=lambda kv: (kv[0][0], MODULES.index(kv[0][1]))):
        unit = units.get((layer, module))
        dense_flops = 2 * out_f * in_f
        if unit is None:
            full = min(out_f, in_f)
            rows.append(LayerResult(layer, module, full, full, 1.0, 0.0, float(dense_flops), dense_flops))
            continue
        rank = unit.static_rank()
        rows.append(
            LayerResult(
                layer=layer,
                module=module,
                rank=rank,
                max_rank=unit.max_rank,
                density=unit.mean_active_rank() / rank if rank else 0.0,
                recon_error=unit.recon_error,
                flops_per_token=unit.flops_per_token,
                dense_flops_per_token=dense_flops,
            )
        )
    return rows


def _environment(loaded: LoadedModel) -> dict:
    device = loaded.info["device"]
    name = torch.cuda.get_device_name() if str(device).startswith("cuda") else platform.processor() or "cpu"
    return {"device": str(device), "device_name": name, "torch": torch.__version__, **loaded.info}
