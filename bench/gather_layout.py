"""Row-major against blocked rows for the masked gather (GPU): does storing each column block's segments side by
side (masked_kernels.blocked_rows) let the gather read closer to the dense GEMV's bandwidth?

    python bench/gather_layout.py [--out PATH]

For the 7B shape's three masked products at three densities: the whole masked product (compact, gather, reduce)
replayed from CUDA graphs, both layouts, a few gather settings, beside the dense GEMV of the same matrix. The two
layouts must give the same bits (same rows, same order of sums); the bench checks it before timing.
Prints a table and writes bench/results/gather-layout-<device>.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from rana_core.decode import latency  # noqa: E402
from rana_core.decode import masked_kernels as kernels  # noqa: E402
from rana_core.decode.dense_kernels import gemv  # noqa: E402

from shown_path import write_results  # noqa: E402  (bench/ is the script's folder)

PRODUCTS = (("qkv A-part", 3441, 12288, False, 1), ("gate+up A-parts", 3082, 11008, False, 2),
            ("down (neurons)", 11008, 4096, True, 1))
SETTINGS = ({}, {"BLOCK_K": 256}, {"GATHER_WARPS": 4}, {"PROGRAMS_PER_SM": 8}, {"GATHER_WARPS": 4, "BLOCK_K": 256})


COPIES = 4  # each call reads another copy of the matrix, as a step reads each layer's once: L2 (50 MB) keeps none


def product_us(copies, coeff, threshold, scale, groups, out) -> float:
    def run():
        for rows in copies:
            partial, splits = kernels.masked_rows_partials(rows, coeff, threshold, scale, groups)
            kernels.reduce_partials(partial, splits, out, "swiglu" if groups == 2 else "sum")
    return 1e3 * latency.graph_ms(run, calls=5) / len(copies)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    name = latency.device_name("cuda")
    torch.manual_seed(0)
    rows_out = []
    print(f"{name}, float16: µs per masked product (compact + gather + reduce) in CUDA graphs; GB/s of active rows")
    print(f"{'product':16} {'density':>7} {'setting':28} {'row-major':>10} {'blocked':>10} {'gain':>6}")
    for label, K, M, scaled, groups in PRODUCTS:
        copies = [torch.randn(groups * K, M, device="cuda", dtype=torch.float16) for _ in range(COPIES)]
        blocked = [kernels.blocked_rows(rows) for rows in copies]
        rows, blocks = copies[0], blocked[0]
        coeff = torch.randn(groups * K, device="cuda", dtype=torch.float16)
        scale = torch.rand(groups * K, device="cuda") + 0.5 if scaled else None
        score = coeff.float().abs() * (scale if scale is not None else 1.0)
        out = torch.empty(M, device="cuda", dtype=torch.float16)
        dense_t = [rows.t().contiguous() for rows in copies]
        dense_out = torch.empty(M, device="cuda", dtype=torch.float16)
        dense_us = 1e3 * latency.graph_ms(lambda: [gemv(w, coeff, dense_out) for w in dense_t], calls=5) / COPIES
        print(f"{label:16} {'1.00':>7} {'dense GEMV':28} {dense_us:10.1f}  ({groups * K * M * 2 / dense_us / 1e3:.0f} GB/s)")
        rows_out.append({"product": label, "K": K, "M": M, "groups": groups, "density": 1.0, "setting": "dense GEMV",
                         "us": dense_us})
        del dense_t
        for density in (0.35, 0.44, 0.56):
            threshold = torch.quantile(score[:K], 1 - density).reshape(1).repeat(groups).contiguous()
            a = kernels.masked_rows_partials(rows, coeff, threshold, scale, groups)
            a = (a[0].clone(), a[1])
            b = kernels.masked_rows_partials(blocks, coeff, threshold, scale, groups)
            if not torch.equal(a[0], b[0]):
                raise SystemExit(f"{label}: blocked rows gave other partial sums than row-major ones")
            active_bytes = density * groups * K * M * 2
            for setting in SETTINGS:
                saved = {key: getattr(kernels, key) for key in setting}
                for key, value in setting.items():
                    setattr(kernels, key, value)
                us = [product_us(c, coeff, threshold, scale, groups, out) for c in (copies, blocked)]
                for key, value in saved.items():
                    setattr(kernels, key, value)
                text = ",".join(f"{k}={v}" for k, v in setting.items()) or "library defaults"
                print(f"{label:16} {density:7.2f} {text:28} {us[0]:10.1f} {us[1]:10.1f} {us[0] / us[1]:5.2f}x"
                      f"   ({active_bytes / us[0] / 1e3:.0f} → {active_bytes / us[1] / 1e3:.0f} GB/s)")
                rows_out.append({"product": label, "K": K, "M": M, "groups": groups, "density": density,
                                 "setting": setting, "row_major_us": us[0], "blocked_us": us[1]})
        del copies, blocked, rows, blocks
        torch.cuda.empty_cache()
    write_results({"device_name": name, "rows": rows_out}, args.out, "gather-layout", name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
