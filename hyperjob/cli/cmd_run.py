"""`hyperjob status`, `logs` and `cancel`: look after a submitted run."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

from hyperjob import stage_table
from hyperjob.cli.cmd_runs import require_run_dir
from hyperjob.cli.common import EXIT_RUN_FAILED, CliError
from hyperjob.cli.report import (
    curves_line,
    failed_stages,
    failure_report,
    needle_report,
    read_needle,
    stage_error,
    status_table,
)
from hyperjob.paths import RunPaths
from hyperjob.schedule import registry
from hyperjob.schedule.base import SchedulerError
from hyperjob.schedule.manifest import Manifest
from hyperjob.schedule.outcome import read_outcomes
from hyperjob.schedule.run import cancel_stages, refresh
from hyperjob.schedule.states import StageState
from hyperjob.stages.progress import Progress, read_progress


def add_parsers(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "status",
        help="state of every stage of a run",
        description=status_doc(),
        epilog=STATUS_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_status)

    lg = sub.add_parser("logs", help="print (or follow) a stage's log", description="Print the log of STAGE of a run.")
    lg.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    lg.add_argument("stage", metavar="STAGE", help=", ".join(stage_table.names()))
    lg.add_argument("--follow", "-f", action="store_true", help="keep printing until the stage ends")
    lg.set_defaults(func=cmd_logs)

    c = sub.add_parser("cancel", help="cancel every unfinished stage of a run", description=CANCEL_DOC)
    c.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    c.set_defaults(func=cmd_cancel)


STATUS_EXIT_CODES = """\
exit codes:
  0  no stage failed: each one completed, or is pending, running, cancelled or not submitted
  1  a stage failed: FAILED, LOST, TIMEOUT, OUT_OF_MEMORY, NODE_FAIL or PREEMPTED (hyperjob resume RUN_DIR)
  2  usage: RUN_DIR is not a run directory, or its manifest cannot be read
  3  the scheduler could not be asked (squeue/scontrol failed): the state is unknown"""
EXIT_SCHEDULER_UNREACHABLE = 3

CANCEL_DOC = (
    "Cancel every stage of the run that is queued or running. Stages that already ended keep their state, and so "
    "does a stage whose own record says it finished while the scheduler still showed it running. A run with "
    "nothing left to cancel is left as it is."
)


def status_doc() -> str:
    return (
        "Show each stage's job id, state and log; for a running train stage, its step out of the total and the time "
        "elapsed. A pending or running stage's state comes from the scheduler (squeue, then `scontrol show job`: no "
        "slurmdbd needed); a finished stage's from the record its script wrote (outcomes/), which outlives Slurm's "
        "memory of the job. A job the scheduler forgot that left no record is LOST, with the reason."
    )


def _load(run_dir: Path) -> Manifest:
    try:
        return refresh(run_dir)
    except (FileNotFoundError, ValueError) as e:
        raise CliError(str(e)) from None


def _train_progress(run_dir: Path, manifest: Manifest) -> Progress | None:
    """The running train stage's progress, when its current attempt wrote one (never a stale file of an earlier
    job, nor one written before the current attempt started)."""
    try:
        rec = manifest.stage("train")
    except KeyError:
        return None
    if rec.state is not StageState.RUNNING:
        return None
    progress = read_progress(run_dir)
    if progress is None:
        return None
    # The attempt began when its script recorded its start (Slurm, a requeue) or the local executor started it.
    outcome = read_outcomes(run_dir, manifest).get("train")
    starts = [t for t in (_epoch(outcome.started if outcome else None), _epoch(rec.started)) if t is not None]
    return progress if progress.belongs_to(rec.job_id, max(starts, default=None)) else None


def _epoch(iso: str | None) -> float | None:
    try:
        return datetime.fromisoformat(iso).timestamp() if iso else None
    except ValueError:
        return None


def status_exit_code(manifest: Manifest) -> int:
    """1 when a stage failed on its own (see STATUS_EXIT_CODES), else 0."""
    return EXIT_RUN_FAILED if failed_stages(manifest) else 0


def cmd_status(args: argparse.Namespace) -> int:
    run_dir = require_run_dir(args.run_dir, "status")
    try:
        manifest = _load(run_dir)
    except SchedulerError as e:
        raise CliError(f"cannot tell the state of the run: {e}", EXIT_SCHEDULER_UNREACHABLE) from None
    needle = read_needle(run_dir)
    progress, now = _train_progress(run_dir, manifest), time.time()
    if args.json:
        failed = {r.name for r in failed_stages(manifest)}
        data = asdict(manifest)
        for st, rec in zip(data["stages"], manifest.stages, strict=True):
            st["state"] = st["state"].value
            st["error"] = stage_error(rec) if rec.name in failed else None
        data["needle"] = needle
        data["progress"] = None if progress is None else {"stage": "train", **progress.to_json(now)}
        print(json.dumps(data, indent=2))
    else:
        print(f"run {manifest.name} ({manifest.scheduler}): {manifest.run_dir}")
        print(status_table(manifest))
        if progress is not None:
            print(f"train: {progress.describe(now)}")
        if curves := curves_line(Path(manifest.run_dir)):
            print(curves)
        if needle is not None:
            print()
            print("\n".join(needle_report(needle)))
        report = failure_report(manifest)
        if report:
            print()
            print("\n".join(report))
    return status_exit_code(manifest)


def _log_path(manifest: Manifest, stage: str) -> Path | None:
    try:
        rec = manifest.stage(stage)
    except KeyError as e:
        raise CliError(str(e.args[0])) from None
    located = registry.get(manifest.scheduler).log(Path(manifest.run_dir), rec) or rec.log
    if located and Path(located).exists():
        return Path(located)
    # A requeued job appends to the same file; otherwise take the newest log of this stage.
    candidates = sorted(RunPaths(Path(manifest.run_dir)).logs.glob(RunPaths.log_name(rec.index, rec.name, "*")))
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def cmd_logs(args: argparse.Namespace) -> int:
    run_dir = require_run_dir(args.run_dir, "logs")
    manifest = _load(run_dir)
    offset = 0
    while True:
        path = _log_path(manifest, args.stage)
        if path is not None:
            with path.open("rb") as f:
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()
        state = manifest.stage(args.stage).state
        if not args.follow or state.is_terminal:
            if path is None:
                print(f"(no log yet for stage {args.stage}: it is {state.value})", file=sys.stderr)
            return 0
        time.sleep(1.0)
        manifest = _load(run_dir)


def cmd_cancel(args: argparse.Namespace) -> int:
    run_dir = require_run_dir(args.run_dir, "cancel")
    try:
        done = cancel_stages(run_dir)
    except (FileNotFoundError, ValueError) as e:
        raise CliError(str(e)) from None
    ended = [f"{r.name} {r.state.value}" for r in done.manifest.stages if r.name in done.finished]
    if not done.cancelled:
        print(f"nothing to cancel in {run_dir}: {_why_nothing(done.manifest, ended)}")
        return 0
    print(status_table(done.manifest))
    print(f"\ncancelled: {', '.join(done.cancelled)}")
    if ended:
        print(f"had already ended (kept): {', '.join(ended)}")
    return 0


def _why_nothing(manifest: Manifest, ended: list[str]) -> str:
    if ended:
        return f"what was still open had already ended ({', '.join(ended)})"
    if all(r.job_id is None for r in manifest.stages):
        return "no stage was submitted (a dry run)"
    finished = [f"{r.name} {r.state.value}" for r in manifest.stages if r.job_id is not None]
    return f"every submitted stage has ended ({', '.join(finished)})"
