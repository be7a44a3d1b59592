"""``rana``: one command line over the core, the queue and the dashboard.

    rana compress --model smollm2-135m --method svd --flop-reduction 0.3 --json out.json   # in-process, no DB
    rana submit   --model tiny --method svd --flop-reduction 0.3 --json                    # enqueue
    rana sweep    --model tiny --methods rana-greedy,cats,svd --budgets 0.2,0.3,0.44,0.5   # one job per point
    rana evaluate RUN_ID --split train --eval-tokens 16384                                  # re-measure a run
    rana recover  RUN_ID --strategy rankadaptor                                             # LoRA recovery
    rana cancel JOB_ID... | rana retry JOB_ID...
    rana worker   [--exit-when-idle] [--stale-after SECONDS]
    rana jobs     [--json]
    rana app      [--port 8501]
    rana up       [--port 8501]        # upgrade the DB, start one worker and the app; Ctrl-C stops both
    rana db upgrade | current

Every command honours RANA_DB_URL, RANA_DATA_DIR and RANA_DEVICE. Bad input is one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from rana_core.errors import RanaError

USAGE_ERROR = 2


def _add_compress_options(parser: argparse.ArgumentParser) -> None:
    from rana_core.config import CompressConfig

    defaults = CompressConfig()
    parser.add_argument("--model", default=defaults.model, help="bundled name, local folder or hub id")
    parser.add_argument("--method", default=defaults.method, help="compression method (see `rana methods`)")
    parser.add_argument("--flop-reduction", type=float, default=defaults.flop_reduction,
                        help="target share of QKV+MLP FLOPs removed, in [0, 0.95)")
    parser.add_argument("--allocation", help="how the budget is spread over layers (default: the method's first)")
    parser.add_argument("--calib-tokens", type=int, default=defaults.calib_tokens)
    parser.add_argument("--eval-tokens", type=int, default=defaults.eval_tokens)
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--dtype", default=defaults.dtype, choices=["float32", "float16", "bfloat16"])


def _add_team_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--priority", type=int, default=0, help="higher runs first")
    parser.add_argument("--author", help="who asked for it (default: the OS user)")
    parser.add_argument("--tags", default="", help="comma-separated labels, e.g. baseline,ablation")
    parser.add_argument("--json", action="store_true", help='print {"job_id": N}')


def _add_recover_options(parser: argparse.ArgumentParser) -> None:
    from rana_core.recovery.config import STRATEGIES

    parser.add_argument("run_id", type=int)
    parser.add_argument("--strategy", default="rankadaptor", choices=list(STRATEGIES),
                        help="how LoRA ranks are spread over layers")
    parser.add_argument("--rank-budget", type=int, help="trainable parameters of uniform LoRA at this rank (8)")
    parser.add_argument("--train-tokens", type=int, help="training-split tokens of the final fine-tune")
    parser.add_argument("--steps", type=int, help="final fine-tune steps (sets --train-tokens to steps x 4 x 256)")
    parser.add_argument("--eval-tokens", type=int, help="held-out tokens for perplexity before and after")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--rethreshold", action="store_true",
                        help="re-set RaNA/CATS mask thresholds after fine-tuning, so they spend their budget again")


def _recover_payload(args) -> dict:
    from rana_core.recovery.config import RecoverConfig

    options = {"rank_budget": args.rank_budget, "train_tokens": args.train_tokens, "eval_tokens": args.eval_tokens,
               "seed": args.seed, "rethreshold": args.rethreshold or None}
    if args.steps is not None:
        if args.train_tokens is not None:
            raise RanaError("give --steps or --train-tokens, not both")
        defaults = RecoverConfig()
        options["train_tokens"] = args.steps * defaults.batch_size * defaults.seq_len
    return {"run_id": args.run_id, "strategy": args.strategy,
            **{key: value for key, value in options.items() if value is not None}}


def _first_allocation(method: str) -> str:
    """A method's default allocation: its first (hybrid has no "uniform"); an unknown method is refused later."""
    from rana_core.methods import METHODS

    return METHODS[method].allocations[0] if method in METHODS else "uniform"


def _config_payload(args) -> dict:
    return {
        "model": args.model, "method": args.method, "flop_reduction": args.flop_reduction,
        "allocation": args.allocation or _first_allocation(args.method), "calib_tokens": args.calib_tokens, "eval_tokens": args.eval_tokens,
        "seq_len": args.seq_len, "seed": args.seed, "dtype": args.dtype,
        "device": os.environ.get("RANA_DEVICE", "cpu"),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rana", description="RaNA Studio: compression trade-offs of Transformers")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    commands = parser.add_subparsers(dest="command", required=True)

    compress = commands.add_parser("compress", help="compress and evaluate in this process (no database)")
    _add_compress_options(compress)
    compress.add_argument("--json", metavar="PATH", help="write the result as JSON ('-' for stdout)")

    submit = commands.add_parser("submit", help="enqueue a compression job")
    _add_compress_options(submit)
    _add_team_options(submit)

    sweep = commands.add_parser("sweep", help="enqueue methods x budgets as one sweep (one job per point)")
    _add_compress_options(sweep)
    sweep.add_argument("--methods", required=True, help="comma-separated, method or method-allocation")
    sweep.add_argument("--budgets", required=True, help="comma-separated FLOP reductions")
    _add_team_options(sweep)

    evaluate = commands.add_parser("evaluate", help="enqueue a new evaluation of a stored run")
    evaluate.add_argument("run_id", type=int)
    evaluate.add_argument("--split", default="heldout", choices=["heldout", "train"])
    evaluate.add_argument("--eval-tokens", type=int, default=8192)
    evaluate.add_argument("--seq-len", type=int, default=512)
    _add_team_options(evaluate)

    recover = commands.add_parser("recover", help="enqueue a LoRA recovery of a stored run (per-layer ranks)")
    _add_recover_options(recover)
    _add_team_options(recover)

    for name, text in (("cancel", "cancel queued or running jobs (a sweep: its unfinished points)"),
                       ("retry", "queue failed or cancelled jobs again (a sweep: its failed points)")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("job_ids", type=int, nargs="+")

    worker = commands.add_parser("worker", help="process queued jobs")
    worker.add_argument("--exit-when-idle", action="store_true", help="stop when the queue is empty")
    worker.add_argument("--max-jobs", type=int, help="stop after this many jobs")
    worker.add_argument("--poll", type=float, default=1.0, help="seconds between looks at an empty queue")
    worker.add_argument("--stale-after", type=float, default=30.0,
                        help="requeue a running job whose worker has been silent this many seconds")

    jobs = commands.add_parser("jobs", help="list jobs")
    jobs.add_argument("--json", action="store_true")
    jobs.add_argument("--status", choices=["queued", "running", "done", "failed", "cancelled"])
    jobs.add_argument("--limit", type=int, default=50)

    commands.add_parser("methods", help="list the compression methods")

    for name, text in (("app", "start the dashboard"), ("up", "upgrade the DB, start a worker and the dashboard")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--port", type=int, default=8501)
        sub.add_argument("--address", default="127.0.0.1")

    db = commands.add_parser("db", help="database schema")
    db.add_argument("action", choices=["upgrade", "current"])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    from db.session import DatabaseError

    try:
        return COMMANDS[args.command](args)
    except (RanaError, DatabaseError) as exc:
        print(f"rana: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("rana: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.verbose:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"rana: error: {type(exc).__name__}: {first} (rerun with -v for the traceback)", file=sys.stderr)
        return 1


def cmd_compress(args) -> int:
    from rana_core.config import CompressConfig

    config = CompressConfig.from_dict(_config_payload(args)).validate()
    if args.json and args.json != "-":
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)  # fail on an unwritable path before the work
    from tqdm import tqdm

    from db.session import data_dir
    from rana_core.pipeline import compress

    with tqdm(total=1000, file=sys.stderr, bar_format="{l_bar}{bar}| {elapsed}<{remaining}",
              disable=None) as bar:
        def progress(fraction: float, message: str) -> None:
            bar.set_description_str(message[:60], refresh=False)
            bar.update(round(fraction * 1000) - bar.n)

        result = compress(config, progress=progress, cache_dir=data_dir() / "curves").to_json()
    _print_summary(result, stream=sys.stderr if args.json == "-" else sys.stdout)
    if args.json == "-":
        json.dump(result, sys.stdout, indent=2)
        print()
    elif args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def _print_summary(result: dict, stream) -> None:
    rows = [
        ("model", result["model"]),
        ("method", f"{result['method']} ({result['allocation']})"),
        ("FLOP reduction target", f"{result['target_flop_reduction']:.3f}"),
        ("FLOP reduction measured (QKV+MLP)", f"{result['measured_flop_reduction']:.3f}"),
        ("FLOP reduction measured (whole model)", f"{result['measured_flop_reduction_whole_model']:.3f}"),
        ("perplexity (dense)", f"{result['perplexity']:.3f} ({result['dense_perplexity']:.3f})"),
        ("tokens calib / eval", f"{result['calib_tokens']} / {result['eval_tokens']}"),
        ("seconds", f"{result['seconds']:.1f}"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}", file=stream)
    by_module: dict[str, list[dict]] = {}
    for row in result["layers"]:
        by_module.setdefault(row["module"], []).append(row)
    print(f"\n{'module':<8}{'mean rank':>12}{'density':>10}{'recon error':>14}", file=stream)
    for module, rows_ in by_module.items():
        mean = lambda key: sum(r[key] or 0.0 for r in rows_) / len(rows_)  # noqa: E731
        print(f"{module:<8}{mean('rank'):>8.1f}/{rows_[0]['max_rank']:<3}{mean('density'):>10.3f}"
              f"{mean('recon_error'):>14.4f}", file=stream)


def _enqueue(args, kind: str, payload: dict) -> int:
    from jobs.queue import submit

    # Not validated here: submit validates every payload once, before it opens the database, for the CLI and
    # the app alike; its RanaError becomes main()'s one line.
    job_id = submit(kind, payload, priority=args.priority, author=args.author, tags=args.tags)
    print(json.dumps({"job_id": job_id}) if args.json else job_id)
    return 0


def cmd_submit(args) -> int:
    return _enqueue(args, "compress", _config_payload(args))


def cmd_sweep(args) -> int:
    base = _config_payload(args)
    for key in ("method", "allocation", "flop_reduction"):
        base.pop(key)
    payload = {"base": base, "methods": [m.strip() for m in args.methods.split(",") if m.strip()],
               "budgets": [b.strip() for b in args.budgets.split(",") if b.strip()]}
    return _enqueue(args, "sweep", payload)


def cmd_evaluate(args) -> int:
    payload = {"run_id": args.run_id, "split": args.split, "eval_tokens": args.eval_tokens, "seq_len": args.seq_len}
    return _enqueue(args, "evaluate", payload)


def cmd_recover(args) -> int:
    return _enqueue(args, "recover", _recover_payload(args))


def cmd_cancel(args) -> int:
    return _each_job(args, "cancel", "cancelled")


def cmd_retry(args) -> int:
    return _each_job(args, "retry", "queued again")


def _each_job(args, action: str, done: str) -> int:
    from db.migrate import check_schema
    from jobs import queue

    check_schema()
    for job_id in args.job_ids:
        count = getattr(queue, action)(job_id)
        print(f"job {job_id}: {count} job(s) {done}")
    return 0


def cmd_worker(args) -> int:
    from db.migrate import check_schema
    from jobs.worker import Worker

    check_schema()
    worker = Worker(device=os.environ.get("RANA_DEVICE"), poll_seconds=args.poll, stale_seconds=args.stale_after)
    worker.install_signal_handlers()
    logging.getLogger("rana.worker").info("worker %s started", worker.name)
    processed = worker.run(exit_when_idle=args.exit_when_idle, max_jobs=args.max_jobs)
    logging.getLogger("rana.worker").info("worker %s stopped after %d job(s)", worker.name, processed)
    return 0


def cmd_jobs(args) -> int:
    from db.migrate import check_schema
    from jobs.kinds import describe
    from jobs.queue import list_jobs

    check_schema()
    jobs = list_jobs(limit=args.limit, status=args.status)
    if args.json:
        print(json.dumps([job.to_json() for job in jobs], indent=2))
        return 0
    print(f"{'id':>5}  {'kind':<9}{'status':<10}{'progress':>9}  {'run':>5}  {'host / device':<28}{'what':<40}")
    for job in jobs:
        where = f"{job.host or ''} {job.device or ''}".strip()
        parent = f" (sweep {job.parent_id})" if job.parent_id else ""
        print(f"{job.id:>5}  {job.kind:<9}{job.status:<10}{job.progress:>8.0%}  {job.run_id or '':>5}  "
              f"{where[:27]:<28}{describe(job.kind, job.payload)}{parent}")
        if job.error:
            print(f"{'':>7}error: {job.error}")
    return 0


def cmd_methods(args) -> int:
    from jobs.specs import method_summaries

    for name, summary in method_summaries().items():
        print(f"{name:<10}{summary}")
    return 0


def app_command(port: int, address: str) -> list[str]:
    import importlib.util

    entry = Path(importlib.util.find_spec("app").origin).with_name("main.py")  # located, not imported
    return [sys.executable, "-m", "streamlit", "run", str(entry), "--server.address", address,
            "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false"]


def cmd_app(args) -> int:
    from db.migrate import check_schema

    check_schema()
    command = app_command(args.port, args.address)
    sys.stdout.flush()
    sys.stderr.flush()
    # Become Streamlit rather than wait on it: a signal sent to `rana app` (Ctrl-C, SIGTERM from a supervisor or
    # a test) then reaches the server itself, and no orphaned server is left behind.
    os.execv(command[0], command)


def cmd_up(args) -> int:
    from db.migrate import upgrade

    upgrade()
    worker = subprocess.Popen([sys.executable, "-m", "jobs.cli", "worker"])
    app = subprocess.Popen(app_command(args.port, args.address))
    print(f"RaNA Studio on http://{args.address}:{args.port} (one worker); Ctrl-C stops both", file=sys.stderr)
    children = [worker, app]
    try:
        while all(child.poll() is None for child in children):
            try:
                children[1].wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
    except KeyboardInterrupt:
        pass
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGINT)
        for child in children:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
    return 0


def cmd_db(args) -> int:
    from db.migrate import current_revision, head_revision, upgrade

    if args.action == "upgrade":
        upgrade()
    print(f"database at revision {current_revision()} (head {head_revision()})")
    return 0


COMMANDS = {
    "compress": cmd_compress, "submit": cmd_submit, "sweep": cmd_sweep, "evaluate": cmd_evaluate,
    "recover": cmd_recover,    "cancel": cmd_cancel, "retry": cmd_retry, "worker": cmd_worker, "jobs": cmd_jobs,
    "methods": cmd_methods, "app": cmd_app, "up": cmd_up, "db": cmd_db,
}

if __name__ == "__main__":
    sys.exit(main())
