"""Can a weight matrix be streamed into L2 on a second branch of the CUDA graph while the main branch waits on a
latency-bound chain, so that the GEMV after the join reads it faster? (GPU; the question before building it into
the engine.)

    python bench/branch_prefetch.py [--out PATH] [--chain N]

Each call reads one of enough copies of the matrix that none is in L2 from its last call (as a decode step reads
each layer's matrices once). Per call, inside one CUDA graph:

- `gemv`: the GEMV alone; `chain + gemv`: N tiny dependent kernels (what rotary, attention and the masked
  products' compactions look like to HBM: idle), then the GEMV;
- `chain ‖ lines + gemv`: a side stream forked before the chain asks L2 for the matrix, one
  `prefetch.global.L2::evict_last` per 128-byte line, and is joined before the GEMV;
- `chain ‖ loads + gemv`: the side stream reads the matrix with evict_last loads instead.

If the branch forms come out near `max(chain, gemv)` rather than `chain + gemv`, the engine can hide weight
reads behind its latency-bound stages. Prints a table and writes bench/results/branch-prefetch-<device>.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from rana_core.decode import latency  # noqa: E402
from rana_core.decode.gemv import gemv  # noqa: E402

from shown_path import write_results  # noqa: E402

SHAPES = (("o_proj 4096 x 4096", 4096, 4096), ("qkv B-factor 3441 x 4096", 3441, 4096),
          ("half of o_proj", 2048, 4096))
COLD_BYTES = 400e6  # copies enough to flush the 50 MB L2 many times over
PROGRAMS = 132  # one one-warp program per multiprocessor: the side branch leaves the main branch room


@triton.jit
def _prefetch_lines_kernel(base_ptr, nbytes, PROGRAMS: tl.constexpr):
    """Program p asks L2 for lines p·32 + lane, p·32 + lane + 32·PROGRAMS, … of the nbytes at base_ptr."""
    lane = tl.program_id(0) * 32 + tl.arange(0, 32)
    base = base_ptr.to(tl.pointer_type(tl.int8))
    for first in range(0, tl.cdiv(nbytes, 128), 32 * PROGRAMS):
        offset = (first + lane).to(tl.int64) * 128
        tl.inline_asm_elementwise("{ prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0; }", "=r,l",
                                  [base + tl.where(offset < nbytes, offset, 0)], dtype=tl.int32, is_pure=False,
                                  pack=1)


@triton.jit
def _prefetch_loads_kernel(base_ptr, sink_ptr, n, PROGRAMS: tl.constexpr, BLOCK: tl.constexpr):
    """Program p reads blocks p, p + PROGRAMS, … of the n elements at base_ptr (evict_last) and stores one sum,
    so the loads are not optimised away."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(tl.program_id(0) * BLOCK, n, PROGRAMS * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(base_ptr + offs, mask=offs < n, other=0.0, eviction_policy="evict_last").to(tl.float32)
    tl.store(sink_ptr + tl.program_id(0), tl.sum(acc, axis=0))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--chain", type=int, default=6, help="tiny dependent kernels on the main branch")
    args = parser.parse_args(argv)
    name = latency.device_name("cuda")
    side = torch.cuda.Stream()
    tiny = torch.zeros(1, device="cuda")
    sink = torch.empty(PROGRAMS, device="cuda")

    def chain():
        for _ in range(args.chain):
            tiny.add_(1.0)

    def branch(weight, prefetch):
        main_stream = torch.cuda.current_stream()
        side.wait_stream(main_stream)
        with torch.cuda.stream(side):
            prefetch(weight)
        chain()
        main_stream.wait_stream(side)

    def lines(weight):
        _prefetch_lines_kernel[(PROGRAMS,)](weight, weight.numel() * weight.element_size(), PROGRAMS=PROGRAMS,
                                            num_warps=1)

    def loads(weight):
        _prefetch_loads_kernel[(PROGRAMS,)](weight, sink, weight.numel(), PROGRAMS=PROGRAMS, BLOCK=2048,
                                            num_warps=4)

    rows = []
    print(f"{name}, float16, chain of {args.chain} tiny kernels: µs per call in CUDA graphs, cold copies")
    header = ("gemv", "chain", "chain + gemv", "chain ‖ lines + gemv", "chain ‖ loads + gemv", "warm gemv")
    print(f"{'matrix':<26}" + "".join(f"{h:>22}" for h in header))
    for label, N, K in SHAPES:
        copies = max(2, int(COLD_BYTES // (N * K * 2)))
        weights = [torch.randn(N, K, device="cuda", dtype=torch.float16) for _ in range(copies)]
        x = torch.randn(K, device="cuda", dtype=torch.float16)
        out = torch.empty(N, device="cuda", dtype=torch.float16)
        variants = {
            "gemv": lambda: [gemv(w, x, out) for w in weights],
            "chain": lambda: [chain() for _ in weights],
            "chain + gemv": lambda: [(chain(), gemv(w, x, out)) for w in weights],
            "chain ‖ lines + gemv": lambda: [(branch(w, lines), gemv(w, x, out)) for w in weights],
            "chain ‖ loads + gemv": lambda: [(branch(w, loads), gemv(w, x, out)) for w in weights],
            "warm gemv": lambda: [gemv(weights[0], x, out) for _ in weights],
        }
        row = {"matrix": label, "N": N, "K": K, "MB": N * K * 2 / 1e6, "chain_kernels": args.chain}
        for key, fn in variants.items():
            row[key] = 1e3 * latency.graph_ms(fn, calls=2) / copies
        rows.append(row)
        print(f"{label:<26}" + "".join(f"{row[h]:>22.1f}" for h in header), flush=True)
        weights = None
        torch.cuda.empty_cache()
    write_results({"device_name": name, "rows": rows}, args.out, "branch-prefetch", name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
