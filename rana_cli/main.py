"""``rana``: one command line over the core, the queue and the dashboard.

    rana compress --model smollm2-135m --method svd --flop-reduction 0.3 --json out.json   # in-process, no DB
    rana submit   --model tiny --method svd --flop-reduction 0.3 --json                    # enqueue
    rana sweep    --model tiny --methods rana-greedy,cats,svd --budgets 0.2,0.3,0.44,0.5   # one job per point
    rana evaluate RUN_ID --split train --eval-tokens 16384 [--tasks cloze,piqa.jsonl]        # re-measure a run
    rana recover  RUN_ID --strategy rankadaptor                                             # LoRA recovery
    rana latency  RUN_ID [--contexts 1,512] [--batches 4,8] [--new-tokens 256] [--dtype bfloat16]  # decode speed (GPU)
    rana cancel JOB_ID... | rana retry JOB_ID...
    rana worker   [--exit-when-idle] [--stale-after SECONDS] [--device cuda:K] [--max-gpu-memory GIB]
    rana jobs     [--json]
    rana app      [--port 8501]
    rana user     add NAME --role runner | list | passwd NAME | disable NAME | enable NAME | role NAME ROLE
    rana up       [--port 8501] [--gpus N]   # upgrade the DB, start the worker(s) and the app; Ctrl-C stops all
    rana db upgrade | current

Every command honours RANA_DB_URL, RANA_DATA_DIR and RANA_DEVICE. Bad input is one line on stderr and exit 2.
Here: the parser and the dispatch; what the commands do is in rana_cli.commands, and starting the dashboard in
rana_cli.serve. `python -m rana_cli.main` is `rana` without the installed script.
"""

from __future__ import annotations

import argparse
import logging
import sys

from rana_cli import commands, serve, users
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
    parser.add_argument("--layer-by-layer", action=argparse.BooleanOptionalAction, default=None,
                        help="keep the decoder layers in CPU memory and build on the GPU one layer at a time "
                             "(default: when the weights would take over 40%% of the GPU memory allowed)")
    parser.add_argument("--tasks", default="", help="accuracy beside perplexity, adapted and dense: cloze (built "
                                                    "in) and multiple-choice JSON-lines files, e.g. cloze,piqa.jsonl")
    parser.add_argument("--probes", action=argparse.BooleanOptionalAction, default=defaults.probes,
                        help="store greedy replies to a few fixed questions and openings, adapted and dense")
    parser.add_argument("--corpus", default=defaults.corpus,
                        help="calibration text (its training split): brown, a .txt/.jsonl/.json/.csv/.parquet file "
                             "or folder (PATH:FIELD names the text field), or a hub id")
    parser.add_argument("--eval-corpus", default=defaults.eval_corpus,
                        help="held-out text for perplexity and measured FLOPs (default: --corpus)")


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rana", description="RaNA Studio: compression trade-offs of Transformers")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    commands = parser.add_subparsers(dest="command", required=True)

    compress = commands.add_parser("compress", help="compress and evaluate in this process (no database)")
    _add_compress_options(compress)
    compress.add_argument("--json", metavar="PATH", help="write the result as JSON ('-' for stdout)")
    compress.add_argument("--max-gpu-memory", type=float, metavar="GIB",
                          help="the most GPU memory this run may take (a model above it is built layer by layer)")

    submit = commands.add_parser("submit", help="enqueue a compression job")
    _add_compress_options(submit)
    _add_team_options(submit)

    sweep = commands.add_parser("sweep", help="enqueue methods x budgets as one sweep (one job per point)")
    _add_compress_options(sweep)
    sweep.add_argument("--methods", required=True, help="comma-separated, method or method-allocation")
    sweep.add_argument("--budgets", required=True, help="comma-separated FLOP reductions")
    sweep.add_argument("--latency", action="store_true",
                       help="then measure each point's decode speed on a GPU worker (contexts 1 and 512)")
    _add_team_options(sweep)

    evaluate = commands.add_parser("evaluate", help="enqueue a new evaluation of a stored run")
    evaluate.add_argument("run_id", type=int)
    evaluate.add_argument("--split", default="heldout", choices=["heldout", "train"])
    evaluate.add_argument("--eval-tokens", type=int, default=8192)
    evaluate.add_argument("--seq-len", type=int, default=512)
    evaluate.add_argument("--tasks", help="accuracy beside perplexity: cloze (built in) and multiple-choice JSON-lines "
                                          "files the worker can read, comma-separated, e.g. cloze,piqa.jsonl")
    evaluate.add_argument("--corpus", help="the text to measure on (default brown): a file or folder the worker can "
                                           "read (PATH:FIELD), or a hub id")
    _add_team_options(evaluate)

    latency = commands.add_parser("latency", help="enqueue a measurement of a stored run's decode speed (a GPU "
                                                  "worker runs it, beside the dense model's)")
    latency.add_argument("run_id", type=int)
    latency.add_argument("--contexts", default="1,512", help="prompt lengths before the timed steps, e.g. 1,512")
    latency.add_argument("--batches", default="", help="batch sizes (2-16) also timed at each context, e.g. 4,8: "
                         "sequences decoding together, one token each per step")
    latency.add_argument("--new-tokens", type=int, default=256, help="decode steps timed at each context")
    latency.add_argument("--dtype", default="bfloat16", help="float16 or bfloat16")
    _add_team_options(latency)

    recover = commands.add_parser("recover", help="enqueue a LoRA recovery of a stored run (per-layer ranks)")
    _add_recover_options(recover)
    _add_team_options(recover)

    for name, text in (("cancel", "cancel queued or running jobs (a sweep: its unfinished points)"),
                       ("retry", "queue failed or cancelled jobs again (a sweep: its failed points)")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("job_ids", type=int, nargs="+")

    worker = commands.add_parser("worker", help="process queued jobs")
    worker.add_argument("--exit-when-idle", action="store_true",
                        help="stop when no job is queued or running (a job whose worker died is reaped and run first)")
    worker.add_argument("--max-jobs", type=int, help="stop after this many jobs")
    worker.add_argument("--poll", type=float, default=1.0, help="seconds between looks at an empty queue")
    worker.add_argument("--stale-after", type=float, default=30.0,
                        help="requeue a running job whose worker has been silent this many seconds")
    worker.add_argument("--device", help="where this worker runs models, e.g. cuda:1 (default: RANA_DEVICE, else cpu)")
    worker.add_argument("--max-gpu-memory", type=float, metavar="GIB",
                        help="GiB of its GPU this worker's jobs may take (a job that needs more fails with one line)")

    jobs = commands.add_parser("jobs", help="list jobs")
    jobs.add_argument("--json", action="store_true")
    jobs.add_argument("--status", choices=["queued", "running", "done", "failed", "cancelled"])
    jobs.add_argument("--limit", type=int, default=50)

    commands.add_parser("methods", help="list the compression methods")

    for name, text in (("app", "start the dashboard"), ("up", "upgrade the DB, start worker(s) and the dashboard")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--port", type=int, default=8501)
        sub.add_argument("--address", default="127.0.0.1")
        sub.add_argument("--allow-remote", action="store_true",
                         help="solo mode (no sign-in) on an address other machines reach: anyone who reaches it may "
                              "queue and cancel jobs (team mode, RANA_AUTH=team, signs users in)")
        if name == "up":
            sub.add_argument("--gpus", type=int, default=0,
                             help="one worker per GPU, on cuda:0 .. cuda:N-1 (default: one worker on RANA_DEVICE)")
            sub.add_argument("--max-gpu-memory", type=float, metavar="GIB", help="each GPU worker's cap, in GiB")

    users.add_user_parser(commands)

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


COMMANDS = {
    "compress": commands.cmd_compress, "submit": commands.cmd_submit, "sweep": commands.cmd_sweep,
    "evaluate": commands.cmd_evaluate, "latency": commands.cmd_latency, "recover": commands.cmd_recover,
    "cancel": commands.cmd_cancel, "retry": commands.cmd_retry, "worker": commands.cmd_worker, "jobs": commands.cmd_jobs,
    "methods": commands.cmd_methods, "db": commands.cmd_db, "app": serve.cmd_app, "up": serve.cmd_up,
    "user": users.cmd_user,
}

if __name__ == "__main__":
    sys.exit(main())
