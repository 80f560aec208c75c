"""`hyperjob plan` and `hyperjob render`: what a config will do, without running anything."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from hyperjob import backends
from hyperjob.cli.common import CliError, add_config_args, load_and_plan, table
from hyperjob.config.models import HyperjobConfig
from hyperjob.paths import RunPaths
from hyperjob.plan.planner import Plan, describe, total_steps
from hyperjob.schedule.run import write_run_dir


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="show the parallel layout, batch sizes and steps of a config",
        description="Validate CONFIG and print the layout: processes, TP/PP/DP, global batch, steps per epoch.",
    )
    add_config_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--show-args",
        action="store_true",
        help="also print, as JSON, the exact keyword arguments the train entry passes to the trainer config, "
        "the LoRA config and the model loader (what `python -m hyperjob.stages.train --print-args` prints in a run)",
    )
    p.set_defaults(func=cmd_plan)

    r = sub.add_parser(
        "render",
        help="write the stage scripts of a config into a directory, submit nothing",
        description="Render CONFIG's sbatch scripts into DIR (DIR/scripts/NN-<stage>.sbatch, DIR/config.yaml). "
        "The scripts refer to DIR as their run directory. DIR must not exist yet.",
    )
    add_config_args(r)
    r.add_argument("--out", type=Path, required=True, metavar="DIR", help="new directory to write into")
    r.set_defaults(func=cmd_render)


def _train_args(cfg: HyperjobConfig, plan: Plan) -> dict[str, Any]:
    """The train stage's arguments for a run that does not exist yet: paths show `<run-dir>`."""
    return backends.get(cfg.backend).train_arguments(
        cfg, plan.layout(), RunPaths(Path("<run-dir>")), compile_only=False
    )


def cmd_plan(args: argparse.Namespace) -> int:
    cfg, plan = load_and_plan(args.config, args.overrides, check_inputs=False)
    if args.json:
        data = {
            "backend": plan.backend,
            "instance_type": plan.instance.name,
            "nodes": plan.nodes,
            "processes_per_node": plan.procs_per_node,
            "world_size": plan.world_size,
            "tensor_parallel": plan.tensor,
            "pipeline_parallel": plan.pipeline,
            "data_parallel": plan.data,
            "kv_size_multiplier": plan.kv_size_multiplier,
            "global_batch": plan.global_batch,
            "dataset_rows": plan.dataset_rows,
            "steps_per_epoch": plan.steps_per_epoch,
            "total_steps": total_steps(plan, cfg),
            "stages": list(plan.stages),
            "notes": list(plan.notes),
        }
        if args.show_args:
            data["train_args"] = _train_args(cfg, plan)
        print(json.dumps(data, indent=2))
        return 0
    print(f"plan for {cfg.name} ({args.config})")
    print(table(describe(plan, cfg)))
    for note in plan.notes:
        print(f"note: {note}")
    if args.show_args:
        print("train stage arguments:")
        print(json.dumps(_train_args(cfg, plan), indent=2, sort_keys=True))
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    cfg, plan = load_and_plan(args.config, args.overrides, check_inputs=False)
    out = args.out.resolve()
    if out.exists():
        raise CliError(f"--out {out} already exists; choose a new directory")
    write_run_dir(cfg, plan, out, scheduler=None)
    for script in sorted((out / "scripts").iterdir()):
        print(script)
    return 0
