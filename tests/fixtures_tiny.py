"""Fixtures for the built-in tiny model and run directories for examples/tiny-cpu.yaml.

The model is built once per session (a few seconds) and copied into each run's shared model cache, so
stages find it complete and never rebuild or download.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from hyperjob.config.load import dump_config, load_config
from hyperjob.paths import RunPaths, base_model_dir

__all__ = [
    "REPO_ROOT",
    "TINY_EXAMPLE",
    "make_run_dir",
    "make_tiny_run_dir",
    "tiny_model_dir",
    "tiny_run_dir",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_EXAMPLE = REPO_ROOT / "examples" / "tiny-cpu.yaml"


def make_run_dir(
    workdir: Path,
    overrides: Sequence[str] = (),
    name: str = "run",
    model_dir: Path | None = None,
) -> Path:
    """A run dir under `workdir/runs/` holding the resolved tiny-cpu config; `model_dir` is copied into the
    run's model cache (if not already there) so the download stage has nothing to do."""
    cfg = load_config(TINY_EXAMPLE, overrides=[f"workdir={workdir}", *overrides])
    run_dir = workdir / "runs" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    RunPaths(run_dir).config.write_text(dump_config(cfg), encoding="utf-8")
    target = base_model_dir(cfg)
    if model_dir is not None and not target.exists():
        shutil.copytree(model_dir, target)
    return run_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete tiny-llama model directory (with the download stage's completion marker)."""
    from hyperjob.stages.download import write_marker
    from hyperjob.stages.tiny import build_tiny_llama

    out = build_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model")
    write_marker(out, "tiny-llama", None)
    return out


@pytest.fixture
def make_tiny_run_dir(tmp_path: Path, tiny_model_dir: Path) -> Callable[..., Path]:
    """Factory: `make(overrides=(), name="run", with_model=True)` -> run dir; workdir is `tmp_path/work`."""

    def make(overrides: Sequence[str] = (), name: str = "run", with_model: bool = True) -> Path:
        return make_run_dir(tmp_path / "work", overrides, name, tiny_model_dir if with_model else None)

    return make


@pytest.fixture
def tiny_run_dir(make_tiny_run_dir: Callable[..., Path]) -> Path:
    """A run dir for examples/tiny-cpu.yaml as shipped (workdir under tmp, tiny model in place)."""
    return make_tiny_run_dir()
