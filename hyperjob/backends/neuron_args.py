"""The Trainium train entry's arguments as data: optimum-neuron 0.4.5's NeuronSFTConfig, LoraConfig and loader.

Pure, importing no torch or optimum: `--print-args` and `plan --show-args` show it, and tests construct the real
NeuronSFTConfig from it (tests/neuron_upstream). Every keyword here exists in optimum-neuron 0.4.5 (checked there):
a misspelling fails those tests, not a job on the cluster.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hyperjob.backends.neuron_lora import neuron_targets
from hyperjob.backends.train_args import lora_kwargs, schedule_kwargs
from hyperjob.config.models import HyperjobConfig
from hyperjob.paths import RunPaths, base_model_dir

if TYPE_CHECKING:  # backends.base is imported by neuron.py, which imports this module
    from hyperjob.backends.base import Layout

# Short compile runs still trace every distinct graph of a training step.
COMPILE_STEPS = 10
TRAINING_MODEL_CLASS = "optimum.neuron.models.training.NeuronModelForCausalLM"


def trainer_config(cfg: HyperjobConfig, plan: Layout, paths: RunPaths, compile_only: bool) -> dict[str, Any]:
    """NeuronSFTConfig keyword arguments; the compile run differs only in max_steps and its output directory."""
    t = cfg.training
    output = paths.compile_output if compile_only else paths.checkpoints
    kwargs = schedule_kwargs(cfg, str(output))
    kwargs |= {
        "tensor_parallel_size": plan.tensor,
        "pipeline_parallel_size": plan.pipeline,
        "zero_1": True,  # optimizer state sharded over the data-parallel ranks
        "bf16": t.bf16,
        "gradient_checkpointing": t.gradient_checkpointing,
        "max_length": t.seq_len,
        # Packing and prompt masking are hyperjob's shared data code (the cpu/cuda entry's), applied before the
        # trainer: upstream's own dataset preparation and packing stay off.
        "packing": False,
        "dataset_kwargs": {"skip_prepare_dataset": True},
        # Every batch has the same shape, or XLA compiles a new graph for the last, smaller one.
        "dataloader_drop_last": True,
    }
    if t.gradient_checkpointing:
        # Required: NeuronSFTTrainer 0.4.5 tests `"use_reentrant" in args.gradient_checkpointing_kwargs` and crashes
        # on its default None. Reentrant, as the training Llama's own checkpointing is: only then does the trainer
        # make the frozen embeddings' outputs require grad, so LoRA gradients flow through checkpointed layers.
        kwargs["gradient_checkpointing_kwargs"] = {"use_reentrant": True}
    if plan.kv_size_multiplier:
        kwargs["kv_size_multiplier"] = plan.kv_size_multiplier
    if compile_only:
        kwargs["max_steps"] = COMPILE_STEPS
    return kwargs


def neuron_arguments(cfg: HyperjobConfig, plan: Layout, paths: RunPaths, compile_only: bool = False) -> dict[str, Any]:
    """Everything the Trainium entry passes upstream, plus the trn_config values the planner expects to see."""
    targets = neuron_targets(cfg.lora.target_modules, plan.model, plan.tensor)
    return {
        "backend": cfg.backend,
        "trainer_class": "optimum.neuron.NeuronSFTConfig",
        "trainer_config": trainer_config(cfg, plan, paths, compile_only),
        "lora_config": lora_kwargs(cfg, targets),
        "model_loader": {
            "class": TRAINING_MODEL_CLASS,
            "path": str(base_model_dir(cfg)),
            "kwargs": {"torch_dtype": "bfloat16" if cfg.training.bf16 else "float32"},
        },
        "expected_trn_config": {
            "tensor_parallel_size": plan.tensor,
            "pipeline_parallel_size": plan.pipeline,
            "kv_size_multiplier": plan.kv_size_multiplier,
        },
    }
