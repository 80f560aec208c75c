"""Train stage (cpu and cuda backends): LoRA fine-tuning with `transformers.Trainer`, resumable.

Launched as `torchrun ... -m hyperjob.stages.train --run-dir RUN_DIR`; every process runs this module and
Trainer/accelerate provide data parallelism (gloo on CPU, NCCL on GPUs). Checkpoints go to
`RunPaths.checkpoints`; a rerun (for example after a Slurm requeue) resumes from the newest complete one.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import re
import time
from pathlib import Path
from typing import Any

from hyperjob import backends, stage_table
from hyperjob.backends.base import Runtime
from hyperjob.config.models import HyperjobConfig
from hyperjob.fsutil import atomic_dir, write_json
from hyperjob.paths import RunPaths, base_model_dir
from hyperjob.stages.common import (
    StageError,
    dtype_kwargs,
    read_token,
    require_model_dir,
    run_stage,
    setup_logging,
    world_size,
)

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
SUMMARY_NAME = "train_summary.json"


def newest_checkpoint(checkpoints: Path) -> Path | None:
    """The highest-numbered `checkpoint-N` whose trainer_state.json exists (Trainer writes it last)."""
    if not checkpoints.is_dir():
        return None
    found = []
    for p in checkpoints.iterdir():
        m = _CHECKPOINT.match(p.name)
        if m and p.is_dir() and (p / "trainer_state.json").is_file():
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


def _training_arguments(cfg: HyperjobConfig, paths: RunPaths, runtime: Runtime, use_bf16: bool) -> Any:
    import transformers

    t = cfg.training
    fields = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    kwargs: dict[str, Any] = {
        "output_dir": str(paths.checkpoints),
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
        "bf16": use_bf16,
        "report_to": "none",
        "remove_unused_columns": False,  # our collator already yields exactly the model's inputs
        "disable_tqdm": True,  # progress bars garble Slurm logs; the printer callback logs each step instead
        "ddp_find_unused_parameters": False,
        "include_num_input_tokens_seen": "non_padding",
    }
    # transformers 5.x renamed gradient_checkpointing to activation_checkpointing (old name deprecated).
    gc_name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    kwargs[gc_name] = t.gradient_checkpointing
    if t.gradient_checkpointing:
        kwargs[f"{gc_name}_kwargs"] = {"use_reentrant": False}  # reentrant checkpointing loses LoRA grads
    if runtime.device == "cpu":
        kwargs["use_cpu"] = True
    if world_size() > 1:  # the backend's choice, not accelerate's guess from the device
        kwargs["ddp_backend"] = runtime.distributed
    return transformers.TrainingArguments(**kwargs)


def _load_model(base: Path, cfg: HyperjobConfig, runtime: Runtime, dtype: Any) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = dtype_kwargs(dtype)
    if runtime.load_on_local_rank:  # straight onto this rank's device: N ranks x a full host copy can exhaust memory
        kwargs.update(device_map={"": int(os.environ.get("LOCAL_RANK", "0"))}, low_cpu_mem_usage=True)
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as e:
        raise StageError(f"lora.target_modules {list(cfg.lora.target_modules)} do not fit {base}: {e}") from None


def _name(dtype: Any) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def _last_logged_loss(log_history: list[dict[str, Any]]) -> float | None:
    for entry in reversed(log_history):
        if "loss" in entry:
            return float(entry["loss"])
    return None


def _train(paths: RunPaths, cfg: HyperjobConfig, *, compile_only: bool = False) -> int:
    log = setup_logging("train")
    runtime = backends.get(cfg.backend).runtime
    if runtime.train_unavailable:
        raise StageError(runtime.train_unavailable)
    if compile_only and not stage_table.spec("compile").available_for(cfg.backend):
        raise StageError(f"--compile precompiles Neuron graphs; it does not apply to backend {cfg.backend!r}")
    started = time.monotonic()
    base = base_model_dir(cfg)
    require_model_dir(base, "base model", "run the download stage first")

    import torch
    from transformers import AutoTokenizer, Trainer
    from transformers.utils import logging as hf_logging

    from hyperjob.stages.data import PadCollator, build_train_examples, pad_id_of

    hf_logging.disable_progress_bar()  # per-tensor loading bars from every rank drown the step logs

    if runtime.device == "cuda" and not torch.cuda.is_available():
        raise StageError(f"backend is {cfg.backend!r} but torch sees no CUDA device on this node")
    use_bf16 = runtime.bf16 and cfg.training.bf16
    dtype = torch.bfloat16 if use_bf16 else torch.float32
    if cfg.training.bf16 and not runtime.bf16:
        log.info("training.bf16 is ignored on the %s backend: training in float32", cfg.backend)

    log.info("starting: world size %d, backend %s, base %s", world_size(), cfg.backend, base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    t = cfg.training
    examples, stats = build_train_examples(cfg.dataset, tokenizer, t.seq_len, t.packing, token=read_token(cfg.model))
    packed = " packed" if t.packing else ""
    log.info("data: %d rows -> %d examples%s", stats.rows, len(examples), packed)
    log.info(
        "%d rows truncated to %d tokens, %d skipped (no answer token left)",
        stats.truncated,
        t.seq_len,
        stats.skipped_no_labels,
    )

    args = _training_arguments(cfg, paths, runtime, use_bf16)
    mode = f"DDP over {torch.distributed.get_backend()}" if args.world_size > 1 else "single process"
    log.info("world size %d (%s), dtype %s", args.world_size, mode, _name(dtype))

    model = _load_model(base, cfg, runtime, dtype)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA r=%d: %d trainable of %d parameters", cfg.lora.r, trainable, model.num_parameters())

    resume = newest_checkpoint(paths.checkpoints)
    if resume is not None:
        log.info("resuming from %s", resume)
    else:
        log.info("no complete checkpoint in %s: starting from step 0", paths.checkpoints)

    collator = PadCollator(pad_id_of(tokenizer), pad_to_multiple_of=runtime.pad_to_multiple_of)
    trainer = Trainer(
        model=model, args=args, train_dataset=examples, data_collator=collator, processing_class=tokenizer
    )
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)

    if trainer.is_world_process_zero():
        with atomic_dir(paths.adapter) as tmp:
            model.save_pretrained(tmp)  # the PeftModel: adapter weights and config only
            tokenizer.save_pretrained(tmp)
        state = trainer.state
        final_loss = _last_logged_loss(state.log_history)
        summary = {
            "steps": state.global_step,
            "final_loss": final_loss if final_loss is not None else result.training_loss,
            "mean_loss": None if math.isnan(result.training_loss) else result.training_loss,
            "world_size": args.world_size,
            "wall_time_s": round(time.monotonic() - started, 2),
            "train_runtime_s": result.metrics.get("train_runtime"),
            "tokens_seen": int(state.num_input_tokens_seen),
            "resumed_from": resume.name if resume else None,
            "backend": cfg.backend,
            "dtype": _name(dtype),
            "data": dataclasses.asdict(stats),
            "train_examples": len(examples),
        }
        write_json(paths.run_dir / SUMMARY_NAME, summary)
        log.info("adapter saved to %s; summary %s", paths.adapter, paths.run_dir / SUMMARY_NAME)
    _finish_distributed()
    return 0


def _finish_distributed() -> None:
    """Every rank waits for rank 0's saves, then leaves the process group together.

    A rank that simply exits while another still works can abort in the communication library's teardown
    ("terminate called without an active exception", SIGABRT), failing a stage whose training succeeded.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    # --compile: the compile stage's run of the same entry under neuron_parallel_compile (Trainium only).
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--compile", action="store_true")
    known, rest = flags.parse_known_args(argv)
    return run_stage("train", functools.partial(_train, compile_only=known.compile), rest, __doc__ or "")


if __name__ == "__main__":
    raise SystemExit(main())
