"""Train stage: LoRA fine-tuning, the entry of every backend.

Launched as `torchrun ... -m hyperjob.stages.train --run-dir RUN_DIR`; every process runs this module. The
backend's arguments (trainer config, LoRA config, model loader) are built as data by the backend, so
`--print-args` shows them without importing torch; the backend's Runtime.trainer trains (Trainium:
hyperjob.stages.train_neuron). The transformers Trainer here serves cpu and cuda: Trainer/accelerate provide data
parallelism (gloo on CPU, NCCL on GPUs), checkpoints go to `RunPaths.checkpoints`, and a rerun (for example after
a Slurm requeue) resumes from the newest complete one.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hyperjob import backends, stage_table
from hyperjob.config.models import HyperjobConfig
from hyperjob.fsutil import write_json
from hyperjob.paths import RunPaths, base_model_dir
from hyperjob.plan.planner import make_plan, total_steps
from hyperjob.stages.common import (
    STOPPED_EARLY,
    SUMMARY_NAME,
    StageError,
    dtype_kwargs,
    last_logged_loss,
    rank,
    read_token,
    require_model_dir,
    require_pinned_environment,
    run_stage,
    setup_logging,
    world_size,
)
from hyperjob.stages.lora_check import check_lora_applied
from hyperjob.stages.resume import ResumePoint, resume_point


def _training_arguments(args: dict[str, Any], cfg: HyperjobConfig) -> Any:
    import transformers

    from hyperjob.backends.parallel_modes import is_deepspeed, write_deepspeed_config

    trainer_config = args["trainer_config"]
    if is_deepspeed(cfg.parallel.mode):  # TrainingArguments reads the JSON when it is built
        write_deepspeed_config(cfg.parallel.mode, Path(trainer_config["deepspeed"]), bf16=trainer_config["bf16"])
    return transformers.TrainingArguments(**trainer_config)


def _load_model(base: Path, cfg: HyperjobConfig, args: dict[str, Any], dtype: Any) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from hyperjob.longctx.rope import apply_to_config

    loader = args["model_loader"]
    kwargs: dict[str, Any] = {**loader["kwargs"], **dtype_kwargs(dtype)}
    if kwargs.get("device_map") == "local rank":  # straight onto this rank's device: N ranks x a host copy is a lot
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    if "quantization_config" in kwargs:
        kwargs["quantization_config"] = _nf4_config(kwargs["quantization_config"])
    if loader.get("config_overrides"):
        config = AutoConfig.from_pretrained(base)
        apply_to_config(config, loader["config_overrides"])
        kwargs["config"] = config
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    if "quantization_config" in kwargs:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.training.gradient_checkpointing)
    try:
        return get_peft_model(model, LoraConfig(**args["lora_config"]))
    except ValueError as e:
        raise StageError(f"lora.target_modules [{', '.join(cfg.lora.target_modules)}] do not fit {base}: {e}") from None


def _nf4_config(kwargs: dict[str, Any]) -> Any:
    """QLoRA's 4-bit loading; bitsandbytes is a CUDA-only extra, so say how to get it rather than fail deep inside."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise StageError("model.quantize: nf4 needs bitsandbytes on the training nodes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(**kwargs)


def _name(dtype: Any) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def train(paths: RunPaths, cfg: HyperjobConfig, compile_only: bool = False) -> int:
    """The transformers Trainer entry (backends cpu, cuda and torchneuron)."""
    log = setup_logging("train")
    backend = backends.get(cfg.backend)
    runtime = backend.runtime
    if backend.environment is not None:  # a pinned set (torchneuron): refuse a drifted venv before importing torch
        require_pinned_environment(backend.environment)
    started = time.monotonic()
    base = base_model_dir(cfg)
    require_model_dir(base, "base model", "run the download stage first")

    import torch
    import transformers
    from transformers import AutoTokenizer, Trainer
    from transformers.utils import logging as hf_logging

    from hyperjob.stages import train_longctx as longctx
    from hyperjob.stages.adapter_save import save_adapter
    from hyperjob.stages.curves import curves_callback
    from hyperjob.stages.data import PadCollator, build_train_examples, pad_id_of
    from hyperjob.stages.device import bind
    from hyperjob.stages.progress import progress_callback

    hf_logging.disable_progress_bar()  # per-tensor loading bars from every rank drown the step logs

    if runtime.device == "cuda" and not torch.cuda.is_available():
        raise StageError(f"backend is {cfg.backend!r} but torch sees no CUDA device on this node")
    bound = bind(runtime)  # out-of-tree devices (neuron): process group and device before TrainingArguments
    if bound is not None:
        log.info("device %s (local rank %s)", bound, os.environ.get("LOCAL_RANK", "0"))
    use_bf16 = runtime.bf16 and cfg.training.bf16
    dtype = torch.bfloat16 if use_bf16 else torch.float32
    if cfg.training.bf16 and not runtime.bf16:
        log.info("training.bf16 is ignored on the %s backend: training in float32", cfg.backend)

    longctx.check_kernel(cfg)
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

    arguments = train_arguments(paths, cfg)
    args = _training_arguments(arguments, cfg)
    mode = f"DDP over {torch.distributed.get_backend()}" if args.world_size > 1 else "single process"
    log.info("world size %d (%s), dtype %s", args.world_size, mode, _name(dtype))

    # Seed before the LoRA weights are drawn (Trainer seeds only when it is built, after the model): otherwise two
    # runs with the same seed start from different adapters and a resumed run cannot match an uninterrupted one.
    transformers.set_seed(cfg.training.seed)
    model = _load_model(base, cfg, arguments, dtype)
    trainable, total = check_lora_applied(model)
    log.info("LoRA r=%d: %d trainable of %d parameters", cfg.lora.r, trainable, total)

    point = resume_of(paths, cfg)
    resume = point.checkpoint if point else None
    if point is not None:
        log.info("resuming from %s", point.describe())
    else:
        log.info("no complete checkpoint in %s: starting from step 0", paths.checkpoints)

    collator = PadCollator(pad_id_of(tokenizer), pad_to_multiple_of=runtime.pad_to_multiple_of)
    stopper = stop_on_request(paths.stop_request)
    group = longctx.sequence_group(cfg)
    for line in longctx.prepare_model(model, cfg, group):
        log.info("%s", line)
    trainer_cls = longctx.trainer_class(cfg, group) if longctx.customised(cfg) else Trainer
    trainer = trainer_cls(
        model=model, args=args, train_dataset=examples, data_collator=collator, processing_class=tokenizer,
        callbacks=[*fault_callbacks(), stopper, curves_callback(paths.run_dir), progress_callback(paths.run_dir)],
    )  # fmt: skip
    if torch.distributed.is_initialized():
        _UNDESTROYED.append(trainer)  # its DDP reducer owns the process group: see _UNDESTROYED
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if stopper.stopped:
        if trainer.is_world_process_zero():
            paths.stopped.write_text(f"{trainer.state.global_step}\n")
            log.info("stopped on request at step %d with its checkpoint saved", trainer.state.global_step)
        _finish_distributed()
        return STOPPED_EARLY

    save_adapter(trainer, model, tokenizer, paths.adapter)  # every rank: FSDP and ZeRO-3 gather the shards
    if trainer.is_world_process_zero():
        state = trainer.state
        final_loss = last_logged_loss(state.log_history)
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
            **packing_summary(stats, cfg, args.world_size),
        }
        write_json(paths.run_dir / SUMMARY_NAME, summary)
        log.info("adapter saved to %s; summary %s", paths.adapter, paths.run_dir / SUMMARY_NAME)
    _finish_distributed()
    return 0


def packing_summary(stats: Any, cfg: HyperjobConfig, world: int) -> dict[str, Any]:
    """Pad fraction and real tokens per optimizer step of packed rows (None when not packed)."""
    if stats.pack is None:
        return {"pad_fraction": None, "tokens_per_step": None}
    t, dp = cfg.training, world // cfg.parallel.sequence
    per_step = stats.pack.tokens_per_step(t.micro_batch, t.grad_accum, dp)
    return {"pad_fraction": round(stats.pack.pad_fraction, 6), "tokens_per_step": round(per_step, 1)}


# After the outputs are saved, a process still alive this long is stuck in teardown and is ended with exit 0.
TEARDOWN_GRACE_S = 120.0
# Objects whose destruction can deadlock. torch's gloo process group joins its worker threads in its destructor with
# the GIL held, and a worker can need the GIL to free a tensor: seen in CI, a rank hung for good when `train`
# returned and the DDP reducer (which owns the group) was freed; the watchdog below could not help, as it needs the
# GIL too. So a distributed run keeps them until `main` has finished the stage and leaves with os._exit.
_UNDESTROYED: list[Any] = []


def _teardown_hung() -> None:
    print(
        f"hyperjob train: warning: rank {rank()} still shutting down {TEARDOWN_GRACE_S:.0f}s after its outputs were "
        "saved (a hung process-group teardown); exiting",
        file=sys.stderr,
        flush=True,
    )
    os._exit(0)


def _finish_distributed() -> None:
    """Every rank waits for rank 0's saves, then leaves the process group together.

    A rank that simply exits while another still works can abort in the communication library's teardown
    ("terminate called without an active exception", SIGABRT), failing a stage whose training succeeded. And a
    teardown can hang (seen once, on a rank of a job requeued after a node failure, after training had finished):
    a watchdog then ends the process, since its work is saved, instead of holding the job until its time limit.
    """
    import threading

    import torch.distributed as dist

    watchdog = threading.Timer(TEARDOWN_GRACE_S, _teardown_hung)
    watchdog.daemon = True  # never keeps a process alive; still fires during a hang at interpreter exit
    watchdog.start()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def stop_on_request(request: Path) -> Any:
    """A callback that, once `request` exists (the train script creates it when Slurm warns of the time limit),
    saves a checkpoint at the end of the current step and stops training. Every rank must stop at the same step, so
    the ranks agree on whether the file exists (a max over them) before acting."""
    import torch
    import torch.distributed as dist
    from transformers import TrainerCallback

    class StopOnRequest(TrainerCallback):
        stopped = False

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            asked = torch.tensor([int(request.exists())], device=args.device)
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(asked, op=dist.ReduceOp.MAX)
            if asked.item():
                control.should_save = True
                control.should_training_stop = True
                self.stopped = True

    return StopOnRequest()


FAULT_ENV = "HYPERJOB_FAULT_AFTER_SAVE"


def fault_callbacks() -> list[Any]:
    """A deliberate fault for the fault-tolerance tests: with HYPERJOB_FAULT_AFTER_SAVE=N in the environment, the
    stage fails right after saving the checkpoint of step N or later (the checkpoint is complete)."""
    value = os.environ.get(FAULT_ENV, "")
    if not value:
        return []
    if not value.isdigit():
        raise StageError(f"{FAULT_ENV}={value!r} must be a step number")
    from transformers import TrainerCallback

    class FailAfterSave(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step >= int(value):
                raise StageError(f"fault injected after saving step {state.global_step} ({FAULT_ENV}={value})")

    return [FailAfterSave()]


def resume_of(paths: RunPaths, cfg: HyperjobConfig) -> ResumePoint | None:
    """The newest complete checkpoint of this run and what it consumed (see hyperjob.stages.resume)."""
    plan = make_plan(cfg)
    return resume_point(
        paths.checkpoints,
        steps_per_epoch=plan.steps_per_epoch,
        grad_accum=plan.grad_accum,
        global_batch=plan.global_batch,
        total_steps=total_steps(plan, cfg),
    )


def train_arguments(paths: RunPaths, cfg: HyperjobConfig, compile_only: bool = False) -> dict[str, Any]:
    """The backend's trainer, LoRA and loader arguments for this run (pure: no torch or optimum import)."""
    return backends.get(cfg.backend).train_arguments(cfg, make_plan(cfg).layout(), paths, compile_only)


def _dispatch(paths: RunPaths, cfg: HyperjobConfig, *, compile_only: bool, print_args: bool) -> int:
    """--print-args prints the arguments as JSON; otherwise the backend's trainer runs."""
    if compile_only and not stage_table.spec("compile").available_for(cfg.backend):
        raise StageError(f"--compile precompiles Neuron graphs; it does not apply to backend {cfg.backend!r}")
    if print_args:
        print(json.dumps(train_arguments(paths, cfg, compile_only), indent=2, sort_keys=True))
        return 0
    runtime = backends.get(cfg.backend).runtime
    trainer: Callable[[RunPaths, HyperjobConfig, bool], int] = (
        importlib.import_module(runtime.trainer).train if runtime.trainer else train
    )
    return trainer(paths, cfg, compile_only)


def main(argv: list[str] | None = None) -> int:
    # --compile: the compile stage's run of the same entry under neuron_parallel_compile (Trainium only).
    # --print-args: print the trainer/LoRA/loader keyword arguments as JSON, import no torch, train nothing.
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--compile", action="store_true")
    flags.add_argument("--print-args", action="store_true")
    known, rest = flags.parse_known_args(argv)
    body = functools.partial(_dispatch, compile_only=known.compile, print_args=known.print_args)
    rc = run_stage("train", body, rest, __doc__ or "", skip_done=not known.print_args, mark=not known.print_args)
    if _UNDESTROYED:  # a distributed run, its outputs saved and the stage marked: leave without destructors
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
