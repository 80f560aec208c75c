"""What a backend is: everything that differs between cpu, cuda and neuron, behind one small class.

A backend module subclasses `Backend`, overrides what differs, and the registry (`hyperjob.backends`) holds one
instance per name. The planner, the renderer, the CLI and the stage entries ask the backend; none of them asks
which backend a config names. The defaults here are the plain torchrun DDP behaviour that cpu and cuda share.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hyperjob.backends.catalogue import InstanceType
from hyperjob.backends.envspec import RECORD_NAME, EnvSpec, read_record, venv_of
from hyperjob.config.load import ConfigError
from hyperjob.config.models import HyperjobConfig
from hyperjob.model_facts import ModelFacts
from hyperjob.paths import RunPaths
from hyperjob.stage_table import StageSpec, spec

TRAIN_GROUP = "train"


def _is_set(cfg: HyperjobConfig, dotted: str) -> bool:
    """Whether `section.field` differs from its default."""
    section_name, field = dotted.split(".")
    section = getattr(cfg, section_name)
    return bool(getattr(section, field) != type(section).model_fields[field].default)


def sequence_checks(cfg: HyperjobConfig, world: int, facts: ModelFacts | None) -> None:
    """Ulysses' rules (heads, KV heads and seq_len divisible by parallel.sequence; world = DP x SP)."""
    from hyperjob.longctx.ulysses import sp_problems

    sp = cfg.parallel.sequence
    if not cfg.training.packing:
        msg = "needs training.packing: true (Ulysses takes rows with restarting positions, not padding masks)"
        raise ConfigError([("parallel.sequence", msg)])
    if world % sp:
        msg = f"{sp} does not divide the {world} training processes (world = data parallel x sequence parallel)"
        raise ConfigError([("parallel.sequence", msg)])
    heads = facts.num_attention_heads if facts else sp
    kv = facts.num_key_value_heads if facts else sp
    problems = sp_problems(heads, kv, cfg.training.seq_len, sp)
    if problems:
        raise ConfigError([("parallel.sequence", problem) for problem in problems])


@dataclass(frozen=True)
class Runtime:
    """How the stage entries run on a backend: data, so the train and evaluate entries hold no backend branches.

    `device`: the torch device type. `distributed`: the torch.distributed backend between processes. `bf16`:
    whether training.bf16 is honoured (else training runs in float32 and says so). `load_on_local_rank`: load the
    weights straight onto this rank's device (N ranks x a full host copy can exhaust host memory).
    `trainer`: the module whose `train(paths, cfg, compile_only)` trains on this backend; None: the transformers
    Trainer of hyperjob.stages.train. `save_on_request`: the trainer saves a checkpoint and stops when asked
    (Slurm's USR2 before the time limit), and resumes from it when the job is requeued. `device_module`: the
    package that registers an out-of-tree (PrivateUse1) device; hyperjob.stages.device imports it and binds each
    rank to one device itself, since accelerate only does that for the devices it knows.
    """

    device: str = "cpu"
    distributed: str = "gloo"
    bf16: bool = False
    pad_to_multiple_of: int | None = None
    load_on_local_rank: bool = False
    trainer: str | None = None
    save_on_request: bool = True
    device_module: str | None = None


@dataclass(frozen=True)
class Layout:
    """The planned parallel layout, as the train arguments need it; the planner builds it (Plan.layout), so the
    backends, which the planner sits above, never import the planner."""

    tensor: int
    pipeline: int
    world_size: int
    kv_size_multiplier: int | None
    model: ModelFacts | None
    sequence: int = 1


class Backend:
    """One backend's rules; subclasses set the class attributes and override the methods that differ."""

    name: str = ""
    accelerator: str = ""  # instances of this kind in the catalogue run this backend
    default_stages: tuple[str, ...] = ("download", "train", "merge", "evaluate")
    parallelism: frozenset[str] = frozenset()  # which of "tensor", "pipeline", "sequence" (Ulysses) it can do
    parallel_modes: frozenset[str] = frozenset({"ddp"})  # parallel.mode values it can launch
    quantizations: frozenset[str] = frozenset({"none"})  # model.quantize values it can load
    loss_kernels: frozenset[str] = frozenset({"standard", "chunked"})  # training.loss values it can run
    unsupported_options: tuple[str, ...] = ()  # config keys its trainer ignores: refused when set, never dropped
    runtime: Runtime = Runtime()
    environment: EnvSpec | None = None  # the pinned venv `hyperjob env` builds for its training stages, if any

    def processes_per_node(self, cfg: HyperjobConfig, inst: InstanceType) -> int:
        """One training process per device; a config may use fewer, never more."""
        procs = cfg.cluster.devices_per_node or inst.devices
        if procs > inst.devices:
            msg = f"{procs} exceeds the {inst.devices} devices of one {inst.name}"
            raise ConfigError([("cluster.devices_per_node", msg)])
        return procs

    def check_layout(self, cfg: HyperjobConfig, world: int, facts: ModelFacts | None) -> int | None:
        """Raise on a parallel layout this backend cannot run; return the KV-head replication factor, if any."""
        p = cfg.parallel
        for key, size in (("tensor", p.tensor), ("pipeline", p.pipeline), ("sequence", p.sequence)):
            if size != 1 and key not in self.parallelism:
                msg = f"{size} is not supported on backend {self.name!r} (allowed: 1)"
                raise ConfigError([(f"parallel.{key}", msg)])
        for key, value, allowed in (
            ("parallel.mode", p.mode, self.parallel_modes),
            ("model.quantize", cfg.model.quantize, self.quantizations),
            ("training.loss", cfg.training.loss, self.loss_kernels),
        ):
            if value not in allowed:
                msg = f"{value!r} is not supported on backend {self.name!r} (allowed: {', '.join(sorted(allowed))})"
                raise ConfigError([(key, msg)])
        for key in self.unsupported_options:
            if _is_set(cfg, key):
                raise ConfigError([(key, f"is not supported on backend {self.name!r}: leave it unset")])
        if p.sequence > 1:
            sequence_checks(cfg, world, facts)
        if p.mode != "ddp":
            from hyperjob.backends.parallel_modes import mode_problems

            problems = mode_problems(p.mode, self.runtime.device, world, cfg.model.quantize)
            if problems:
                raise ConfigError([("parallel.mode", problem) for problem in problems])
        return None

    def instance_problem(self, inst: InstanceType) -> str | None:
        """Why this backend cannot run on an instance type of its accelerator kind; None when it can."""
        return None

    def entry(self, stage: StageSpec) -> tuple[str, tuple[str, ...]]:
        """The module a stage's script runs with `python -m`, and its extra arguments."""
        return stage.entry, stage.args

    def launch_wrapper(self, cfg: HyperjobConfig, stage: StageSpec) -> tuple[str, ...]:
        """Words before the torchrun command of a distributed stage (a compiler driver, a profiler)."""
        return ()

    def env(self, cfg: HyperjobConfig, stage: StageSpec) -> list[tuple[str, str]]:
        """Environment variables this backend sets for a stage, before the user's own (which win)."""
        # One intra-op thread per process: N torchrun processes each spawning a thread per core oversubscribe.
        return [("OMP_NUM_THREADS", "1")] if stage.distributed else []

    def python(self, cfg: HyperjobConfig, stage: StageSpec) -> str:
        """The interpreter a stage runs with: its own (stage_resources.<stage>.python), else
        environment.train_python for the training stack, if set, else environment.python."""
        own = cfg.stage_resources.get(stage.name)
        if own is not None and own.python is not None:
            return own.python
        env = cfg.environment
        if stage.group == TRAIN_GROUP and env.train_python:
            return env.train_python
        if env.python is None:
            raise ValueError("environment.python is unset: load configs with load_config, which fills it")
        return env.python

    def warnings(self, cfg: HyperjobConfig, stages: Sequence[str]) -> list[str]:
        """What a user should hear before queueing these stages on this backend: by default, that the training
        interpreter is not a current hyperjob-built venv of this backend's pinned set, when it has one."""
        if self.environment is None or not {"compile", "train"} & set(stages):
            return []
        python = self.python(cfg, spec("train"))
        venv = venv_of(python)
        record = read_record(venv) if venv is not None else None
        if record is not None and self.environment.record_is_current(record):
            return []
        return [
            f"backend {self.name!r}: {venv or python} is not a Neuron environment built by this hyperjob (no "
            f"current {RECORD_NAME}); build it first with `hyperjob env CONFIG`, or the training stages will "
            "refuse the versions they find"
        ]

    def train_arguments(
        self, cfg: HyperjobConfig, layout: Layout, paths: RunPaths, compile_only: bool
    ) -> dict[str, Any]:
        """What the train entry passes to the trainer config, peft and the model loader (pure; `--print-args`)."""
        from hyperjob.backends.train_args import hf_arguments

        return hf_arguments(cfg, layout, paths, self.runtime)

    def plan_rows(self, cfg: HyperjobConfig) -> list[tuple[str, str]]:
        """Backend-specific rows for `hyperjob plan` (an environment to build, versions it pins)."""
        return self.environment.plan_rows() if self.environment is not None else []

    def template_vars(self, cfg: HyperjobConfig, stage: StageSpec) -> Mapping[str, str | int]:
        """Backend-specific values a stage template may show (`s.extra`)."""
        return {}
