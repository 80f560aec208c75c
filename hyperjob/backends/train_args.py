"""The train stage's arguments as data: what the entry passes to the trainer config, peft and the model loader.

Pure functions of (config, plan, run paths), importing no torch, transformers or optimum, so that
`python -m hyperjob.stages.train --print-args` and `hyperjob plan --show-args` show exactly what a job will use
and tests can check it against the real upstream classes. This module holds the transformers Trainer flavour
(backends cpu and cuda); backends/neuron_args.py holds optimum-neuron's.
"""

from __future__ import annotations

import importlib.metadata
from typing import TYPE_CHECKING, Any

from hyperjob.backends.parallel_modes import DEEPSPEED_CONFIG_NAME, shards_parameters
from hyperjob.backends.parallel_modes import mode_arguments as for_mode
from hyperjob.config.models import HyperjobConfig
from hyperjob.longctx.rope import config_overrides
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
    out: dict[str, Any] = {
        "r": cfg.lora.r,
        "lora_alpha": cfg.lora.alpha,
        "lora_dropout": cfg.lora.dropout,
        "target_modules": ALL_LINEAR if targets == (ALL_LINEAR,) else list(targets),
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    if cfg.lora.modules_to_save:
        out["modules_to_save"] = list(cfg.lora.modules_to_save)
    return out


# QLoRA as in its paper: NF4 weights with double quantisation, computing in the training dtype.
def nf4_kwargs(compute_dtype: str) -> dict[str, Any]:
    """transformers.BitsAndBytesConfig keyword arguments for model.quantize: nf4."""
    return {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": compute_dtype,
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
    # Packed rows carry no attention mask, so "non_padding" would compare tokens with a pad id that Llama 3 lacks
    # (and warn every step); their padding is reported as pad_fraction instead.
    seen = "all" if cfg.training.packing else "non_padding"
    trainer |= {"bf16": use_bf16, "ddp_find_unused_parameters": False, "include_num_input_tokens_seen": seen}
    # transformers 5 renamed gradient_checkpointing to activation_checkpointing (the old name is deprecated).
    gc_name = "activation_checkpointing" if _transformers_major() >= 5 else "gradient_checkpointing"
    trainer[gc_name] = cfg.training.gradient_checkpointing
    if cfg.training.gradient_checkpointing:
        # Non-reentrant by default (reentrant loses LoRA grads unless the inputs require grad). Offloading needs the
        # reentrant kind: it saves the checkpoint inputs through autograd, where save_on_cpu can move them to the host;
        # the train entry then makes the inputs require grad.
        trainer[f"{gc_name}_kwargs"] = {"use_reentrant": cfg.training.activation_offload}
    if runtime.device == "cpu":
        trainer["use_cpu"] = True
    if layout.world_size > 1 and runtime.device_module is None:  # the backend's choice, not accelerate's guess
        trainer["ddp_backend"] = runtime.distributed  # (an out-of-tree device's group is started by stages.device)
    if cfg.training.torch_compile:  # transformers picks the device's compiler: neuron on TorchNeuron, else inductor
        trainer["torch_compile"] = True
    trainer |= mode_arguments(cfg, use_bf16, paths)
    dtype = "bfloat16" if use_bf16 else "float32"
    # transformers 4.56+ takes `dtype` and warns on `torch_dtype`.
    loader_kwargs: dict[str, Any] = {"dtype": dtype}
    if runtime.load_on_local_rank and not shards_parameters(cfg.parallel.mode):  # FSDP2 and ZeRO-3 place them
        loader_kwargs |= {"device_map": "local rank", "low_cpu_mem_usage": True}
    if cfg.model.quantize == "nf4":
        loader_kwargs["quantization_config"] = nf4_kwargs(dtype)
    overrides = config_overrides(cfg, layout.model)
    return {
        "backend": cfg.backend,
        "trainer_class": "transformers.TrainingArguments",
        "trainer_config": trainer,
        "lora_config": lora_kwargs(cfg, cfg.lora.target_modules),
        "model_loader": {
            "class": "transformers.AutoModelForCausalLM",
            "path": str(base_model_dir(cfg)),
            "kwargs": loader_kwargs,
            "config_overrides": overrides,
        },
    }


def mode_arguments(cfg: HyperjobConfig, bf16: bool, paths: RunPaths) -> dict[str, Any]:
    """The launch mode's TrainingArguments (FSDP2, DeepSpeed ZeRO); nothing for DDP. The DeepSpeed JSON is
    written into the run directory by the train entry (deepspeed_json) before TrainingArguments reads it."""
    t = cfg.training
    return for_mode(
        cfg.parallel.mode, gradient_checkpointing=t.gradient_checkpointing, activation_offload=t.activation_offload,
        bf16=bf16, deepspeed_config_path=str(paths.run_dir / DEEPSPEED_CONFIG_NAME),
    )  # fmt: skip
