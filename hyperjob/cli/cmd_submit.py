"""`hyperjob submit`: render a run directory and queue the whole stage DAG."""

from __future__ import annotations

import argparse

from hyperjob.cli.cmd_plan import load_checked
from hyperjob.cli.common import EXIT_RUN_FAILED, CliError, add_config_args
from hyperjob.cli.report import print_outcome
from hyperjob.schedule import registry
from hyperjob.schedule.base import SubmitError
from hyperjob.schedule.run import new_run_dir, submit_run, wait_run, write_run_dir
from hyperjob.schedule.scheduler_dry_run import RECORD_NAME, DryRunScheduler


def add_parsers(sub: argparse._SubParsersAction) -> None:
    choices = [registry.AUTO, *(s.name for s in registry.selectable())]
    p = sub.add_parser(
        "submit",
        help="render the stage scripts and submit the DAG (Slurm or local)",
        description="Render CONFIG into <workdir>/runs/<name>-<timestamp>/ and submit every stage at once, "
        "each with afterok on the one before. --scheduler auto uses Slurm when sbatch is on PATH, "
        "else runs the same scripts locally.",
        epilog="examples:\n  hyperjob submit examples/tiny-cpu.yaml --wait\n"
        "  hyperjob submit my.yaml --dry-run --set training.max_steps=50",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p)
    p.add_argument("--scheduler", choices=choices, default=registry.AUTO)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="render the run directory and print the exact commands the scheduler would run (auto: sbatch); "
        "run nothing",
    )
    p.add_argument("--wait", action="store_true", help="block until the run ends; exit 1 if a stage failed")
    p.add_argument("--poll", type=float, default=5.0, metavar="SECONDS", help="status poll interval with --wait")
    p.set_defaults(func=cmd_submit)


def cmd_submit(args: argparse.Namespace) -> int:
    cfg, plan, _ = load_checked(args.config, args.overrides)
    try:
        target = registry.choose(args.scheduler, dry_run=args.dry_run)
    except registry.SchedulerChoiceError as e:
        raise CliError(str(e)) from None
    if target.max_nodes is not None and plan.nodes > target.max_nodes:
        raise CliError(
            f"cluster.nodes: {plan.nodes} nodes, but the {target.name} scheduler runs at most {target.max_nodes}; "
            f"choose another with --scheduler"
        )
    scheduler = DryRunScheduler(target) if args.dry_run else target
    run_dir = new_run_dir(cfg)
    manifest = write_run_dir(cfg, plan, run_dir, scheduler.name)
    assert manifest is not None
    print(f"run {cfg.name}: {run_dir}")
    if args.dry_run:
        _, request = submit_run(scheduler, run_dir, manifest)
        print(f"dry run: nothing submitted; the {target.name} scheduler would run ({run_dir / RECORD_NAME}):")
        for line in request.lines:
            print(f"  {line}")
        return 0
    print(f"submitting {len(manifest.stages)} stages to {target.name}" + ("" if args.wait else " in the background"))
    try:
        manifest, _ = submit_run(scheduler, run_dir, manifest, wait=args.wait)
    except SubmitError as e:
        raise CliError(str(e), EXIT_RUN_FAILED) from None
    if not args.wait:
        print(f"follow it with: hyperjob status {run_dir}")
        return 0
    # The local scheduler ran the stages in the foreground and printed each one; polling again would repeat them.
    if not all(r.state.is_terminal for r in manifest.stages):
        manifest = wait_run(run_dir, poll=args.poll)
    return 0 if print_outcome(run_dir, manifest) else EXIT_RUN_FAILED
