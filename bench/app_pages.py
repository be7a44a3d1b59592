"""Dashboard page timings: each page rendered by Streamlit's AppTest against a SQLite database of many runs.

    python bench/app_pages.py [--runs 2000] [--repeat 3]

Seeds a temporary database with `runs` runs (one held-out evaluation each, methods and budgets spread as a sweep
would leave them), then renders each page `repeat` times and reports the median and the slowest seconds. The first
render of a page in a process also pays for its imports. Prints a table and writes bench/results/app-pages.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runnable from a plain checkout

from shown_path import shown  # noqa: E402  (bench/ is the script's folder)

RESULTS = Path(__file__).resolve().parent / "results"
PAGES = ("pareto.py", "compare.py", "run_detail.py", "job_list.py")


def seed(url: str, runs: int) -> None:
    from db.models import Evaluation, Run
    from db.session import session_scope

    with session_scope(url) as session:
        for i in range(runs):
            run = Run(model="smollm2-135m", method=("svd", "cats", "rana")[i % 3], allocation="uniform",
                      target_flop_reduction=(i % 50) / 100, calib_tokens=8192, seconds=1.0, config={},
                      author=("ada", "grace")[i % 2], tags=["bulk"])
            run.evaluations.append(Evaluation(split="heldout", tokens=8192, seq_len=512, perplexity=40 + i % 97,
                                              dense_perplexity=40.0, measured_flop_reduction=(i % 50) / 100,
                                              measured_flop_reduction_whole_model=(i % 50) / 150))
            session.add(run)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "app-pages.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite:///{Path(folder) / 'bench.db'}"
        os.environ["RANA_DB_URL"], os.environ["RANA_DATA_DIR"] = url, folder
        from db.migrate import upgrade
        from streamlit.testing.v1 import AppTest

        upgrade(url)
        seed(url, args.runs)
        rows = []
        print(f"{'page':<14} {'median s':>9} {'slowest s':>10}  ({args.runs} runs, {args.repeat} renders each)")
        for page in PAGES:
            seconds = []
            for _ in range(args.repeat):
                started = time.perf_counter()
                at = AppTest.from_file(str(ROOT / "app" / "app_pages" / page), default_timeout=120).run()
                seconds.append(time.perf_counter() - started)
                if at.exception:
                    raise SystemExit(f"{page} raised: {at.exception[0].message}")
            rows.append({"page": page, "median_s": statistics.median(seconds), "max_s": max(seconds),
                         "seconds": seconds})
            print(f"{page:<14} {rows[-1]['median_s']:>9.2f} {rows[-1]['max_s']:>10.2f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": args.runs, "repeat": args.repeat, "host": platform.node(),
                                    "cpus": os.cpu_count(), "rows": rows}, indent=2) + "\n")
    print(f"wrote {shown(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
