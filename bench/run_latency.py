"""Decode speed of real runs (GPU): each method's run of a real model, in the engine built from its own weights and
adapters (rana_core.decode.from_model), against the dense model in the same engine on the same GPU.

    python bench/run_latency.py [--model smollm2-135m] [--label NAME] [--budget 0.44]
                                [--methods dense,svd,cats,teal,wina,rana-greedy,a3,hybrid] [--contexts 1,512]
                                [--new-tokens 256] [--dtype bfloat16] [--calib-tokens 8192] [--eval-tokens 8192]
                                [--layers reference,persistent] [--masked-products auto,gemv] [--batches 4,8]
                                [--layer-by-layer] [--env NAME --values A,B] [--out PATH]

Each run is compressed in this process on the GPU (rana_core.pipeline.compress, its adapters saved and loaded back
as a worker would), then measured by rana_core.decode.run_latency.measure_run: median ms per token over
`new-tokens` graph-replayed steps after a prompt of each context, the dense engine's beside it, the floor (bytes a
step reads over the copy bandwidth), the FLOP reduction counted from the engine's masks on held-out windows;
with --batches, tokens per second of that many sequences decoding together, run and dense (batch_rows); with
--masked-products, each run under each RANA_MASKED_PRODUCT value (a row each); with --env and --values, each run
(and its dense engine) under each value of that launch option, in one process (a row each: an A/B of an option on
real runs, e.g. --env RANA_RUN_MLP_ADDS --values 0,1).
A model that is not installed is skipped with its reason. Prints a table and writes
bench/results/run-latency-<label>-<device>.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runnable from a plain checkout, as on the GPU machine

import torch  # noqa: E402

from rana_core.adapters.artifacts import load_adapters  # noqa: E402
from rana_core.adapters.base import unload  # noqa: E402
from rana_core.config import CompressConfig  # noqa: E402
from rana_core.corpus import token_windows  # noqa: E402
from rana_core.decode.run_latency import measure_run  # noqa: E402
from rana_core.errors import ModelNotFound, RanaError  # noqa: E402
from rana_core.loading import load_model  # noqa: E402
from rana_core.methods import parse_method_label  # noqa: E402
from rana_core.pipeline import compress  # noqa: E402

from shown_path import RESULTS, write_results  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--label", help="the model's name in the results (default: --model)")
    parser.add_argument("--budget", type=float, default=0.44)
    parser.add_argument("--methods", default="dense,svd,cats,teal,wina,rana-greedy,a3,hybrid")
    parser.add_argument("--contexts", default="1,512")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--layers", default="reference",
                        help="how the engine runs a layer: reference (a launch per operation), persistent (one "
                             "launch), or both comma-separated (each run timed both ways in this process)")
    parser.add_argument("--masked-products", default="auto",
                        help="RANA_MASKED_PRODUCT values to time each run under, comma-separated (e.g. auto,gemv: "
                             "each run timed both ways in this process)")
    parser.add_argument("--batches", default="", help="batch sizes (2-16) also timed at each context, e.g. 4,8")
    parser.add_argument("--layer-by-layer", action=argparse.BooleanOptionalAction, default=None,
                        help="compress with the decoder layers resting in CPU memory (default: decided by the "
                             "model's size, as load_model decides)")
    parser.add_argument("--env", help="a launch option's environment variable, timed at each of --values")
    parser.add_argument("--values", default="", help="the option's values, comma-separated (the baseline first)")
    parser.add_argument("--out", type=Path, help="the JSON's path (default: bench/results/run-latency-…)")
    args = parser.parse_args(argv)
    modes, designs = args.layers.split(","), args.masked_products.split(",")
    values = args.values.split(",") if args.env else [None]
    if args.env and not args.values:
        parser.error("--env needs --values")
    if set(modes) - {"reference", "persistent"}:
        parser.error(f"--layers {args.layers}: use reference, persistent or both")
    if not torch.cuda.is_available():
        print("bench/run_latency.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    label = args.label or args.model
    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batches.split(",") if b]
    try:
        loaded = load_model(args.model, device="cuda", dtype=args.dtype, layer_by_layer=args.layer_by_layer)
    except ModelNotFound as exc:
        print(f"bench/run_latency.py: {label} skipped: {exc}", file=sys.stderr)
        return 0
    text = token_windows(loaded.tokenizer, "heldout", 2048, 512)
    rows = []
    for name in args.methods.split(","):
        method, allocation = parse_method_label(name)
        config = CompressConfig(model=args.model, method=method, allocation=allocation, device="cuda",
                                dtype=args.dtype, flop_reduction=0.0 if method == "dense" else args.budget,
                                calib_tokens=args.calib_tokens, eval_tokens=args.eval_tokens, track_layers=False)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            try:
                result = compress(config, loaded=loaded, artifact_path=Path(folder) / "adapters.safetensors")
                unload(loaded.layers)
                adapters = load_adapters(loaded, result.artifact["path"], result.artifact["sha256"])
                reports = {}
                for mode in modes:
                    for design in designs:
                        for value in values:
                            os.environ["RANA_MASKED_PRODUCT"] = design  # read where each product is launched
                            if args.env:
                                os.environ[args.env] = value  # read when a step is captured
                            reports[mode, design, value] = measure_run(loaded.model, adapters, contexts,
                                                                       args.new_tokens, args.dtype, "cuda", text,
                                                                       layers=mode, batches=batches)
            except RanaError as exc:  # e.g. a family or adapter the engine cannot run: one line, the row says so
                rows.append({"method": name, "error": str(exc)})
                print(f"{name}: {exc}", file=sys.stderr)
                continue
        for (mode, design, value), report in reports.items():
            rows.append({"method": name, "layer_mode": mode, "masked_product": design,
                         **({"option": f"{args.env}={value}"} if args.env else {}),
                         "perplexity": result.perplexity,
                         "measured_flop_reduction": result.measured_flop_reduction,
                         "engine_flop_reduction": report["measured_flop_reduction"],
                         "device_name": report["device_name"], "per_context": report["rows"],
                         "layers": report["layers"], "section_costs": report["section_costs"],
                         "seconds": round(time.perf_counter() - started, 1)})
        torch.cuda.empty_cache()
    device = torch.cuda.get_device_name(0)
    print(f"\n{label} on {device}, {args.dtype}, batch 1, {args.new_tokens} new tokens")
    print(f"{'method':<14}{'layers':>11}{'masked':>8}{'option':>24}{'ppl':>9}{'cut':>7}{'engine cut':>11}" + "".join(
        f"{f'dense@{c}':>9}{f'ms@{c}':>9}{'× dense':>9}{'floor':>8}" for c in contexts))
    for row in rows:
        if "error" in row:
            print(f"{row['method']:<14}  not run: {row['error']}")
            continue
        cells = "".join(f"{r['dense_ms_per_token']:>9.4f}{r['ms_per_token']:>9.4f}"
                        f"{r['dense_ms_per_token'] / r['ms_per_token']:>9.2f}{r['floor_ms']:>8.4f}"
                        for r in row["per_context"])
        print(f"{row['method']:<14}{row['layer_mode']:>11}{row['masked_product']:>8}{row.get('option', '-'):>24}"
              f"{row['perplexity']:>9.2f}"
              f"{row['measured_flop_reduction']:>7.3f}"
              f"{row['engine_flop_reduction']:>11.3f}{cells}")
    print("\nwhere a step goes (profiled sections at the last context, µs; each carries its timing events' cost):"
          " whole sections' mean, cut ones' fixed + per-kept·k where their kept shares k spread, else their mean")
    for row in rows:
        if "section_costs" in row:
            print(f"{row['method']:<14}{row.get('option', ''):>24}  {describe_costs(row['section_costs'])}")
    if batches:
        print("\nbatches: tokens/s of the run (and × dense at the same batch)")
        print(f"{'method':<14}{'layers':>11}{'masked':>8}{'context':>9}"
              + "".join(f"{f'B={b}':>18}" for b in [1] + batches))
        for row in rows:
            for r in row.get("per_context", []):
                cells = [(1e3 / r["ms_per_token"], r["dense_ms_per_token"] / r["ms_per_token"])] + [
                    (b["tokens_per_s"], b["tokens_per_s"] / b["dense_tokens_per_s"]) for b in r["batches"]]
                print(f"{row['method']:<14}{row['layer_mode']:>11}{row['masked_product']:>8}{r['context_tokens']:>9}"
                      + "".join(f"{f'{t:,.0f} ({x:.2f}×)':>18}" for t, x in cells))
    mode = ("" if modes == ["reference"] else "-" + "-".join(modes)) + (
        "" if designs == ["auto"] else "-masked-" + "-".join(designs)) + (
        f"-{args.env.lower().replace('_', '-')}" if args.env else "")
    out = args.out or RESULTS / f"run-latency-{label}-{device.lower().replace(' ', '-')}{mode}.json"
    write_results({"model": label, "device": device, "args": {**vars(args), "out": str(out)}, "rows": rows}, out,
                  "run-latency", device)
    return 0


def describe_costs(costs: dict) -> str:
    """One line of section_costs in µs: e.g. "mlp whole 75.5 (7), cut 26.2 + 59.0·k (25); … attention 23.8"."""
    parts = []
    for kind in ("qkv", "mlp"):
        c, pieces = costs[kind], []
        if c["whole_layers"]:
            pieces.append(f"whole {1e3 * c['whole_ms']:.1f} ({c['whole_layers']})")
        if c["fixed_ms"] is not None:
            pieces.append(f"cut {1e3 * c['fixed_ms']:.1f} + {1e3 * c['per_kept_ms']:.1f}·k ({c['cut_layers']})")
        elif c["cut_layers"]:
            low, high = c["kept_range"]
            pieces.append(f"cut {1e3 * c['cut_ms']:.1f} at k {low:.2f}-{high:.2f} ({c['cut_layers']})")
        parts.append(f"{kind} " + ", ".join(pieces))
    attention = costs["attention_ms"]
    return "; ".join(parts) + ("" if attention is None else f"; attention {1e3 * attention:.1f}")


if __name__ == "__main__":
    sys.exit(main())
