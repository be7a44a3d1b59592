"""A launch option of the reference engine, off against on, in one process (GPU).

    python bench/engine_ab.py --env RANA_EARLY_WEIGHTS [--values long,all] [--models llama2-7b-shape,smollm2-135m-shape]
                              [--cuts 0,0.44] [--rounds 2] [--contexts 1]
    python bench/engine_ab.py --env RANA_FUSE_NORM:RANA_ATTENTION_LAUNCHES --values 0:3,1:2
    python bench/engine_ab.py --env RANA_GEMV_CONFIG --values ,8-1024-4-4,8-1024-4-2 --models llama2-7b-shape

Options read at launch time (RANA_EARLY_WEIGHTS: a GEMV's first weight chunk loaded before the PDL wait; RANA_PDL:
programmatic dependent launch) are A/B'd by recapturing the same engine's graph with each value, alternately,
`rounds` times: machines of one kind differ by a few per cent, so only ratios within one run are compared.
Several options at once: their names and each side's values joined by colons. More than two values: each
against the first (the baseline). Options read when an engine is built (its weights' layout, say) take --build: one
engine per value, built alike (same seed, same calibration), all kept and timed alternately.
Median ms/token of graph-replayed steps. Prints a table and writes bench/results/engine-ab-<env>-<device>.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from rana_core.decode.engine import SHAPES, DecodeEngine  # noqa: E402
from rana_core.decode.latency import DTYPES  # noqa: E402

from shown_path import write_results  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", required=True,
                        help="the environment variable that selects the option (several: joined by colons)")
    parser.add_argument("--values", default="0,1", help="its values, the baseline first")
    parser.add_argument("--models", default="llama2-7b-shape,smollm2-135m-shape")
    parser.add_argument("--cuts", default="0,0.44")
    parser.add_argument("--contexts", default="1")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--build", action="store_true",
                        help="the option is read when an engine is built: one engine per value")
    args = parser.parse_args(argv)
    values = args.values.split(",")
    names = args.env.split(":")
    if len(values) < 2 or len(set(values)) != len(values):
        parser.error(f"--values {args.values}: at least two different values")
    if any(len(side.split(":")) != len(names) for side in values):
        parser.error(f"--values {args.values}: one value per variable of --env {args.env} on each side")
    base, options = values[0], values[1:]
    name = torch.cuda.get_device_name()
    rows = []
    print(f"{name}, {args.dtype}, median ms/token of {args.new_tokens} replayed steps; "
          f"{args.env}={base} against {', '.join('=' + v for v in options)}")
    width = max(10, *(len(v) + 2 for v in values))
    print(f"{'model':<22}{'cut':>5}{'context':>8}" + "".join(f"{v or '(unset)':>{width}}" for v in values)
          + "".join(f"{'ratio':>8}" for _ in options))
    for model in args.models.split(","):
        for cut in [float(c) for c in args.cuts.split(",")]:
            engines = {}
            for value in (values if args.build else values[:1]):
                os.environ.update(zip(names, value.split(":")))
                engines[value] = DecodeEngine(SHAPES[model], DTYPES[args.dtype], "cuda", flop_reduction=cut,
                                              gemv="triton")
                engines[value].calibrate()
            for context in [int(c) for c in args.contexts.split(",")]:
                times: dict[str, list[float]] = {value: [] for value in values}
                for _ in range(args.rounds):
                    for value in values:
                        os.environ.update(zip(names, value.split(":")))
                        engine = engines[value if args.build else base]
                        engine.graph = None  # recaptured with this value
                        times[value].append(statistics.median(engine.time_decode(context, args.new_tokens)))
                ms = {value: statistics.median(times[value]) for value in values}
                ratios = [ms[value] / ms[base] for value in options]
                row = {"model": model, "cut": cut, "context": context,
                       **{f"{args.env}={value}": times[value] for value in values}}
                row.update({"ratio": ratios[0]} if len(options) == 1 else {"ratios": dict(zip(options, ratios))})
                rows.append(row)
                print(f"{model:<22}{cut:>5.2f}{context:>8}" + "".join(f"{ms[v]:>{width}.3f}" for v in values)
                      + "".join(f"{r:>8.3f}" for r in ratios), flush=True)
            del engine, engines
            torch.cuda.empty_cache()
    for variable in names:
        os.environ.pop(variable, None)
    report = {"device_name": name, "dtype": args.dtype, "env": args.env, "values": values, "rows": rows}
    write_results(report, args.out, f"engine-ab-{args.env.lower().replace('_', '-').replace(':', '+')}", name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
