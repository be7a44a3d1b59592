"""Decode latency benchmark (GPU): dense and RaNA in one engine, Hugging Face eager generate, the bandwidth floor.

    python bench/latency.py [--models llama2-7b-shape,smollm2-135m-shape] [--budgets 0,0.3,0.44,0.5]
                            [--contexts 1,128,512,1000] [--new-tokens 492] [--hf-tokens 64] [--dtype float16]

Batch 1; median ms per token over `new-tokens` decode steps (each one CUDA-graph replay) after a random prompt
of each context length; random weights of the named shape, RaNA thresholds calibrated on synthetic activations
(rana_core.decode.engine). Hugging Face `generate` (eager) is timed on `hf-tokens` new tokens at the same contexts. The
floor is the bytes one step must read (weights at the measured mask densities, plus the KV prefix) over the
measured device-to-device copy bandwidth. A micro-benchmark gives the kernel's bandwidth on its active bytes.
Prints tables and writes bench/results/latency-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runnable from a plain checkout, as on the GPU machine

import torch  # noqa: E402

from rana_core.decode import latency  # noqa: E402

from shown_path import shown  # noqa: E402  (bench/ is the script's folder)

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="llama2-7b-shape,smollm2-135m-shape")
    parser.add_argument("--budgets", default="0,0.3,0.44,0.5")
    parser.add_argument("--contexts", default="1,128,512,1000")
    parser.add_argument("--new-tokens", type=int, default=492)
    parser.add_argument("--hf-tokens", type=int, default=64, help="new tokens for HF generate (0: skip it)")
    parser.add_argument("--dtype", default="float16", choices=sorted(latency.DTYPES))
    parser.add_argument("--gemv", default="cublas,triton", help="GEMV backends of the engine to time")
    parser.add_argument("--layers", default="reference",
                        help="layer modes to time: reference (a launch per operation), persistent (a launch per layer)")
    parser.add_argument("--no-kernel", action="store_true", help="skip the masked-row kernel micro-benchmark")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/latency.py needs a CUDA GPU", file=sys.stderr)
        return 2
    started = time.perf_counter()
    device = "cuda"
    name = latency.device_name(device)
    budgets = [float(b) for b in args.budgets.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    bandwidth = latency.copy_bandwidth(device)
    print(f"{name}: device-to-device copy {bandwidth / 1e9:.0f} GB/s (read + written)", flush=True)
    report = {"device_name": name, "dtype": args.dtype, "copy_bandwidth_gbs": bandwidth / 1e9,
              "torch": torch.__version__, "host": platform.node(), "rows": [], "hf_rows": [], "kernel": []}
    out = args.out or RESULTS / f"latency-{name.replace(' ', '-').lower()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for model in args.models.split(","):
        rows = [row for layers in args.layers.split(",") for backend in args.gemv.split(",") for row in
                latency.engine_rows(model, args.dtype, budgets, contexts, args.new_tokens, device, bandwidth,
                                    gemv=backend, layers=layers)]
        hf = latency.hf_rows(model, args.dtype, contexts, args.hf_tokens, device) if args.hf_tokens else []
        report["rows"] += rows
        report["hf_rows"] += hf
        out.write_text(json.dumps(report, indent=2))
        hf_ms = {r["context_tokens"]: r["ms_per_token"] for r in hf}
        print(f"\n{model} ({args.dtype}, {args.new_tokens} new tokens, median ms/token)")
        print(f"{'engine':>18}{'cut':>5}{'measured':>9}{'context':>8}{'ms/token':>10}{'vs dense':>9}{'vs HF':>8}"
              f"{'floor ms':>9}{'/floor':>7}")
        for r in rows:
            speedup = r["dense_ms_per_token"] / r["ms_per_token"]
            hf_time = hf_ms.get(r["context_tokens"])
            versus_hf = f"{hf_time / r['ms_per_token']:>7.1f}x" if hf_time else f"{'-':>8}"  # --hf-tokens 0: none
            floor = r["shapes"]["floor_ms"]
            print(f"{r['engine']:>18}{r['flop_reduction']:>5.2f}{r['measured_flop_reduction']:>9.3f}{r['context_tokens']:>8}"
                  f"{r['ms_per_token']:>10.3f}{speedup:>8.2f}x{versus_hf}{floor:>9.3f}"
                  f"{r['ms_per_token'] / floor:>6.2f}x", flush=True)
        for r in hf:
            print(f"  HF generate (eager), context {r['context_tokens']}: {r['ms_per_token']:.2f} ms/token")
    if not args.no_kernel:
        report["kernel"] = latency.kernel_microbenchmark(device, args.dtype, bandwidth)
        print(f"\nmasked-row kernel ({args.dtype}): bandwidth on the active rows")
        print(f"{'kernel':<28}{'K':>6}{'M':>7}{'density':>8}{'us':>9}{'GB/s':>8}{'of copy':>8}")
        for k in report["kernel"]:
            print(f"{k['kernel']:<28}{k['K']:>6}{k['M']:>7}{k['density']:>8.2f}{k['us']:>9.1f}"
                  f"{k['active_gbs']:>8.0f}{k['share_of_copy_bandwidth']:>8.0%}")
    report["seconds"] = time.perf_counter() - started
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {shown(out)} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
