"""Which error weight should hybrid use by default? Measured on calibration text only (the training split).

    python bench/hybrid_weights.py [--model smollm2-135m] [--budgets 0.2,0.3,0.44,0.5]
                                   [--allocations exact-loss,exact-output,exact-loss:nocheck,…]

Builds the hybrid model exactly as bench/quality.py does (the same calibration and threshold windows, so the
curve cache is shared), then measures its perplexity on validation windows of the *training* split that neither
built the curves nor set the thresholds. The held-out split is never read. Writes
bench/results/hybrid-weights-<model>.json and prints a table. An allocation with ":nocheck" skips the method's
calibration check (only the allocation under the measured loss model is built).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from db.session import data_dir
from rana_core.adapters.base import installed_meters, module_shapes, unload
from rana_core.config import CompressConfig
from rana_core.corpus import token_windows
from rana_core.errors import RanaError
from rana_core.evaluate import perplexity
from rana_core.flops import dense_profile
from rana_core.loading import load_model
from rana_core.methods import hybrid
from rana_core.pipeline import _layer_results, adapt

from shown_path import shown  # noqa: E402  (bench/ is the script's folder)

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_FACTORS = hybrid.CHECK_FACTORS


def validation_windows(tokenizer, used: torch.Tensor, tokens: int, seq_len: int) -> torch.Tensor:
    """Training-split windows none of which is among `used` (evenly spaced on another grid)."""
    candidates = token_windows(tokenizer, "train", 3 * used.shape[0] * seq_len, seq_len)
    seen = {tuple(w.tolist()) for w in used}
    fresh = [w for w in candidates if tuple(w.tolist()) not in seen]
    count = max(1, tokens // seq_len)
    return torch.stack(fresh[:: max(1, len(fresh) // count)][:count])  # spread over the split, like the others


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--budgets", default="0.2,0.3,0.44,0.5")
    parser.add_argument("--allocations", default="exact-loss,exact-output,exact-loss:nocheck,exact-output:nocheck")
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--validation-tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args(argv)
    try:
        loaded = load_model(args.model)
    except RanaError as exc:
        print(f"bench/hybrid_weights.py: {exc}", file=sys.stderr)
        return 2
    train = token_windows(loaded.tokenizer, "train", 2 * args.calib_tokens, args.seq_len)  # as compress() cuts it
    calib, threshold_windows = train[0::2], train[1::2]
    validation = validation_windows(loaded.tokenizer, train, args.validation_tokens, args.seq_len)
    dense = perplexity(loaded.model, validation).perplexity
    print(f"dense validation perplexity {dense:.2f} on {validation.numel()} training-split tokens", flush=True)
    shapes = module_shapes(loaded.layers)
    profile = dense_profile(loaded.config, shapes, args.seq_len)
    rows = []
    for budget in [float(b) for b in args.budgets.split(",")]:
        for variant in args.allocations.split(","):
            allocation, _, option = variant.partition(":")
            hybrid.CHECK_FACTORS = () if option == "nocheck" else DEFAULT_FACTORS
            config = CompressConfig(model=args.model, method="hybrid", allocation=allocation, flop_reduction=budget,
                                    calib_tokens=args.calib_tokens, seq_len=args.seq_len, track_layers=False)
            t0 = time.perf_counter()
            try:
                adapt(loaded, config, calib, threshold_windows, lambda f, m: None, lambda f, m: None,
                      data_dir() / "curves")
                for meter in installed_meters(loaded.layers).values():
                    meter.reset()
                result = perplexity(loaded.model, validation)
                layer_rows = _layer_results(shapes, installed_meters(loaded.layers))
            finally:
                unload(loaded.layers)
            measured, _ = profile.reductions({(r.layer, r.module): r.flops_per_token for r in layer_rows}, 0.0)
            rows.append({"allocation": variant, "target": budget, "validation_perplexity": result.perplexity,
                         "validation_nll": result.mean_nll, "measured_flop_reduction": measured,
                         "seconds": time.perf_counter() - t0})
            print(f"{variant:<22}{budget:>6.2f}{measured:>8.3f}{result.perplexity:>10.2f}", flush=True)
            out = RESULTS / f"hybrid-weights-{args.model}.json"
            out.write_text(json.dumps({"model": args.model, "dense_validation_perplexity": dense,
                                       "validation_tokens": validation.numel(), "rows": rows}, indent=2))
    print(f"wrote {shown(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
