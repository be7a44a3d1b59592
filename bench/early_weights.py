"""GEMV weights loaded before the wait for the launch before (GPU): an A/B in one process.

    python bench/early_weights.py [--models llama2-7b-shape,smollm2-135m-shape] [--cuts 0,0.44] [--rounds 2]

Under programmatic dependent launch a kernel's programs start while the launch before drains and wait
(griddepcontrol.wait) before reading its outputs. A GEMV's weights are never written during a step, so its
programs may load their first weight chunk before that wait (dense_kernels.GEMV_CONFIG["EARLY_MIN_K"]): the chunk's
memory latency then overlaps the launch before instead of following it. Each configuration: the reference engine
(rana_core.decode.engine) recaptured with RANA_EARLY_WEIGHTS=0 and =1 (=1: the default rule, early from
EARLY_MIN_K columns on; pass --min-k 0 to load early at every shape), alternately, `rounds` times; median
ms/token of graph-replayed steps at context 1. Prints a table, writes bench/results/early-weights-<device>.json.
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

from rana_core.decode.dense_kernels import GEMV_CONFIG  # noqa: E402
from rana_core.decode.engine import SHAPES, DecodeEngine  # noqa: E402
from rana_core.decode.latency import DTYPES  # noqa: E402

from shown_path import write_results  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="llama2-7b-shape,smollm2-135m-shape")
    parser.add_argument("--cuts", default="0,0.44")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    parser.add_argument("--min-k", type=int, help="EARLY_MIN_K for the early runs (default: the library's)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.min_k is not None:
        GEMV_CONFIG["EARLY_MIN_K"] = args.min_k
    name = torch.cuda.get_device_name()
    rows = []
    print(f"{name}, {args.dtype}, context 1, median ms/token of {args.new_tokens} replayed steps")
    print(f"{'model':<22}{'cut':>5}{'after wait':>12}{'early':>9}{'early / after':>15}")
    for model in args.models.split(","):
        for cut in [float(c) for c in args.cuts.split(",")]:
            engine = DecodeEngine(SHAPES[model], DTYPES[args.dtype], "cuda", flop_reduction=cut, gemv="triton")
            engine.calibrate()
            times: dict[str, list[float]] = {"0": [], "1": []}
            for _ in range(args.rounds):
                for early in ("0", "1"):
                    os.environ["RANA_EARLY_WEIGHTS"] = early
                    engine.graph = None  # recaptured with this launch option
                    times[early].append(statistics.median(engine.time_decode(1, args.new_tokens)))
            after, early = statistics.median(times["0"]), statistics.median(times["1"])
            rows.append({"model": model, "cut": cut, "after_wait_ms": times["0"], "early_ms": times["1"],
                         "ratio": early / after})
            print(f"{model:<22}{cut:>5.2f}{after:>12.3f}{early:>9.3f}{early / after:>15.3f}", flush=True)
            del engine
            torch.cuda.empty_cache()
    os.environ.pop("RANA_EARLY_WEIGHTS", None)
    write_results({"device_name": name, "dtype": args.dtype, "rows": rows}, args.out, "early-weights", name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
