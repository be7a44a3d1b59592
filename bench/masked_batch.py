"""Masked products for a batch of tokens (GPU): the union of B tokens' masks against the dense product and against
B single-token masked products, at Llama-2-7B's RaNA −44% sizes.

    python bench/masked_batch.py [--batches 1,4,8] [--dtype float16]

Per product and batch: the share of rows the union reads, and the median ms of one call inside CUDA graphs
(rana_core.decode.latency.graph_ms) of the union kernel (rana_core.decode.batch_masked), of its every-row kernel
(masked_rows_dense: each token's mask applied to its coefficients), of the dense product (cuBLAS, the whole matrix,
no mask), and of B calls of the batch-1 kernel. Coefficients are random with each token's mask
at the product's density (its threshold set on a sample). Prints a table, writes
bench/results/masked-batch-<device>.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from rana_core.decode.batch_masked import masked_rows_dense, masked_rows_union  # noqa: E402
from rana_core.decode.latency import DTYPES, graph_ms  # noqa: E402
from rana_core.decode.masked_kernels import masked_rows_gemv  # noqa: E402

from shown_path import write_results  # noqa: E402

# (name, K rows, M columns, density per token, neuron scores): 7B RaNA −44% (rana_core.decode.parts.rank_plan)
PRODUCTS = [("qkv A-part", 3441, 12288, 0.333, False), ("gate A-part", 3082, 11008, 0.372, False),
            ("down (neurons)", 11008, 4096, 0.56, True)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    name, dtype = torch.cuda.get_device_name(), DTYPES[args.dtype]
    generator = torch.Generator("cuda").manual_seed(0)
    rows_out = []
    print(f"{name}, {args.dtype}: median ms per call in CUDA graphs")
    print(f"{'product':<16}{'B':>3}{'rows read':>10}{'union':>9}{'every row':>10}{'dense':>9}{'B x one':>9}"
          f"{'vs dense':>9}")
    for product, K, M, density, neurons in PRODUCTS:
        rows = (torch.randn(K, M, device="cuda", generator=generator) / K ** 0.5).to(dtype)
        scale = torch.rand(K, device="cuda", generator=generator) + 0.5 if neurons else None
        for B in [int(b) for b in args.batches.split(",")]:
            coeff = torch.randn(B, K, device="cuda", generator=generator).to(dtype)
            score = coeff.float().abs() * (scale if scale is not None else 1.0)
            threshold = torch.quantile(score[0].float(), 1.0 - density).reshape(1)
            _, listed = masked_rows_union(rows, coeff, threshold, scale)
            read = int(listed) / K
            union = graph_ms(lambda: masked_rows_union(rows, coeff, threshold, scale))
            every = graph_ms(lambda: masked_rows_dense(rows, coeff, threshold, scale))
            dense = graph_ms(lambda: coeff @ rows)
            singles = graph_ms(lambda: [masked_rows_gemv(rows, coeff[b], threshold, scale) for b in range(B)])
            rows_out.append({"product": product, "K": K, "M": M, "batch": B, "density": density, "rows_read": read,
                             "union_ms": union, "every_row_ms": every, "dense_ms": dense,
                             "single_token_calls_ms": singles})
            print(f"{product:<16}{B:>3}{read:>10.2f}{union:>9.4f}{every:>10.4f}{dense:>9.4f}{singles:>9.4f}"
                  f"{dense / min(union, every):>8.2f}x", flush=True)
    write_results({"device_name": name, "dtype": args.dtype, "rows": rows_out}, args.out, "masked-batch", name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
