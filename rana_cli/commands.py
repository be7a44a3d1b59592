"""What each ``rana`` command does, apart from starting the dashboard (rana_cli.serve). Heavy imports (torch, the
database, the worker) happen inside the command that needs them, so `rana --help` and one-line refusals stay fast.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from rana_core.errors import RanaError


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


def _rana_device(check, default: str | None = "cpu") -> str | None:
    """RANA_DEVICE (else `default`) passed through `check` (rana_core.devices); its refusal names the variable,
    which is where the user has to fix it."""
    device = os.environ.get("RANA_DEVICE") or default
    if device is not None:
        try:
            check(device)
        except RanaError as exc:
            raise RanaError(f"RANA_DEVICE={device}: {exc}") from None
    return device


def _config_payload(args) -> dict:
    from rana_core.devices import check_device_name

    return {
        "model": args.model, "method": args.method, "flop_reduction": args.flop_reduction,
        "allocation": args.allocation or _first_allocation(args.method), "calib_tokens": args.calib_tokens,
        "eval_tokens": args.eval_tokens, "seq_len": args.seq_len, "seed": args.seed, "dtype": args.dtype,
        "layer_by_layer": args.layer_by_layer,
        "tasks": [t.strip() for t in args.tasks.split(",") if t.strip()],
        "probes": args.probes,
        "corpus": args.corpus, "eval_corpus": args.eval_corpus,
        # Only its form here: a queued job runs on a worker's machine, which checks that it has the device.
        "device": _rana_device(check_device_name),
    }


def cmd_compress(args) -> int:
    from rana_core.config import CompressConfig
    from rana_core.devices import check_device_present

    config = CompressConfig.from_dict(_config_payload(args)).validate()
    _rana_device(check_device_present)  # compress runs here: this machine must have the device
    if args.max_gpu_memory is not None:
        from jobs import gpu

        if not config.device.startswith("cuda"):
            raise RanaError(f"--max-gpu-memory needs a CUDA device; this run is on {config.device}")
        if args.max_gpu_memory <= 0:
            raise RanaError(f"--max-gpu-memory must be a positive number of GiB, got {args.max_gpu_memory}")
        gpu.cap_memory(config.device, args.max_gpu_memory)
    if args.json and args.json != "-":
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)  # fail on an unwritable path before the work
    from db.session import data_dir
    from rana_cli.progress import progress_reporter
    from rana_core.pipeline import compress

    with progress_reporter(sys.stderr) as (progress, doing):
        try:
            result = compress(config, progress=progress, cache_dir=data_dir() / "curves").to_json()
        except Exception as exc:
            from jobs import gpu

            if config.device.startswith("cuda") and gpu.is_out_of_memory(exc):  # one line, as a worker says it
                raise RanaError(gpu.out_of_memory_line(exc, doing(), config.device,
                                                       args.max_gpu_memory)) from None
            raise
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
    tasks = result.get("tasks") or {}
    for task, scores in tasks.get("adapted", {}).get("results", {}).items():
        dense = tasks["dense"]["results"][task]["acc,none"]
        rows.append((f"accuracy {task} (dense)", f"{scores['acc,none']:.3f} ± {scores['acc_stderr,none']:.3f} "
                                                 f"({dense:.3f})"))
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
    from jobs.accounts import auth_mode
    from jobs.queue import default_author, submit

    # Not validated here: submit validates every payload once, before it opens the database, for the CLI and
    # the app alike; its RanaError becomes main()'s one line.
    author = args.author
    if auth_mode() == "team":  # --author is for solo use; in team mode the CLI records who ran it
        author = default_author()
    job_id = submit(kind, payload, priority=args.priority, author=author, tags=args.tags)
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
    if args.latency:
        payload["latency"] = {}
    return _enqueue(args, "sweep", payload)


def cmd_evaluate(args) -> int:
    payload = {"run_id": args.run_id, "split": args.split, "eval_tokens": args.eval_tokens, "seq_len": args.seq_len}
    if args.tasks:
        payload["tasks"] = args.tasks
    if args.corpus:
        payload["corpus"] = args.corpus
    return _enqueue(args, "evaluate", payload)


def cmd_latency(args) -> int:
    payload = {"run_id": args.run_id, "contexts": _integers(args.contexts, "--contexts"),
               "new_tokens": args.new_tokens, "dtype": args.dtype, "batches": _integers(args.batches, "--batches")}
    return _enqueue(args, "run_latency", payload)


def _integers(text: str, option: str) -> list[int]:
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise RanaError(f"{option} must be integers separated by commas, got {text!r}") from None


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
    from rana_core.devices import check_device_present

    # At start, not at the first job: a worker without its device would fail every job it claims.
    if args.device:
        try:
            device = check_device_present(args.device)
        except RanaError as exc:
            raise RanaError(f"--device {args.device}: {exc}") from None
    else:
        device = _rana_device(check_device_present, default=None)
    check_schema()
    worker = Worker(device=device, poll_seconds=args.poll, stale_seconds=args.stale_after,
                    max_gpu_memory=args.max_gpu_memory)
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


def cmd_db(args) -> int:
    from db.migrate import current_revision, head_revision, upgrade

    if args.action == "upgrade":
        upgrade()
    print(f"database at revision {current_revision()} (head {head_revision()})")
    return 0
