"""RaNA's masked MLP after B, design against design (GPU): the list design's chain (rank compaction, gate/up gather,
down's compaction, down's gather, reduction), the same in two branches (the engine's default), and the one-launch
design by blocks of neurons (rana_core/decode/mlp_blocks.py) in the configurations given.

    python bench/mlp_blocks.py [--densities 0.35:0.5,0.2:0.3,0.5:0.7,0:0]
                               [--blocks 64-64-128-2-4-2-0/64-64-128-2-4-2-1] [--out PATH]

Llama-2-7B's MLP at a 44% cut (bench/masked_designs.py's ranks): gate's and up's A-parts of 3,082 ranks each
(→ 11,008 neurons) and down (11,008 neurons → 4,096, with its column norms), fp16; a density pair is
(ranks kept : neurons kept). Rank coefficients fall off with the rank, as a trained adapter's do. Each call reads
the next of two copies of the weights (226 MB each, beyond the 50 MB L2), adds the residual and leaves the sums of
squares for the next norm, as the engine's MLP does; 40 calls are captured in one CUDA graph and replayed. Prints
µs a call and the active weights' bytes over that time, and writes bench/results/mlp-blocks-<device>.json.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from rana_core.decode import latency  # noqa: E402
from rana_core.decode.parts import swiglu_chain  # noqa: E402

from shown_path import write_results  # noqa: E402

K, M, D = 3082, 11008, 4096
COPIES = 2


def quantile_threshold(score: torch.Tensor, density: float) -> torch.Tensor:
    if density <= 0:
        return torch.tensor([float("inf")], device=score.device)
    if density >= 1:
        return torch.zeros(1, device=score.device)
    return torch.quantile(score.float(), 1 - density).reshape(1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--densities", default="0.35:0.5,0.2:0.3,0.5:0.7,0:0")
    parser.add_argument("--blocks", default="64-64-128-2-4-2-0/64-64-128-2-4-2-1")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    name, dtype = torch.cuda.get_device_name(), torch.float16
    g = torch.Generator(device="cuda").manual_seed(0)
    gate_up = [torch.randn(2 * K, M, device="cuda", dtype=dtype, generator=g) / K ** 0.5 for _ in range(COPIES)]
    downs = [torch.randn(M, D, device="cuda", dtype=dtype, generator=g) / M ** 0.5 for _ in range(COPIES)]
    decay = torch.exp(-3 * torch.arange(K, device="cuda") / K).repeat(2)
    z = (torch.randn(2 * K, device="cuda", generator=g) * decay).to(dtype)
    norms = downs[0].float().norm(dim=1)
    r = torch.randn(D, device="cuda", generator=g).to(dtype)
    out = torch.empty(D, device="cuda", dtype=dtype)
    h = torch.empty(M, device="cuda", dtype=dtype)
    designs = {"chain": {"RANA_MLP_BRANCHES": "1", "RANA_MLP_BLOCKS": "0"},
               "2 branches": {"RANA_MLP_BRANCHES": "2", "RANA_MLP_BLOCKS": "0"}}
    designs.update({f"blocks {c}": {"RANA_MLP_BLOCKS": c} for c in args.blocks.split("/") if c})
    print(f"{name}, fp16, µs per MLP after B (active weights' TB/s); K {K} ranks a group, {M} neurons, {D} outputs")
    for i, design in enumerate(designs):
        print(f"  design {i}: {design}")
    print(f"{'ranks:neurons':<14}" + "".join(f"{i:>16}" for i in range(len(designs))))
    rows = []
    for pair in args.densities.split(","):
        rank_density, neuron_density = (float(v) for v in pair.split(":"))
        score = z.float().abs().view(2, K)
        threshold = torch.cat([quantile_threshold(score[0], rank_density), quantile_threshold(score[1], rank_density)])
        gate = (z[:K].float() * (score[0] >= threshold[0])) @ gate_up[0][:K].float()
        upv = (z[K:].float() * (score[1] >= threshold[1])) @ gate_up[0][K:].float()
        hv = (torch.nn.functional.silu(gate.to(dtype).float()).to(dtype).float() * upv.to(dtype).float()).to(dtype)
        down_threshold = quantile_threshold(hv.float().abs() * norms, neuron_density)
        active = (float((score >= threshold[:, None]).sum()) * M +
                  float((hv.float().abs() * norms >= down_threshold).sum()) * D) * 2
        row = {"rank_density": rank_density, "neuron_density": neuron_density, "active_bytes": active}
        line = f"{pair:<14}"
        for design, env in designs.items():
            os.environ.update(env)
            parts = [SimpleNamespace(rows=d, threshold=down_threshold, scale=norms, out=out) for d in downs]
            calls = iter(range(10**9))

            def call():
                i = next(calls) % COPIES
                swiglu_chain(gate_up[i], z, threshold, parts[i], h, residual=(r, out))

            us = 1e3 * latency.graph_ms(call, calls=40)
            row[design] = us
            line += f"{us:>8.1f} ({active / us / 1e6:4.2f})"
        print(line, flush=True)
        rows.append(row)
    write_results({"device_name": name, "dtype": "float16", "K": K, "M": M, "D": D, "designs": designs,
                   "rows": rows}, args.out, "mlp-blocks", name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
