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
from hyperjob.config.load import ConfigError
from hyperjob.config.models import HyperjobConfig
from hyperjob.model_facts import ModelFacts
from hyperjob.paths import RunPaths
from hyperjob.stage_table import StageSpec

TRAIN_GROUP = "train"


@dataclass(frozen=True)
class Runtime:
    """How the stage entries run on a backend: data, so the train and evaluate entries hold no backend branches.

    `device`: the torch device type. `distributed`: the torch.distributed backend between processes. `bf16`:
    whether training.bf16 is honoured (else training runs in float32 and says so). `load_on_local_rank`: load the
    weights straight onto this rank's device (N ranks x a full host copy can exhaust host memory).
    `trainer`: the module whose `train(paths, cfg, compile_only)` trains on this backend; None: the transformers
    Trainer of hyperjob.stages.train. `save_on_request`: the trainer saves a checkpoint and stops when asked
    (Slurm's USR2 before the time limit), and resumes from it when the job is requeued.
    """

    device: str = "cpu"
    distributed: str = "gloo"
    bf16: bool = False
    pad_to_multiple_of: int | None = None
    load_on_local_rank: bool = False
    trainer: str | None = None
    save_on_request: bool = True


@dataclass(frozen=True)
class Layout:
    """The planned parallel layout, as the train arguments need it; the planner builds it (Plan.layout), so the
    backends, which the planner sits above, never import the planner."""

    tensor: int
    pipeline: int
    world_size: int
    kv_size_multiplier: int | None
    model: ModelFacts | None


class Backend:
    """One backend's rules; subclasses set the class attributes and override the methods that differ."""

    name: str = ""
    accelerator: str = ""  # instances of this kind in the catalogue run this backend
    default_stages: tuple[str, ...] = ("download", "train", "merge", "evaluate")
    parallelism: frozenset[str] = frozenset()  # which of "tensor", "pipeline", "sequence" it can do
    runtime: Runtime = Runtime()

    def processes_per_node(self, cfg: HyperjobConfig, inst: InstanceType) -> int:
        """One training process per device; a config may use fewer, never more."""
        procs = cfg.cluster.devices_per_node or inst.devices
        if procs > inst.devices:
            msg = f"{procs} exceeds the {inst.devices} devices of one {inst.name}"
            raise ConfigError([("cluster.devices_per_node", msg)])
        return procs

    def check_layout(self, cfg: HyperjobConfig, world: int, facts: ModelFacts | None) -> int | None:
        """Raise on a parallel layout this backend cannot run; return the KV-head replication factor, if any."""
        for key, size in (("tensor", cfg.parallel.tensor), ("pipeline", cfg.parallel.pipeline)):
            if size != 1 and key not in self.parallelism:
                msg = f"{size} is not supported on backend {self.name!r} (allowed: 1)"
                raise ConfigError([(f"parallel.{key}", msg)])
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
        """The interpreter a stage runs with: environment.train_python for the training stack, if set."""
        env = cfg.environment
        if stage.group == TRAIN_GROUP and env.train_python:
            return env.train_python
        if env.python is None:
            raise ValueError("environment.python is unset: load configs with load_config, which fills it")
        return env.python

    def warnings(self, cfg: HyperjobConfig, stages: Sequence[str]) -> list[str]:
        """What a user should hear before queueing these stages on this backend."""
        return []

    def train_arguments(
        self, cfg: HyperjobConfig, layout: Layout, paths: RunPaths, compile_only: bool
    ) -> dict[str, Any]:
        """What the train entry passes to the trainer config, peft and the model loader (pure; `--print-args`)."""
        from hyperjob.backends.train_args import hf_arguments

        return hf_arguments(cfg, layout, paths, self.runtime)

    def plan_rows(self, cfg: HyperjobConfig) -> list[tuple[str, str]]:
        """Backend-specific rows for `hyperjob plan` (an environment to build, versions it pins)."""
        return []

    def template_vars(self, cfg: HyperjobConfig, stage: StageSpec) -> Mapping[str, str | int]:
        """Backend-specific values a stage template may show (`s.extra`)."""
        return {}
