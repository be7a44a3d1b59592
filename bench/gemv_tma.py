"""Does a GEMV that streams its weights through the tensor memory accelerator (TMA) beat the engine's? (GPU)

    python bench/gemv_tma.py [--dtype float16] [--out PATH]

Why: Llama-2-7B's dense step moves its weights at 0.87 of the copy bandwidth on an H200 (docs/latency.md,
session 11), and issue 18 asks for 1.15× the bandwidth floor, i.e. GEMVs at ~0.93 of it. The engine's GEMV
(rana_core.decode.gemv.gemv) loads each weight tile with per-thread loads; here each program's row block
comes in as TMA copies of BLOCK_N × BLOCK_K boxes into shared memory, NUM_STAGES of them in flight (Triton's
pipeliner over `tl.range`), so the loads cost no registers or address arithmetic. At the 7B decode shapes of
bench/gemv_configs.py, each call reading the next of ≥ 64 MB of weight copies (no L2 reuse), calls captured in a
CUDA graph (rana_core.decode.latency.graph_ms): the engine's GEMV at its default configuration and at the best of
a small sweep, and the TMA GEMV at the best of its sweep, in µs and TB/s. Prints a table and writes
bench/results/gemv-tma-<device>.json.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from rana_core.decode import latency  # noqa: E402
from rana_core.decode.gemv import gemv, gemv_config  # noqa: E402
from rana_core.decode.launch import triton  # noqa: E402

from gemv_configs import SHAPES  # noqa: E402  (bench/ is the script's folder)
from shown_path import write_results  # noqa: E402

L2_BYTES = 64 * 2**20  # more than the H100's and H200's 50 MB L2
CALLS = 20
ENGINE_SWEEP = [dict(BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=s)
                for n, k, w, s in itertools.product((2, 4, 8), (512, 1024), (4, 8), (2, 4))]
TMA_SWEEP = list(itertools.product((2, 4, 8, 16), (128, 256), (3, 4, 6), (4,)))  # BLOCK_N, BLOCK_K, stages, warps

if triton is not None:
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor

    @triton.jit
    def _gemv_tma_kernel(w_desc, x_ptr, out_ptr, N, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         NUM_STAGES: tl.constexpr):
        """Rows pid·BLOCK_N… of W x: the row block's BLOCK_K-wide boxes by TMA (rows and columns past the matrix
        come in as zeros), multiplied by x's chunk, summed once at the end."""
        pid = tl.program_id(0)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
            w = w_desc.load([pid * BLOCK_N, k0])
            offs = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs, mask=offs < K, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(out_ptr + rows, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=rows < N)


def tma_descriptor(weight: torch.Tensor, block_n: int, block_k: int):
    """The weight's TMA descriptor for BLOCK_N × BLOCK_K boxes (made once per weight and shape: a graph replays
    the launch with it). TMA needs rows 16-byte aligned and boxes of at most 256 per side."""
    if weight.stride(1) != 1 or (weight.stride(0) * weight.element_size()) % 16 or max(block_n, block_k) > 256:
        raise ValueError(f"weight {tuple(weight.shape)} with boxes {block_n}×{block_k} cannot be read by TMA")
    return TensorDescriptor.from_tensor(weight, [block_n, block_k])


def gemv_tma(descriptor, weight: torch.Tensor, x: torch.Tensor, out: torch.Tensor, block_n: int, block_k: int,
             stages: int, warps: int) -> torch.Tensor:
    """out ← weight @ x for one token through `descriptor` (tma_descriptor of weight)."""
    N, K = weight.shape
    _gemv_tma_kernel[(triton.cdiv(N, block_n),)](descriptor, x, out, N, K=K, BLOCK_N=block_n, BLOCK_K=block_k,
                                                 NUM_STAGES=stages, num_warps=warps)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float16", choices=sorted(latency.DTYPES))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/gemv_tma.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    dtype, name = latency.DTYPES[args.dtype], latency.device_name("cuda")
    bandwidth = latency.copy_bandwidth("cuda")
    print(f"{name}, {args.dtype}: copy {bandwidth / 1e12:.2f} TB/s (read + written); µs per call (weight TB/s)")
    print(f"{'shape':<19}{'N x K':>13}{'engine default':>21}{'engine best':>21}{'TMA best':>21}  TMA config")
    rows = []
    for label, (N, K) in SHAPES.items():
        nbytes = N * K * torch.finfo(dtype).bits // 8
        count = max(3, -(-L2_BYTES // nbytes))
        weights = [torch.randn(N, K, device="cuda", dtype=dtype) / K ** 0.5 for _ in range(count)]
        x = torch.randn(K, device="cuda", dtype=dtype)
        out = torch.empty(N, device="cuda", dtype=dtype)
        expected = (weights[0].float() @ x.float())
        calls = itertools.count()

        def timed(call) -> float:
            return 1e3 * latency.graph_ms(lambda: call(weights[next(calls) % count]), calls=CALLS)

        default_config = gemv_config(K)
        engine = {str(c): timed(lambda w, c=c: gemv(w, x, out, config=c)) for c in [default_config] + ENGINE_SWEEP}
        tma = {}
        for block_n, block_k, stages, warps in TMA_SWEEP:
            descriptors = {w.data_ptr(): tma_descriptor(w, block_n, block_k) for w in weights}
            gemv_tma(descriptors[weights[0].data_ptr()], weights[0], x, out, block_n, block_k, stages, warps)
            error = float((out.float() - expected).norm() / expected.norm())
            if error > 1e-2:
                raise AssertionError(f"TMA GEMV {label} {block_n},{block_k},{stages},{warps}: relative error {error}")
            tma[(block_n, block_k, stages, warps)] = timed(
                lambda w, b=(block_n, block_k, stages, warps), d=descriptors: gemv_tma(d[w.data_ptr()], w, x, out, *b))
        default = engine[str(default_config)]
        best_engine = min(engine, key=engine.get)
        best_tma = min(tma, key=tma.get)

        def cell(us: float) -> str:
            return f"{us:>10.1f} ({nbytes / us / 1e6:4.2f})"

        print(f"{label:<19}{f'{N}x{K}':>13}{cell(default):>21}{cell(engine[best_engine]):>21}"
              f"{cell(tma[best_tma]):>21}  {best_tma}", flush=True)
        rows.append({"shape": label, "N": N, "K": K, "bytes": nbytes, "engine_default_us": default,
                     "engine_best_us": engine[best_engine], "engine_best_config": best_engine,
                     "tma_best_us": tma[best_tma], "tma_best_config": list(best_tma),
                     "tma_all_us": {",".join(map(str, k)): v for k, v in tma.items()}})
        weights = None
        torch.cuda.empty_cache()
    write_results({"device_name": name, "dtype": args.dtype, "copy_bytes_per_s": bandwidth, "rows": rows},
                  args.out, "gemv-tma", name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
