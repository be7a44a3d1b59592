"""Why output bases are float64: the same basis computed in float32, on SmolLM2-135M's real calibration grams.

    python bench/basis_precision.py [--model smollm2-135m] [--layers 0,15,29] [--keep 0.5]

For the stacked QKV and the up projection of a few layers: the gram's condition number, the orthogonality error of
U (max |UᵀU − I|), and the rank plan at `--keep` (static rank, share of output energy kept on the calibration rows)
from the float64 basis (rana_core.decompose) and from the same algorithm in float32. Prints a table and writes
bench/results/basis-precision-<model>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rana_core.adapters.base import layer_members  # noqa: E402
from rana_core.adapters.low_rank import plan_rank_adapter  # noqa: E402
from rana_core.calibration import capture_module_inputs  # noqa: E402
from rana_core.corpus import token_windows  # noqa: E402
from rana_core.decompose import EIGEN_FLOOR, OutputBasis, output_basis  # noqa: E402
from rana_core.loading import load_model  # noqa: E402


def basis_float32(weight: torch.Tensor, gram: torch.Tensor) -> OutputBasis:
    """decompose.output_basis's tall-layer branch, in float32."""
    C, W = gram.float(), weight.detach().float()
    lifted = C + EIGEN_FLOOR * C.diagonal().mean().item() * torch.eye(C.shape[0])
    M = W @ torch.linalg.cholesky_ex(lifted)[0]
    energy, V = torch.linalg.eigh(M.T @ M)
    energy, V = energy.flip(0).clamp_min(0), V.flip(1)
    return OutputBasis((M @ V) / energy.sqrt().clamp_min(1e-30), energy)


def measure(basis: OutputBasis, weight: torch.Tensor, rows: torch.Tensor, keep: float) -> dict:
    U = basis.U.double()
    orthogonality = (U.T @ U - torch.eye(U.shape[1], dtype=U.dtype)).abs().max().item()
    energy = (rows.double() @ (U.T @ weight.double()).T).square().float()  # z_i² of the rows on the full basis
    plan = plan_rank_adapter(energy, keep, *weight.shape)
    return {"orthogonality_error": orthogonality, "rank": plan.rank, "coverage": plan.coverage}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", default="0,15,29")
    parser.add_argument("--keep", type=float, default=0.5)
    args = parser.parse_args(argv)
    loaded = load_model(args.model)
    windows = token_windows(loaded.tokenizer, "train", 4096, 512)
    stats = capture_module_inputs(loaded, windows, row_stride=4, inputs=("attention", "mlp"))
    rows = []
    for layer in (int(i) for i in args.layers.split(",")):
        for input_name, module in (("attention", "qkv"), ("mlp", "up")):
            layer_stats = stats[(layer, input_name)]
            weight = torch.cat([m.weight for m in layer_members(loaded.layers[layer], module)]).detach()
            eigenvalues = torch.linalg.eigvalsh(layer_stats.gram)
            condition = (eigenvalues.max() / eigenvalues.clamp_min(1e-300).min()).item()
            row = {"layer": layer, "module": module, "gram_condition": condition}
            for precision, basis in (("float64", output_basis(weight, layer_stats.gram)),
                                     ("float32", basis_float32(weight, layer_stats.gram))):
                row[precision] = measure(basis, weight, layer_stats.rows, args.keep)
            rows.append(row)
    print(f"{'layer':>5} {'module':<6} {'cond(C)':>9}  {'float64 rank/coverage/|UtU-I|':<32} float32")
    for row in rows:
        cells = [f"{row[p]['rank']:>4} {row[p]['coverage']:.4f} {row[p]['orthogonality_error']:.1e}"
                 for p in ("float64", "float32")]
        print(f"{row['layer']:>5} {row['module']:<6} {row['gram_condition']:>9.1e}  {cells[0]:<32} {cells[1]}")
    path = ROOT / "bench" / "results" / f"basis-precision-{args.model}.json"
    path.write_text(json.dumps({"model": args.model, "keep": args.keep, "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
