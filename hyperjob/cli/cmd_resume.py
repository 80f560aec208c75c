"""`hyperjob resume RUN_DIR`: redo the failed, cancelled and lost stages of a run and what comes after them."""

from __future__ import annotations

import argparse
from pathlib import Path

from hyperjob.cli.cmd_runs import require_run_dir
from hyperjob.cli.common import EXIT_RUN_FAILED, CliError, load_and_plan
from hyperjob.cli.report import print_outcome
from hyperjob.paths import RunPaths
from hyperjob.schedule.base import SubmitError
from hyperjob.schedule.resume import ResumeError, resume_run
from hyperjob.schedule.run import wait_run

DESCRIPTION = """\
Resume a run that stopped part-way (a failed stage, a cancel, a lost job, a node that died): stages that
completed are kept, and so are stages still queued or running (what is redone waits for them); every other
stage is submitted again with the same scheduler, in order, and so is everything after it. A train stage that
is redone resumes from its newest complete checkpoint (cpu, cuda; on Trainium it stops instead, saying what to
do: optimum-neuron 0.4.5 cannot resume).

A completed stage counts only when its script recorded exit 0 and its completion marker still holds: the config
values it depends on, its outputs (files, sizes, times) and the stage before it are unchanged. If the config now
differs in a value a completed stage depends on, resume refuses and names the key; --force redoes that stage and
all after it instead.

The config is the run's own config.yaml, with --set overrides, or --config FILE (the scripts are rendered again
from it). A fault fixed outside the config (a node, a file, a quota) needs neither."""


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "resume",
        help="redo the failed/cancelled/lost stages of a run (and those after them), keep what completed",
        description=DESCRIPTION,
        epilog="examples:\n  hyperjob resume /fsx/hyperjob/runs/llama3-8b-dolly-20261130-101500 --wait\n"
        "  hyperjob resume RUN_DIR --set training.max_steps=2000 --force",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--config", type=Path, metavar="FILE", help="use this config instead of RUN_DIR/config.yaml")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config value"
    )
    p.add_argument("--force", action="store_true", help="redo completed stages whose config values changed")
    p.add_argument("--wait", action="store_true", help="block until the run ends; exit 1 if a stage failed")
    p.add_argument("--poll", type=float, default=5.0, metavar="SECONDS", help="status poll interval with --wait")
    p.set_defaults(func=cmd_resume)


def cmd_resume(args: argparse.Namespace) -> int:
    run_dir = require_run_dir(args.run_dir, "resume")
    cfg, plan = load_and_plan(args.config or RunPaths(run_dir).config, args.overrides)
    print(f"resuming {run_dir}")
    try:
        manifest, decided = resume_run(run_dir, cfg, plan, force=args.force)
    except ResumeError as e:
        raise CliError(str(e)) from None
    except SubmitError as e:
        raise CliError(str(e), EXIT_RUN_FAILED) from None
    if not decided.redo:
        print("nothing to resume: every stage completed or is still queued")
        return 0
    print(f"redoing {', '.join(decided.redo)}")
    if not args.wait:
        print(f"follow it with: hyperjob status {run_dir}")
        return 0
    manifest = wait_run(run_dir, poll=args.poll)
    return 0 if print_outcome(run_dir, manifest) else EXIT_RUN_FAILED
