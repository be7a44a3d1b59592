"""Batch-1 GEMV on the GPU: the Triton kernel (rana_core.decode_kernels.gemv) at several block shapes against
torch's product (cuBLAS), at the Llama-2-7B decode shapes; and the masked-row kernel's bandwidth.

    python bench/gemv_configs.py [--dtype float16]

Achieved GB/s on the weight bytes, as a share of the measured device-to-device copy bandwidth. Prints a table and
writes bench/results/gemv-<device>.json. This is the measurement behind decode_kernels.GEMV_CONFIG.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from rana_core.decode import latency  # noqa: E402
from rana_core.decode.gemv import gemv  # noqa: E402

from shown_path import shown  # noqa: E402  (bench/ is the script's folder)

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {"qkv": (12288, 4096), "o_proj": (4096, 4096), "gate+up": (22016, 4096), "down": (4096, 11008),
          "lm_head": (32000, 4096), "qkv B at 0.44": (3441, 4096), "gate+up B at 0.44": (6164, 4096)}
CONFIGS = [dict(BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=s)
           for n, k, w, s in itertools.product((2, 4, 8, 16), (256, 512, 1024), (4, 8), (2, 4))
           if n * k <= 8192]


def main(argv=None) -> int:
    import triton.testing

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float16", choices=sorted(latency.DTYPES))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/gemv_configs.py needs a CUDA GPU", file=sys.stderr)
        return 2
    started = time.perf_counter()
    dtype, name = latency.DTYPES[args.dtype], latency.device_name("cuda")
    bandwidth = latency.copy_bandwidth("cuda")
    rows = []
    for label, (N, K) in SHAPES.items():
        weights = [torch.randn(N, K, device="cuda", dtype=dtype) for _ in range(3)]  # rotated: no L2 reuse
        x = torch.randn(K, device="cuda", dtype=dtype)
        out = torch.empty(N, device="cuda", dtype=dtype)
        calls = itertools.count()
        nbytes = N * K * weights[0].element_size()

        def timed(fn) -> float:
            return triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median")

        cublas = timed(lambda: torch.mv(weights[next(calls) % 3], x, out=out))
        results = []
        for config in CONFIGS:
            ms = timed(lambda: gemv(weights[next(calls) % 3], x, out, config))
            results.append((ms, config))
        results.sort(key=lambda item: item[0])
        best_ms, best = results[0]
        default_ms = next(ms for ms, c in results if c == {"BLOCK_N": 8, "BLOCK_K": 512, "num_warps": 4,
                                                            "num_stages": 2})
        rows.append({"shape": label, "N": N, "K": K, "cublas_us": cublas * 1e3, "cublas_gbs": nbytes / cublas / 1e6,
                     "best_us": best_ms * 1e3, "best_gbs": nbytes / best_ms / 1e6, "best_config": best,
                     "top5": [{"us": ms * 1e3, **c} for ms, c in results[:5]], "default_us": default_ms * 1e3})
        print(f"{label:<18}{N:>6}x{K:<6} cuBLAS {cublas * 1e3:7.1f} us {nbytes / cublas / 1e6:6.0f} GB/s | "
              f"Triton best {best_ms * 1e3:7.1f} us {nbytes / best_ms / 1e6:6.0f} GB/s {best}", flush=True)
    kernel = latency.kernel_microbenchmark("cuda", args.dtype, bandwidth)
    for k in kernel:
        print(f"{k['kernel']:<28}{k['K']:>6}{k['M']:>7}{k['density']:>6.2f}{k['us']:>8.1f} us"
              f"{k['active_gbs']:>7.0f} GB/s {k['share_of_copy_bandwidth']:>5.0%} of copy", flush=True)
    out_path = RESULTS / f"gemv-{name.replace(' ', '-').lower()}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({"device_name": name, "dtype": args.dtype, "copy_bandwidth_gbs": bandwidth / 1e9,
                                    "rows": rows, "masked_kernel": kernel,
                                    "seconds": time.perf_counter() - started}, indent=2))
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; wrote {shown(out_path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
