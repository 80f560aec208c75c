"""Backend `cuda`: torchrun over NCCL, one process per GPU of the instance type.

Owns the multi-GPU launch modes (DDP, FSDP2, DeepSpeed ZeRO-2/3), Ulysses sequence parallelism, QLoRA (bitsandbytes
4-bit, CUDA only) and the fused loss kernels (Liger, cut-cross-entropy: Triton, CUDA only).
"""

from __future__ import annotations

from hyperjob.backends.base import TRAIN_GROUP, Backend, Runtime
from hyperjob.backends.parallel_modes import mode_environment
from hyperjob.config.models import HyperjobConfig
from hyperjob.stage_table import StageSpec


class CudaBackend(Backend):
    name = "cuda"
    accelerator = "cuda"
    parallelism = frozenset({"sequence"})
    parallel_modes = frozenset({"ddp", "fsdp2", "deepspeed-zero2", "deepspeed-zero3"})
    quantizations = frozenset({"none", "nf4"})
    loss_kernels = frozenset({"standard", "chunked", "liger", "cut-cross-entropy"})
    runtime = Runtime(device="cuda", distributed="nccl", bf16=True, pad_to_multiple_of=8, load_on_local_rank=True)

    def env(self, cfg: HyperjobConfig, stage: StageSpec) -> list[tuple[str, str]]:
        env = super().env(cfg, stage)
        if stage.distributed:
            # NCCL errors end the job instead of hanging it until the time limit.
            env += [("NCCL_DEBUG", "WARN"), ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")]
        if stage.group == TRAIN_GROUP:  # what accelerate reads from the environment only (FSDP2 loading, offload)
            t = cfg.training
            env += sorted(mode_environment(cfg.parallel.mode, activation_offload=t.activation_offload).items())
        return env


BACKEND = CudaBackend()
