"""How much faster is a decode GEMV whose weights are already in L2? (GPU; the question before any weight prefetch.)

    python bench/l2_reuse.py [--out PATH]

For o_proj-sized and smaller matrices of the 7B shape: the Triton GEMV (dense_kernels.gemv) replayed from CUDA
graphs on one matrix call after call (what fits in L2 stays there) against cycling through enough copies that none
is left in L2 between its calls. The gap bounds what prefetching that matrix during idle stages could save.
Prints a table and writes bench/results/l2-reuse-<device>.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from rana_core.decode import latency  # noqa: E402
from rana_core.decode.dense_kernels import gemv  # noqa: E402

from shown_path import write_results  # noqa: E402

SHAPES = (("o_proj 4096 x 4096", 4096, 4096), ("half of o_proj", 2048, 4096), ("qkv B-factor 3441 x 4096", 3441, 4096))
COLD_BYTES = 400e6  # copies enough to flush a 50 MB L2 many times over


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    name = latency.device_name("cuda")
    rows = []
    print(f"{name}, float16: µs per GEMV in CUDA graphs")
    print(f"{'matrix':<28}{'MB':>7}{'same matrix':>13}{'cold copies':>13}{'cold / warm':>13}")
    for label, N, K in SHAPES:
        copies = max(2, int(COLD_BYTES // (N * K * 2)))
        weights = [torch.randn(N, K, device="cuda", dtype=torch.float16) for _ in range(copies)]
        x = torch.randn(K, device="cuda", dtype=torch.float16)
        out = torch.empty(N, device="cuda", dtype=torch.float16)
        warm = 1e3 * latency.graph_ms(lambda: [gemv(weights[0], x, out) for _ in range(copies)], calls=2) / copies
        cold = 1e3 * latency.graph_ms(lambda: [gemv(w, x, out) for w in weights], calls=2) / copies
        mb = N * K * 2 / 1e6
        rows.append({"matrix": label, "N": N, "K": K, "MB": mb, "warm_us": warm, "cold_us": cold})
        print(f"{label:<28}{mb:>7.1f}{warm:>13.1f}{cold:>13.1f}{cold / warm:>12.2f}x", flush=True)
        weights = None
        torch.cuda.empty_cache()
    write_results({"device_name": name, "rows": rows}, args.out, "l2-reuse", name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
