"""Decoding B sequences at once (GPU): dense and RaNA, batch 1, 4 and 8, in one process.

    python bench/batch_decode.py [--models llama2-7b-shape,smollm2-135m-shape] [--cuts 0,0.44] [--batches 1,4,8]

Each (model, cut): the synthetic engine (rana_core.decode.engine, random weights, thresholds calibrated), then
for each batch size a BatchDecoder (rana_core.decode.batch_step: one CUDA graph per step, B sequences with
prompts of `context` tokens, each masked product reading the union of the B tokens' masks) timed over
`new-tokens` replayed steps, its dense products on cuBLAS and on batch_gemv's Triton kernel, its masked products
over the union of the masks or dense over masked coefficients (--masked); beside it the
batch-1 engine's own step (fused kernels, one graph). Reports median
ms per step, tokens per second and RaNA's speed against dense at the same batch. Prints a table, writes
bench/results/batch-decode-<device>.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from rana_core.decode.batch_step import BatchDecoder  # noqa: E402
from rana_core.decode.engine import SHAPES, DecodeEngine  # noqa: E402
from rana_core.decode.latency import DTYPES  # noqa: E402

from shown_path import write_results  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="llama2-7b-shape,smollm2-135m-shape")
    parser.add_argument("--cuts", default="0,0.44")
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--products", default="cublas,triton",
                        help="the batched step's dense products: cuBLAS, or batch_gemv's Triton kernel")
    parser.add_argument("--masked", default="union,dense", help="BatchDecoder's masked products, for cuts > 0")
    parser.add_argument("--context", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    name = torch.cuda.get_device_name()
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    print(f"{name}, {args.dtype}, context {args.context}, median of {args.new_tokens} graph-replayed steps")
    print(f"{'model':<20}{'cut':>5}{'engine':>25}{'B':>3}{'ms/step':>9}{'tokens/s':>10}{'vs dense':>9}")
    for model in args.models.split(","):
        dense_ms: dict[tuple, float] = {}
        for cut in [float(c) for c in args.cuts.split(",")]:
            engine = DecodeEngine(SHAPES[model], DTYPES[args.dtype], "cuda", flop_reduction=cut, gemv="triton")
            engine.calibrate()
            max_seq = args.context + args.new_tokens + 16
            generator = torch.Generator().manual_seed(0)
            runs = [("batch-1 engine", "batch-1 engine", 1,
                     lambda engine=engine: engine.time_decode(args.context, args.new_tokens))]
            masked_kinds = args.masked.split(",") if cut > 0 else ["union"]
            for products, masked, batch in [(p, m, b) for p in args.products.split(",") for m in masked_kinds
                                            for b in batches]:
                def timed(batch=batch, engine=engine, products=products, masked=masked):
                    decoder = BatchDecoder(engine, batch, max_seq, products=products, masked=masked)
                    decoder.prefill([torch.randint(0, engine.shape.vocab, (args.context,), generator=generator)
                                     .cuda() for _ in range(batch)])
                    return decoder.time_decode(args.new_tokens)
                label = f"batched, {products}" + (f", {masked}" if cut > 0 else "")
                runs.append((label, f"batched, {products}", batch, timed))
            for label, dense_label, batch, run in runs:
                ms = statistics.median(run())
                if cut == 0:
                    dense_ms[(dense_label, batch)] = ms
                versus = dense_ms[(dense_label, batch)] / ms if (dense_label, batch) in dense_ms else float("nan")
                rows.append({"model": model, "cut": cut, "engine": label, "batch": batch, "ms_per_step": ms,
                             "tokens_per_s": batch / ms * 1e3, "speedup_vs_dense": versus})
                print(f"{model:<20}{cut:>5.2f}{label:>25}{batch:>3}{ms:>9.3f}{batch / ms * 1e3:>10.0f}"
                      f"{versus:>8.2f}x", flush=True)
            del engine
            torch.cuda.empty_cache()
    write_results({"device_name": name, "dtype": args.dtype, "context": args.context, "new_tokens": args.new_tokens,
                   "rows": rows}, args.out, "batch-decode", name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
