"""Backend `neuron`: AWS Trainium through optimum-neuron (PyTorch/XLA), the seed pipeline's backend.

Owns what only Trainium has: tensor and pipeline parallelism with their head rules (GQA KV replication), the
compile stage run under neuron_parallel_compile with the training stage's interpreter, and the Neuron compiler
and runtime settings of the reference pipeline with the compile cache on the shared filesystem.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from hyperjob.backends.base import Backend, Runtime
from hyperjob.config.load import ConfigError
from hyperjob.config.models import HyperjobConfig
from hyperjob.model_facts import ModelFacts
from hyperjob.paths import compile_cache_dir
from hyperjob.stage_table import StageSpec

# Short compile runs still trace every distinct graph of a training step.
COMPILE_STEPS = 10
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
    parallelism = frozenset({"tensor", "pipeline", "sequence"})
    runtime = Runtime(
        device="xla",
        distributed="xla",
        bf16=True,
        train_unavailable="training on backend 'neuron' needs the Trainium entry (optimum-neuron), "
        "not shipped in this version yet",
    )

    def check_layout(self, cfg: HyperjobConfig, world: int, facts: ModelFacts | None) -> int | None:
        tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
        kv_mult = head_checks(tp, world, facts) if facts is not None else None
        if world % (tp * pp):
            msg = f"tensor x pipeline = {tp * pp} does not divide the {world} processes of the job"
            raise ConfigError([("parallel.tensor", msg)])
        if cfg.training.seq_len % tp:
            msg = f"{cfg.training.seq_len} must be a multiple of tensor={tp} (sequence parallelism)"
            raise ConfigError([("training.seq_len", msg)])
        return kv_mult

    def launch_wrapper(self, cfg: HyperjobConfig, stage: StageSpec) -> tuple[str, ...]:
        """The compile stage runs the training command under neuron_parallel_compile, from the Neuron venv."""
        if stage.name != COMPILE_STAGE:
            return ()
        python = Path(self.python(cfg, stage))
        return (str(python.parent / PARALLEL_COMPILE) if python.is_absolute() else PARALLEL_COMPILE,)

    def env(self, cfg: HyperjobConfig, stage: StageSpec) -> list[tuple[str, str]]:
        env = super().env(cfg, stage)
        return env + neuron_env(cfg, stage) if stage.distributed else env

    def warnings(self, cfg: HyperjobConfig, stages: Sequence[str]) -> list[str]:
        if self.runtime.train_unavailable and {COMPILE_STAGE, "train"} & set(stages):
            # Say so up front rather than after the download: the queue would stop at the compile stage.
            return [
                "backend 'neuron': the Trainium training entry (optimum-neuron) is not in this version yet, so the "
                "compile and train stages will fail; `hyperjob consolidate` handles checkpoints you already have"
            ]
        return []

    def template_vars(self, cfg: HyperjobConfig, stage: StageSpec) -> Mapping[str, str | int]:
        return {"compile_steps": COMPILE_STEPS}


BACKEND = NeuronBackend()
