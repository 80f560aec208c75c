"""Shared plumbing for stage entry points: argument parsing, logging, atomic outputs, secrets.

Kept free of torch/transformers imports so every stage (and the CLI) can import it cheaply.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hyperjob.backends.envspec import EnvSpec
from hyperjob.config.load import ConfigError, load_resolved, redact
from hyperjob.config.models import HyperjobConfig, ModelSection
from hyperjob.paths import RunPaths

# Written last into a downloaded/built model directory: its presence means "complete".
COMPLETE_MARKER = ".hyperjob-complete"
# What a train entry (any backend) leaves in the run directory: steps, losses, wall time.
SUMMARY_NAME = "train_summary.json"
# A stage body's return value: stopped on request with its work saved (exit 0), but not complete (no marker).
STOPPED_EARLY = -1


class StageError(Exception):
    """An expected failure: reported as one line on stderr, no traceback."""


def require_pinned_environment(env: EnvSpec) -> None:
    """Refuse a venv that is not the backend's pinned set: version drift fails late and obscurely otherwise."""
    problem = env.mismatch(env.installed_versions())
    if problem:
        raise StageError(problem)


def rank() -> int:
    """Global rank under torchrun/Slurm; 0 for single-process stages."""
    for var in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(var)
        if value is not None and value.isdigit():
            return int(value)
    return 0


def world_size() -> int:
    value = os.environ.get("WORLD_SIZE", "1")
    return int(value) if value.isdigit() else 1


def setup_logging(stage: str, level: int = logging.INFO) -> logging.Logger:
    """Log to stdout with the rank in every line, so interleaved multi-process Slurm logs stay readable."""
    prefix = f"[{stage} rank {rank()}/{world_size()}]"
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix} %(levelname)s %(message)s", "%H:%M:%S"))
    log = logging.getLogger(f"hyperjob.stages.{stage}")
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
    return log


def parse_run_dir(argv: list[str] | None, stage: str, description: str) -> RunPaths:
    parser = argparse.ArgumentParser(prog=f"python -m hyperjob.stages.{stage}", description=description)
    parser.add_argument("--run-dir", required=True, type=Path, help="run directory holding config.yaml")
    args = parser.parse_args(argv)
    return RunPaths(args.run_dir.resolve())


def load_run_config(paths: RunPaths) -> HyperjobConfig:
    if not paths.config.is_file():
        raise StageError(f"{paths.config} does not exist: is {paths.run_dir} a hyperjob run directory?")
    return load_resolved(paths.config)


def run_stage(
    stage: str,
    body: Callable[[RunPaths, HyperjobConfig], int],
    argv: list[str] | None,
    doc: str,
    *,
    skip_done: bool = True,
    mark: bool = True,
) -> int:
    """Parse `--run-dir`, load the config and run `body`; expected errors become one stderr line and exit 2.

    `skip_done`: a stage whose completion marker still holds (same config values, same outputs, same upstream)
    does nothing and says so. `mark`: on success, write the marker (rank 0). See hyperjob.stage_outputs.
    """
    from hyperjob.stage_outputs import check_marker, write_marker

    paths = parse_run_dir(argv, stage, doc)
    who = f"hyperjob {stage}" + (f" (rank {rank()})" if world_size() > 1 else "")
    try:
        cfg = load_run_config(paths)
        if skip_done:
            done = check_marker(paths, cfg, stage)
            if done.ok:
                print(f"{who}: already complete ({done.why}); nothing to do", flush=True)
                return 0
        code = body(paths, cfg)
        if code == STOPPED_EARLY:
            return 0
        if code == 0 and mark and rank() == 0:
            write_marker(paths, cfg, stage)
        return code
    except ConfigError as e:
        for line in e.lines():
            print(f"{who}: error: {line}", file=sys.stderr)
        return 2
    except StageError as e:
        print(f"{who}: error: {redact(str(e))}", file=sys.stderr)
        return 2


def read_token(model: ModelSection) -> str | None:
    """The hub token, read at run time only (env var first, then file); never logged or passed in argv."""
    if model.token_env:
        value = os.environ.get(model.token_env, "").strip()
        if value:
            return value
    if model.token_file is not None:
        try:
            value = Path(model.token_file).read_text(encoding="utf-8").strip()
        except OSError as e:
            raise StageError(f"cannot read model.token_file {model.token_file}: {e.strerror}") from None
        return value or None
    return None


def last_logged_loss(log_history: list[dict[str, Any]]) -> float | None:
    """The loss of the trainer's last logging step (its mean over the run hides where training ended)."""
    for entry in reversed(log_history):
        if "loss" in entry:
            return float(entry["loss"])
    return None


def dtype_kwargs(dtype: Any) -> dict[str, Any]:
    """`from_pretrained` takes `dtype` since transformers 4.56 (and warns on `torch_dtype`); older needs the latter."""
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def require_model_dir(path: Path, what: str, hint: str) -> None:
    if not is_model_dir(path):
        raise StageError(f"{what} {path} has no config.json: {hint}")
