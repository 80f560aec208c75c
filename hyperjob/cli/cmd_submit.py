"""`hyperjob submit`: render a run directory and queue the whole stage DAG."""

from __future__ import annotations

import argparse
import sys

from hyperjob.cli.common import EXIT_RUN_FAILED, CliError, add_config_args, load_and_plan, table
from hyperjob.cli.report import print_outcome
from hyperjob.schedule import slurm
from hyperjob.schedule.run import SubmitError, new_run_dir, submit_local, submit_slurm, wait_run, write_run_dir


def add_parsers(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--scheduler", choices=["auto", "slurm", "local"], default="auto")
    p.add_argument("--dry-run", action="store_true", help="render into the run directory only; call no scheduler")
    p.add_argument("--wait", action="store_true", help="block until the run ends; exit 1 if a stage failed")
    p.add_argument("--poll", type=float, default=5.0, metavar="SECONDS", help="status poll interval with --wait")
    p.set_defaults(func=cmd_submit)


def choose_scheduler(requested: str) -> str:
    if requested == "auto":
        return "slurm" if slurm.available() else "local"
    if requested == "slurm" and not slurm.available():
        raise CliError("--scheduler slurm: sbatch is not on PATH (use --scheduler local, or load Slurm)")
    return requested


def cmd_submit(args: argparse.Namespace) -> int:
    cfg, plan = load_and_plan(args.config, args.overrides)
    if not args.dry_run and cfg.backend == "neuron" and {"compile", "train"} & set(cfg.stage_list):
        # Say so up front rather than after the download: the queue would stop at the compile stage.
        print(
            "hyperjob: warning: backend 'neuron': the Trainium training entry (optimum-neuron) is not in this "
            "version yet, so the compile and train stages will fail; `hyperjob consolidate` handles checkpoints "
            "you already have",
            file=sys.stderr,
        )
    scheduler = "dry-run" if args.dry_run else choose_scheduler(args.scheduler)
    if scheduler == "local" and plan.nodes > 1:
        raise CliError(f"cluster.nodes: {plan.nodes} needs Slurm; the local executor runs one node")
    run_dir = new_run_dir(cfg)
    manifest = write_run_dir(cfg, plan, run_dir, scheduler)
    assert manifest is not None
    print(f"run {cfg.name}: {run_dir}")
    if scheduler == "dry-run":
        print(table([(f"{r.index:02d}", r.name, r.script) for r in manifest.stages], ("#", "stage", "script")))
        print("dry run: nothing submitted")
        return 0
    if scheduler == "slurm":
        print(f"submitting {len(manifest.stages)} stages to Slurm:")
        try:
            manifest = submit_slurm(run_dir, manifest)
        except SubmitError as e:
            raise CliError(str(e), EXIT_RUN_FAILED) from None
    else:
        print(
            f"running {len(manifest.stages)} stages with the local executor"
            + ("" if args.wait else " in the background")
        )
        manifest = submit_local(run_dir, manifest, wait=args.wait)
    if not args.wait:
        print(f"follow it with: hyperjob status {run_dir}")
        return 0
    manifest = wait_run(run_dir, poll=args.poll)
    return 0 if print_outcome(run_dir, manifest) else EXIT_RUN_FAILED
