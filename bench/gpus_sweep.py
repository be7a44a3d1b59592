"""A sweep drained by one GPU worker, then by one worker per GPU: wall time of each and which GPU ran each point.

    python bench/gpus_sweep.py [--model smollm2-135m] [--label NAME] [--gpus 2] [--methods svd,cats,rana-greedy,hybrid]
                               [--budgets 0.3,0.44] [--calib-tokens 8192] [--eval-tokens 8192] [--seq-len 512]

Each drain gets a fresh database and data folder (so neither finds the other's curves), queues the sweep with
`rana sweep`, and runs `rana worker --exit-when-idle --device cuda:K` per GPU. Prints a table and writes
bench/results/gpus-sweep-<model>-<gpus>gpu.json. Needs as many CUDA GPUs as --gpus.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
RANA = [sys.executable, "-m", "rana_cli.main"]
SHARE_CORES = True


def threads(workers: int) -> dict[str, str]:
    """As `rana up --gpus` does (rana_cli.serve.worker_environment): the CPU cores shared out, unless --share-cores
    is off, to measure what N workers that each take every core do."""
    return {} if workers == 1 or not SHARE_CORES else {"OMP_NUM_THREADS": str(max(1, os.cpu_count() // workers))}


def drain(args, devices: list[str]) -> dict:
    folder = tempfile.mkdtemp(prefix="gpus-sweep-")
    env = {**os.environ, "RANA_DATA_DIR": folder, "RANA_DB_URL": f"sqlite:///{folder}/rana.db"}
    subprocess.run(RANA + ["db", "upgrade"], env=env, check=True, capture_output=True)
    subprocess.run(RANA + ["sweep", "--model", args.model, "--methods", args.methods, "--budgets", args.budgets,
                           "--calib-tokens", str(args.calib_tokens), "--eval-tokens", str(args.eval_tokens),
                           "--seq-len", str(args.seq_len)], env={**env, "RANA_DEVICE": "cuda"}, check=True,
                   capture_output=True)
    started = time.perf_counter()
    workers = [subprocess.Popen(RANA + ["worker", "--exit-when-idle", "--poll", "0.2", "--device", device],
                                env={**env, **threads(len(devices))}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL) for device in devices]
    exit_codes = [worker.wait() for worker in workers]
    seconds = time.perf_counter() - started
    listed = subprocess.run(RANA + ["jobs", "--json"], env=env, check=True, capture_output=True, text=True).stdout
    points = [job for job in json.loads(listed) if job["kind"] == "compress"]
    return {"workers": devices, "seconds": round(seconds, 1), "exit_codes": exit_codes, "points": len(points),
            "status": sorted({job["status"] for job in points}),
            "errors": [job["error"] for job in points if job["error"]],
            "points_per_gpu": {d: sum((job["device"] or "").startswith(f"{d} ") for job in points) for d in devices},
            "each_point": [{"method": job["payload"]["method"], "allocation": job["payload"]["allocation"],
                            "budget": job["payload"]["flop_reduction"], "gpu": (job["device"] or "").split(" ")[0],
                            "seconds": _seconds(job)} for job in sorted(points, key=lambda job: job["started_at"])]}


def _seconds(job: dict) -> float | None:
    """The point's own time, claim to finish (the model load of a worker's first job included)."""
    from datetime import datetime

    if not (job["started_at"] and job["finished_at"]):
        return None
    return round((datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["started_at"]))
                 .total_seconds(), 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--label", help="the model's name in the results file (default: --model)")
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--methods", default="svd,cats,rana-greedy,hybrid")
    parser.add_argument("--budgets", default="0.3,0.44")
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--all-cores-each", action="store_true", help="every worker takes every CPU core")
    args = parser.parse_args(argv)
    global SHARE_CORES
    SHARE_CORES = not args.all_cores_each
    import torch

    if torch.cuda.device_count() < args.gpus:
        print(f"bench/gpus_sweep.py: needs {args.gpus} CUDA GPUs, this machine has {torch.cuda.device_count()}",
              file=sys.stderr)
        return 2
    one = drain(args, ["cuda:0"])
    many = drain(args, [f"cuda:{k}" for k in range(args.gpus)])
    print(f"{'workers':<24}{'points':>7}{'seconds':>9}  points per GPU")
    for row in (one, many):
        print(f"{', '.join(row['workers']):<24}{row['points']:>7}{row['seconds']:>9.1f}  {row['points_per_gpu']}"
              + (f"  FAILED: {row['errors']}" if row["errors"] else ""))
    for row in (one, many):
        print(f"  {', '.join(row['workers'])}: " + ", ".join(
            f"{p['gpu']} {p['method']}-{p['allocation']}@{p['budget']} {p['seconds']} s" for p in row["each_point"]))
    print(f"{args.gpus} GPUs drain the sweep {one['seconds'] / many['seconds']:.2f}x faster than one")
    label = args.label or args.model
    out = RESULTS / f"gpus-sweep-{label}-{args.gpus}gpu{'-all-cores-each' if args.all_cores_each else ''}.json"
    out.write_text(json.dumps({"model": label, "device": torch.cuda.get_device_name(0), "args": vars(args),
                               "one_gpu": one, "all_gpus": many}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
