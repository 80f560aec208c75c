"""`hyperjob status`, `logs` and `cancel`: look after a submitted run."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from hyperjob import stage_table
from hyperjob.cli.common import CliError
from hyperjob.cli.report import failed_stages, failure_report, needle_report, read_needle, stage_error, status_table
from hyperjob.paths import RunPaths
from hyperjob.schedule import registry
from hyperjob.schedule.manifest import Manifest
from hyperjob.schedule.run import cancel_run, refresh


def add_parsers(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("status", help="state of every stage of a run", description=status_doc())
    s.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_status)

    lg = sub.add_parser("logs", help="print (or follow) a stage's log", description="Print the log of STAGE of a run.")
    lg.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    lg.add_argument("stage", metavar="STAGE", help=", ".join(stage_table.names()))
    lg.add_argument("--follow", "-f", action="store_true", help="keep printing until the stage ends")
    lg.set_defaults(func=cmd_logs)

    c = sub.add_parser("cancel", help="cancel every unfinished stage of a run")
    c.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    c.set_defaults(func=cmd_cancel)


def status_doc() -> str:
    return (
        "Show each stage's job id, state and log. A pending or running stage's state comes from the scheduler "
        "(squeue, then `scontrol show job`: no slurmdbd needed); a finished stage's from the record its script "
        "wrote (outcomes/), which outlives Slurm's memory of the job. A job the scheduler forgot that left no "
        "record is LOST, with the reason."
    )


def _load(run_dir: Path) -> Manifest:
    try:
        return refresh(run_dir.resolve())
    except (FileNotFoundError, ValueError) as e:
        raise CliError(str(e)) from None


def cmd_status(args: argparse.Namespace) -> int:
    manifest = _load(args.run_dir)
    needle = read_needle(Path(manifest.run_dir))
    if args.json:
        failed = {r.name for r in failed_stages(manifest)}
        data = asdict(manifest)
        for st, rec in zip(data["stages"], manifest.stages, strict=True):
            st["state"] = st["state"].value
            st["error"] = stage_error(rec) if rec.name in failed else None
        data["needle"] = needle
        print(json.dumps(data, indent=2))
    else:
        print(f"run {manifest.name} ({manifest.scheduler}): {manifest.run_dir}")
        print(status_table(manifest))
        if needle is not None:
            print()
            print("\n".join(needle_report(needle)))
        report = failure_report(manifest)
        if report:
            print()
            print("\n".join(report))
    return 0


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
    manifest = _load(args.run_dir)
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
        manifest = _load(args.run_dir)


def cmd_cancel(args: argparse.Namespace) -> int:
    try:
        manifest = cancel_run(args.run_dir.resolve())
    except (FileNotFoundError, ValueError) as e:
        raise CliError(str(e)) from None
    print(status_table(manifest))
    return 0
