"""How data-parallel processes hold the model (`parallel.mode`), as transformers Trainer arguments.

ddp replicates everything; fsdp2 shards parameters, gradients and optimizer state with torch's `fully_shard`
(through accelerate's FSDP plugin); deepspeed-zero2 shards gradients and optimizer state, deepspeed-zero3 also
the parameters. Pure data like backends/train_args.py: no torch, transformers or deepspeed import, so
`--print-args` shows the exact arguments and tests check them against the real upstream classes.

Facts of transformers 5.24 / accelerate 1.15 this module is built on (read from their source):
- accelerate turns the FSDP plugin on only for GPU-like distributed types: with `use_cpu` the Trainer silently
  trains DDP over gloo (`model_wrapped` is a DistributedDataParallel) although `fsdp` is set. DeepSpeed is
  likewise switched off by `use_cpu`. Hence mode_problems refuses both on the cpu backend.
- TrainingArguments forwards only some `fsdp_config` keys to accelerate's plugin: FSDP's activation offload is
  read from the environment only (FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD), and `cpu_ram_efficient_loading` only
  reaches `from_pretrained` when ACCELERATE_USE_FSDP is set too (accelerate's launcher sets it, torchrun does
  not). mode_environment returns those variables.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

from hyperjob.fsutil import write_json

PARALLEL_MODES: tuple[str, ...] = ("ddp", "fsdp2", "deepspeed-zero2", "deepspeed-zero3")
DEEPSPEED_CONFIG_NAME = "deepspeed.json"  # written into the run directory; TrainingArguments(deepspeed=<path>)
_ZERO_STAGE = {"deepspeed-zero2": 2, "deepspeed-zero3": 3}


def _check_mode(mode: str) -> None:
    if mode not in PARALLEL_MODES:
        raise ValueError(f"parallel.mode {mode!r} is not one of {', '.join(PARALLEL_MODES)}")


def is_deepspeed(mode: str) -> bool:
    return mode in _ZERO_STAGE


def shards_parameters(mode: str) -> bool:
    """Whether each process holds only a shard of the weights. Then the loader must not put the whole model on
    every GPU (no `device_map` of the local rank): FSDP2 and ZeRO-3 place the weights themselves."""
    return mode in ("fsdp2", "deepspeed-zero3")


def _checkpointing_arg() -> str:
    """transformers 5 renamed gradient_checkpointing to activation_checkpointing (as train_args.hf_arguments)."""
    try:
        major = int(importlib.metadata.version("transformers").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        major = 4
    return "activation_checkpointing" if major >= 5 else "gradient_checkpointing"


def fsdp_config(*, gradient_checkpointing: bool, decoder_layer: str | None = None) -> dict[str, Any]:
    """TrainingArguments.fsdp_config for FSDP2.

    One FSDP unit per decoder layer: all-gathers overlap the previous layer's compute and peak memory is one
    layer's full weights. Without `decoder_layer` accelerate takes the model's `_no_split_modules`
    (LlamaDecoderLayer for Llama, MistralDecoderLayer for Mistral), so no architecture is pinned here.
    """
    config: dict[str, Any] = {
        "version": 2,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "reshard_after_forward": True,  # free each layer's gathered weights after its forward: the FSDP2 memory win
        "state_dict_type": "FULL_STATE_DICT",  # checkpoints and saves hold whole tensors, loadable anywhere
        # Local rank 0 reads the checkpoint; the others start on the meta device and get the weights by broadcast,
        # so a node holds one host copy of the model instead of one per GPU.
        "cpu_ram_efficient_loading": True,
        # FSDP's own checkpoint wrapper around each decoder layer: the Trainer's gradient checkpointing would
        # all-gather each layer's weights a second time in the backward pass.
        "activation_checkpointing": gradient_checkpointing,
    }
    if decoder_layer:
        config["transformer_layer_cls_to_wrap"] = [decoder_layer]
    return config


def deepspeed_config(mode: str, *, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed JSON for ZeRO stage 2 or 3.

    "auto" values are filled by transformers from TrainingArguments and the model (batch sizes, accumulation,
    clipping, bucket sizes from hidden_size), so the JSON never disagrees with the trainer. No optimizer or
    scheduler block: the Trainer builds the same AdamW and schedule as under ddp and hands them to DeepSpeed.
    No CPU offload: a LoRA run's optimizer state is the adapter's, a few MB, so offloading it saves nothing and
    costs a host round trip per step; parameter offload (ZeRO-3) would only matter for a base model that does not
    fit sharded over the GPUs, which the planner's memory estimate rules out before launch.
    """
    _check_mode(mode)
    stage = _ZERO_STAGE.get(mode)
    if stage is None:
        raise ValueError(f"parallel.mode {mode!r} does not use DeepSpeed")
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if stage == 3:
        zero |= {
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            # save_model / get_state_dict gather the whole 16-bit weights on rank 0 instead of refusing to save.
            "stage3_gather_16bit_weights_on_model_save": True,
        }
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        # Explicit, not "auto": transformers raises if it disagrees with TrainingArguments.bf16, which catches a
        # plan whose dtype choice drifted from the trainer's.
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
    }


def write_deepspeed_config(mode: str, path: Path, *, bf16: bool) -> Path:
    """Write deepspeed_config(mode) to `path` atomically (every rank may call it; the content is identical)."""
    write_json(path, deepspeed_config(mode, bf16=bf16))
    return path


def mode_arguments(
    mode: str,
    *,
    gradient_checkpointing: bool,
    activation_offload: bool,
    bf16: bool,
    deepspeed_config_path: str,
    decoder_layer: str | None = None,
) -> dict[str, Any]:
    """The TrainingArguments kwargs the mode adds to (or overrides in) train_args.hf_arguments' trainer config.

    `activation_offload` changes no argument: under fsdp2 it is an environment variable (mode_environment);
    `bf16` matters only for DeepSpeed, whose JSON (written to `deepspeed_config_path`) must agree with it.
    """
    _check_mode(mode)
    if mode == "ddp":
        return {}
    if mode == "fsdp2":
        args: dict[str, Any] = {
            "fsdp": True,
            "fsdp_config": fsdp_config(gradient_checkpointing=gradient_checkpointing, decoder_layer=decoder_layer),
        }
        if gradient_checkpointing:  # FSDP checkpoints the layers itself (see fsdp_config)
            args[_checkpointing_arg()] = False
        return args
    return {"deepspeed": deepspeed_config_path}


def mode_environment(mode: str, *, activation_offload: bool) -> dict[str, str]:
    """Environment variables the train processes need before TrainingArguments and the model are built.

    fsdp2: ACCELERATE_USE_FSDP and FSDP_CPU_RAM_EFFICIENT_LOADING make `from_pretrained` load real weights on
    local rank 0 only (transformers checks both); FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD turns on accelerate's
    offload of each checkpointed layer's input to host memory, which TrainingArguments does not forward from
    fsdp_config. Under ddp and DeepSpeed, activation offload is the train stage's own (not a launch setting).
    """
    _check_mode(mode)
    if mode != "fsdp2":
        return {}
    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}
    if activation_offload:
        env["FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD"] = "true"
    return env


FSDP_DEVICES = ("cuda", "neuron")  # accelerate turns ACCELERATE_USE_FSDP into FSDP on MULTI_GPU and MULTI_NEURON


def mode_problems(mode: str, backend_device: str, world_size: int, quantize: str) -> list[str]:
    """Why `mode` cannot (or should not) run here; empty when it can. Each message says what to change."""
    if mode not in PARALLEL_MODES:
        return [f"parallel.mode {mode!r} is not one of {', '.join(PARALLEL_MODES)}"]
    if mode == "ddp":
        return []
    problems: list[str] = []
    devices = ("cuda",) if is_deepspeed(mode) else FSDP_DEVICES
    if backend_device not in devices:
        if is_deepspeed(mode):
            why = "DeepSpeed ZeRO runs on CUDA GPUs only (transformers turns it off on CPU)"
        else:
            why = "accelerate applies FSDP only on GPUs and Neuron: on CPU the Trainer would silently train DDP"
        problems.append(
            f"parallel.mode {mode!r} needs backend device {' or '.join(devices)}, not {backend_device!r}: {why}"
        )
    if world_size < 2:
        problems.append(
            f"parallel.mode {mode!r} shards over the training processes, and this run has {world_size}: nothing "
            "is sharded and only communication is added; use parallel.mode ddp"
        )
    if quantize == "nf4" and mode == "fsdp2":
        problems.append(
            "model.quantize nf4 with parallel.mode fsdp2: accelerate's FSDP2 leaves bitsandbytes' uint8 4-bit "
            "weights unsharded (a replica per GPU, as with ddp) and loses their quantization state when they are "
            "stored as bf16; use deepspeed-zero2 (or ddp) for QLoRA"
        )
    if quantize == "nf4" and mode == "deepspeed-zero3":
        problems.append(
            "model.quantize nf4 with parallel.mode deepspeed-zero3: ZeRO-3 partitions bitsandbytes 4-bit weights "
            "only when they are stored as bfloat16 (bnb_4bit_quant_storage) and loaded outside zero.Init, which "
            "the nf4 loader does not promise; use deepspeed-zero2, which keeps one 4-bit replica per GPU"
        )
    return problems
