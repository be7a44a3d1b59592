"""One compression run end to end: load, sample data, measure dense, build adapters, measure adapted.

    result = compress(CompressConfig(model="tiny", method="svd", flop_reduction=0.3))

The model is restored (adapters unloaded) before returning, so a caller may reuse a preloaded model.
"""

from __future__ import annotations

import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rana_core import provenance
from rana_core.adapters.base import (MODULES, inject, installed_adapters, installed_meters, module_shapes, set_tracking,
                                unload)
from rana_core.adapters.artifacts import load_adapters, save_adapters
from rana_core.adapters.thresholds import Thresholded
from rana_core.config import CompressConfig
from rana_core.corpora import open_corpus
from rana_core.corpus import token_windows, windows_digest
from rana_core.devices import cuda_index
from rana_core.evaluate import perplexity
from rana_core.flops import dense_profile
from rana_core.loading import LoadedModel, load_model
from rana_core.methods import METHODS
from rana_core.model_size import model_stats, size_stats
from rana_core.probes import run_probes
from rana_core.progress import ProgressFn, StagedProgress
from rana_core.residency import resting_device
from rana_core.tasks import lm_eval_results, run_tasks

STAGES = {"load": 1.0, "data": 0.5, "dense eval": 3.0, "build": 3.0, "thresholds": 1.5, "adapted eval": 4.0}


@dataclass
class LayerResult:
    layer: int
    module: str
    adapter: str  # dense | svd | rank | neuron | cats | a3
    rank: int  # static rank kept (neurons for neuron-masked modules; max rank when dense)
    max_rank: int
    density: float  # mean active ranks / static rank on the evaluation tokens (1 for static adapters)
    recon_error: float  # ‖f(X) − f̂(X)‖² / ‖f(X)‖² on the evaluation tokens
    sparsity: float  # share of ranks (neurons) carrying 90% of a token's ‖z‖², averaged over tokens
    flops_per_token: float
    dense_flops_per_token: int
    sparsity_curve: list[float] | None = None  # `sparsity` at each of adapters.SPARSITY_CURVE_SHARES
    planned_keep: float | None = None  # the keep the allocation chose for this row's QKV or whole MLP (hybrid)


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
    provenance: dict = field(default_factory=dict)  # rana_core.provenance.collect
    model_stats: dict = field(default_factory=dict)  # params, KV-cache bytes and FLOPs per token, where known
    artifact: dict | None = None  # {"path", "sha256"} of the saved adapters, when asked for
    tasks: dict | None = None  # accuracy on config.tasks: {"adapted": lm-eval results JSON, "dense": …}
    probes: dict | None = None  # what the model says (rana_core.probes): {"adapted": …, "dense": …}
    # the text behind the numbers: {"calibration": Corpus.record(), "evaluation": …} (rana_core.corpora)
    corpora: dict = field(default_factory=dict)

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
    config: CompressConfig, progress: ProgressFn | None = None, loaded: LoadedModel | None = None,
    artifact_path: Path | None = None, cache_dir: Path | None = None,
) -> CompressionResult:
    """Run `config` end to end. With `artifact_path`, the adapters are also saved there (adapters.artifacts);
    with `cache_dir`, what a method computes from the model and the data alone (hybrid's curves) is kept there
    for later runs (the worker and the CLI pass $RANA_DATA_DIR/curves)."""
    config.validate()
    started = time.perf_counter()
    if config.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(cuda_index(config.device))
    plan = StagedProgress(progress, _with_extras(STAGES, config.tasks, config.probes))
    target = 0.0 if config.method == "dense" else config.flop_reduction

    report = plan.stage("load")
    if loaded is None:
        report(0.0, f"loading {config.model}")
        loaded = load_model(config.model, device=config.device, dtype=config.dtype,
                            layer_by_layer=config.layer_by_layer)
    report(1.0, f"{config.model}: {loaded.info['parameters'] / 1e6:.1f} M parameters")

    report = plan.stage("data")
    report(0.0, "reading the corpora")
    calib_corpus = open_corpus(config.corpus)
    eval_corpus = open_corpus(config.eval_corpus or config.corpus)
    report(0.1, "sampling windows")
    # Two interleaved, disjoint samples of the training split: one builds the adapters, the other sets their
    # thresholds. Thresholds set on the very tokens a basis was fitted to undercount the ranks that new text
    # needs (the basis concentrates *their* energy best), so the cut came out 1-2 points short on held-out text.
    train = token_windows(loaded.tokenizer, "train", 2 * config.calib_tokens, config.seq_len, calib_corpus)
    calib, threshold_windows = train[0::2], train[1::2]
    report(0.5, "calibration windows")
    held_out = token_windows(loaded.tokenizer, "heldout", config.eval_tokens, config.seq_len, eval_corpus)
    report(1.0, f"{calib.numel()} calibration tokens of {calib_corpus.name}, {held_out.numel()} held-out tokens "
                f"of {eval_corpus.name}")

    report = plan.stage("dense eval")
    report(0.0, f"{held_out.shape[0]} sequences")  # the stage is named before its first batch runs
    dense = loaded.cached(("dense perplexity", windows_digest(held_out)),
                          lambda: perplexity(loaded.model, held_out, progress=report))
    report(1.0, f"{dense.perplexity:.3f}")
    accuracy = {"dense": _dense_tasks(loaded, config.tasks, plan.stage("dense tasks"))} if config.tasks else {}
    replies = {"dense": _probes(loaded, plan.stage("dense probes"), ("dense probes",))} if config.probes else {}

    layers = loaded.layers
    shapes = module_shapes(layers)
    profile = dense_profile(loaded.config, shapes, config.seq_len)
    unload(layers)  # a reused model must start clean
    dense_size = size_stats(loaded)
    artifact = None
    try:
        adapters = adapt(loaded, config, calib, threshold_windows, plan.stage("build"), plan.stage("thresholds"),
                         cache_dir)
        if artifact_path is not None:
            artifact = {"path": str(artifact_path), "sha256": save_adapters(adapters, artifact_path)}
        meters = installed_meters(layers)
        for meter in meters.values():
            meter.reset()
        set_tracking(layers, config.track_layers)
        adapted = perplexity(loaded.model, held_out, progress=plan.stage("adapted eval"))
        layer_rows = _layer_results(shapes, meters)
        adapted_size, fixed_saved = size_stats(loaded), _fixed_saved(meters)
        set_tracking(layers, False)  # what follows is not the held-out measurement the layer rows report
        if config.tasks:
            accuracy["adapted"] = lm_eval_results(run_tasks(loaded.model, loaded.tokenizer, config.tasks,
                                                            plan.stage("adapted tasks")))
        if config.probes:
            replies["adapted"] = _probes(loaded, plan.stage("adapted probes"))
    finally:
        unload(layers)

    spent = {(row.layer, row.module): row.flops_per_token for row in layer_rows}
    measured, measured_whole = profile.reductions(spent, fixed_saved)
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
        provenance=provenance.collect(loaded, config, calib.numel(), held_out.numel()),
        model_stats=model_stats(adapted_size, dense_size, profile.whole_model_total, measured_whole),
        artifact=artifact,
        tasks=accuracy or None,
        probes=replies if any(replies.values()) else None,
        corpora={"calibration": calib_corpus.record(), "evaluation": eval_corpus.record()},
    )


def evaluate_saved(loaded: LoadedModel, artifact_path: Path, sha256: str | None, split: str, eval_tokens: int,
                   seq_len: int, progress: ProgressFn | None = None, tasks: list[str] = (),
                   corpus: str = "brown") -> dict:
    """Measure a run's saved adapters again on `split` ("heldout" or "train") of `corpus` and return the
    evaluation: the perplexity beside the dense model's on the same tokens and the FLOP reduction measured from
    the masks; with `tasks` (rana_core.task_files), accuracy on each, adapted and dense, in lm-eval's JSON shape."""
    plan = StagedProgress(progress, _with_extras({"data": 0.5, "dense eval": 3.0, "adapted eval": 4.0}, tasks))
    report = plan.stage("data")
    text = open_corpus(corpus)
    windows = token_windows(loaded.tokenizer, split, eval_tokens, seq_len, text)
    report(1.0, f"{windows.numel()} {split} tokens of {text.name}")
    report = plan.stage("dense eval")
    dense = loaded.cached(("dense perplexity", windows_digest(windows)),
                          lambda: perplexity(loaded.model, windows, progress=report))
    layers = loaded.layers
    shapes = module_shapes(layers)
    profile = dense_profile(loaded.config, shapes, seq_len)
    unload(layers)
    accuracy = {"dense": _dense_tasks(loaded, tasks, plan.stage("dense tasks"))} if tasks else {}
    inject(layers, load_adapters(loaded, artifact_path, sha256))
    try:
        adapted = perplexity(loaded.model, windows, progress=plan.stage("adapted eval"))
        meters = installed_meters(layers)
        layer_rows, fixed_saved = _layer_results(shapes, meters), _fixed_saved(meters)
        if tasks:
            accuracy["adapted"] = lm_eval_results(run_tasks(loaded.model, loaded.tokenizer, tasks,
                                                            plan.stage("adapted tasks")))
    finally:
        unload(layers)
    measured, measured_whole = profile.reductions({(r.layer, r.module): r.flops_per_token for r in layer_rows},
                                                  fixed_saved)
    plan.done(f"perplexity {adapted.perplexity:.2f} (dense {dense.perplexity:.2f})")
    return {"split": split, "tokens": windows.numel(), "seq_len": seq_len, "perplexity": adapted.perplexity,
            "dense_perplexity": dense.perplexity, "measured_flop_reduction": measured,
            "measured_flop_reduction_whole_model": measured_whole, "tasks": accuracy or None,
            "corpus": text.record()}


def _with_extras(stages: dict[str, float], tasks, probes: bool = False) -> dict[str, float]:
    """The stages with, when there are tasks, "dense tasks" right after "dense eval" and "adapted tasks" right after
    "adapted eval" (then the probes likewise): where they run, so that progress only moves forward."""
    weighted = {}
    for name, weight in stages.items():
        weighted[name] = weight
        if tasks and name in ("dense eval", "adapted eval"):
            weighted[name.replace("eval", "tasks")] = 4.0
        if probes and name in ("dense eval", "adapted eval"):
            weighted[name.replace("eval", "probes")] = 1.0
    return weighted


def _probes(loaded: LoadedModel, progress: ProgressFn, cache_key: tuple | None = None) -> dict | None:
    """What the model says (rana_core.probes), or None for a model whose layers rest on the CPU: replies are made
    token by token, and each token would carry every layer to the GPU."""
    if resting_device(loaded.model) is not None:
        progress(1.0, "skipped: the layers rest on the CPU")
        return None
    probe = lambda: run_probes(loaded.model, loaded.tokenizer, progress)  # noqa: E731
    return loaded.cached(cache_key, probe) if cache_key else probe()


def _dense_tasks(loaded: LoadedModel, tasks: list[str], progress: ProgressFn) -> dict:
    """The dense model's accuracy on `tasks` (lm-eval's shape), kept with the loaded model: a file edited since is
    scored again."""
    files = tuple((t, Path(t).stat().st_mtime_ns) for t in tasks if Path(t).is_file())
    return loaded.cached(("dense tasks", tuple(tasks), files),
                         lambda: lm_eval_results(run_tasks(loaded.model, loaded.tokenizer, tasks, progress)))


def adapt(loaded: LoadedModel, config: CompressConfig, calib: torch.Tensor, threshold_windows: torch.Tensor,
          build_progress: ProgressFn, threshold_progress: ProgressFn, cache_dir: Path | None = None) -> list:
    """Build the method's adapters from `calib`, put them in the model, and set their thresholds on the adapted
    model from `threshold_windows` (disjoint from `calib`). The caller unloads them (adapters.unload)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        adapters = METHODS[config.method].load_builder()(loaded, calib, config, build_progress, cache_dir)
    inject(loaded.layers, adapters)
    calibrate_thresholds(loaded.model, loaded.layers, threshold_windows, threshold_progress)
    return adapters


@torch.no_grad()
def calibrate_thresholds(model, layers, windows, progress) -> None:
    """Re-set every masked adapter's threshold from the scores it sees on the *adapted* model, so that budgets
    set on dense-model inputs still hold once upstream layers are adapted.

    One forward pass of the decoder (no LM head) over all `windows` in a single batch: each adapter sets its
    threshold from the whole batch before masking it (Thresholded, immediate mode), so layer i is calibrated on
    what the already calibrated layers 0..i-1 produce: exact in one pass, where re-setting all thresholds after
    each full pass needed two passes to settle."""
    masked = [adapter for adapter in installed_adapters(layers) if isinstance(adapter, Thresholded)]
    if not masked:
        progress(1.0, "no masks")
        return
    progress(0.0, f"one pass over {windows.numel()} tokens")
    for adapter in masked:
        adapter.begin_calibration(immediate=True)
    # one pass, but a long one on a big model: a word after each layer
    handles = [layer.register_forward_hook(lambda *_, i=i: progress((i + 1) / len(layers), f"layer {i + 1}/"
                                                                   f"{len(layers)}")) for i, layer in enumerate(layers)]
    try:
        device = next(model.parameters()).device
        model.get_decoder()(windows.to(device), use_cache=False)
        missed = [adapter for adapter in masked if adapter.histogram is not None]
        if missed:
            raise RuntimeError(f"{len(missed)} masked adapter(s) saw no calibration tokens")
    finally:
        for handle in handles:
            handle.remove()
        for adapter in masked:
            adapter.histogram = None
    progress(1.0, f"{len(masked)} thresholds set")


def _fixed_saved(meters) -> float:
    """FLOPs per token the adapters saved outside the adaptable modules (A3: o_proj and attention scores)."""
    return sum(meter.fixed_saved_per_token for meter in meters.values())


def _layer_results(shapes, meters) -> list[LayerResult]:
    rows = []
    for (layer, module), (out_f, in_f) in sorted(shapes.items(), key=lambda kv: (kv[0][0], MODULES.index(kv[0][1]))):
        meter = meters.get((layer, module))
        dense_flops = 2 * out_f * in_f
        if meter is None:
            full = min(out_f, in_f)
            rows.append(LayerResult(layer, module, "dense", full, full, 1.0, 0.0, float("nan"), float(dense_flops),
                                    dense_flops))
            continue
        rows.append(
            LayerResult(
                layer=layer,
                module=module,
                adapter=meter.adapter,
                rank=meter.static_rank,
                max_rank=meter.max_rank,
                density=meter.mean_active / meter.static_rank if meter.static_rank else 0.0,
                recon_error=meter.recon_error,
                sparsity=meter.sparsity,
                sparsity_curve=meter.sparsity_curve,
                flops_per_token=meter.flops_per_token,
                dense_flops_per_token=dense_flops,
                planned_keep=meter.planned_keep,
            )
        )
    return rows


def _environment(loaded: LoadedModel) -> dict:
    device = loaded.info["device"]
    environment = {"device": str(device), "torch": torch.__version__, **loaded.info}
    if str(device).startswith("cuda"):  # the most this run held on the GPU at once
        environment["device_name"] = torch.cuda.get_device_name(cuda_index(device))
        environment["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(cuda_index(device)) / (1 << 30), 3)
    else:
        environment["device_name"] = platform.processor() or "cpu"
    return environment
