"""Pieces shared by the CLI verbs: loading a config with clear errors, printing tables.

Imported by `hyperjob --help` itself, so it imports nothing heavy at module level (pydantic, the planner).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hyperjob.config.models import HyperjobConfig
    from hyperjob.plan.planner import Plan

EXIT_RUN_FAILED = 1
EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a Unix tool whose reader went away


class CliError(Exception):
    """An expected failure: printed as one line (per problem), exit code attached."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def load_and_plan(config: Path, overrides: Sequence[str], *, check_inputs: bool = True) -> tuple[HyperjobConfig, Plan]:
    from hyperjob.config.load import ConfigError, load_config
    from hyperjob.plan.planner import make_plan

    try:
        cfg = load_config(config, overrides, check_inputs=check_inputs)
        return cfg, make_plan(cfg)
    except ConfigError as e:
        # Plan-level errors carry no source: name the file here (a --set error names its --set).
        lines = [
            line if line.startswith((str(config), "--set ")) else f"{config}: {line.removeprefix('config: ')}"
            for line in e.lines()
        ]
        raise CliError("\n".join(lines)) from None


def table(rows: Sequence[Sequence[str]], header: Sequence[str] | None = None) -> str:
    all_rows = [list(header)] + [list(r) for r in rows] if header else [list(r) for r in rows]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(all_rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in all_rows]
    return "\n".join(lines)


def err(message: str) -> None:
    for line in message.splitlines():
        print(f"hyperjob: error: {line}", file=sys.stderr)


def add_config_args(parser: object) -> None:
    """CONFIG positional and repeated --set KEY=VALUE overrides."""
    import argparse

    assert isinstance(parser, argparse.ArgumentParser)
    parser.add_argument("config", type=Path, metavar="CONFIG", help="the run's YAML config")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set training.max_steps=10 (repeatable)",
    )
