"""Quality benchmark: held-out perplexity of every method at every budget, at equal *measured* FLOPs.

    python bench/quality.py [--model smollm2-135m] [--budgets 0.2,0.3,0.44,0.5] [--eval-tokens 32768]
                            [--methods dense,cats,rana-uniform,…,rana-uniform+recover]

Calibration on the training split, evaluation on the held-out split (both fixed: see rana_core.corpus). One
model load, one dense evaluation and one set of calibration profiles serve every row. Prints a table and writes
bench/results/quality-<model>.json with, per row, the method, allocation, target, the measured FLOP reduction of
the adapted linear layers (QKV + MLP) and of the whole model (adding o_proj, attention scores and the LM head),
and the perplexity.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import transformers

from db.session import data_dir
from rana_core.config import CompressConfig
from rana_core.errors import RanaError
from rana_core.loading import load_model
from rana_core.methods import parse_method_label
from rana_core.pipeline import compress

from shown_path import shown  # noqa: E402  (bench/ is the script's folder)

RESULTS = Path(__file__).resolve().parent / "results"
CURVES = data_dir() / "curves"  # hybrid's curve cache, shared with the worker and `rana compress`
DEFAULT_METHODS = ("dense,cats,rana-uniform,rana-greedy,svd,a3-uniform,a3-greedy,hybrid-exact-loss,"
                   "hybrid-exact-output")  # uniform first: greedy reuses its splits


def show_choices(fraction: float, message: str) -> None:
    """Print the allocation a method settled on (greedy RaNA reports its candidates' calibration losses, hybrid
    the adapters it chose)."""
    if ("allocation:" in message and "; kept" in message) or "hybrid allocation:" in message:
        print(f"    {message}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--budgets", default="0.2,0.3,0.44,0.5")
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--device", default=os.environ.get("RANA_DEVICE") or "cpu",
                        help="where the model runs, float32 either way (default: RANA_DEVICE, else cpu)")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/quality-<model>.json)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    try:  # "rana-uniform+recover[-strategy]": compress, then LoRA recovery. A misspelt method stops before the load
        plan = [(name, *parse_method_label(name.partition("+")[0]), name.partition("+")[2])
                for name in args.methods.split(",")]
    except RanaError as exc:
        print(f"bench/quality.py: {exc}", file=sys.stderr)
        return 2
    try:
        loaded = load_model(args.model, device=args.device)
    except RanaError as exc:  # e.g. gemma3-270m when its package is not installed
        print(f"bench/quality.py: {args.model} not run: {exc}", file=sys.stderr)
        return 2
    budgets = [float(b) for b in args.budgets.split(",")]
    rows = []
    print(f"{'method':<14}{'target':>7}{'measured':>10}{'whole':>8}{'perplexity':>12}{'seconds':>9}", flush=True)
    for name, method, allocation, recovery in plan:
        for budget in [0.0] if method == "dense" else budgets:
            config = CompressConfig(model=args.model, method=method, allocation=allocation, flop_reduction=budget,
                                    device=args.device, calib_tokens=args.calib_tokens, eval_tokens=args.eval_tokens,
                                    seq_len=args.seq_len, track_layers=False)
            t0 = time.perf_counter()
            try:
                if recovery:
                    row = recovered_row(args, loaded, config, recovery)
                    rows.append(row)
                    write_report(args, rows, started)
                    print(f"{name:<14}{budget:>7.2f}{row['measured_flop_reduction']:>10.3f}{'':>8}"
                          f"{row['perplexity']:>12.2f}{row['seconds']:>9.0f}   (before recovery "
                          f"{row['perplexity_before']:.2f} at {row['measured_flop_reduction_before']:.3f})",
                          flush=True)
                    continue
                result = compress(config, loaded=loaded, progress=show_choices, cache_dir=CURVES)
            except RanaError as exc:
                print(f"{name:<14}{budget:>7.2f}  skipped: {exc}", flush=True)
                rows.append({"method": method, "allocation": allocation, "target": budget, "skipped": str(exc)})
                write_report(args, rows, started)
                continue
            row = {
                "method": method, "allocation": allocation, "target": budget,
                "measured_flop_reduction": result.measured_flop_reduction,
                "measured_flop_reduction_whole_model": result.measured_flop_reduction_whole_model,
                "perplexity": result.perplexity, "dense_perplexity": result.dense_perplexity,
                "model_stats": result.model_stats, "seconds": time.perf_counter() - t0,
            }
            rows.append(row)
            write_report(args, rows, started)
            print(f"{name:<14}{budget:>7.2f}{row['measured_flop_reduction']:>10.3f}"
                  f"{row['measured_flop_reduction_whole_model']:>8.3f}{row['perplexity']:>12.2f}"
                  f"{row['seconds']:>9.0f}", flush=True)
    out = write_report(args, rows, started)
    print(f"wrote {shown(out)} ({time.perf_counter() - started:.0f} s)")
    return 0


def recovered_row(args, loaded, config: CompressConfig, recovery: str) -> dict:
    """Compress, save the adapters, then recover them with LoRA (rana_core.recovery.recover, its default token budgets;
    strategy from "recover-<strategy>", else RecoverConfig's default). The row's perplexity and measured FLOP
    reduction are those after recovery (LoRA on adapter-computed linears costs FLOPs; see docs/results.md)."""
    import tempfile

    from rana_core.recovery.recover import recover
    from rana_core.recovery.config import RecoverConfig

    t0 = time.perf_counter()
    strategy = recovery.partition("-")[2] or RecoverConfig.strategy
    with tempfile.TemporaryDirectory() as scratch:
        artifact = Path(scratch) / "adapters.safetensors"
        result = compress(config, loaded=loaded, progress=show_choices, artifact_path=artifact,
                          cache_dir=CURVES)
        recovered = recover(loaded, artifact, result.artifact["sha256"],
                            RecoverConfig(strategy=strategy, eval_tokens=args.eval_tokens,
                                          eval_seq_len=args.seq_len).validate())
    return {"method": f"{config.method}+recover", "allocation": f"{config.allocation}/{strategy}",
            "target": config.flop_reduction, "measured_flop_reduction": recovered.flop_reduction_after,
            "measured_flop_reduction_before": result.measured_flop_reduction,
            "measured_flop_reduction_whole_model": None, "perplexity": recovered.perplexity_after,
            "perplexity_before": result.perplexity, "dense_perplexity": result.dense_perplexity,
            "lora_ranks": recovered.ranks, "trainable_params": recovered.trainable_params,
            "train_tokens": recovered.train_tokens, "model_stats": result.model_stats,
            "seconds": time.perf_counter() - t0}


def write_report(args, rows: list, started: float) -> Path:
    """The whole report so far: written after every row, so an interrupted run still leaves its numbers."""
    report = {
        "model": args.model,
        "flops": {"measured_flop_reduction": "adapted linear layers: stacked QKV and MLP gate/up/down of every layer",
                  "measured_flop_reduction_whole_model": "adds attention output projection, attention scores "
                                                         "at the evaluation length, and the LM head (dense)"},
        "calib_tokens": args.calib_tokens, "eval_tokens": args.eval_tokens, "seq_len": args.seq_len,
        "device": (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
                   else platform.processor() or "cpu"), "transformers": transformers.__version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - started, "rows": rows,
    }
    out = args.out or RESULTS / f"quality-{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return out


if __name__ == "__main__":
    sys.exit(main())
