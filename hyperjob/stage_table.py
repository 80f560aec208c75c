"""The stage table: every stage of the pipeline, in DAG order, as one row each.

A row says what a stage is for, which template renders it, which module its script runs, which backends have it
and what it leaves in the run directory. Adding a stage is one row here and one template; the renderer, the
planner and the reports read this table and hold no per-stage knowledge of their own. Backends may replace a
stage's entry module (`Backend.entry`), never its place in the order.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hyperjob.config.load import ConfigError
from hyperjob.config.models import HyperjobConfig
from hyperjob.paths import RunPaths, base_model_dir


@dataclass(frozen=True)
class Output:
    """One thing a stage produces, shown when a run completes."""

    label: str
    path: Callable[[RunPaths], Path]
    preview: Callable[[Path], list[str]] | None = None
    optional: bool = False  # produced only when configured: not shown when absent


@dataclass(frozen=True)
class StageSpec:
    """One row of the table.

    `backends`: the backends that have this stage (None: every backend). `distributed`: runs on every node of the
    allocation through the backend's launcher (torchrun), the others run one task on one node. `group`: the
    interpreter group, `train` for stages that need the training stack (environment.train_python), `tools` for
    the rest. `hub`: the only stage allowed to reach the Hugging Face hub. `template_dir`: None for the shipped
    templates; a directory for a stage added from outside the package (its template may import the shipped macros).
    `resumable`: long-running, checkpointed: its job is requeued (within cluster.max_restarts) and saves a
    checkpoint before its time limit. `config_keys`: the config keys (dotted; a section name covers the section)
    whose values the stage's result depends on: a change to one of them invalidates a completed stage. `outputs`:
    what the stage leaves behind, as paths; their file sizes and times make the digest that proves a completed
    stage still stands (stage_outputs). `time_limit`: the stage's default `--time`, for stages that need far less than
    training (capped at cluster.time, so a short partition limit still holds); None: cluster.time. Resources
    (partition, nodes, time, exclusive, sbatch options, interpreter) are resolved by hyperjob.plan.resources.
    """

    name: str
    purpose: str
    entry: str
    args: tuple[str, ...] = ()
    backends: frozenset[str] | None = None
    distributed: bool = False
    group: str = "tools"
    hub: bool = False
    resumable: bool = False
    time_limit: str | None = None
    produces: tuple[Output, ...] = ()
    config_keys: tuple[str, ...] = ()
    outputs: Callable[[RunPaths, HyperjobConfig], tuple[Path, ...]] = field(default=lambda p, c: (), compare=False)
    template_dir: Path | None = field(default=None, compare=False)

    @property
    def template(self) -> str:
        return f"{self.name}.sbatch.j2"

    def available_for(self, backend_name: str) -> bool:
        return self.backends is None or backend_name in self.backends


def _first_answer(answers: Path) -> list[str]:
    """The first evaluation prompt with both answers, for the end-of-run summary."""
    try:
        first = json.loads(answers.read_text())[0]
        return [f"  prompt: {first['prompt']}", f"  base:   {first['base']!r}", f"  tuned:  {first['tuned']!r}"]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return []


def _lines(table: Path) -> list[str]:
    """A short text file (the needle accuracy table), indented, for the end-of-run summary."""
    try:
        return [f"  {line}" for line in table.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError):
        return []


_ADAPTER = Output("adapter", lambda p: p.adapter)
# Default time limits of the single-task stages: generous for an 8B-70B model on a shared filesystem, far below a
# training day, so that the scheduler can backfill them.
_SHORT = "02:00:00"
_EVALUATE = "04:00:00"  # generation with the base and the tuned model, plus the needle table
_MODEL = ("model.id", "model.revision")
_SHAPES = ("backend", *_MODEL, "dataset", "parallel", "training", "lora", "cluster.instance_type", "cluster.nodes",
           "cluster.devices_per_node")  # fmt: skip

_BUILTIN = (
    StageSpec(
        name="download",
        purpose="Fetch the base model (and hub dataset) onto the shared filesystem.",
        entry="hyperjob.stages.download",
        hub=True,
        config_keys=(*_MODEL, "dataset"),
        outputs=lambda p, c: (base_model_dir(c),),
        time_limit=_SHORT,
    ),
    StageSpec(
        name="compile",
        purpose="Precompile the Neuron training graphs (neuron_parallel_compile) into the shared cache.",
        entry="hyperjob.stages.train",
        args=("--compile",),
        backends=frozenset({"neuron"}),
        distributed=True,
        group="train",
        config_keys=_SHAPES,
    ),
    StageSpec(
        name="train",
        purpose="LoRA fine-tuning; checkpoints every save_steps, resumes from the newest one.",
        entry="hyperjob.stages.train",
        distributed=True,
        group="train",
        resumable=True,
        produces=(_ADAPTER,),
        config_keys=_SHAPES,
        outputs=lambda p, c: (p.run_dir / "train_summary.json", p.checkpoints),
    ),
    StageSpec(
        name="consolidate",
        purpose="Tensor-parallel shards -> a standard PEFT adapter.",
        entry="hyperjob.stages.consolidate",
        backends=frozenset({"neuron"}),
        produces=(_ADAPTER,),
        config_keys=("consolidate",),
        outputs=lambda p, c: (p.adapter,),
        time_limit=_SHORT,
    ),
    StageSpec(
        name="merge",
        purpose="Merge the adapter into the base model (safetensors shards + index).",
        entry="hyperjob.stages.merge",
        produces=(Output("merged model", lambda p: p.merged),),
        config_keys=("merge",),
        outputs=lambda p, c: (p.merged,),
        time_limit=_SHORT,
    ),
    StageSpec(
        name="evaluate",
        purpose="Answer the evaluation prompts with the base and the tuned model.",
        entry="hyperjob.stages.evaluate",
        produces=(
            Output("evaluation answers", lambda p: p.evaluation / "answers.json", _first_answer),
            Output("needle accuracy", lambda p: p.evaluation / "needle.md", _lines, optional=True),
        ),
        config_keys=("evaluate",),
        outputs=lambda p, c: (p.evaluation,),
        time_limit=_EVALUATE,
    ),
)

_TABLE: list[StageSpec] = list(_BUILTIN)


def all_stages() -> tuple[StageSpec, ...]:
    """Every stage, in DAG order."""
    return tuple(_TABLE)


def spec(name: str) -> StageSpec:
    for row in _TABLE:
        if row.name == name:
            return row
    raise KeyError(f"no stage {name!r}; the stages are {', '.join(names())}")


def names() -> list[str]:
    return [row.name for row in _TABLE]


@contextlib.contextmanager
def registered(row: StageSpec, *, after: str) -> Iterator[StageSpec]:
    """Add a stage after `after` for the duration of the block (extensions and tests)."""
    if row.name in names():
        raise ValueError(f"stage {row.name!r} already exists")
    _TABLE.insert(names().index(after) + 1, row)
    try:
        yield row
    finally:
        _TABLE.remove(row)


def resolve_stages(requested: Sequence[str] | None, backend: str, default: Sequence[str]) -> tuple[str, ...]:
    """The stages a run will have: `requested` (a config's `stages`) checked against the table, or the default."""
    order = names()
    chosen = tuple(default if requested is None else requested)
    unknown = [s for s in chosen if s not in order]
    if unknown:
        raise ConfigError([("stages", f"unknown stage {unknown[0]!r} (allowed: {', '.join(order)})")])
    index = [order.index(s) for s in chosen]
    if index != sorted(index):
        raise ConfigError([("stages", f"stages {list(chosen)} are out of order; the order is {order}")])
    for name in chosen:
        row = spec(name)
        if not row.available_for(backend):
            have = ", ".join(repr(b) for b in sorted(row.backends or ()))
            raise ConfigError([("stages", f"stage {name!r} exists only for backend {have} (backend is {backend!r})")])
    return chosen
