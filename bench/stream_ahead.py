"""Weights streamed ahead of the activations: a chain of dependent GEMVs in one persistent CUDA launch against the
engine's launch-per-product chain (GPU with nvcc; the question before a decode megakernel, issue 18).

    python bench/stream_ahead.py [--cases 4096x32,2048x64,512x240] [--masked-cases 4096x3072x32,512x384x240]
                                 [--density 0.35] [--out PATH]

A decode step is a chain of products, each waiting for the one before; the engine runs each as its own launch
(Triton GEMVs in a CUDA graph with programmatic dependent launch), so every product starts its weight reads only
when its launch begins. bench/stream_ahead.cu runs the whole chain y_{l+1} = W_l y_l in one launch: a producer
warp per block bulk-copies the block's rows of the next layers into a shared-memory ring while its consumer warps
wait for the previous layer's output through a counter in global memory. Each case (hidden × layers: 4,096 as
Llama-2-7B's o_proj, 2,048 as a 1B model's, 512 as SmolLM2's small products, with enough layers that the weights
do not fit in L2) is timed, in µs per layer, as:

- `stream`: the persistent launch (ring of 4 slots, and a deeper one), launched back to back;
- `triton`: the engine's GEMV (rana_core.decode.gemv.gemv), one launch a layer, in a CUDA graph;
- `cublas`: torch.mv, one launch a layer, in a CUDA graph;
- `floor`: the weights' bytes at the device's copy bandwidth.

Then the same for a chain of RaNA rank adapters (`--masked-cases`, hidden × rank × layers; `--density` of the ranks
active): z = B_l y_l streamed ahead as above, then y_{l+1} from the active ranks' rows of A_l, each block listing
the active ranks itself from the published z (no compaction launch) and reading its columns of their rows;
against the engine's GEMV and `masked_rows_gemv` (compaction, gather, reduction), one set of launches a layer.

Block 0's stage times (its wait for the layer's input, its rows, and for the rank chain the wait for z, the list
and the gather; the GPU's timer at each boundary) are printed under each case, median µs a layer.

Every layer the persistent launch computes is checked against PyTorch's product of the same input (fp32 sums
rounded to fp16: within 1e-3 of it, the rounding alone allows 4.9e-4).
Prints a table and writes bench/results/stream-ahead-<device>.json.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from rana_core.decode import latency  # noqa: E402
from rana_core.decode.gemv import gemv  # noqa: E402
from rana_core.decode.masked_kernels import masked_rows_gemv  # noqa: E402

from cuda_library import compile_library, events_us  # noqa: E402
from shown_path import write_results  # noqa: E402

SOURCE = Path(__file__).with_suffix(".cu")
STAGES = {4096: (4, 6), 2048: (4, 8), 512: (4, 16)}  # the ring depths stream_ahead_chain is built for


def build():
    """stream_ahead.cu built for sm_90a; its two entry points."""
    loaded = compile_library(SOURCE)
    chain, masked = loaded.stream_ahead_chain, loaded.stream_ahead_masked
    chain.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 3 + [ctypes.c_void_p] * 2
    masked.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int] * 3 + [ctypes.c_void_p] * 2
    chain.restype = masked.restype = ctypes.c_int
    return chain, masked


def layer_errors(weights: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Each layer's output against PyTorch's product of the same input (the kernel's own output of the layer
    before, so errors do not compound): relative norm of the difference; fp16 rounding of the output alone
    allows 2⁻¹¹ ≈ 4.9e-4."""
    errors = []
    for layer, w in enumerate(weights):
        expected = (w.float() @ ys[layer].float()).half().float()
        errors.append((ys[layer + 1].float() - expected).norm() / expected.norm())
    return torch.stack(errors)


def rank_chain(hidden: int, rank: int, layers: int, density: float, seed: int):
    """B (layers, rank, hidden), A's rows (layers, rank, hidden), one threshold on |z| a layer and y_0, for a chain
    of rank adapters y_{l+1} = Σ_{|z_k| ≥ τ_l} z_k A_l[k] with z = B_l y_l: τ_l keeps `density` of the ranks of
    the chain's own z, and A_l is scaled so that y keeps the norm of y_0 (240 layers would drift out of fp16)."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    b = (torch.randn(layers, rank, hidden, device="cuda", generator=generator) / hidden ** 0.5).half()
    a = torch.randn(layers, rank, hidden, device="cuda", generator=generator).half()
    y = y0 = torch.randn(hidden, device="cuda", generator=generator).half()
    thresholds = torch.empty(layers, device="cuda")
    first = y.float().norm()
    for layer in range(layers):
        z = (b[layer].float() @ y.float()).half().float()
        thresholds[layer] = torch.quantile(z.abs(), 1.0 - density)
        active = z.abs() >= thresholds[layer]
        out = a[layer][active].float().T @ z[active]
        a[layer] = (a[layer].float() * (first / out.norm())).half()
        y = (a[layer][active].float().T @ z[active]).half()
    return b, a, thresholds, y0


def rank_chain_errors(b, a, thresholds, ys, zs) -> tuple[float, float, float]:
    """(worst z error, worst y error, mean active share) of each layer against PyTorch's product of the same
    inputs: z from the kernel's y_l; y_{l+1} from the kernel's own z_l and its mask (so a coefficient at the
    threshold, rounded the other way, cannot flip a rank between the two)."""
    z_errors, y_errors, shares = [], [], []
    for layer in range(len(b)):
        z = (b[layer].float() @ ys[layer].float()).half().float()
        z_errors.append(float((zs[layer].float() - z).norm() / z.norm()))
        active = zs[layer].float().abs() >= thresholds[layer]
        y = (a[layer][active].float().T @ zs[layer][active].float()).half().float()
        y_errors.append(float((ys[layer + 1].float() - y).norm() / y.norm()))
        shares.append(float(active.float().mean()))
    return max(z_errors), max(y_errors), sum(shares) / len(shares)


def masked_cases(masked, cases: str, density: float, bandwidth: float) -> list[dict]:
    """The rank-adapter chain: the persistent launch against the engine's launches a layer (its GEMV for z, then
    masked_rows_gemv: compaction, gather, reduction), in µs per layer; the floor is B's bytes plus the active
    rows' bytes of A."""
    print(f"\nrank-adapter chain, {density:.2f} of the ranks active: µs per layer")
    print(f"{'hidden × rank × layers':<26}{'stream':>9}{'engine':>9}{'floor':>8}{'stream/floor':>14}"
          f"{'engine/stream':>15}{'z error':>10}{'y error':>10}{'active':>8}")
    rows = []
    for case in cases.split(","):
        hidden, rank, layers = (int(v) for v in case.split("x"))
        b, a, thresholds, y0 = rank_chain(hidden, rank, layers, density, hidden + rank + layers)
        ys = torch.zeros(layers + 1, hidden, device="cuda", dtype=torch.float16)
        ys[0] = y0
        zs = torch.zeros(layers, rank, device="cuda", dtype=torch.float16)
        ready = torch.zeros(2 * layers + 1, device="cuda", dtype=torch.int32)
        stream = torch.cuda.current_stream().cuda_stream

        stamps = torch.zeros(layers, 6, device="cuda", dtype=torch.int64)

        def run(stamps=None):
            code = masked(b.data_ptr(), a.data_ptr(), thresholds.data_ptr(), ys.data_ptr(), zs.data_ptr(),
                          ready.data_ptr(), layers, hidden, rank, None if stamps is None else stamps.data_ptr(),
                          stream)
            if code:
                raise SystemExit(f"stream_ahead: masked launch failed with code {code} ({hidden} × {rank})")
        run(stamps=stamps)
        torch.cuda.synchronize()
        z_error, y_error, share = rank_chain_errors(b, a, thresholds, ys, zs)
        row = {"hidden": hidden, "rank": rank, "layers": layers, "active_share": share, "z_error": z_error,
               "y_error": y_error, "stream_us": events_us(run) / layers,
               "stream_stages": stage_times(stamps, ("wait for y", "z rows and publish", "wait for z", "list",
                                                     "gather and publish", "end"))}
        z_buffer = torch.empty(layers, rank, device="cuda", dtype=torch.float16)
        out = torch.empty_like(ys)
        limits = [thresholds[layer:layer + 1] for layer in range(layers)]

        def engine_chain():  # the kernel's own y_l as inputs: the same masks, so the same rows read
            for layer in range(layers):
                gemv(b[layer], ys[layer], z_buffer[layer])
                masked_rows_gemv(a[layer], z_buffer[layer], limits[layer], None, out=out[layer + 1])
        row["engine_us"] = 1e3 * latency.graph_ms(engine_chain, calls=1) / layers
        row["floor_us"] = (rank * hidden + share * rank * hidden) * 2 / bandwidth * 1e6
        print(f"{f'{hidden} × {rank} × {layers}':<26}{row['stream_us']:>9.2f}{row['engine_us']:>9.2f}"
              f"{row['floor_us']:>8.2f}{row['stream_us'] / row['floor_us']:>13.2f}×"
              f"{row['engine_us'] / row['stream_us']:>14.2f}×{z_error:>10.1e}{y_error:>10.1e}{share:>8.3f}",
              flush=True)
        print_stages(row["stream_stages"])
        if max(z_error, y_error) > 1e-3:
            print(f"  the persistent chain disagrees with PyTorch's ({max(z_error, y_error):.1e}): "
                  "its times do not count")
        rows.append(row)
        b = a = ys = zs = out = z_buffer = None
        torch.cuda.empty_cache()
    return rows


def stage_times(stamps: torch.Tensor, names: tuple[str, ...]) -> dict:
    """Block 0's stage boundaries (layers × stamps a layer, ns) → median µs of each stage a layer, layer 0 (no
    wait) left out; the stage after the last stamp runs to the next layer's first."""
    ns = stamps[1:].double()
    spans = {name: float((ns[:, i + 1] - ns[:, i]).median()) / 1e3 for i, name in enumerate(names[:-1])}
    spans["layer"] = float((ns[1:, 0] - ns[:-1, 0]).median()) / 1e3
    return spans


def print_stages(spans: dict) -> None:
    print("  block 0, median µs a layer: " + ", ".join(f"{name} {us:.2f}" for name, us in spans.items()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="4096x32,2048x64,512x240", help="hidden×layers, comma-separated")
    parser.add_argument("--masked-cases", default="4096x3072x32,512x384x240",
                        help="hidden×rank×layers of the rank-adapter chain (the shapes the .cu is built for)")
    parser.add_argument("--density", type=float, default=0.35, help="share of ranks active in each layer")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    chain, masked = build()
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
        stamps = torch.zeros(layers, 3, device="cuda", dtype=torch.int64)
        for label, stages in zip(("stream_ring4_us", "stream_deep_us"), STAGES[hidden]):
            def run(stages=stages, stamps=None):
                code = chain(weights.data_ptr(), ys.data_ptr(), ready.data_ptr(), layers, hidden, stages,
                             None if stamps is None else stamps.data_ptr(), stream)
                if code:
                    raise SystemExit(f"stream_ahead: launch failed with code {code} ({hidden}, ring {stages})")
            ys[1:].zero_()
            run(stamps=stamps)
            torch.cuda.synchronize()
            errors.append(float(layer_errors(weights, ys).max()))
            row[label] = events_us(run) / layers
            row[label.replace("_us", "_stages")] = stage_times(stamps, ("wait for x", "rows and publish", "end"))
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
        print_stages(row["stream_ring4_stages"])
        if max(errors) > 1e-3:
            print(f"  the persistent chain disagrees with PyTorch's ({max(errors):.1e}): its times do not count")
        rows.append(row)
        weights = ys = out = None
        torch.cuda.empty_cache()
    report = {"device_name": name, "dtype": "float16", "copy_bandwidth": bandwidth, "rows": rows}
    write_results(report, args.out, "stream-ahead", name)  # kept if the rank chain below hangs and is killed
    report["masked_rows"] = masked_cases(masked, args.masked_cases, args.density, bandwidth)
    write_results(report, args.out, "stream-ahead", name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
