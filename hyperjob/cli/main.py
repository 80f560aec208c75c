"""The `hyperjob` command: a few verbs over one config file.

Light verbs (plan, render, status, logs, cancel, init, --help) import no torch
or transformers; heavy work happens inside the stage scripts.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from hyperjob import __version__
from hyperjob.cli import cmd_checkpoint, cmd_env, cmd_init, cmd_plan, cmd_resume, cmd_run, cmd_submit
from hyperjob.cli.common import CliError, err
from hyperjob.schedule.base import SchedulerError

DESCRIPTION = """\
LoRA fine-tuning of Llama-class models on Slurm (Trainium or NVIDIA GPUs), from one config file.

  hyperjob init --preset cpu-tiny            write a starter config
  hyperjob plan CONFIG                       show TP/DP layout, batch and steps
  hyperjob submit CONFIG [--wait]            render and queue download -> ... -> evaluate
  hyperjob status RUN_DIR                    state of each stage
  hyperjob logs RUN_DIR STAGE [--follow]     a stage's log
  hyperjob cancel RUN_DIR                    stop a run
  hyperjob resume RUN_DIR [--wait]           redo what failed (and after it), keep what completed
  hyperjob consolidate CHECKPOINT --output DIR   Neuron TP shards -> PEFT adapter (+ merged model)
  hyperjob merge ADAPTER --base DIR --output DIR streaming LoRA merge in bounded memory
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hyperjob", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"hyperjob {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for module in (cmd_init, cmd_plan, cmd_submit, cmd_resume, cmd_run, cmd_checkpoint, cmd_env):
        module.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except CliError as e:
        err(str(e))
        return e.code
    except SchedulerError as e:
        err(str(e))
        return 1
    except KeyboardInterrupt:
        err("interrupted")
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
