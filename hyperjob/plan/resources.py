"""Each stage's effective resources: partition, nodes, time, exclusive, extra sbatch options, interpreter.

One rule, used by the renderer (the `#SBATCH` lines) and by `hyperjob plan` (the resources table), so what plan
shows is what the scripts ask for: `stage_resources.<stage>` > the stage table's default for that stage >
`cluster.*` (`environment.*` for the interpreter, decided by `Backend.python`). The cluster's values are sized for
training; a merge or a download that inherited them would hold a whole (exclusive) node for a day.

Pure: no filesystem, no cluster. The local executor ignores everything here but the interpreter (the `#SBATCH`
lines are comments to bash).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hyperjob import backends
from hyperjob.config.load import ConfigError
from hyperjob.config.models import HyperjobConfig, StageResourceOverride
from hyperjob.stage_table import StageSpec, names, spec

# Where a value came from, as `plan` and the scripts name it.
OVERRIDE = "stage_resources"
STAGE_DEFAULT = "stage default"
CLUSTER = "cluster"


@dataclass(frozen=True)
class Resources:
    """What one stage's job asks for; `sources` names where each value came from (key -> OVERRIDE, ...)."""

    stage: str
    partition: str | None
    nodes: int
    time: str | None
    exclusive: bool
    sbatch_extra: tuple[str, ...]
    python: str
    sources: tuple[tuple[str, str], ...]

    def source(self, key: str) -> str:
        return dict(self.sources)[key]


def slurm_minutes(time: str) -> int | None:
    """Slurm's reading of a `--time` value (validated by `_SLURM_TIME`) in minutes, seconds rounded up; None: no
    limit (UNLIMITED, INFINITE, or 0, which Slurm reads as none)."""
    if time in ("UNLIMITED", "INFINITE"):
        return None
    days, _, clock = time.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days:  # D-H, D-H:M, D-H:M:S
        hours, minutes, seconds = [*parts, 0, 0][:3]
    elif len(parts) == 3:  # H:M:S
        hours, minutes, seconds = parts
    else:  # M, M:S
        hours, (minutes, seconds) = 0, [*parts, 0][:2]
    total = int(days or 0) * 86400 + hours * 3600 + minutes * 60 + seconds
    return -(-total // 60) or None


def _time(row: StageSpec, override: str | None, cluster: str | None) -> tuple[str | None, str]:
    """A stage's default never exceeds cluster.time: a partition whose limit is below it would never start the job."""
    if override is not None:
        return override, OVERRIDE
    if row.time_limit is None:
        return cluster, CLUSTER
    own, limit = slurm_minutes(row.time_limit), slurm_minutes(cluster) if cluster else None
    if cluster and limit is not None and (own is None or limit < own):
        return cluster, CLUSTER
    return row.time_limit, STAGE_DEFAULT


def _nodes(cfg: HyperjobConfig, row: StageSpec, override: int | None) -> int:
    """Distributed stages run on the layout's nodes (world size, data parallel and the compile cache follow
    cluster.nodes); the others are one task on one node, and more nodes would sit idle."""
    layout = cfg.cluster.nodes if row.distributed else 1
    key = f"stage_resources.{row.name}.nodes"
    if override is not None and override != layout and row.distributed:
        msg = f"{override} differs from cluster.nodes={layout}: a distributed stage runs on the training layout's nodes"
        raise ConfigError([(key, f"{msg} (set cluster.nodes instead)")])
    if override is not None and override != layout:
        raise ConfigError([(key, f"{override}: stage {row.name!r} runs one task on one node (allowed: 1)")])
    return layout


def resolve(cfg: HyperjobConfig, stage: str) -> Resources:
    """The resources of `stage` in a run of `cfg`; ConfigError for an override the stage cannot honour."""
    row, cluster = spec(stage), cfg.cluster
    own = cfg.stage_resources.get(stage, StageResourceOverride())
    time, time_from = _time(row, own.time, cluster.time)
    if own.exclusive is not None:
        exclusive, exclusive_from = own.exclusive, OVERRIDE
    elif row.distributed:
        exclusive, exclusive_from = cluster.exclusive, CLUSTER
    else:  # a single-task stage shares its node
        exclusive, exclusive_from = False, STAGE_DEFAULT

    def source(mine: object, inherited: str = CLUSTER) -> str:
        return OVERRIDE if mine is not None else inherited

    return Resources(
        stage=stage,
        partition=own.partition if own.partition is not None else cluster.partition,
        nodes=_nodes(cfg, row, own.nodes),
        time=time,
        exclusive=exclusive,
        sbatch_extra=own.sbatch_extra if own.sbatch_extra is not None else cluster.sbatch_extra,
        python=backends.get(cfg.backend).python(cfg, row),  # the one place that decides, override included
        sources=(
            ("partition", source(own.partition)),
            ("nodes", source(own.nodes, CLUSTER if row.distributed else STAGE_DEFAULT)),
            ("time", time_from),
            ("exclusive", exclusive_from),
            ("sbatch_extra", source(own.sbatch_extra)),
            ("python", source(own.python, "environment")),
        ),
    )


def check(cfg: HyperjobConfig) -> None:
    """Refuse `stage_resources` for a stage the table does not have, or nodes the stage cannot use (the planner's
    check, before anything is written). A stage of the table that this run lacks (compile on cpu) is accepted: one
    config may serve several backends."""
    allowed = names()
    for stage, own in cfg.stage_resources.items():
        if stage not in allowed:
            raise ConfigError([("stage_resources", f"unknown stage {stage!r} (allowed: {', '.join(allowed)})")])
        _nodes(cfg, spec(stage), own.nodes)


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


def _marked(text: str, source: str) -> str:
    """Values that are not the cluster's are marked, so a reader sees at once which stages differ."""
    return {OVERRIDE: f"{text} (set)", STAGE_DEFAULT: f"{text} (default)"}.get(source, text)


HEADER = ("stage", "partition", "nodes", "time", "exclusive", "sbatch_extra", "python")


def table_rows(cfg: HyperjobConfig, stages: Sequence[str]) -> list[tuple[str, ...]]:
    """One row per stage for `hyperjob plan`; `(set)`: from stage_resources, `(default)`: the stage's default (one
    node for a single-task stage goes unmarked: it is what such a stage is)."""
    rows = []
    for stage in stages:
        r = resolve(cfg, stage)
        values = {
            "partition": r.partition or "(Slurm's default)",
            "nodes": str(r.nodes),
            "time": r.time or "(partition's default)",
            "exclusive": _yes_no(r.exclusive),
            "sbatch_extra": " ".join(r.sbatch_extra) or "-",
            "python": r.python,
        }
        marked = {key: _marked(value, r.source(key)) for key, value in values.items()}
        marked["nodes"] = (
            _marked(values["nodes"], r.source("nodes")) if r.source("nodes") == OVERRIDE else values["nodes"]
        )
        rows.append((stage, *(marked[key] for key in HEADER[1:])))
    return rows


def as_json(cfg: HyperjobConfig, stages: Sequence[str]) -> dict[str, dict[str, object]]:
    """`hyperjob plan --json`: each stage's resources and where each value came from."""
    out: dict[str, dict[str, object]] = {}
    for stage in stages:
        r = resolve(cfg, stage)
        out[stage] = {
            "partition": r.partition,
            "nodes": r.nodes,
            "time": r.time,
            "exclusive": r.exclusive,
            "sbatch_extra": list(r.sbatch_extra),
            "python": r.python,
            "sources": dict(r.sources),
        }
    return out
