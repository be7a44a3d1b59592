"""Weights streamed ahead of the activations: a chain of dependent GEMVs in one persistent CUDA launch against the
engine's launch-per-product chain (GPU with nvcc; the question before a decode megakernel, issue 18).

    python bench/stream_ahead.py [--cases 4096x32,2048x64,512x240] [--out PATH]

A decode step is a chain of products, each waiting for the one before; the engine runs each as its own launch
(Triton GEMVs in a CUDA graph with programmatic dependent launch), so every product starts its weight reads only
when its launch begins. bench/stream_ahead.cu runs the whole chain y_{l+1} = W_l y_l in one launch: a producer
warp per block bulk-copies the block's rows of the next layers into a shared-memory ring while its consumer warps
wait for the previous layer's output through a counter in global memory. Each case (hidden × layers: 4,096 as
Llama-2-7B's o_proj, 2,048 as a 1B model's, 512 as SmolLM2's small products, with enough layers that the weights
do not fit in L2) is timed, in µs per layer, as:

- `stream`: the persistent launch (ring of 4 slots, and a deeper one), launched back to back;
- `triton`: the engine's GEMV (rana_core.decode.dense_kernels.gemv), one launch a layer, in a CUDA graph;
- `cublas`: torch.mv, one launch a layer, in a CUDA graph;
- `floor`: the weights' bytes at the device's copy bandwidth.

Every layer the persistent launch computes is checked against PyTorch's product of the same input (fp32 sums
rounded to fp16: within 1e-3 of it, the rounding alone allows 4.9e-4).
Prints a table and writes bench/results/stream-ahead-<device>.json.
"""

from __future__ import annotations

import argparse
import ctypes
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from rana_core.decode import latency  # noqa: E402
from rana_core.decode.dense_kernels import gemv  # noqa: E402

from shown_path import write_results  # noqa: E402

SOURCE = Path(__file__).with_suffix(".cu")
STAGES = {4096: (4, 6), 2048: (4, 8), 512: (4, 16)}  # the ring depths stream_ahead_chain is built for


def build() -> ctypes.CDLL:
    """Compile stream_ahead.cu for sm_90a into a temporary shared library and load it."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise SystemExit("stream_ahead: nvcc not found (CUDA's compiler is needed to build the persistent kernel)")
    library = Path(tempfile.mkdtemp()) / "stream_ahead.so"
    built = subprocess.run([nvcc, "-O3", "-shared", "-Xcompiler", "-fPIC", "-gencode",
                            "arch=compute_90a,code=sm_90a", "-o", str(library), str(SOURCE)],
                           capture_output=True, text=True)
    if built.returncode != 0:
        raise SystemExit(f"stream_ahead: nvcc failed: {built.stderr.strip().splitlines()[-1]}")
    chain = ctypes.CDLL(str(library)).stream_ahead_chain
    chain.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                      ctypes.c_void_p]
    chain.restype = ctypes.c_int
    return chain


def layer_errors(weights: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Each layer's output against PyTorch's product of the same input (the kernel's own output of the layer
    before, so errors do not compound): relative norm of the difference; fp16 rounding of the output alone
    allows 2⁻¹¹ ≈ 4.9e-4."""
    errors = []
    for layer, w in enumerate(weights):
        expected = (w.float() @ ys[layer].float()).half().float()
        errors.append((ys[layer + 1].float() - expected).norm() / expected.norm())
    return torch.stack(errors)


def events_us(fn, calls: int = 20) -> float:
    """Median µs of one call of fn over several rounds of back-to-back calls (CUDA events)."""
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="4096x32,2048x64,512x240", help="hidden×layers, comma-separated")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    chain = build()
    name = latency.device_name("cuda")
    bandwidth = latency.copy_bandwidth()
    print(f"{name}: copy {bandwidth / 1e9:.0f} GB/s; float16, µs per layer")
    print(f"{'hidden × layers':<18}{'stream (ring 4)':>17}{'stream (deep)':>15}{'triton':>9}{'cublas':>9}"
          f"{'floor':>8}{'stream/floor':>14}{'triton/stream':>15}{'max error':>11}")
    rows = []
    for case in args.cases.split(","):
        hidden, layers = (int(v) for v in case.split("x"))
        generator = torch.Generator(device="cuda").manual_seed(hidden + layers)
        weights = (torch.randn(layers, hidden, hidden, device="cuda", generator=generator) / hidden ** 0.5).half()
        ys = torch.zeros(layers + 1, hidden, device="cuda", dtype=torch.float16)
        ys[0] = torch.randn(hidden, device="cuda", generator=generator).half()
        ready = torch.zeros(layers + 1, device="cuda", dtype=torch.int32)
        stream = torch.cuda.current_stream().cuda_stream
        row = {"hidden": hidden, "layers": layers, "MB": weights.numel() * 2 / 1e6}
        errors = []
        for label, stages in zip(("stream_ring4_us", "stream_deep_us"), STAGES[hidden]):
            def run(stages=stages):
                code = chain(weights.data_ptr(), ys.data_ptr(), ready.data_ptr(), layers, hidden, stages, stream)
                if code:
                    raise SystemExit(f"stream_ahead: launch failed with code {code} ({hidden}, ring {stages})")
            ys[1:].zero_()
            run()
            torch.cuda.synchronize()
            errors.append(float(layer_errors(weights, ys).max()))
            row[label] = events_us(run) / layers
        out = torch.empty_like(ys)
        row["triton_us"] = 1e3 * latency.graph_ms(
            lambda: [gemv(weights[i], ys[i], out[i + 1]) for i in range(layers)], calls=1) / layers
        row["cublas_us"] = 1e3 * latency.graph_ms(
            lambda: [torch.mv(weights[i], ys[i], out=out[i + 1]) for i in range(layers)], calls=1) / layers
        row["floor_us"] = hidden * hidden * 2 / bandwidth * 1e6
        row["max_relative_error"] = max(errors)
        best = min(row["stream_ring4_us"], row["stream_deep_us"])
        print(f"{f'{hidden} × {layers}':<18}{row['stream_ring4_us']:>17.2f}{row['stream_deep_us']:>15.2f}"
              f"{row['triton_us']:>9.2f}{row['cublas_us']:>9.2f}{row['floor_us']:>8.2f}"
              f"{best / row['floor_us']:>13.2f}×{row['triton_us'] / best:>14.2f}×{max(errors):>11.1e}", flush=True)
        if max(errors) > 1e-3:
            print(f"  the persistent chain disagrees with PyTorch's ({max(errors):.1e}): its times do not count")
        rows.append(row)
        weights = ys = out = None
        torch.cuda.empty_cache()
    write_results({"device_name": name, "dtype": "float16", "copy_bandwidth": bandwidth, "rows": rows}, args.out,
                  "stream-ahead", name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
