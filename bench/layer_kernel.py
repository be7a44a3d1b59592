"""The persistent layer kernel's launch shape (GPU): programs per multiprocessor, warps and tile sizes, timed at
one model shape and cut, beside the reference engine.

    python bench/layer_kernel.py [--model llama2-7b-shape] [--cut 0.44] [--context 1] [--new-tokens 128]

Each configuration: median ms/token over graph-replayed decode steps (rana_core.decode.engine), the same engine
and calibration for all. Prints a table and writes bench/results/layer-kernel-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from rana_core.decode.engine import SHAPES, DecodeEngine  # noqa: E402
from rana_core.decode.latency import DTYPES  # noqa: E402
from rana_core.decode.layer_kernel import STAGE_NAMES  # noqa: E402

from shown_path import write_results  # noqa: E402

SWEEP = [{"PROGRAMS_PER_SM": p, "num_warps": w, "GEMV_FLAT": f} for p in (2, 4, 8) for w in (4, 8) for f in (0, 1)] + [
    {"PROGRAMS_PER_SM": 4, "num_warps": 4, "GATHER_K": 64},
    {"PROGRAMS_PER_SM": 8, "num_warps": 4, "BLOCK_N": 4, "BLOCK_K": 512}]
QUICK = [{"PROGRAMS_PER_SM": p, "num_warps": 4, "GEMV_FLAT": f} for p in (4, 8) for f in (0, 1)]
# the barrier's wait (atomics or acquire loads) and register caps that let more programs reside
BARRIER = [{"PROGRAMS_PER_SM": 4, "num_warps": 4, "GEMV_FLAT": 1, "LOAD_POLL": p} for p in (0, 1)] + [
    {"PROGRAMS_PER_SM": p, "num_warps": 4, "GEMV_FLAT": f, "LOAD_POLL": 1, "maxnreg": r}
    for p, r in ((4, 128), (8, 64)) for f in (0, 1)] + [
    {"PROGRAMS_PER_SM": 2, "num_warps": 8, "GEMV_FLAT": 0, "LOAD_POLL": 1}]
# lists compacted by more programs, at session 11's best shapes (its 'early' sweep also loaded each GEMV stage's
# first weight chunk before the barrier in front of it: no faster, and removed)
LISTS = [{"PROGRAMS_PER_SM": 4, "num_warps": w, "GEMV_FLAT": f, "LIST_CHUNK": c} for w, f in ((4, 1), (8, 0))
         for c in (2048, 512)]
# more listed rows (and wider row segments) per gather step: the stage clock measured the persistent gathers at
# 1.2-1.4 TB/s with 2 programs of 8 warps per multiprocessor, each with one 128 x 64 tile in flight
GATHER = [{"PROGRAMS_PER_SM": 4, "num_warps": 8, "GATHER_K": k, "BLOCK_M": m} for k in (128, 256, 512)
          for m in (64, 128)] + [{"PROGRAMS_PER_SM": 4, "num_warps": 4, "GATHER_K": 256}]
SWEEPS = {"full": SWEEP, "quick": QUICK, "barrier": BARRIER, "lists": LISTS, "gather": GATHER}
PROFILE_REPLAYS = 5


def stage_times(engine: DecodeEngine, context: int) -> dict[str, float]:
    """Milliseconds per step of each stage, summed over the layers, in the staged form (a launch per stage) from
    timing events inside a captured graph: where a step's time goes, launch gaps included."""
    engine.use_layer_kernels("staged")
    engine.allocate(context + PROFILE_REPLAYS + 16)
    engine.prefill(torch.arange(context, device="cuda") * 7 % engine.shape.vocab)
    marks = []

    def mark(name):
        if torch.cuda.is_current_stream_capturing():
            event = torch.cuda.Event(enable_timing=True, external=True)
            event.record()
            marks.append((name, event))

    for kernel in engine.kernels:
        if kernel is not None:
            kernel.marker = lambda stage: mark(STAGE_NAMES[stage])
    engine.marker = lambda layer, section: mark("LM head and the rest" if section == "head" else
                                                 ("end" if section == "end" else "layer start"))
    try:
        engine.capture()
    finally:
        engine.marker = None
        for kernel in engine.kernels:
            if kernel is not None:
                kernel.marker = None
    totals: dict[str, float] = {}
    for _ in range(PROFILE_REPLAYS):
        engine.graph.replay()
        torch.cuda.synchronize()
        for (name, start), (_, end) in zip(marks, marks[1:]):
            totals[name] = totals.get(name, 0.0) + start.elapsed_time(end) / PROFILE_REPLAYS
    engine.graph = None
    return totals


def persistent_clock(engine: DecodeEngine, config: dict, context: int) -> tuple[float, int, dict]:
    """Microseconds per step of each stage inside the persistent launch, summed over the layers: its work (last
    arrival at the barrier after it) and the barrier's latency (LayerKernel.stage_clock), from the last step."""
    engine.use_layer_kernels("persistent", {**config, "CLOCK": 1})
    ms = statistics.median(engine.time_decode(context, 16))
    grid = next(kernel.grid[0] for kernel in engine.kernels if kernel is not None)
    print(f"    persistent with its clock on: {grid} programs, {ms:.3f} ms/token", flush=True)
    totals: dict[str, tuple[float, float]] = {}
    for kernel in engine.kernels:
        for stage, work, barrier in (kernel.stage_clock() if kernel is not None else ()):
            before = totals.get(stage, (0.0, 0.0))
            totals[stage] = (before[0] + work, before[1] + barrier)
    return ms, grid, totals


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama2-7b-shape")
    parser.add_argument("--cuts", default="0,0.44")
    parser.add_argument("--context", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    parser.add_argument("--sweep", default="full", choices=sorted(SWEEPS),
                        help="quick: 4 and 8 programs per multiprocessor at 4 warps, GEMV tile by tile and flat; "
                             "barrier: the barrier's wait and register caps")
    parser.add_argument("--clock", action="store_true",
                        help="also the persistent launch's own stage clock at the sweep's fastest configuration")
    parser.add_argument("--no-staged-profile", action="store_true", help="skip the staged form's stage profile")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    name = torch.cuda.get_device_name()
    rows = []
    print(f"{name}, {args.model}, context {args.context}, median ms/token of {args.new_tokens} replayed steps")
    for cut in [float(c) for c in args.cuts.split(",")]:
        engine = DecodeEngine(SHAPES[args.model], DTYPES[args.dtype], "cuda", flop_reduction=cut, gemv="triton")
        engine.calibrate()
        sweep = SWEEPS[args.sweep]
        for mode, config in [("reference", None)] + [("persistent", c) for c in sweep]:
            engine.use_layer_kernels(mode, config)
            ms = statistics.median(engine.time_decode(args.context, args.new_tokens))
            grid = engine.kernels[0].grid[0] if engine.kernels and engine.kernels[0] else None
            rows.append({"cut": cut, "mode": mode, "config": config, "programs": grid, "ms_per_token": ms})
            print(f"cut {cut:.2f} {mode:<11}{json.dumps(config) if config else '':<60}{grid or '':>6}{ms:8.3f}",
                  flush=True)
        if args.clock:
            best = min((r for r in rows if r["cut"] == cut and r["mode"] == "persistent"),
                       key=lambda r: r["ms_per_token"])
            ms, grid, clock = persistent_clock(engine, best["config"], args.context)
            rows.append({"cut": cut, "mode": "persistent clock", "config": best["config"], "programs": grid,
                         "ms_per_token": ms, "stage_us": clock})
            for stage, (work, barrier) in clock.items():
                print(f"    persistent: {stage:<34}{work:9.1f} µs work {barrier:8.1f} µs barrier per step",
                      flush=True)
        stages = {} if args.no_staged_profile else stage_times(engine, args.context)
        rows.append({"cut": cut, "mode": "staged profile", "stage_ms": stages})
        for stage, ms in stages.items():
            print(f"    staged: {stage:<34}{ms:8.3f} ms per step", flush=True)
        del engine
        torch.cuda.empty_cache()
    write_results({"device_name": name, "model": args.model, "context": args.context, "dtype": args.dtype,
                   "rows": rows}, args.out, "layer-kernel", name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
