"""The masked product's two designs, product by product (GPU): the list (compaction, then gather, then the sum)
against the one-launch wide design (rana_core/decode/masked_wide.py), beside the dense GEMV of the same matrix.

    python bench/masked_designs.py [--densities 0,0.35,0.5,1] [--configs 64,64,2,1,16/64,64,2,1,8]
                                   [--products "qkv A-part,down (neurons)"] [--out PATH]

Llama-2-7B's products at a 44% cut (the reference engine's ranks): qkv's A-part (3,441 ranks → 12,288), gate's
and up's A-parts as two groups (3,082 ranks each → 11,008), down (11,008 neurons → 4,096, with its column
norms); and SmolLM2-135M's MLP products (360 ranks → 1,536 twice; 1,536 neurons → 576). Rank coefficients
fall off with the rank (as a trained adapter's do: the leading ranks are active far more often), neuron
coefficients do not. Each call reads the next of enough copies of its matrix to fill 64 MB (at least four), as a
step reads each layer's matrices once, so the 50 MB L2 does not serve them; 40 calls are captured in one CUDA
graph and replayed; µs per call (the median over replays) and the active rows' bytes over that time. Prints a
table and writes bench/results/masked-designs-<device>.json.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from rana_core.decode import latency, masked_wide  # noqa: E402
from rana_core.decode.gemv import gemv  # noqa: E402
from rana_core.decode.masked_kernels import masked_rows_partials, reduce_partials  # noqa: E402

from shown_path import write_results  # noqa: E402

PRODUCTS = {  # name: (K per group, M, groups, coefficients fall off with the rank, column norms)
    "qkv A-part": (3441, 12288, 1, True, False),
    "gate/up A-parts": (3082, 11008, 2, True, False),
    "down (neurons)": (11008, 4096, 1, False, True),
    "SmolLM2 gate/up": (360, 1536, 2, True, False),  # SmolLM2-135M's MLP at −44% (its QKV is not adapted)
    "SmolLM2 down": (1536, 576, 1, False, True),
}
CALLS = 40
L2_BYTES = 64 * 2**20  # more than the H100's and H200's 50 MB L2


def timed(call, copies: int) -> float:
    """µs per call of `call` (a function of the call's index, which picks the copy it reads), CALLS calls captured
    in one CUDA graph and replayed (rana_core.decode.latency.graph_ms)."""
    index = itertools.count()
    return 1e3 * latency.graph_ms(lambda: call(next(index) % copies), calls=CALLS)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--densities", default="0,0.35,0.5,1")
    parser.add_argument("--configs", default=",".join(map(str, masked_wide.CONFIG)),
                        help="the wide design's (BLOCK_M,BLOCK_K,warps,stages,programs per SM), joined by '/'")
    parser.add_argument("--products", default=",".join(PRODUCTS), help="names of PRODUCTS, joined by commas")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    name, dtype = torch.cuda.get_device_name(), torch.float16
    g = torch.Generator(device="cuda").manual_seed(0)
    designs = ["list"] + [f"wide {c}" for c in args.configs.split("/") if c]
    print(f"{name}, fp16, µs per call (active rows' TB/s), the next of at least 64 MB of copies per call")
    for i, design in enumerate(designs):
        print(f"  design {i}: {design}")
    print(f"{'product':<17}{'density':>8}" + "".join(f"{i:>17}" for i in range(len(designs))) + f"{'dense GEMV':>17}")
    rows_out = []
    for product in args.products.split(","):
        K, M, groups, falls, with_scale = PRODUCTS[product]
        count = max(4, -(-L2_BYTES // (groups * K * M * 2)))
        copies = [torch.randn(groups * K, M, device="cuda", dtype=dtype, generator=g) / K ** 0.5
                  for _ in range(count)]
        decay = torch.exp(-3 * torch.arange(K, device="cuda") / K).repeat(groups) if falls else 1.0
        coeff = (torch.randn(groups * K, device="cuda", generator=g) * decay).to(dtype)
        scale = torch.rand(K, device="cuda", generator=g) + 0.5 if with_scale else None
        score = coeff.float().abs().view(groups, K) * (scale if scale is not None else 1.0)
        transposed = [c.t().contiguous() for c in copies]  # the dense GEMV's (M, K) layout, same bytes
        x = torch.randn(groups * K, device="cuda", generator=g).to(dtype)
        dense_out = torch.empty(M, device="cuda", dtype=dtype)
        dense = timed(lambda i: gemv(transposed[i % count], x, dense_out), count) if groups == 1 else None
        for density in [float(d) for d in args.densities.split(",")]:
            threshold = torch.quantile(score, 1 - density, dim=1).float() if 0 < density < 1 else \
                torch.full((groups,), float("inf") if density == 0 else 0.0, device="cuda")
            active_bytes = float((score >= threshold[:, None]).sum()) * M * 2
            out = torch.empty(M * groups, device="cuda", dtype=dtype)
            row = {"product": product, "K": K, "M": M, "groups": groups, "density": density,
                   "dense_gemv_us": dense}
            line = f"{product:<17}{density:>8.2f}"
            for design in designs:
                kind, *setting = design.split()
                os.environ["RANA_MASKED_PRODUCT"] = kind
                if setting:
                    os.environ["RANA_WIDE_CONFIG"] = setting[0]

                def call(i):
                    partial, splits = masked_rows_partials(copies[i % count], coeff, threshold, scale,
                                                           groups=groups)
                    reduce_partials(partial, splits, out[:M], epilogue="swiglu" if groups == 2 else "sum")

                us = timed(call, count)
                row[design] = us
                line += f"{us:>9.1f} ({active_bytes / us / 1e6:4.2f})"
            line += f"{dense:>9.1f} ({groups * K * M * 2 / dense / 1e6:4.2f})" if dense else f"{'–':>17}"
            print(line, flush=True)
            rows_out.append(row)
        copies = transposed = None  # freed before the next product's
        torch.cuda.empty_cache()
    os.environ.pop("RANA_MASKED_PRODUCT", None)
    write_results({"device_name": name, "dtype": "float16", "rows": rows_out}, args.out, "masked-designs", name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
