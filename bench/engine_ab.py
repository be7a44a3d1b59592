"""A launch option of the reference engine, off against on, in one process (GPU).

    python bench/engine_ab.py --env RANA_EARLY_WEIGHTS [--values 0,1] [--models llama2-7b-shape,smollm2-135m-shape]
                              [--cuts 0,0.44] [--rounds 2] [--contexts 1]
    python bench/engine_ab.py --env RANA_FUSE_NORM:RANA_ATTENTION_LAUNCHES --values 0:3,1:2

Options read at launch time (RANA_EARLY_WEIGHTS: a GEMV's first weight chunk loaded before the PDL wait; RANA_PDL:
programmatic dependent launch) are A/B'd by recapturing the same engine's graph with each value, alternately,
`rounds` times: machines of one kind differ by a few per cent, so only ratios within one run are compared.
Several options at once: their names and each side's values joined by colons.
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
    parser.add_argument("--values", default="0,1", help="its two values, the baseline first")
    parser.add_argument("--models", default="llama2-7b-shape,smollm2-135m-shape")
    parser.add_argument("--cuts", default="0,0.44")
    parser.add_argument("--contexts", default="1")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    base, option = args.values.split(",")
    names = args.env.split(":")
    if any(len(side.split(":")) != len(names) for side in (base, option)):
        parser.error(f"--values {args.values}: one value per variable of --env {args.env} on each side")
    name = torch.cuda.get_device_name()
    rows = []
    print(f"{name}, {args.dtype}, median ms/token of {args.new_tokens} replayed steps; "
          f"{args.env}={base} against ={option}")
    print(f"{'model':<22}{'cut':>5}{'context':>8}{base:>10}{option:>10}{'ratio':>8}")
    for model in args.models.split(","):
        for cut in [float(c) for c in args.cuts.split(",")]:
            engine = DecodeEngine(SHAPES[model], DTYPES[args.dtype], "cuda", flop_reduction=cut, gemv="triton")
            engine.calibrate()
            for context in [int(c) for c in args.contexts.split(",")]:
                times: dict[str, list[float]] = {base: [], option: []}
                for _ in range(args.rounds):
                    for value in (base, option):
                        os.environ.update(zip(names, value.split(":")))
                        engine.graph = None  # recaptured with this value
                        times[value].append(statistics.median(engine.time_decode(context, args.new_tokens)))
                a, b = statistics.median(times[base]), statistics.median(times[option])
                rows.append({"model": model, "cut": cut, "context": context, f"{args.env}={base}": times[base],
                             f"{args.env}={option}": times[option], "ratio": b / a})
                print(f"{model:<22}{cut:>5.2f}{context:>8}{a:>10.3f}{b:>10.3f}{b / a:>8.3f}", flush=True)
            del engine
            torch.cuda.empty_cache()
    for variable in names:
        os.environ.pop(variable, None)
    report = {"device_name": name, "dtype": args.dtype, "env": args.env, "values": [base, option], "rows": rows}
    write_results(report, args.out, f"engine-ab-{args.env.lower().replace('_', '-').replace(':', '+')}", name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
