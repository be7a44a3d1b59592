"""Where a decode step's GPU time goes, and the masked-row kernel's parts timed inside CUDA graphs (GPU).

    python bench/masked_profile.py [--shape llama2-7b-shape] [--budget 0.44]

1. The engine's eager step under torch.profiler: GPU time per kernel name, per step (dense and RaNA).
2. the masked product (compact, gather, reduce), replayed from CUDA graphs (no launch overhead, as in the
   engine), at several densities, compaction chunks and gather settings, beside the dense GEMV of the same matrix.
Prints tables and writes bench/results/masked-profile-<device>.json.
"""

from __future__ import annotations

import argparse
import collections
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from rana_core.decode import latency
from rana_core.decode import masked_kernels as kernels  # noqa: E402
from rana_core.decode.gemv import gemv  # noqa: E402
from rana_core.decode.engine import SHAPES, DecodeEngine  # noqa: E402

from shown_path import write_results  # noqa: E402  (bench/ is the script's folder)


def warm_engine(shape: str, budget: float) -> DecodeEngine:
    """A calibrated fp16 engine of `shape` at `budget` (Triton GEMV), after a random 64-token prompt and three
    eager steps (every kernel compiled, the caches warm)."""
    engine = DecodeEngine(SHAPES[shape], torch.float16, "cuda", flop_reduction=budget, gemv="triton")
    engine.calibrate()
    engine.allocate(600)
    engine.prefill(torch.randint(0, engine.shape.vocab, (64,), device="cuda"))
    for _ in range(3):
        engine.step()
    return engine


def step_profile(shape: str, budget: float, steps: int = 5) -> dict[str, float]:
    """GPU µs per step by kernel name, from eager steps (kernel durations are the same as in a graph)."""
    engine = warm_engine(shape, budget)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    totals = collections.Counter()
    counts = collections.Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name[:60]] += event.device_time_total / steps
            counts[event.name[:60]] += 1 / steps
    del engine
    torch.cuda.empty_cache()
    return {name: {"us": us, "launches": counts[name]} for name, us in totals.most_common()}


def graph_us(fn) -> float:
    return 1e3 * latency.graph_ms(fn, calls=20)


def masked_parts(K: int, M: int, density: float, scaled: bool, groups: int, configs: list[dict]) -> list[dict]:
    rows = torch.randn(groups * K, M, device="cuda", dtype=torch.float16)
    coeff = torch.randn(groups * K, device="cuda", dtype=torch.float16)
    scale = torch.rand(groups * K, device="cuda") + 0.5 if scaled else None
    score = coeff.float().abs() * (scale if scale is not None else 1.0)
    threshold = torch.quantile(score[:K], 1 - density).reshape(1).repeat(groups).contiguous()
    index = torch.empty(groups * K, dtype=torch.int32, device="cuda")
    value = torch.empty(groups * K, dtype=torch.float32, device="cuda")
    out = torch.empty(M, device="cuda", dtype=torch.float16)
    active_bytes = density * groups * K * M * 2
    results = []
    defaults = {name: getattr(kernels, name) for name in ("COMPACT_CHUNK", "BLOCK_M", "BLOCK_K", "GATHER_WARPS",
                                                          "GATHER_STAGES", "PROGRAMS_PER_SM")}
    for chunk in (1024, 2048, 4096):
        chunks = math.ceil(K / chunk)
        count = torch.empty(groups * chunks, dtype=torch.int32, device="cuda")
        us = graph_us(lambda: kernels._compact_kernel[(chunks, groups)](
            coeff, scale if scale is not None else coeff, threshold, index, value, count, coeff, K=K, CHUNKS=chunks,
            HAS_SCALE=scale is not None, CHUNK=min(chunk, kernels.triton.next_power_of_2(K)), SOURCE_SPLITS=0, PDL=False,
            num_warps=4 if chunk <= 1024 else 8))
        results.append({"part": "compact", "CHUNK": chunk, "us": us})
    for c in configs:  # compact + gather + reduce with these gather settings
        for name, setting in (("BLOCK_M", c["BLOCK_M"]), ("BLOCK_K", c["BLOCK_K"]), ("GATHER_WARPS", c["warps"]),
                              ("GATHER_STAGES", c["stages"]), ("PROGRAMS_PER_SM", c["per_sm"])):
            setattr(kernels, name, setting)
        us = graph_us(lambda: kernels.reduce_partials(*kernels.masked_rows_partials(rows, coeff, threshold, scale,
                                                                                     groups), out,
                                                      "swiglu" if groups == 2 else "sum"))
        row = {"part": "masked product", **c, "us": us, "active_gbs": active_bytes / us / 1e3}
        if groups == 1:  # the configuration must also be right
            reference = kernels.reference_masked_rows(rows, coeff, threshold, scale)
            got = kernels.masked_rows_gemv(rows, coeff, threshold, scale).double()
            row["rel_error"] = float((got - reference.double()).norm() / reference.double().norm())
        results.append(row)
    for name, setting in defaults.items():
        setattr(kernels, name, setting)
    whole = graph_us(lambda: kernels.reduce_partials(*kernels.masked_rows_partials(rows, coeff, threshold, scale,
                                                                                    groups), out,
                                                     "swiglu" if groups == 2 else "sum"))
    dense_t = rows.t().contiguous()  # the same matrix as a dense (M, groups·K) GEMV
    dense = graph_us(lambda: gemv(dense_t, coeff, out if groups == 1 else torch.empty(M, device="cuda",
                                                                                     dtype=torch.float16)))
    results.append({"part": "whole (library defaults)", "us": whole, "active_gbs": active_bytes / whole / 1e3})
    results.append({"part": "dense GEMV of the whole matrix", "us": dense,
                    "gbs": groups * K * M * 2 / dense / 1e3})
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama2-7b-shape")
    parser.add_argument("--budget", type=float, default=0.44)
    parser.add_argument("--steps-only", action="store_true", help="only part 1: GPU time per kernel of a step")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    name = latency.device_name("cuda")
    report = {"device_name": name, "profiles": {}, "masked": []}
    for budget in (0.0, args.budget):
        profile = step_profile(args.shape, budget)
        report["profiles"][str(budget)] = profile
        total = sum(p["us"] for p in profile.values())
        print(f"\n{args.shape} cut {budget}: {total:.0f} us of kernels per step, "
              f"{sum(p['launches'] for p in profile.values()):.0f} launches")
        for kernel, p in list(profile.items())[:20]:
            print(f"  {p['us']:8.1f} us {p['launches']:5.0f}x  {kernel}")
    configs = [dict(BLOCK_M=m, BLOCK_K=k, warps=w, stages=3, per_sm=p)  # the library's choice first
               for m, k, w, p in ((64, 128, 2, 16), (64, 128, 4, 16), (64, 64, 2, 16), (128, 128, 2, 16),
                                  (64, 128, 2, 4), (256, 64, 2, 16))]
    for label, K, M, scaled, groups in (("gate+up A (2 groups)", 3082, 11008, False, 2),
                                        ("down neuron", 11008, 4096, True, 1), ("qkv A", 3441, 12288, False, 1)):
        if args.steps_only:
            break
        for density in (0.35, 0.56):
            parts = masked_parts(K, M, density, scaled, groups, configs)
            report["masked"].append({"kernel": label, "K": K, "M": M, "density": density, "parts": parts})
            print(f"\n{label} K={K} M={M} density {density}")
            for p in parts:
                print("  " + "  ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in p.items()))
    write_results(report, args.out, "masked-profile", name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
