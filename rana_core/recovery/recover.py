"""Recovery after compression: LoRA fine-tuning of a stored run's adapted model, with one LoRA rank per layer.

    result = recover(loaded, artifact_path, sha256, RecoverConfig(strategy="rankadaptor"))

Steps: rebuild the run's adapters from its artifact and inject them; measure each layer's reconstruction error and
the validation loss on a slice of the *training* split; held-out perplexity before; choose per-layer ranks (uniform,
error-proportional, or RankAdaptor's search, rana_core.recovery.rank_search, whose configurations are each fine-tuned
briefly and scored on that validation slice, never on held-out text); fine-tune the chosen ranks on `train_tokens`
training tokens (rana_core.recovery.lora: everything else frozen); held-out perplexity after, with LoRA merged into every
plain Linear and the FLOPs of the unmergeable LoRA on adapter-computed linears counted. The model is left exactly
as it came (LoRA detached, merged weights restored, adapters unloaded), so a worker may reuse it.

CPU timing (two shared cores, SmolLM2-135M, RaNA at 0.44, the defaults): see docs/results.md "Recovery"; a GPU runs the
same code (the worker loads the model on RANA_DEVICE; LoRA layers follow the module they wrap).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from rana_core.adapters.artifacts import load_adapters
from rana_core.adapters.base import inject, installed_meters, module_shapes, set_tracking, unload
from rana_core.corpus import token_windows, windows_digest
from rana_core.errors import RanaError
from rana_core.evaluate import perplexity
from rana_core.flops import dense_profile
from rana_core.loading import LoadedModel
from rana_core.pipeline import calibrate_thresholds
from rana_core.progress import ProgressFn, StagedProgress, no_progress
from rana_core.recovery.config import RecoverConfig
from rana_core.recovery.lora import attach_lora, params_per_rank
from rana_core.recovery.rank_search import SearchSettings, budget_of, error_ranks, search_ranks, uniform_ranks
from rana_core.residency import resting_device

RETHRESHOLD_TOKENS = 8192  # training tokens that re-set the masks' thresholds after fine-tuning (as compress does)


@dataclass
class RecoveryResult:
    strategy: str
    ranks: list[int]  # LoRA rank per layer (0: no LoRA there)
    trainable_params: int
    param_budget: int  # those of uniform LoRA at config.rank_budget
    train_tokens: int  # of the final fine-tune
    search_tokens: int  # fine-tuning tokens spent measuring configurations (rankadaptor only)
    dense_perplexity: float
    perplexity_before: float
    perplexity_after: float
    val_loss_before: float  # mean NLL on the training split's validation slice
    val_loss_after: float
    flop_reduction_before: float  # measured on the held-out pass, of the adaptable FLOPs (QKV + MLP)
    flop_reduction_after: float  # LoRA merged into plain Linears; the rest of the LoRA path counted
    flop_reduction_after_unmerged: float  # had no LoRA been merged
    flop_reduction_after_adapters_only: float  # the adapters' own spend after (masks move when activations do)
    lora_flops_per_token: float  # what the unmergeable LoRA path adds, whole model
    layer_errors: list[float]  # per layer ‖f(X) − f̂(X)‖² / ‖f(X)‖² of its adapted modules, validation slice
    history: list[dict] = field(default_factory=list)  # search: {round, ranks, predicted, spread, measured}
    train_losses: list[float] = field(default_factory=list)  # the final fine-tune, per step
    eval_tokens: int = 0
    seconds: float = 0.0
    config: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, float) and not math.isfinite(value):
                data[key] = None
        data["layer_errors"] = [v if math.isfinite(v) else None for v in self.layer_errors]
        return data


def recover(loaded: LoadedModel, artifact_path: Path, sha256: str | None, config: RecoverConfig,
            progress: ProgressFn | None = None) -> RecoveryResult:
    config.validate()
    if resting_device(loaded.model) is not None:  # a visit swaps parameters: LoRA's could not be trained there
        raise RanaError("LoRA recovery needs the whole model on its device; this one is built layer by layer "
                        "(its weights take over 40% of the GPU memory allowed)")
    started = time.perf_counter()
    search_weight = (config.initial_configs + config.rounds * config.per_round) * config.probe_tokens
    plan = StagedProgress(progress, {
        "data": 0.02 * config.train_tokens, "errors": 0.3 * config.val_tokens, "before": 0.3 * config.eval_tokens,
        "search": search_weight if config.strategy == "rankadaptor" else 0.0, "train": config.train_tokens,
        "after": 0.3 * config.eval_tokens})
    model, layers = loaded.model, loaded.layers

    report = plan.stage("data")
    train, val = training_windows(loaded.tokenizer, config)
    held_out = token_windows(loaded.tokenizer, "heldout", config.eval_tokens, config.eval_seq_len)
    report(1.0, f"{train.numel()} training, {val.numel()} validation, {held_out.numel()} held-out tokens")
    unload(layers)  # a reused model must start clean
    dense = loaded.cached(("dense perplexity", windows_digest(held_out)), lambda: perplexity(model, held_out))
    shapes = module_shapes(layers)
    profile = dense_profile(loaded.config, shapes, config.eval_seq_len)
    inject(layers, load_adapters(loaded, artifact_path, sha256))
    try:
        errors, val_before = layer_errors(model, layers, val, plan.stage("errors"))
        measure_before = lambda: _held_out(model, layers, held_out, profile, plan.stage("before"))  # noqa: E731
        before, reduction_before = (loaded.cached(("recover: before", sha256, windows_digest(held_out)),
                                                  measure_before) if sha256 else measure_before())
        per_rank = params_per_rank(layers)
        budget = budget_of(per_rank, config.rank_budget)

        search_tokens, history = 0, []
        if config.strategy == "uniform":
            ranks = uniform_ranks(len(layers), config.rank_budget)
        elif config.strategy == "error":
            ranks = error_ranks(errors, per_rank, config.rank_budget)
        else:
            probe = train[_evenly(len(train), config.probe_tokens // config.seq_len)]
            report = plan.stage("search")
            total = config.initial_configs + config.rounds * config.per_round

            def measure(ranks: list[int]) -> float:
                done = len(history)
                return probe_config(model, layers, ranks, probe, val, config,
                                    lambda f, m: report((done + f) / total, f"config {done + 1}/{total}: {m}"))

            def measured(entry: dict) -> None:
                history.append(entry)
                report(len(history) / total, f"config {len(history)}/{total}: val loss {entry['measured']:.4f}")

            settings = SearchSettings(initial=config.initial_configs, rounds=config.rounds,
                                      per_round=config.per_round, seed=config.seed)
            ranks = search_ranks(measure, errors, per_rank, config.rank_budget, settings, measured).best
            search_tokens = len(history) * probe.numel()

        handle = attach_lora(layers, ranks, seed=config.seed)
        try:
            trainable = handle.trainable_parameters()
            losses = fine_tune(model, handle, train, config, plan.stage("train"))
            if config.rethreshold:
                calibrate_thresholds(model, layers, train[_evenly(len(train), RETHRESHOLD_TOKENS // config.seq_len)],
                                     no_progress)
            val_after = perplexity(model, val).mean_nll
            with handle.merged():
                after, reduction_unmerged = _held_out(model, layers, held_out, profile, plan.stage("after"),
                                                      handle.added_flops(merged=False))
            # The merged pass computed the same function; only the bookkeeping of the LoRA FLOPs differs.
            spent = _spent(layers, profile, handle.added_flops(merged=True))
            reduction_after = profile.reductions(spent)[0]
            reduction_adapters_only = profile.reductions(_spent(layers, profile, {}))[0]
            lora_flops = sum(handle.added_flops(merged=True).values())
        finally:
            handle.detach()
    finally:
        unload(layers)
    plan.done(f"perplexity {before:.2f} -> {after:.2f} (dense {dense.perplexity:.2f}), "
              f"FLOPs -{reduction_after:.1%}")
    return RecoveryResult(
        strategy=config.strategy, ranks=ranks, trainable_params=trainable, param_budget=budget,
        train_tokens=train.numel(), search_tokens=search_tokens, dense_perplexity=dense.perplexity,
        perplexity_before=before, perplexity_after=after, val_loss_before=val_before, val_loss_after=val_after,
        flop_reduction_before=reduction_before, flop_reduction_after=reduction_after,
        flop_reduction_after_unmerged=reduction_unmerged,
        flop_reduction_after_adapters_only=reduction_adapters_only, lora_flops_per_token=lora_flops, layer_errors=errors,
        history=history, train_losses=losses, eval_tokens=held_out.numel(),
        seconds=time.perf_counter() - started, config=config.to_dict())


def training_windows(tokenizer, config: RecoverConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint training and validation windows, both spread evenly over the training split."""
    n_train, n_val = config.train_tokens // config.seq_len, config.val_tokens // config.seq_len
    windows = token_windows(tokenizer, "train", (n_train + n_val) * config.seq_len, config.seq_len)
    is_val = torch.zeros(len(windows), dtype=torch.bool)
    is_val[_evenly(len(windows), n_val)] = True
    return windows[~is_val], windows[is_val]


def _evenly(n: int, k: int) -> torch.Tensor:
    return torch.linspace(0, n - 1, min(k, n)).round().long()


@torch.no_grad()
def layer_errors(model, layers, windows, report: ProgressFn = no_progress) -> tuple[list[float], float]:
    """Each layer's relative reconstruction error over its adapted modules (0 where nothing is adapted), and the
    mean NLL, from one tracked pass over `windows`."""
    meters = installed_meters(layers)
    for meter in meters.values():
        meter.reset()
    set_tracking(layers, True)
    try:
        loss = perplexity(model, windows, progress=report).mean_nll
    finally:
        set_tracking(layers, False)
    errors = []
    for index in range(len(layers)):
        own = [m for (layer, _), m in meters.items() if layer == index]
        reference = sum(m.ref_sq for m in own)
        errors.append(sum(m.err_sq for m in own) / reference if reference else 0.0)
    return errors, loss


def _spent(layers, profile, lora_added: dict) -> dict[tuple[int, str], float]:
    """FLOPs per token per adaptable module on the last pass: the adapters' meters plus the LoRA path."""
    spent = {key: meter.flops_per_token for key, meter in installed_meters(layers).items() if meter.tokens}
    for (layer, module), flops in lora_added.items():
        if module is not None:  # o_proj's LoRA lies outside the adaptable FLOPs
            key = (layer, module)
            spent[key] = spent.get(key, profile.adaptable[key]) + flops  # a dense module pays its own cost
    return spent


def _held_out(model, layers, windows, profile, report, lora_added=None) -> tuple[float, float]:
    """Held-out perplexity and the measured reduction of the adaptable FLOPs (with `lora_added` counted)."""
    for meter in installed_meters(layers).values():
        meter.reset()
    ppl = perplexity(model, windows, progress=report).perplexity
    return ppl, profile.reductions(_spent(layers, profile, lora_added or {}))[0]


def probe_config(model, layers, ranks, probe, val, config: RecoverConfig, report: ProgressFn = no_progress) -> float:
    """RankAdaptor's measurement of one configuration: a short fine-tune from fresh LoRA, the validation loss."""
    handle = attach_lora(layers, ranks, seed=config.seed)
    try:
        fine_tune(model, handle, probe, replace(config, batch_size=config.probe_batch_size), report)
        return perplexity(model, val).mean_nll
    finally:
        handle.detach()


def fine_tune(model, handle, windows, config: RecoverConfig, report: ProgressFn = no_progress) -> list[float]:
    """One pass over `windows` in a seeded order, AdamW on the LoRA parameters only, 10% linear warm-up then
    cosine decay to a tenth of the peak rate; gradients clipped at norm 1. Returns the loss of every step."""
    parameters = handle.parameters()
    if not parameters:
        report(1.0, "no LoRA parameters")
        return []
    device = parameters[0].device
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.0)
    steps = max(1, len(windows) // config.batch_size)
    warmup = max(1, steps // 10)

    def rate(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(config.seed))
    losses = []
    with torch.enable_grad():
        for step in range(steps):
            batch = windows[order[step * config.batch_size:(step + 1) * config.batch_size]].to(device)
            logits = model(batch, use_cache=False).logits[:, :-1]
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            report((step + 1) / steps, f"step {step + 1}/{steps}, loss {losses[-1]:.3f}")
    return losses
