"""The Trainium train entry: optimum-neuron 0.4.5's NeuronSFTTrainer with LoRA, tensor parallel over NeuronCores.

Run by hyperjob.stages.train (Runtime.trainer of backend neuron) in every torchrun process, with the Neuron venv's
interpreter; the compile stage runs the same code with the same arguments under neuron_parallel_compile. The
arguments are the pure `neuron_arguments` (what `--print-args` shows); the data is the cpu/cuda entry's (same
formatting, prompt masking and packing), padded to exactly training.seq_len so every step has the compiled shape.
optimum is imported only here, inside `train`: nothing else in hyperjob needs the Neuron stack.
"""

from __future__ import annotations

import math
import time
from typing import Any

from hyperjob.backends.neuron_env import XLA
from hyperjob.config.models import HyperjobConfig
from hyperjob.fsutil import write_json
from hyperjob.paths import RunPaths, base_model_dir
from hyperjob.stages.common import (
    SUMMARY_NAME,
    StageError,
    last_logged_loss,
    read_token,
    require_model_dir,
    require_pinned_environment,
    setup_logging,
    world_size,
)
from hyperjob.stages.lora_check import check_lora_applied
from hyperjob.stages.resume import ResumePoint, incomplete_checkpoints


def refuse_resume(paths: RunPaths, point: ResumePoint | None) -> None:
    """optimum-neuron 0.4.5 cannot resume (its trainer raises on resume_from_checkpoint, and its LoRA checkpoints
    hold no optimizer state): stop rather than train from step 0 over checkpoints a requeue or auto-resume left."""
    if point is not None:
        raise StageError(
            f"this run already has {point.describe()}, and optimum-neuron 0.4.5 cannot resume training: stopping "
            f"instead of restarting from step 0 over {paths.checkpoints}. To keep the work: `hyperjob consolidate "
            f"{point.checkpoint}` gives its adapter; to train again from step 0, move {paths.checkpoints} away "
            "and resubmit the train stage"
        )
    partial = incomplete_checkpoints(paths.checkpoints)
    if partial:
        raise StageError(
            f"{partial[-1]} is an interrupted save (no trainer_state.json); move it away before training again, "
            "so that no checkpoint is overwritten"
        )


def check_trn_config(trn_config: Any, expected: dict[str, Any]) -> None:
    """The parallel layout upstream built must be the one we planned (TP, PP, KV-head replication)."""
    for name, want in expected.items():
        got = getattr(trn_config, name, None)
        if got != want:
            raise StageError(f"optimum-neuron set {name}={got!r}, but the plan needs {want!r}")


def neuron_config(arguments: dict[str, Any]) -> Any:
    """The real NeuronSFTConfig from the pure arguments; its trn_config must carry the planned layout."""
    from optimum.neuron import NeuronSFTConfig

    args = NeuronSFTConfig(**arguments["trainer_config"])  # initialises torch.distributed and the model parallel state
    check_trn_config(args.trn_config, arguments["expected_trn_config"])
    return args


def load_model(arguments: dict[str, Any], trn_config: Any) -> Any:
    """The TRAINING NeuronModelForCausalLM (optimum/neuron/models/training, not the top-level inference class)."""
    import torch
    from optimum.neuron.models.training import NeuronModelForCausalLM

    loader = arguments["model_loader"]
    dtype = getattr(torch, loader["kwargs"]["torch_dtype"])
    model = NeuronModelForCausalLM.from_pretrained(loader["path"], trn_config, torch_dtype=dtype)
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    return model


def make_trainer(arguments: dict[str, Any], args: Any, model: Any, examples: list[Any], tokenizer: Any) -> Any:
    """NeuronSFTTrainer with peft's LoraConfig and hyperjob's own encoded examples, padded to exactly max_length
    (XLA compiles one graph per shape); upstream's dataset preparation is skipped (dataset_kwargs)."""
    from optimum.neuron import NeuronSFTTrainer
    from peft import LoraConfig

    from hyperjob.stages.data import PadCollator, pad_id_of

    return NeuronSFTTrainer(
        model=model,
        args=args,
        train_dataset=examples,
        processing_class=tokenizer,
        peft_config=LoraConfig(**arguments["lora_config"]),
        data_collator=PadCollator(pad_id_of(tokenizer), length=arguments["trainer_config"]["max_length"]),
    )


def train(paths: RunPaths, cfg: HyperjobConfig, compile_only: bool = False) -> int:
    from hyperjob.stages.train import resume_of, train_arguments

    log = setup_logging("compile" if compile_only else "train")
    started = time.monotonic()
    require_pinned_environment(XLA)
    arguments = train_arguments(paths, cfg, compile_only)
    if not compile_only:
        refuse_resume(paths, resume_of(paths, cfg))
    base = base_model_dir(cfg)
    require_model_dir(base, "base model", "run the download stage first")

    from transformers import AutoTokenizer, set_seed

    from hyperjob.stages.data import build_train_examples

    args = neuron_config(arguments)
    log.info("world size %d: %s", world_size(), arguments["expected_trn_config"])

    tokenizer = AutoTokenizer.from_pretrained(base)
    t = cfg.training
    # optimum-neuron's attention is plain causal (no sequence-ID masking): packing keeps the concatenated layout.
    examples, stats = build_train_examples(
        cfg.dataset, tokenizer, t.seq_len, t.packing, token=read_token(cfg.model), packing_mode="concat"
    )
    log.info("data: %d rows -> %d examples%s", stats.rows, len(examples), " packed" if t.packing else "")

    set_seed(t.seed)  # before LoRA's weights are drawn: the same seed gives the same run
    trainer = make_trainer(arguments, args, load_model(arguments, args.trn_config), examples, tokenizer)
    trainable, total = check_lora_applied(trainer.model)
    log.info("LoRA r=%d: %d trainable of %d parameters on this rank", cfg.lora.r, trainable, total)

    result = trainer.train()
    if not compile_only and trainer.is_world_process_zero():
        final_loss = last_logged_loss(trainer.state.log_history)
        mean = getattr(result, "training_loss", None)
        summary = {
            "steps": trainer.state.global_step,
            "final_loss": final_loss,
            "mean_loss": None if mean is None or math.isnan(mean) else mean,
            "world_size": world_size(),
            "wall_time_s": round(time.monotonic() - started, 2),
            "backend": cfg.backend,
            "dtype": arguments["model_loader"]["kwargs"]["torch_dtype"],
            "trainable_parameters_per_rank": trainable,
            "train_examples": len(examples),
        }
        write_json(paths.run_dir / SUMMARY_NAME, summary)
        log.info("checkpoints in %s; summary %s", paths.checkpoints, paths.run_dir / SUMMARY_NAME)
    return 0
