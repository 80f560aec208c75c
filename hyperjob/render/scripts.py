"""Render the stage scripts of a run: a pure function of (config, plan, run dir).

Nothing here touches the filesystem or a cluster; `hyperjob.schedule.run` writes
the result. The per-stage context is a plain dataclass so templates see typed,
already-decided values (no logic about backends inside Jinja beyond layout).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from hyperjob import __version__, backends
from hyperjob.backends.base import Backend
from hyperjob.config.models import HyperjobConfig
from hyperjob.paths import RunPaths, datasets_cache_dir
from hyperjob.plan.planner import Plan
from hyperjob.plan.resources import OVERRIDE, STAGE_DEFAULT, Resources, resolve
from hyperjob.render.shell import make_env, quote, slurm_filename
from hyperjob.stage_table import StageSpec, spec


@dataclass(frozen=True)
class StageContext:
    """Everything one stage template needs, decided in Python."""

    version: str
    stage: str
    index: int
    total: int
    purpose: str
    template: str
    run_name: str
    run_dir: str
    python: str
    job_name: str
    log_pattern: str
    nodes: int
    exclusive: bool
    sbatch_options: tuple[str, ...]
    resources_note: str
    resumable: bool
    max_restarts: int
    save_on_request: bool
    env: tuple[tuple[str, str], ...]
    unset_env: tuple[str, ...]
    srun_extra: str
    procs_per_node: int
    world_size: int
    layout: str
    token_source: str
    entry: str
    entry_args: tuple[str, ...]
    launch_wrapper: tuple[str, ...]
    outcome: str
    extra: Mapping[str, str | int]


@dataclass(frozen=True)
class RenderedStage:
    index: int
    stage: str
    filename: str
    text: str


def _sbatch_options(cfg: HyperjobConfig, row: StageSpec, backend: Backend, res: Resources) -> tuple[str, ...]:
    c = cfg.cluster
    opts = []
    if row.resumable:
        opts.append("--requeue" if c.requeue else "--no-requeue")
        if backend.runtime.save_on_request:  # to this script (B:), which asks train to save and stop
            opts.append(f"--signal=B:USR2@{c.save_before_time_limit}")
    if res.partition:
        opts.append(f"--partition={res.partition}")
    if c.account:
        opts.append(f"--account={c.account}")
    if c.qos:
        opts.append(f"--qos={c.qos}")
    if res.time:
        opts.append(f"--time={res.time}")
    return (*opts, *res.sbatch_extra)


def _resources_note(res: Resources) -> str:
    """Header values that are not cluster.*'s and why: a reader should not wonder why a merge asks for 2 hours."""
    shown = {
        "partition": f"partition {res.partition}",
        "nodes": f"{res.nodes} node(s)",
        "time": f"time {res.time}",
        "exclusive": "exclusive" if res.exclusive else "not exclusive",
        "sbatch_extra": f"sbatch options {' '.join(res.sbatch_extra) or '(none)'}",
        "python": f"python {res.python}",
    }
    by_source: dict[str, list[str]] = {OVERRIDE: [], STAGE_DEFAULT: []}
    for key, source in res.sources:
        if source in by_source and not (key == "nodes" and source == STAGE_DEFAULT):  # one node: plain to see
            by_source[source].append(shown[key])
    labels = {OVERRIDE: f"stage_resources.{res.stage}", STAGE_DEFAULT: "stage default"}
    parts = [f"{', '.join(items)} ({labels[source]})" for source, items in by_source.items() if items]
    return f"Resources: {'; '.join(parts)}; the rest from cluster.*" if parts else ""


def stage_env(cfg: HyperjobConfig, backend: Backend, stage: StageSpec) -> tuple[tuple[str, str], ...]:
    env: list[tuple[str, str]] = [("HYPERJOB_STAGE", stage.name), ("HF_DATASETS_CACHE", str(datasets_cache_dir(cfg)))]
    if not stage.hub:
        # Only the download stage needs the hub; the rest must not stall on it from offline nodes.
        env += [("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1")]
    env += backend.env(cfg, stage)
    env += sorted(cfg.environment.env.items())
    # Later entries win: a user's own value replaces a default of the same name.
    return tuple(dict(env).items())


def _srun_extra(cfg: HyperjobConfig) -> str:
    image = cfg.cluster.container_image
    if not image:
        return ""
    mounts = f"{cfg.workdir}:{cfg.workdir}"
    return f" --container-image={quote(image)} --container-mounts={quote(mounts)}"


def _token_source(cfg: HyperjobConfig) -> str:
    if cfg.model.token_file:
        return f"the file {cfg.model.token_file}"
    return f"${cfg.model.token_env}" if cfg.model.token_env else "nowhere (anonymous download)"


def stage_context(cfg: HyperjobConfig, plan: Plan, run_dir: Path, stage: str, index: int) -> StageContext:
    row, backend, res = spec(stage), backends.get(cfg.backend), resolve(cfg, stage)
    paths = RunPaths(run_dir)
    entry, entry_args = backend.entry(row)
    return StageContext(
        version=__version__,
        stage=stage,
        index=index,
        total=len(plan.stages),
        purpose=row.purpose,
        template=row.template,
        run_name=cfg.name,
        run_dir=str(run_dir),
        python=res.python,
        job_name=f"{cfg.name}.{stage}",
        log_pattern=f"{slurm_filename(paths.logs)}/{RunPaths.log_name(index, stage, '%j')}",
        nodes=res.nodes,
        exclusive=res.exclusive,
        sbatch_options=_sbatch_options(cfg, row, backend, res),
        resources_note=_resources_note(res),
        resumable=row.resumable,
        max_restarts=cfg.cluster.max_restarts,
        save_on_request=row.resumable and backend.runtime.save_on_request,
        env=stage_env(cfg, backend, row),
        unset_env=(cfg.model.token_env,) if cfg.model.token_env and not row.hub else (),
        srun_extra=_srun_extra(cfg),
        procs_per_node=plan.procs_per_node,
        world_size=plan.world_size,
        layout=f"TP={plan.tensor} x PP={plan.pipeline} x DP={plan.data}"
        + (f" x SP={plan.sequence}" if plan.sequence > 1 else ""),
        token_source=_token_source(cfg),
        entry=entry,
        entry_args=entry_args,
        launch_wrapper=backend.launch_wrapper(cfg, row) if row.distributed else (),
        outcome=str(paths.outcome(index, stage).relative_to(run_dir)),
        extra=backend.template_vars(cfg, row),
    )


def render_stage(ctx: StageContext, template_dirs: Sequence[Path] = ()) -> str:
    return make_env(template_dirs).get_template(ctx.template).render(s=ctx)


def render_run(cfg: HyperjobConfig, plan: Plan, run_dir: Path) -> list[RenderedStage]:
    out = []
    for i, stage in enumerate(plan.stages, start=1):
        ctx = stage_context(cfg, plan, run_dir, stage, i)
        template_dir = spec(stage).template_dir
        text = render_stage(ctx, [template_dir] if template_dir else [])
        out.append(RenderedStage(i, stage, RunPaths(run_dir).script(i, stage).name, text))
    return out
