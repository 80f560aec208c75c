"""Render the stage scripts of a run: a pure function of (config, plan, run dir).

Nothing here touches the filesystem or a cluster; `hyperjob.schedule.run` writes
the result. The per-stage context is a plain dataclass so templates see typed,
already-decided values (no logic about backends inside Jinja beyond layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hyperjob import __version__
from hyperjob.config.models import HyperjobConfig
from hyperjob.paths import RunPaths, compile_cache_dir, datasets_cache_dir
from hyperjob.plan.planner import Plan
from hyperjob.render.shell import make_env, quote, slurm_filename

PURPOSE = {
    "download": "Fetch the base model (and hub dataset) onto the shared filesystem.",
    "compile": "Precompile the Neuron training graphs (neuron_parallel_compile) into the shared cache.",
    "train": "LoRA fine-tuning; checkpoints every save_steps, resumes from the newest one.",
    "consolidate": "Tensor-parallel shards -> a standard PEFT adapter.",
    "merge": "Merge the adapter into the base model (safetensors shards + index).",
    "evaluate": "Answer the evaluation prompts with the base and the tuned model.",
}
# Short compile runs still trace every distinct graph of a training step.
COMPILE_STEPS = 10


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
    env: tuple[tuple[str, str], ...]
    srun_extra: str
    procs_per_node: int
    world_size: int
    layout: str
    token_source: str
    parallel_compile: str = "neuron_parallel_compile"
    compile_steps: int = COMPILE_STEPS


@dataclass(frozen=True)
class RenderedStage:
    index: int
    stage: str
    filename: str
    text: str


def _sbatch_options(cfg: HyperjobConfig) -> tuple[str, ...]:
    c = cfg.cluster
    opts = []
    if c.partition:
        opts.append(f"--partition={c.partition}")
    if c.account:
        opts.append(f"--account={c.account}")
    if c.qos:
        opts.append(f"--qos={c.qos}")
    if c.time:
        opts.append(f"--time={c.time}")
    return (*opts, *c.sbatch_extra)


def neuron_env(cfg: HyperjobConfig, stage: str) -> list[tuple[str, str]]:
    """The Neuron runtime/compiler settings of the reference pipeline, compile cache on the shared FS."""
    cc_flags = (
        "--model-type=transformer --distribution-strategy=llm-training --enable-saturate-infinity "
        f"--cache_dir={compile_cache_dir(cfg)}"
    )
    return [
        ("NEURON_CC_FLAGS", cc_flags),
        ("NEURON_EXTRACT_GRAPHS_ONLY", "1" if stage == "compile" else "0"),
        ("NEURON_FUSE_SOFTMAX", "1"),
        ("NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS", "3"),
        ("NEURON_RT_STOCHASTIC_ROUNDING_EN", "1"),
        ("MALLOC_ARENA_MAX", "64"),
        ("FI_PROVIDER", "efa"),
        ("FI_EFA_USE_DEVICE_RDMA", "1"),
        ("FI_EFA_FORK_SAFE", "1"),
    ]


def stage_env(cfg: HyperjobConfig, stage: str) -> tuple[tuple[str, str], ...]:
    env: list[tuple[str, str]] = [("HYPERJOB_STAGE", stage), ("HF_DATASETS_CACHE", str(datasets_cache_dir(cfg)))]
    if stage != "download":
        # Only the download stage needs the hub; the rest must not stall on it from offline nodes.
        env += [("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1")]
    if stage in ("train", "compile"):
        env.append(("OMP_NUM_THREADS", "1"))
        if cfg.backend == "neuron":
            env += neuron_env(cfg, stage)
        elif cfg.backend == "cuda":
            env += [("NCCL_DEBUG", "WARN"), ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")]
    env += sorted(cfg.environment.env.items())
    # Later entries win: a user's own value replaces a default of the same name.
    return tuple(dict(env).items())


def _srun_extra(cfg: HyperjobConfig) -> str:
    image = cfg.cluster.container_image
    if not image:
        return ""
    mounts = f"{cfg.workdir}:{cfg.workdir}"
    return f" --container-image={quote(image)} --container-mounts={quote(mounts)}"


def _parallel_compile(python: str) -> str:
    """neuron_parallel_compile sits beside the interpreter of the Neuron venv."""
    p = Path(python)
    return str(p.parent / "neuron_parallel_compile") if p.is_absolute() else "neuron_parallel_compile"


def stage_context(cfg: HyperjobConfig, plan: Plan, run_dir: Path, stage: str, index: int) -> StageContext:
    stages = cfg.stage_list
    distributed = stage in ("train", "compile")
    paths = RunPaths(run_dir)
    token = (
        f"the file {cfg.model.token_file}"
        if cfg.model.token_file
        else f"${cfg.model.token_env}"
        if cfg.model.token_env
        else "nowhere (anonymous download)"
    )
    assert cfg.environment.python is not None, "load_config fills environment.python"
    return StageContext(
        version=__version__,
        stage=stage,
        index=index,
        total=len(stages),
        purpose=PURPOSE[stage],
        template=f"{stage}.sbatch.j2",
        run_name=cfg.name,
        run_dir=str(run_dir),
        python=cfg.environment.python,
        job_name=f"{cfg.name}.{stage}",
        log_pattern=f"{slurm_filename(paths.logs)}/{RunPaths.log_name(index, stage, '%j')}",
        nodes=plan.nodes if distributed else 1,
        exclusive=cfg.cluster.exclusive and distributed,
        sbatch_options=_sbatch_options(cfg),
        env=stage_env(cfg, stage),
        srun_extra=_srun_extra(cfg),
        procs_per_node=plan.procs_per_node,
        world_size=plan.world_size,
        layout=f"TP={plan.tensor} x PP={plan.pipeline} x DP={plan.data}",
        token_source=token,
        parallel_compile=_parallel_compile(cfg.environment.python),
    )


def render_stage(ctx: StageContext) -> str:
    return make_env().get_template(ctx.template).render(s=ctx)


def render_run(cfg: HyperjobConfig, plan: Plan, run_dir: Path) -> list[RenderedStage]:
    out = []
    for i, stage in enumerate(cfg.stage_list, start=1):
        ctx = stage_context(cfg, plan, run_dir, stage, i)
        out.append(RenderedStage(i, stage, RunPaths(run_dir).script(i, stage).name, render_stage(ctx)))
    return out
