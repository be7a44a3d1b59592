"""Recovery benchmark: RaNA at one budget, then LoRA recovery with each rank strategy at equal trainable parameters.

    python bench/recovery.py [--model smollm2-135m] [--budget 0.44] [--runs uniform:0,rankadaptor:0,error:0,uniform:1]

The quality bench's protocol: RaNA (uniform allocation) calibrated on 8192 training-split tokens, perplexity on
32768 held-out tokens in windows of 512. Each run is `strategy:seed` with rana_core.recovery.recover's default token
budgets (RecoverConfig). `--artifact PATH` reuses adapters saved by an identical compression instead of compressing
again (compression is deterministic). Prints a table and writes bench/results/recovery-<model>.json after every row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from rana_core.config import CompressConfig
from rana_core.errors import RanaError
from rana_core.loading import file_sha256, load_model
from rana_core.pipeline import compress
from rana_core.recovery.config import RecoverConfig
from rana_core.recovery.recover import recover

from shown_path import shown  # noqa: E402  (bench/ is the script's folder)

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--budget", type=float, default=0.44)
    parser.add_argument("--runs", default="uniform:0,rankadaptor:0,error:0,uniform:1", help="strategy:seed,…")
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--artifact", type=Path, help="adapters of the same compression, saved earlier")
    parser.add_argument("--rethreshold", action="store_true", help="re-set the masks' thresholds after fine-tuning")
    parser.add_argument("--device", default=os.environ.get("RANA_DEVICE", "cpu"), help="cpu, cuda, cuda:1 …")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/recovery-<model>.json)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        runs = [(strategy, int(seed)) for strategy, _, seed in (r.partition(":") for r in args.runs.split(","))]
        loaded = load_model(args.model, device=args.device)
    except (RanaError, ValueError) as exc:
        print(f"bench/recovery.py: {exc}", file=sys.stderr)
        return 2
    report = {"model": args.model, "method": "rana-uniform", "budget": args.budget, "calib_tokens": args.calib_tokens,
              "eval_tokens": args.eval_tokens, "eval_seq_len": 512,
              "device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
              else platform.processor() or "cpu",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "compression": None, "rows": []}
    with tempfile.TemporaryDirectory() as scratch:
        artifact = args.artifact
        sha256 = file_sha256(artifact) if artifact else None  # also keys the cached "before" measurement
        if artifact is None:
            t0 = time.perf_counter()
            artifact = Path(scratch) / "rana.safetensors"
            result = compress(CompressConfig(model=args.model, method="rana", allocation="uniform",
                                             flop_reduction=args.budget, calib_tokens=args.calib_tokens,
                                             eval_tokens=args.eval_tokens, seq_len=512, track_layers=False,
                                             device=args.device),
                              loaded=loaded, artifact_path=artifact)
            sha256 = result.artifact["sha256"]
            report["compression"] = {"perplexity": result.perplexity, "seconds": time.perf_counter() - t0,
                                     "measured_flop_reduction": result.measured_flop_reduction}
        print(f"{'strategy':<12}{'seed':>5}{'before':>9}{'after':>9}{'dense':>8}{'FLOPs-':>8}{'params':>10}"
              f"{'tokens':>8}{'search':>8}{'seconds':>9}", flush=True)
        for strategy, seed in runs:
            config = RecoverConfig(strategy=strategy, seed=seed, eval_tokens=args.eval_tokens,
                                   rethreshold=args.rethreshold)
            try:
                row = recover(loaded, artifact, sha256, config).to_json()
            except RanaError as exc:
                print(f"{strategy:<12}{seed:>5}  skipped: {exc}", flush=True)
                continue
            row["seed"] = seed
            report["rows"].append(row)
            write_report(args, report, started)
            print(f"{strategy:<12}{seed:>5}{row['perplexity_before']:>9.2f}{row['perplexity_after']:>9.2f}"
                  f"{row['dense_perplexity']:>8.2f}{row['flop_reduction_after']:>8.3f}{row['trainable_params']:>10}"
                  f"{row['train_tokens']:>8}{row['search_tokens']:>8}{row['seconds']:>9.0f}", flush=True)
            print(f"    ranks {row['ranks']}", flush=True)
    out = write_report(args, report, started)
    print(f"wrote {shown(out)} ({time.perf_counter() - started:.0f} s)")
    return 0


def write_report(args, report: dict, started: float) -> Path:
    """The whole report so far: written after every row, so an interrupted run still leaves its numbers."""
    report["seconds"] = time.perf_counter() - started
    out = args.out or RESULTS / f"recovery-{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return out


if __name__ == "__main__":
    sys.exit(main())
