"""The train stage's arguments as data: what the entry passes to the trainer config, peft and the model loader.

Pure functions of (config, plan, run paths), importing no torch, transformers or optimum, so that
`python -m hyperjob.stages.train --print-args` and `hyperjob plan --show-args` show exactly what a job will use
and tests can check it against the real upstream classes. This module holds the transformers Trainer flavour
(backends cpu and cuda); backends/neuron_args.py holds optimum-neuron's.
"""

from __future__ import annotations

import importlib.metadata
from typing import TYPE_CHECKING, Any

from hyperjob.config.models import HyperjobConfig
from hyperjob.paths import RunPaths, base_model_dir

if TYPE_CHECKING:  # backends.base imports this module lazily, inside a method
    from hyperjob.backends.base import Layout, Runtime

ALL_LINEAR = "all-linear"


def schedule_kwargs(cfg: HyperjobConfig, output_dir: str) -> dict[str, Any]:
    """The optimisation and bookkeeping arguments every trainer flavour shares (transformers TrainingArguments)."""
    t = cfg.training
    return {
        "output_dir": output_dir,
        "per_device_train_batch_size": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "learning_rate": t.lr,
        "lr_scheduler_type": t.schedule,
        "warmup_steps": t.warmup,
        "weight_decay": t.weight_decay,
        "num_train_epochs": t.epochs,
        "max_steps": t.max_steps,
        "save_strategy": "steps",
        "save_steps": t.save_steps,
        "logging_strategy": "steps",
        "logging_steps": t.logging_steps,
        "seed": t.seed,
        "data_seed": t.seed,
        "report_to": "none",
        "remove_unused_columns": False,  # our collator already yields exactly the model's inputs
        "disable_tqdm": True,  # progress bars garble Slurm logs; the printer callback logs each step instead
    }


def lora_kwargs(cfg: HyperjobConfig, targets: tuple[str, ...]) -> dict[str, Any]:
    """peft.LoraConfig keyword arguments; peft takes "all-linear" as a plain string, not inside a list."""
    return {
        "r": cfg.lora.r,
        "lora_alpha": cfg.lora.alpha,
        "lora_dropout": cfg.lora.dropout,
        "target_modules": ALL_LINEAR if targets == (ALL_LINEAR,) else list(targets),
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }


def _transformers_major() -> int:
    """Read from the installed distribution's metadata, so nothing is imported; 4 when it is not installed."""
    try:
        return int(importlib.metadata.version("transformers").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return 4


def hf_arguments(cfg: HyperjobConfig, layout: Layout, paths: RunPaths, runtime: Runtime) -> dict[str, Any]:
    """transformers.TrainingArguments, peft.LoraConfig and AutoModelForCausalLM.from_pretrained arguments."""
    use_bf16 = runtime.bf16 and cfg.training.bf16
    trainer = schedule_kwargs(cfg, str(paths.checkpoints))
    trainer |= {"bf16": use_bf16, "ddp_find_unused_parameters": False, "include_num_input_tokens_seen": "non_padding"}
    # transformers 5 renamed gradient_checkpointing to activation_checkpointing (the old name is deprecated).
    gc_name = "activation_checkpointing" if _transformers_major() >= 5 else "gradient_checkpointing"
    trainer[gc_name] = cfg.training.gradient_checkpointing
    if cfg.training.gradient_checkpointing:
        trainer[f"{gc_name}_kwargs"] = {"use_reentrant": False}  # reentrant checkpointing loses LoRA grads
    if runtime.device == "cpu":
        trainer["use_cpu"] = True
    if layout.world_size > 1:  # the backend's choice, not accelerate's guess from the device
        trainer["ddp_backend"] = runtime.distributed
    dtype = "bfloat16" if use_bf16 else "float32"
    # transformers 4.56+ takes `dtype` and warns on `torch_dtype`.
    loader_kwargs: dict[str, Any] = {"dtype": dtype}
    if runtime.load_on_local_rank:
        loader_kwargs |= {"device_map": "local rank", "low_cpu_mem_usage": True}
    return {
        "backend": cfg.backend,
        "trainer_class": "transformers.TrainingArguments",
        "trainer_config": trainer,
        "lora_config": lora_kwargs(cfg, cfg.lora.target_modules),
        "model_loader": {
            "class": "transformers.AutoModelForCausalLM",
            "path": str(base_model_dir(cfg)),
            "kwargs": loader_kwargs,
        },
    }
