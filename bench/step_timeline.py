"""What each kernel of a replayed decode step costs on the step's critical path (GPU).

    python bench/step_timeline.py [--models llama2-7b-shape,smollm2-135m-shape] [--cuts 0,0.44] [--steps 16]
                                  [--out PATH]

A profiler's kernel durations miss what a step pays between kernels, and inside a CUDA graph with programmatic
dependent launch a kernel's programs start early and wait, so its measured duration includes the kernel before.
Here every Triton kernel's first program stamps the GPU's timer when its wait for the launch before releases
(launch.await_inputs, compiled with RANA_STEP_STAMPS, which this script sets before importing the
engine). Launches run in stream order, so the stamps of one replayed step are the launches in order, and the
time from one stamp to the next is what that kernel cost the step: its work after the wait, its completion, and
the hand-over to the next launch. The kernels' names and order come from one eager step under torch.profiler;
the step's last kernel (no stamp after it) is left out. RaNA's MLP runs as the single chain here (its two
branches would interleave their stamps). Prints the cost by kernel name (µs per step and per
launch, against the profiler's own duration of the same kernels), then one layer launch by launch (the period the
launch order repeats with), and writes
bench/results/step-timeline-<device>.json.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import os
import pkgutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SLOTS = 1 << 20  # launch.STEP_STAMP_SLOTS: one a 256 ns bucket of the GPU's timer
STAMPS = torch.zeros(SLOTS, dtype=torch.int64, device="cuda")
os.environ["RANA_STEP_STAMPS"] = str(STAMPS.data_ptr())  # before the kernels' module is imported
# The stamps read one stream's launches in order; the MLP's branches (mlp_branches) run two streams at once, so a
# timeline takes the single chain unless told otherwise (RANA_MLP_BRANCHES=2: the stamps then interleave).
os.environ.setdefault("RANA_MLP_BRANCHES", "1")

from triton.runtime.jit import JITFunction  # noqa: E402

import rana_core.decode  # noqa: E402

from masked_profile import warm_engine  # noqa: E402  (bench/ is the script's folder)
from shown_path import write_results  # noqa: E402


def stamping_kernels() -> set[str]:
    """Names of the Triton kernels that wait through await_inputs (and so stamp), in every module of the engine's
    package (a kernel moved to a new module is still found)."""
    names = set()
    for info in pkgutil.iter_modules(rana_core.decode.__path__):
        module = importlib.import_module(f"rana_core.decode.{info.name}")
        for name, value in vars(module).items():
            if isinstance(value, JITFunction) and "await_inputs(" in value.src and name != "await_inputs":
                names.add(name)
    return names


def eager_order(engine, kernels: set[str]) -> tuple[list[str], dict[str, float]]:
    """The stamping kernels of one eager step, in launch order, and each name's profiled GPU µs per step."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        engine.step()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                     and e.name in kernels), key=lambda e: e.time_range.start)
    durations = collections.Counter()
    for event in events:
        durations[event.name] += event.device_time_total
    return [e.name for e in events], dict(durations)


def replayed_stamps(graph, steps: int) -> list[list[int]]:
    """Each replayed step's stamps (ns), one replay at a time: the buffer's nonzero slots in time order."""
    runs = []
    for _ in range(steps):
        STAMPS.zero_()
        torch.cuda.synchronize()
        graph.replay()
        torch.cuda.synchronize()
        runs.append(sorted(STAMPS[STAMPS != 0].tolist()))
    return runs


def layer_period(order: list[str]) -> int:
    """The launches a decoder layer takes: the shortest period that the eager order repeats almost everywhere."""
    for period in range(2, len(order) // 2):
        same = sum(order[i] == order[i + period] for i in range(len(order) - period))
        if same >= 0.9 * (len(order) - period):
            return period
    return len(order)


def by_position(order: list[str], runs: list[list[int]]) -> list[tuple[str, float]]:
    """Each launch of a layer (its place in the layer and kernel name) with its median µs per layer: the launches
    that repeat with the layer's period, the ones before the first layer and after the last left out."""
    period = layer_period(order)
    repeating = [i for i in range(len(order) - 1)
                 if (i + period < len(order) and order[i] == order[i + period])
                 or (i >= period and order[i] == order[i - period])]
    start = repeating[0] if repeating else 0
    positions = collections.defaultdict(list)
    for run in runs:
        per_step = collections.defaultdict(list)
        for i in repeating:
            per_step[(i - start) % period].append(run[i + 1] - run[i])
        for place, ns in per_step.items():
            positions[place].append(statistics.median(ns) / 1e3)
    return [(f"{place:>2} {order[start + place]}", statistics.median(us)) for place, us in sorted(positions.items())]


def replay_ms(graph, steps: int) -> float:
    """The stamped graph's replay time (ms a step, CUDA events): what the stamps cost, against latency.py."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="llama2-7b-shape,smollm2-135m-shape")
    parser.add_argument("--cuts", default="0,0.44")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    name = torch.cuda.get_device_name()
    kernels = stamping_kernels()
    report = {"device_name": name, "dtype": "float16", "runs": []}
    for model in args.models.split(","):
        for cut in [float(c) for c in args.cuts.split(",")]:
            engine = warm_engine(model, cut)
            order, profiled = eager_order(engine, kernels)
            engine.capture()
            runs = replayed_stamps(engine.graph, args.steps)
            if any(len(run) != len(order) for run in runs):
                print(f"{model} {cut}: {len(order)} stamping launches in the eager step, "
                      f"{sorted({len(r) for r in runs})} stamps in the replays: not aligned, skipped")
                continue
            costs = collections.defaultdict(list)  # name → per step, the sum of its launches' costs (ns)
            for run in runs:
                per_step = collections.Counter()
                for i in range(len(run) - 1):
                    per_step[order[i]] += run[i + 1] - run[i]
                for kernel, ns in per_step.items():
                    costs[kernel].append(ns)
            launches = collections.Counter(order[:-1])
            span = statistics.median((run[-1] - run[0]) / 1e3 for run in runs)
            table = sorted(((kernel, statistics.median(ns) / 1e3) for kernel, ns in costs.items()),
                           key=lambda row: -row[1])
            replayed = replay_ms(engine.graph, 64)
            print(f"\n{name}, {model}, cut {cut}: {len(order)} launches a step, first to last stamp {span:.0f} µs "
                  f"(median of {args.steps} replays); the stamped step replays in {replayed:.3f} ms")
            print(f"{'kernel':<34}{'launches':>9}{'µs/step':>10}{'µs each':>9}{'profiled µs/step':>18}")
            rows = []
            for kernel, us in table:
                print(f"{kernel:<34}{launches[kernel]:>9}{us:>10.0f}{us / launches[kernel]:>9.2f}"
                      f"{profiled.get(kernel, 0.0):>18.0f}", flush=True)
                rows.append({"kernel": kernel, "launches": launches[kernel], "us_per_step": us,
                             "profiled_us_per_step": profiled.get(kernel)})
            layer = by_position(order, runs)
            print(f"one layer, launch by launch (median µs; {sum(us for _, us in layer):.1f} µs a layer):")
            for place, us in layer:
                print(f"  {place:<40}{us:>8.2f}")
            report["runs"].append({"model": model, "cut": cut, "launches": len(order), "span_us": span,
                                   "replay_ms": replayed, "last_kernel": order[-1], "rows": rows,
                                   "layer": [{"launch": place, "us": us} for place, us in layer]})
            del engine
            torch.cuda.empty_cache()
    write_results(report, args.out, "step-timeline", name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
