"""The masked product as compact → gather (masked_kernels, "list") against one strided launch
(masked_strided, "strided") (GPU), product by product and in the whole decode step.

    python bench/gather_designs.py [--models llama2-7b-shape,smollm2-135m-shape] [--rounds 2] [--out PATH]

1. The 7B shape's three masked products at densities 0 to 1, replayed from CUDA graphs, each call reading another
   copy of the matrix (as a step reads each layer's once: L2 keeps none), both designs and a few strided settings,
   beside the dense GEMV of the same matrix. Both designs are checked against float64 first.
2. The reference engine recaptured with RANA_GATHER=list and =strided, alternately, `rounds` times, beside dense:
   median ms/token of graph-replayed steps at context 1.
Prints tables and writes bench/results/gather-designs-<device>.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from rana_core.decode import latency  # noqa: E402
from rana_core.decode import masked_kernels as kernels  # noqa: E402
from rana_core.decode import masked_strided  # noqa: E402
from rana_core.decode.dense_kernels import gemv  # noqa: E402
from rana_core.decode.engine import SHAPES, DecodeEngine  # noqa: E402

from shown_path import write_results  # noqa: E402  (bench/ is the script's folder)

PRODUCTS = (("qkv A-part", 3441, 12288, False, 1), ("gate+up A-parts", 3082, 11008, False, 2),
            ("down (neurons)", 11008, 4096, True, 1))
DESIGNS = (("list", {}), ("strided", {}), ("strided", {"BLOCK_C": 128, "WARPS": 2}),
           ("strided", {"WARPS": 2}), ("strided", {"BLOCK_C": 512, "WARPS": 8}), ("strided", {"PROGRAMS_PER_SM": 8}))
COPIES = 4


def product_us(design, setting, copies, coeff, threshold, scale, groups, out) -> float:
    kernels.GATHER = design
    saved = {key: getattr(masked_strided, key) for key in setting}
    for key, value in setting.items():
        setattr(masked_strided, key, value)

    def run():
        for rows in copies:
            partial, splits = kernels.masked_rows_partials(rows, coeff, threshold, scale, groups)
            kernels.reduce_partials(partial, splits, out, "swiglu" if groups == 2 else "sum")
    try:
        return 1e3 * latency.graph_ms(run, calls=5) / len(copies)
    finally:
        for key, value in saved.items():
            setattr(masked_strided, key, value)


def products() -> list[dict]:
    torch.manual_seed(0)
    results = []
    print("µs per masked product in CUDA graphs (GB/s of active rows); dense GEMV of the whole matrix")
    print(f"{'product':16} {'density':>7}  " + "  ".join(f"{d[:4]}{''.join(str(v) for v in s.values()):>7}"
                                                        for d, s in DESIGNS))
    for label, K, M, scaled, groups in PRODUCTS:
        copies = [torch.randn(groups * K, M, device="cuda", dtype=torch.float16) for _ in range(COPIES)]
        coeff = torch.randn(groups * K, device="cuda", dtype=torch.float16)
        scale = torch.rand(groups * K, device="cuda") + 0.5 if scaled else None
        score = coeff.float().abs() * (scale if scale is not None else 1.0)
        out = torch.empty(M, device="cuda", dtype=torch.float16)
        dense_t = [rows.t().contiguous() for rows in copies]
        dense_us = 1e3 * latency.graph_ms(lambda: [gemv(w, coeff, out) for w in dense_t], calls=5) / COPIES
        dense_t = None  # the copies stay; the transposes go
        for density in (0.0, 0.35, 0.44, 0.56, 1.0):
            level = torch.quantile(score[:K], 1 - density) if 0 < density < 1 else (1e9 if density == 0 else 0.0)
            threshold = torch.full((groups,), float(level), device="cuda")
            for design in ("list", "strided"):  # right first
                kernels.GATHER = design
                partial, splits = kernels.masked_rows_partials(copies[0], coeff, threshold, scale, groups)
                for g in range(groups):
                    got = partial.view(groups, splits, M)[g].sum(0).double()
                    part = slice(g * K, (g + 1) * K)
                    want = kernels.reference_masked_rows(copies[0][part], coeff[part], threshold[g:g + 1],
                                                         None if scale is None else scale[part]).double()
                    error = float((got - want).abs().max() / want.abs().max().clamp(min=1e-6))
                    if error > 1e-5:
                        raise SystemExit(f"{label}, {design}, density {density}: relative error {error:.2e}")
            us = [product_us(d, s, copies, coeff, threshold, scale, groups, out) for d, s in DESIGNS]
            active = density * groups * K * M * 2
            print(f"{label:16} {density:7.2f}  " + "  ".join(f"{t:11.1f}" for t in us)
                  + f"   dense {dense_us:.1f}" + (f"   ({active / us[0] / 1e3:.0f} → {active / min(us[1:]) / 1e3:.0f} GB/s)"
                                                  if density else ""), flush=True)
            results.append({"product": label, "K": K, "M": M, "groups": groups, "density": density,
                            "dense_gemv_us": dense_us,
                            "designs": [{"design": d, "setting": s, "us": t} for (d, s), t in zip(DESIGNS, us)]})
        del copies
        torch.cuda.empty_cache()
    kernels.GATHER = "list"
    return results


def steps(models: list[str], rounds: int, new_tokens: int) -> list[dict]:
    print(f"\nmedian ms/token of {new_tokens} replayed steps, context 1, float16")
    print(f"{'model':<22}{'dense':>8}{'list':>8}{'strided':>9}{'list × dense':>14}{'strided × dense':>17}")
    results = []
    for model in models:
        dense = DecodeEngine(SHAPES[model], torch.float16, "cuda", flop_reduction=0.0, gemv="triton")
        dense.calibrate()
        dense_ms = statistics.median(dense.time_decode(1, new_tokens))
        del dense
        engine = DecodeEngine(SHAPES[model], torch.float16, "cuda", flop_reduction=0.44, gemv="triton")
        engine.calibrate()
        times: dict[str, list[float]] = {"list": [], "strided": []}
        for _ in range(rounds):
            for design in times:
                kernels.GATHER = design
                engine.graph = None  # recaptured with this design
                times[design].append(statistics.median(engine.time_decode(1, new_tokens)))
        kernels.GATHER = "list"
        listed, strided = statistics.median(times["list"]), statistics.median(times["strided"])
        print(f"{model:<22}{dense_ms:>8.3f}{listed:>8.3f}{strided:>9.3f}{dense_ms / listed:>13.2f}x"
              f"{dense_ms / strided:>16.2f}x", flush=True)
        results.append({"model": model, "cut": 0.44, "dense_ms": dense_ms, "list_ms": times["list"],
                        "strided_ms": times["strided"]})
        del engine
        torch.cuda.empty_cache()
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="llama2-7b-shape,smollm2-135m-shape")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--skip-products", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    name = latency.device_name("cuda")
    print(name)
    report = {"device_name": name, "products": [] if args.skip_products else products(),
              "steps": steps(args.models.split(","), args.rounds, args.new_tokens)}
    write_results(report, args.out, "gather-designs", name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
