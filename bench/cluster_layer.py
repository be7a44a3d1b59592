"""A SmolLM2-shaped layer's products in one thread-block cluster, chained over every layer in one launch, against
the engine's launch per product (GPU with nvcc; issue 18's small-model question).

    python bench/cluster_layer.py [--layers 30] [--clusters 8,16] [--stages 6,8] [--ahead 0,1,2,4] [--out PATH]

bench/stream_ahead measured that a hand-over between products through global memory over the whole GPU costs
~2 µs on an H200, more than a PDL launch in a CUDA graph. A SmolLM2 layer's products are small (7 MB of fp16
weights, 1.7 µs at the copy's bandwidth), so its decode step is bound by those hand-overs: the engine's dense step
runs at 7.5× its floor. bench/cluster_layer.cu keeps the whole chain inside one cluster of 8 or 16 blocks, which
hand over through distributed shared memory and mbarriers (release/acquire at cluster scope), and streams the
weights through a ring of bulk copies, optionally asking L2 for layer l + ahead's rows while it works on layer l.
Per layer, with r the residual stream (every block keeps a copy and makes the norms itself):

    a = RMSNorm(r)·w1; qkv = W_qkv a; o = W_o qkv[:576] (attention's stand-in); r += o;
    a = RMSNorm(r)·w2; h = silu(W_g a)·(W_u a); r += W_down h

Timed, µs per layer (ratios within one run):
- `cluster C, ring R, ahead A`: the one launch, C blocks, R ring slots of 24 KB, L2 prefetch A layers ahead (0: none);
- `engine`: the same layer as the engine's Triton GEMVs run it at this shape (the norms folded into the qkv and
  gate/up GEMVs, SwiGLU in the gate/up GEMV): four launches a layer in a CUDA graph with PDL;
- `floor`: the layer's weight bytes at the device's copy bandwidth.
Rank 0's stage times (globaltimer at each product's end and each hand-over's end; mean over layers 1…) say where a
cluster layer goes, and the same launch with the consumers only handing each ring slot back (no sums, no
hand-overs) says what the weights' stream alone takes: whether a block's bulk-copy ring or its sums set the pace.
Each layer's residual is checked against PyTorch's float32 chain (≤ 1e-4 relative).
Prints a table and writes bench/results/cluster-layer-<device>.json.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from rana_core.decode import latency  # noqa: E402
from rana_core.decode.gemv import gemv  # noqa: E402

from cuda_library import compile_library, events_us  # noqa: E402
from shown_path import write_results  # noqa: E402

HIDDEN, QKV, INTER = 576, 960, 1536
STAGES = ("qkv product", "qkv hand-over", "o product", "o hand-over", "gate/up product", "h hand-over",
          "down product", "down hand-over")
EPS = 1e-5


def build():
    chain = compile_library(Path(__file__).with_suffix(".cu")).cluster_layer_chain
    chain.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int] * 5 + [ctypes.c_void_p] * 2
    chain.restype = ctypes.c_int
    return chain


def weights(layers: int, seed: int = 0) -> dict:
    """Random fp16 weights of the shape (rows scaled by 1/√K so activations stay O(1)); gate/up interleaved
    (row 2j gate j, row 2j + 1 up j) as the kernel reads them."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def matrix(rows, k):
        return (torch.randn(layers, rows, k, device="cuda", generator=g) / k ** 0.5).half()
    return {"qkv": matrix(QKV, HIDDEN), "o": matrix(HIDDEN, HIDDEN), "gate_up": matrix(2 * INTER, HIDDEN),
            "down": matrix(HIDDEN, INTER),
            "norms": (1 + 0.1 * torch.randn(layers, 2, HIDDEN, device="cuda", generator=g)).half(),
            "x0": torch.randn(HIDDEN, device="cuda", generator=g).half()}


def rmsnorm(r: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return r * torch.rsqrt(r.pow(2).mean() + EPS) * weight.float()


def reference(w: dict) -> torch.Tensor:
    """The residual after each layer, in float32 from the fp16 weights."""
    r, out = w["x0"].float(), []
    for layer in range(len(w["qkv"])):
        qkv = w["qkv"][layer].float() @ rmsnorm(r, w["norms"][layer, 0])
        r = r + w["o"][layer].float() @ qkv[:HIDDEN]
        gate_up = w["gate_up"][layer].float() @ rmsnorm(r, w["norms"][layer, 1])
        h = F.silu(gate_up[0::2]) * gate_up[1::2]
        r = r + w["down"][layer].float() @ h
        out.append(r)
    return torch.stack(out)


def engine_chain(w: dict):
    """The layer as the engine's launches make it at this shape; a function that runs every layer."""
    layers = len(w["qkv"])
    gate_up = torch.cat([w["gate_up"][:, 0::2], w["gate_up"][:, 1::2]], dim=1).contiguous()  # [gate; up]
    residuals = torch.zeros(2 * layers + 1, HIDDEN, device="cuda", dtype=torch.float16)
    residuals[0] = w["x0"]
    qkv = torch.empty(QKV, device="cuda", dtype=torch.float16)
    o, down = (torch.zeros(HIDDEN, device="cuda", dtype=torch.float16) for _ in range(2))
    h = torch.empty(INTER, device="cuda", dtype=torch.float16)

    def run():
        for layer in range(layers):
            gemv(w["qkv"][layer], residuals[2 * layer], qkv,
                 norm=(down, w["norms"][layer, 0], EPS, residuals[2 * layer + 1]))
            gemv(w["o"][layer], qkv[:HIDDEN], o)
            gemv(gate_up[layer], residuals[2 * layer + 1], h, swiglu=True,
                 norm=(o, w["norms"][layer, 1], EPS, residuals[2 * layer + 2]))
            gemv(w["down"][layer], h, down)
    return run


def stage_means(stamps: torch.Tensor) -> dict:
    """Rank 0's stamps (layers × 9: layer start, then each stage's end) → mean µs of each stage, layers 1…, and
    of a whole layer (start to next start)."""
    ns = stamps[1:].double()
    spans = {name: float((ns[:, i + 1] - ns[:, i]).mean()) / 1e3 for i, name in enumerate(STAGES)}
    spans["layer"] = float((ns[1:, 0] - ns[:-1, 0]).mean()) / 1e3
    return spans


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--clusters", default="8,16")
    parser.add_argument("--ahead", default="0,1,2,4")
    parser.add_argument("--stages", default="6,8", help="ring slots of 24 KB a block (6 or 8)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    chain = build()
    name = latency.device_name("cuda")
    bandwidth = latency.copy_bandwidth()
    w = weights(args.layers)
    expected = reference(w)
    layer_bytes = sum(w[k][0].numel() for k in ("qkv", "o", "gate_up", "down")) * 2
    floor_us = layer_bytes / bandwidth * 1e6
    engine_us = 1e3 * latency.graph_ms(engine_chain(w), calls=1) / args.layers
    print(f"{name}: copy {bandwidth / 1e9:.0f} GB/s; SmolLM2-shaped layer products, {layer_bytes / 1e6:.2f} MB "
          f"a layer, {args.layers} layers; µs per layer")
    print(f"engine (4 Triton launches a layer): {engine_us:.2f}   floor: {floor_us:.2f}")
    print(f"{'cluster':>8}{'ring':>6}{'ahead':>7}{'µs/layer':>10}{'engine/this':>13}{'this/floor':>12}"
          f"{'max error':>11}")
    stream = torch.cuda.current_stream().cuda_stream
    rows = []
    cases = [(int(c), int(st), int(a)) for c in args.clusters.split(",") for st in args.stages.split(",")
             for a in args.ahead.split(",")]
    for cluster, stages, ahead in cases:
        residuals = torch.zeros(args.layers, HIDDEN, device="cuda")
        stamps = torch.zeros(args.layers, 9, device="cuda", dtype=torch.int64)

        def run(stamps=None, cluster=cluster, stages=stages, ahead=ahead, residuals=residuals, ring_only=0):
            code = chain(*(w[k].data_ptr() for k in ("qkv", "o", "gate_up", "down", "norms", "x0")),
                         residuals.data_ptr(), args.layers, cluster, stages, ahead, ring_only,
                         None if stamps is None else stamps.data_ptr(), stream)
            if code:
                raise SystemExit(f"cluster_layer: launch failed with code {code} (cluster {cluster}, "
                                 f"ring {stages})")
        run(stamps)
        torch.cuda.synchronize()
        error = float(((residuals - expected).norm(dim=1) / expected.norm(dim=1)).max())
        us = events_us(run) / args.layers
        ring_us = events_us(lambda: run(ring_only=1)) / args.layers  # the weights' stream alone
        row = {"cluster": cluster, "stages": stages, "ahead": ahead, "us_per_layer": us,
               "max_relative_error": error,
               "stages_us": stage_means(stamps), "ring_only_us_per_layer": ring_us,
               "ring_only_gb_per_s_per_block": layer_bytes / cluster / ring_us / 1e3}
        rows.append(row)
        print(f"{cluster:>8}{stages:>6}{ahead:>7}{us:>10.2f}{engine_us / us:>12.2f}×{us / floor_us:>11.2f}×"
              f"{error:>11.1e}", flush=True)
        print("   rank 0, mean µs: " + ", ".join(f"{k} {v:.2f}" for k, v in row["stages_us"].items()))
        print(f"   the ring alone (no sums, no hand-overs): {ring_us:.2f} µs a layer, "
              f"{row['ring_only_gb_per_s_per_block']:.0f} GB/s a block")
        if error > 1e-4:
            print(f"   the cluster chain disagrees with PyTorch's ({error:.1e}): its time does not count")
    write_results({"device_name": name, "dtype": "float16", "copy_bandwidth": bandwidth, "layers": args.layers,
                   "layer_bytes": layer_bytes, "floor_us": floor_us, "engine_us": engine_us, "rows": rows},
                  args.out, "cluster-layer", name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
