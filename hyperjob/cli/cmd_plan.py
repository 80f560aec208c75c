"""`hyperjob plan` and `hyperjob render`: what a config will do, without running anything."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hyperjob import backends
from hyperjob.cli.common import CliError, add_config_args, load_and_plan, table
from hyperjob.config.load import ConfigError
from hyperjob.config.models import DatasetFormat, HyperjobConfig
from hyperjob.paths import RunPaths
from hyperjob.plan.inputs import check_dataset_sample
from hyperjob.plan.planner import Plan, describe, total_steps


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


def _row_problem(row: Any, fmt: DatasetFormat, where: str) -> str | None:
    """The train stage's own row check, as plan's input check asks it (pure Python: no torch)."""
    from hyperjob.stages.data import DataError, validate_row

    try:
        validate_row(row, fmt, where)
    except DataError as e:
        return str(e)
    return None


def load_checked(config: Path, overrides: Sequence[str]) -> tuple[HyperjobConfig, Plan, list[str]]:
    """Load and plan CONFIG, check the local inputs, and print every warning a submit would print.

    plan, render and submit (also --dry-run) all start here, so each says the same truth before anything runs.
    Returns the warnings too, for `plan --json`.
    """
    cfg, plan = load_and_plan(config, overrides)
    try:
        check_dataset_sample(cfg.dataset, _row_problem)
    except ConfigError as e:
        raise CliError("\n".join(ConfigError(e.problems, str(config)).lines())) from None
    warnings = backends.get(cfg.backend).warnings(cfg, plan.stages)
    for warning in warnings:
        print(f"hyperjob: warning: {warning}", file=sys.stderr)
    return cfg, plan, warnings


def _train_args(cfg: HyperjobConfig, plan: Plan) -> dict[str, Any]:
    """The train stage's arguments for a run that does not exist yet: paths show `<run-dir>`."""
    return backends.get(cfg.backend).train_arguments(
        cfg, plan.layout(), RunPaths(Path("<run-dir>")), compile_only=False
    )


def _stage_resources(cfg: HyperjobConfig, plan: Plan, config: Path, *, as_json: bool) -> Any:
    """Each stage's partition, nodes, time, exclusive, sbatch options and interpreter, as the scripts ask for them:
    the text table `plan` prints, or (as_json) the mapping `plan --json` carries."""
    from hyperjob.plan import resources

    try:
        resources.check(cfg)  # the planner's check too; here so that plan never shows a table it would refuse
        if as_json:
            return resources.as_json(cfg, plan.stages)
        rows = resources.table_rows(cfg, plan.stages)
    except ConfigError as e:
        raise CliError("\n".join(ConfigError(e.problems, str(config)).lines())) from None
    title = "stage resources ((set): stage_resources.<stage>, (default): the stage's own, else cluster.*):"
    return f"{title}\n{table(rows, resources.HEADER)}"


def cmd_plan(args: argparse.Namespace) -> int:
    cfg, plan, warnings = load_checked(args.config, args.overrides)
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
            "warnings": warnings,
            "stage_resources": _stage_resources(cfg, plan, args.config, as_json=True),
        }
        if args.show_args:
            data["train_args"] = _train_args(cfg, plan)
        print(json.dumps(data, indent=2))
        return 0
    print(f"plan for {cfg.name} ({args.config})")
    print(table(describe(plan, cfg)))
    print(_stage_resources(cfg, plan, args.config, as_json=False))
    for note in plan.notes:
        print(f"note: {note}")
    if args.show_args:
        print("train stage arguments:")
        print(json.dumps(_train_args(cfg, plan), indent=2, sort_keys=True))
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from hyperjob.schedule.run import write_run_dir  # render only: jinja and the schedulers cost plan 45 ms

    cfg, plan, _ = load_checked(args.config, args.overrides)
    out = args.out.resolve()
    if out.exists():
        raise CliError(f"--out {out} already exists; choose a new directory")
    write_run_dir(cfg, plan, out, scheduler=None)
    for script in sorted((out / "scripts").iterdir()):
        print(script)
    return 0
