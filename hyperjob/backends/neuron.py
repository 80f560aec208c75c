"""Backend `neuron`: AWS Trainium through optimum-neuron (PyTorch/XLA), the seed pipeline's backend.

Owns what only Trainium has: tensor and pipeline parallelism with their head rules (GQA KV replication), the
compile stage run under neuron_parallel_compile with the training stage's interpreter, and the Neuron compiler
and runtime settings of the reference pipeline with the compile cache on the shared filesystem.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hyperjob.backends.base import Backend, Layout, Runtime
from hyperjob.backends.neuron_args import COMPILE_STEPS, neuron_arguments
from hyperjob.backends.neuron_env import XLA
from hyperjob.backends.neuron_lora import neuron_targets
from hyperjob.config.load import ConfigError
from hyperjob.config.models import HyperjobConfig
from hyperjob.model_facts import ModelFacts
from hyperjob.paths import RunPaths, compile_cache_dir
from hyperjob.stage_table import StageSpec

COMPILE_STAGE = "compile"
PARALLEL_COMPILE = "neuron_parallel_compile"


def head_checks(tp: int, world: int, facts: ModelFacts) -> int | None:
    """Attention heads split evenly over TP ranks; KV heads split, or are replicated (GQA) when fewer than TP."""
    heads, kv = facts.num_attention_heads, facts.num_key_value_heads
    if heads % tp:
        allowed = ", ".join(str(d) for d in range(1, heads + 1) if heads % d == 0 and world % d == 0)
        raise ConfigError(
            [("parallel.tensor", f"{tp} does not divide the model's {heads} attention heads (allowed: {allowed})")]
        )
    if kv >= tp:
        if kv % tp:
            raise ConfigError(
                [("parallel.tensor", f"{tp} does not divide the model's {kv} key/value heads (KV heads >= tensor)")]
            )
        return None
    if tp % kv:
        raise ConfigError(
            [("parallel.tensor", f"{tp} is not a multiple of the model's {kv} key/value heads (needed when KV < TP)")]
        )
    return tp // kv


def neuron_env(cfg: HyperjobConfig, stage: StageSpec) -> list[tuple[str, str]]:
    """The Neuron runtime/compiler settings of the reference pipeline, compile cache on the shared FS."""
    cc_flags = (
        "--model-type=transformer --distribution-strategy=llm-training --enable-saturate-infinity "
        f"--cache_dir={compile_cache_dir(cfg)}"
    )
    return [
        ("NEURON_CC_FLAGS", cc_flags),
        # The compile run only extracts and compiles graphs; the train run executes them.
        ("NEURON_EXTRACT_GRAPHS_ONLY", "1" if stage.name == COMPILE_STAGE else "0"),
        ("NEURON_FUSE_SOFTMAX", "1"),
        ("NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS", "3"),
        ("NEURON_RT_STOCHASTIC_ROUNDING_EN", "1"),
        ("MALLOC_ARENA_MAX", "64"),
        ("FI_PROVIDER", "efa"),
        ("FI_EFA_USE_DEVICE_RDMA", "1"),
        ("FI_EFA_FORK_SAFE", "1"),
    ]


class NeuronBackend(Backend):
    name = "neuron"
    accelerator = "neuron"
    default_stages = ("download", "compile", "train", "consolidate", "merge", "evaluate")
    parallelism = frozenset({"tensor", "pipeline"})  # its sequence parallelism comes with TP
    loss_kernels = frozenset({"standard"})
    unsupported_options = (
        "model.rope_theta", "lora.modules_to_save", "training.mlp_chunk", "training.activation_offload",
        "training.torch_compile",
    )  # fmt: skip
    environment = XLA
    runtime = Runtime(
        device="xla",
        distributed="xla",
        bf16=True,
        pad_to_multiple_of=None,
        trainer="hyperjob.stages.train_neuron",
        save_on_request=False,  # optimum-neuron 0.4.5 cannot resume: a requeued job would only stop (see README)
    )

    def check_layout(self, cfg: HyperjobConfig, world: int, facts: ModelFacts | None) -> int | None:
        super().check_layout(cfg, world, facts)
        tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
        kv_mult = head_checks(tp, world, facts) if facts is not None else None
        if world % (tp * pp):
            msg = f"tensor x pipeline = {tp * pp} does not divide the {world} processes of the job"
            raise ConfigError([("parallel.tensor", msg)])
        if cfg.training.seq_len % tp:
            msg = f"{cfg.training.seq_len} must be a multiple of tensor={tp} (sequence parallelism)"
            raise ConfigError([("training.seq_len", msg)])
        neuron_targets(cfg.lora.target_modules, facts, tp)  # upstream's fused-layer rules, before queueing
        return kv_mult

    def warnings(self, cfg: HyperjobConfig, stages: Sequence[str]) -> list[str]:
        """Say before queueing that packing on Trainium concatenates samples (optimum-neuron's attention has no
        sequence-ID masking), and when the training interpreter is not a hyperjob-built Neuron environment."""
        if not {COMPILE_STAGE, "train"} & set(stages):
            return []
        out = []
        if cfg.training.packing:
            out.append(
                "backend 'neuron': training.packing concatenates samples into rows that attend across sample "
                "boundaries (optimum-neuron's attention is plain causal); the cpu and cuda backends isolate them"
            )
        return out + super().warnings(cfg, stages)

    def train_arguments(
        self, cfg: HyperjobConfig, layout: Layout, paths: RunPaths, compile_only: bool
    ) -> dict[str, Any]:
        return neuron_arguments(cfg, layout, paths, compile_only)

    def launch_wrapper(self, cfg: HyperjobConfig, stage: StageSpec) -> tuple[str, ...]:
        """The compile stage runs the training command under neuron_parallel_compile, from the Neuron venv."""
        if stage.name != COMPILE_STAGE:
            return ()
        python = Path(self.python(cfg, stage))
        return (str(python.parent / PARALLEL_COMPILE) if python.is_absolute() else PARALLEL_COMPILE,)

    def env(self, cfg: HyperjobConfig, stage: StageSpec) -> list[tuple[str, str]]:
        env = super().env(cfg, stage)
        return env + neuron_env(cfg, stage) if stage.distributed else env

    def template_vars(self, cfg: HyperjobConfig, stage: StageSpec) -> Mapping[str, str | int]:
        return {"compile_steps": COMPILE_STEPS}


BACKEND = NeuronBackend()
